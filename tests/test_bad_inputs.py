"""Bad input, table-driven: every kind of bad input stops its stage with one line and touches nothing.

The contract (README): bad input stops a stage with exactly one stderr line
`error: <file or key>: <what was expected>`, exit status 2, no traceback, and
nothing on disk is written or changed.

Each row of CASES is (id, prepare, texts):

- `prepare(tmp_path, tiny, keep)` builds one bad input under tmp_path: a copy
  of the parts of the session's `tiny_run` it needs (never its run_dir itself:
  small files are copied, large read-only checkpoints hard-linked, and a file
  to be made bad is always written as a new file) plus the bad config key or
  file, and returns (stage name, config path, extra arguments). `keep` is an
  ExitStack that stays open until after the second snapshot, for what must
  outlive `prepare` (a lock held, a permission to restore).
- `texts`: what the one `error:` line must contain (the file or key, and what
  was expected).

The test snapshots all of tmp_path (every file: size, mtime_ns, sha256; every
folder), runs the stage, checks the failure with `assert_user_error` (exit 2,
no traceback, one `error:` line) and that stderr holds that line only, then
snapshots again: the two must be equal (nothing written, changed or deleted,
no new empty folder), and no crafted pickle may have run (MARKER absent).

Every case stops before any work is done (no training, no episode), so each
costs one interpreter start.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from conftest import CreatesAFile, assert_user_error, run_script, write_config

MARKER = "payload_ran"  # a crafted pickle, if ever loaded, creates tmp_path/MARKER


# --- helpers -----------------------------------------------------------------------------------------------------


def snapshot(folder) -> tuple[dict, set]:
    """({relative file path: (size, mtime_ns, sha256)}, {relative folder path}) of everything under folder."""
    files, dirs = {}, set()
    for root, dirnames, filenames in os.walk(folder):
        for d in dirnames:
            dirs.add(os.path.relpath(os.path.join(root, d), folder))
        for f in filenames:
            path = os.path.join(root, f)
            st = os.stat(path)
            with open(path, "rb") as fh:
                digest = hashlib.file_digest(fh, "sha256").hexdigest()
            files[os.path.relpath(path, folder)] = (st.st_size, st.st_mtime_ns, digest)
    return files, dirs


def assert_unchanged(before: tuple[dict, set], after: tuple[dict, set]) -> None:
    (files0, dirs0), (files1, dirs1) = before, after
    problems = [f"new file {p}" for p in sorted(files1.keys() - files0.keys())]
    problems += [f"deleted file {p}" for p in sorted(files0.keys() - files1.keys())]
    problems += [f"changed file {p}: {files0[p][:2]} -> {files1[p][:2]}"
                 for p in sorted(files0.keys() & files1.keys()) if files0[p] != files1[p]]
    problems += [f"new folder {d}" for d in sorted(dirs1 - dirs0)]
    problems += [f"deleted folder {d}" for d in sorted(dirs0 - dirs1)]
    assert not problems, "the stage touched the disk: " + "; ".join(problems)


def _link_or_copy(src: str, dst: str) -> str:
    """Hard-link files over 1 MiB (checkpoints the stage only reads), copy the rest (with their mtimes)."""
    if os.path.getsize(src) > 1 << 20:
        os.link(src, dst)
        return dst
    return shutil.copy2(src, dst)


def copy_stages(tiny: dict, run_dir, *stages: str) -> None:
    """Copy <tiny run>/<stage> to run_dir/<stage> for each stage folder (latest.pt left out: no case reads it)."""
    for stage in stages:
        shutil.copytree(os.path.join(tiny["run_dir"], stage), os.path.join(run_dir, stage),
                        copy_function=_link_or_copy, ignore=shutil.ignore_patterns("latest.pt"))


def read_npz(path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def write_npz(path, **arrays) -> None:
    """Replace `path` by a new file (unlink first: never write through a hard link into tiny_run)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    np.savez_compressed(str(path), **arrays)


def bad_rollout(change):
    """A case for stage 02: tiny_run's rollouts with episode_00001.npz replaced by change(arrays) -> arrays."""

    def prepare(tmp_path, tiny, keep):
        run_dir = tmp_path / "run"
        copy_stages(tiny, run_dir, "rollouts")
        path = run_dir / "rollouts" / "episode_00001.npz"
        write_npz(path, **change(read_npz(path)))
        return "02_train_nvae", write_config(tmp_path, run_dir), []

    return prepare


def config_error(stage: str, copied: tuple[str, ...] = (), args: tuple[str, ...] = (), **sections):
    """A case for `stage` whose config (TINY with `sections` merged in) or --set `args` is bad; the stage
    folders `copied` from tiny_run are there to show that none of them is touched."""

    def prepare(tmp_path, tiny, keep):
        run_dir = tmp_path / "run"
        copy_stages(tiny, run_dir, *copied)
        return stage, write_config(tmp_path, run_dir, **sections), list(args)

    return prepare


# --- the cases ---------------------------------------------------------------------------------------------------


def empty_config(tmp_path, tiny, keep):
    path = tmp_path / "config.yaml"
    path.write_text("")
    return "01_generate_rollouts", str(path), []


def config_without_run_dir(tmp_path, tiny, keep):
    import yaml

    config = write_config(tmp_path, tmp_path / "run")
    with open(config) as f:
        data = yaml.safe_load(f)
    del data["run_dir"]
    with open(config, "w") as f:
        yaml.safe_dump(data, f)
    return "01_generate_rollouts", config, []


def small_frames(d):
    return {**d, "obs": np.zeros((len(d["actions"]), 32, 32, 3), np.uint8)}


def zero_steps(d):
    return {**d, **{k: d[k][:0] for k in ("obs", "actions", "rewards", "terminated", "truncated")}}


def nan_reward(d):
    rewards = d["rewards"].copy()
    rewards[3] = np.nan
    return {**d, "rewards": rewards}


def no_actions(d):
    return {k: v for k, v in d.items() if k != "actions"}


def small_frames_for_stage_03(tmp_path, tiny, keep):
    run_dir = tmp_path / "run"
    copy_stages(tiny, run_dir, "rollouts", "vision")
    path = run_dir / "rollouts" / "episode_00001.npz"
    write_npz(path, **small_frames(read_npz(path)))
    return "03_encode_latents", write_config(tmp_path, run_dir), []


def nan_latents(tmp_path, tiny, keep):
    run_dir = tmp_path / "run"
    copy_stages(tiny, run_dir, "latents")
    path = run_dir / "latents" / "episode_00001.npz"
    arrays = read_npz(path)
    arrays["mu"] = np.full_like(arrays["mu"], np.nan)  # vision_sha256 and the other arrays kept
    write_npz(path, **arrays)
    return "04_train_mdnrnn", write_config(tmp_path, run_dir), []


def unknown_env_fresh_run(tmp_path, tiny, keep):
    return "01_generate_rollouts", write_config(tmp_path, tmp_path / "run", env={"id": "NoSuchEnv-v0"}), []


def unknown_env_evaluate(tmp_path, tiny, keep):
    run_dir = tmp_path / "run"
    copy_stages(tiny, run_dir, "vision", "mdnrnn", "controller", "eval")
    return "06_evaluate", write_config(tmp_path, run_dir, env={"id": "NoSuchEnv-v0"}), []


def read_only_parent(tmp_path, tiny, keep):
    parent = tmp_path / "read_only"
    parent.mkdir()
    config = write_config(tmp_path, parent / "run")
    parent.chmod(0o555)
    keep.callback(parent.chmod, 0o755)  # after the second snapshot, so that tmp_path can be cleaned up
    if os.access(parent, os.W_OK):
        pytest.skip("this user may write into a 0o555 folder (root ignores permissions): nothing to test")
    return "01_generate_rollouts", config, []


def crafted_vision_checkpoint(tmp_path, tiny, keep):
    run_dir = tmp_path / "run"
    copy_stages(tiny, run_dir, "rollouts")
    (run_dir / "vision").mkdir()
    torch.save(CreatesAFile(str(tmp_path / MARKER)), run_dir / "vision" / "best.pt")
    return "03_encode_latents", write_config(tmp_path, run_dir), []


def crafted_cmaes_state(payload: str):
    """A case for stage 05 with a controller/cmaes_state.npz that carries a pickle: the raw pickle bytes
    (payload="pickle"), or a real npz one of whose arrays is a pickled object array (payload="object array")."""

    def prepare(tmp_path, tiny, keep):
        run_dir = tmp_path / "run"
        copy_stages(tiny, run_dir, "vision", "mdnrnn", "controller")
        path = run_dir / "controller" / "cmaes_state.npz"
        crafted = CreatesAFile(str(tmp_path / MARKER))
        if payload == "pickle":
            path.unlink()
            path.write_bytes(pickle.dumps(crafted))
        else:
            arrays = read_npz(path)
            path.unlink()
            with open(path, "wb") as f:
                np.savez(f, **{**arrays, "told": np.array([crafted], dtype=object)})
        return "05_train_controller", write_config(tmp_path, run_dir), []

    return prepare


def stage_folder_in_use(tmp_path, tiny, keep):
    run_dir = tmp_path / "run"
    copy_stages(tiny, run_dir, "rollouts")
    lock_path = run_dir / "rollouts" / ".lock"
    lock_path.unlink()  # a new file: tiny_run's own .lock is never written
    lock = keep.enter_context(open(lock_path, "w"))
    lock.write("pid 123\n")
    lock.flush()
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held until after the second snapshot
    return "01_generate_rollouts", write_config(tmp_path, run_dir), []


def checkpoint_of_the_wrong_kind(tmp_path, tiny, keep):
    run_dir = tmp_path / "run"
    copy_stages(tiny, run_dir, "rollouts", "vision", "mdnrnn")
    return "03_encode_latents", write_config(tmp_path, run_dir), ["--vision", str(run_dir / "mdnrnn" / "best.pt")]


def init_from_of_another_size(tmp_path, tiny, keep):
    run_dir = tmp_path / "run"
    copy_stages(tiny, run_dir, "latents")
    copy_stages(tiny, tmp_path / "previous", "mdnrnn")  # hidden 16, as TINY
    config = write_config(tmp_path, run_dir, memory={"hidden": 32,
                                                     "init_from": str(tmp_path / "previous" / "mdnrnn" / "best.pt")})
    return "04_train_mdnrnn", config, []


CASES = [
    # 1. a config value that is not finite
    ("config-lr-inf-by-set-02", config_error("02_train_nvae", ("rollouts",), ("--set", "vision.lr=1e400")),
     ("vision.lr", "expected a finite number")),
    ("config-sigma0-nan-05",
     config_error("05_train_controller", ("vision", "mdnrnn"), controller={"sigma0": float("nan")}),
     ("config.yaml", "controller.sigma0", "expected a finite number")),
    # 2. an empty config file; a config without run_dir
    ("config-empty-file-01", empty_config, ("config.yaml", "empty")),
    ("config-without-run_dir-01", config_without_run_dir, ("config.yaml", "'run_dir' is required")),
    # 3. a value out of bounds
    ("cuda-without-a-gpu-04", config_error("04_train_mdnrnn", ("latents",), memory={"device": "cuda"}),
     ("memory.device=cuda", "no CUDA device")),
    ("cuda-without-a-gpu-dream-05", config_error("05_train_controller", ("vision", "latents", "mdnrnn"),
                                                 controller={"env": "dream", "device": "cuda"}),
     ("controller.device=cuda", "no CUDA device")),
    ("config-actor-std-bounds-05",
     config_error("05_train_controller", ("vision", "mdnrnn"),
                  controller={"kind": "actor_critic", "actor_critic": {"min_std": 2.0, "max_std": 1.0}}),
     ("controller.actor_critic.min_std (2.0)", "below", "max_std (1.0)")),
    ("tssm-context-beyond-windows-04",
     config_error("04_train_mdnrnn", ("latents",), memory={"kind": "tssm", "tssm": {"context": 64}}),
     ("memory.tssm.context (64)", "memory.seq_len (8)")),
    ("open-loop-for-the-rssm-04", config_error("04_train_mdnrnn", ("latents",),
                                               memory={"kind": "rssm", "open_loop_horizon": 4}),
     ("memory.open_loop_horizon", "memory.kind is rssm")),
    ("open-loop-as-long-as-the-window-04", config_error("04_train_mdnrnn", ("latents",),
                                                        memory={"open_loop_horizon": 8}),
     ("memory.open_loop_horizon", "2 .. memory.seq_len - 1 (7)", "got 8")),
    ("init-from-missing-04", config_error("04_train_mdnrnn", ("latents",), memory={"init_from": "/no/such/best.pt"}),
     ("/no/such/best.pt", "not found")),
    ("init-from-another-size-04", init_from_of_another_size, ("memory.init_from", "best.pt", "this run builds")),
    ("config-popsize-1-05", config_error("05_train_controller", ("vision", "mdnrnn"), controller={"popsize": 1}),
     ("controller.popsize", ">= 2")),
    # 4. a renamed key
    ("config-renamed-vision.workers-02", config_error("02_train_nvae", ("rollouts",), vision={"workers": 2}),
     ("vision.workers", "renamed to vision.threads")),
    # 5. bad rollouts
    ("rollout-32px-frames-02", bad_rollout(small_frames),
     ("episode_00001.npz", "(40, 32, 32, 3)", "expected uint8 (T >= 1, 64, 64, 3)")),
    ("rollout-32px-frames-03", small_frames_for_stage_03,
     ("episode_00001.npz", "(40, 32, 32, 3)", "expected uint8 (T >= 1, 64, 64, 3)")),
    ("rollout-0-steps-02", bad_rollout(zero_steps), ("episode_00001.npz", "(0, 64, 64, 3)", "T >= 1")),
    ("rollout-nan-reward-02", bad_rollout(nan_reward), ("episode_00001.npz", "rewards hold NaN")),
    ("rollout-no-actions-02", bad_rollout(no_actions), ("episode_00001.npz", "missing arrays ['actions']")),
    # 6. latents that are not finite
    ("latents-nan-mu-04", nan_latents, ("latents/episode_00001.npz", "mu hold NaN")),
    # 7. an unknown env id
    ("env-unknown-fresh-run-01", unknown_env_fresh_run, ("env.id", "NoSuchEnv-v0")),
    ("env-unknown-06", unknown_env_evaluate, ("env.id", "NoSuchEnv-v0")),
    # 8. a run_dir that cannot be written
    ("run_dir-read-only-01", read_only_parent, ("read_only/run/rollouts", "not writable")),
    # 9. crafted pickles: refused before anything in them runs
    ("crafted-vision-checkpoint-03", crafted_vision_checkpoint, ("vision/best.pt", "refused")),
    ("crafted-cmaes-state-pickle-05", crafted_cmaes_state("pickle"), ("cmaes_state.npz", "refused", "pickle")),
    ("crafted-cmaes-state-object-array-05", crafted_cmaes_state("object array"),
     ("cmaes_state.npz", "refused", "pickle")),
    # 10. a second process on the same stage folder
    ("stage-folder-in-use-01", stage_folder_in_use, ("run/rollouts", "in use by pid 123")),
    # 11. a checkpoint of the wrong kind
    ("checkpoint-wrong-kind-03", checkpoint_of_the_wrong_kind, ("mdnrnn/best.pt", "kind 'mdnrnn'", "vision")),
    ("memory-of-another-kind-05", config_error("05_train_controller", ("vision", "mdnrnn"), memory={"kind": "rssm"}),
     ("mdnrnn/best.pt", "M of kind 'mdnrnn'", "'memory.kind' is 'rssm'")),
    ("controller-of-another-kind-06",
     config_error("06_evaluate", ("vision", "mdnrnn", "controller"), controller={"kind": "actor_critic"}),
     ("controller/controller.pt", "C of kind 'linear'", "'controller.kind' is 'actor_critic'")),
]


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: cuda is valid here")


@pytest.mark.parametrize("prepare, texts", [pytest.param(p, t, id=i, marks=[NO_CUDA] if i.startswith("cuda") else [])
                                            for i, p, t in CASES])
def test_bad_input_stops_with_one_line_and_changes_nothing(prepare, texts, tiny_run, tmp_path):
    with contextlib.ExitStack() as keep:
        stage, config, args = prepare(tmp_path, tiny_run, keep)
        before = snapshot(tmp_path)
        proc = run_script(stage, config, *args, timeout=120)
        after = snapshot(tmp_path)
    line = assert_user_error(proc, *texts)
    assert proc.stderr.strip().splitlines() == [line], f"stderr holds more than the error line:\n{proc.stderr}"
    assert not (tmp_path / MARKER).exists(), f"the crafted pickle ran: {tmp_path / MARKER} exists"
    assert_unchanged(before, after)
