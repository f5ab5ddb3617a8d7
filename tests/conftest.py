"""Shared helpers: a tiny real-CarRacing config and a subprocess runner for the stage scripts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# The models trained inside the test process are tiny: a second torch thread costs more in synchronisation than it
# computes. Measured on this 2-core machine while the other core was busy: the actor-critic learning test took 41 s
# with one thread and over 300 s with two. The stage scripts run as subprocesses with their configs' threads.
torch.set_num_threads(1)

STAGES = [
    "01_generate_rollouts",
    "02_train_nvae",
    "03_encode_latents",
    "04_train_mdnrnn",
    "05_train_controller",
    "06_evaluate",
]

# Every stage on real CarRacing-v3, as small as it can be and still exercise each path. The env's time limit is
# 100 steps instead of 1000: every full episode (05's held-out re-evaluations, the dream's length) stays short.
TINY = {
    "seed": 7,
    "env": {"id": "CarRacing-v3", "frame_size": 64, "max_episode_steps": 100},
    "rollouts": {"episodes": 3, "max_steps": 40, "workers": 2},
    "vision": {"z_dim": 8, "epochs": 1, "batch_size": 16, "val_frames": 32, "threads": 1},
    "latents": {"batch_size": 64},
    "memory": {"hidden": 16, "gaussians": 3, "seq_len": 8, "batch_size": 4, "epochs": 1, "threads": 1},
    "controller": {
        "popsize": 4, "rollouts_per_candidate": 1, "generations": 2, "max_steps": 30,
        "early_stop_steps": 20, "eval_every": 2, "eval_episodes": 1, "workers": 2,
    },
    "evaluate": {"episodes": 3, "max_steps": 40, "workers": 2, "recon_frames": 4, "fid_frames": 8},
}


class CreatesAFile:
    """Unpickling this object creates `path`: what a crafted checkpoint or state would do if it were ever
    loaded with pickle. Tests write it into files the pipeline reads and check the file never appears."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def write_config(folder, run_dir, **sections) -> str:
    """Write TINY (with `sections` merged in) to folder/config.yaml; return its path."""
    data = {"run_dir": str(run_dir), **{k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY.items()}}
    for key, value in sections.items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    path = os.path.join(str(folder), "config.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(data, f)
    return path


def run_script(stage: str, config: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python <stage>.py --config <config> <args>` from the repo root."""
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, f"{stage}.py"), "--config", config, *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


def assert_user_error(proc: subprocess.CompletedProcess, *must_contain: str) -> str:
    """A bad-input failure: exit 2, no traceback, one `error:` line naming what is wrong."""
    assert proc.returncode == 2, f"exit {proc.returncode}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    for text in must_contain:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """All six stages run once on the tiny config; tests read (never write) its artifacts."""
    folder = tmp_path_factory.mktemp("tiny")
    run_dir = folder / "run"
    config = write_config(folder, run_dir)
    outputs = {}
    for stage in STAGES:
        proc = run_script(stage, config)
        assert_ok(proc)
        outputs[stage] = proc
    return {"config": config, "run_dir": str(run_dir), "outputs": outputs, "folder": str(folder)}


NVAE_TINY = {  # the paper's options on: the logistic mixture likelihood and a posterior flow
    "kind": "nvae", "z_dim": 16, "epochs": 1, "batch_size": 16, "val_frames": 16, "threads": 1,
    "likelihood": "logistic_mixture", "mixtures": 2,
    "nvae": {"channels": 4, "preprocess_blocks": 2, "latent_scales": 3, "groups_per_scale": 1, "latent_channels": 1,
             "num_flows": 1},
}


@pytest.fixture(scope="session")
def tiny_nvae_run(tiny_run, tmp_path_factory):
    """Stages 02-06 with vision.kind=nvae on the rollouts of `tiny_run`."""
    import shutil

    folder = tmp_path_factory.mktemp("tiny_nvae")
    run_dir = folder / "run"
    shutil.copytree(os.path.join(tiny_run["run_dir"], "rollouts"), run_dir / "rollouts")
    config = write_config(folder, run_dir, vision=NVAE_TINY, evaluate={"episodes": 2, "max_steps": 30})
    for stage in STAGES[1:]:
        assert_ok(run_script(stage, config))
    return {"config": config, "run_dir": str(run_dir)}
