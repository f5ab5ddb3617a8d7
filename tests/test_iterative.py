"""Iterative training as one command (utils/iterative.py): two rounds end to end on a tiny budget, killed in the
middle of round 1 and resumed by the same command; the per-round table; the config errors."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, assert_user_error, write_config
from utils.io import load_episode

ITERATIVE = {"rounds": 2, "episodes": 2, "memory_epochs": 1, "eval_episodes": 2}
DREAM_C = {"env": "dream", "popsize": 4, "rollouts_per_candidate": 1, "generations": 2, "max_steps": 30,
           "eval_every": 2, "eval_episodes": 1, "workers": 2, "threads": 1}


def iterate(config: str, *args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "utils.iterative", "--config", config, *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def test_two_rounds_killed_in_round_1_resume_and_report(tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    bootstrap = {"bootstrap_generations": 1, "bootstrap_popsize": 4, "bootstrap_max_steps": 30,
                 "bootstrap_early_stop_steps": 0}  # round 0's C: one CMA-ES generation in the real env
    final = {"final_round_sets": ["controller.kind=actor_critic"]}  # the last round's C: an actor-critic in M
    controller = {**DREAM_C, "updates": 2, "batch_windows": 2, "actor_critic": {"units": 16, "horizon": 3}}
    config = write_config(tmp_path, run_dir, controller=controller, iterative={**ITERATIVE, **bootstrap, **final},
                          evaluate={"episodes": 3, "max_steps": 30, "workers": 2, "fid_frames": 0, "params": "mean"})
    # Round 0's stages 01-04 are those of tiny_run (the same config but C's section, which they do not read):
    # finished stage folders, which the command skips as it would its own. Its 05 and 06 run here.
    for stage in ("rollouts", "vision", "latents", "mdnrnn"):
        shutil.copytree(os.path.join(tiny_run["run_dir"], stage), run_dir / "round_00" / stage)
    first_new = run_dir / "round_01" / "rollouts" / "episode_00003.npz"  # round 0 records episodes 0-2
    proc = iterate(config, start_new_session=True)
    deadline = time.monotonic() + 420
    while not first_new.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first_new.exists(), proc.communicate()[1][-3000:]
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, the running stage and its workers: nothing cleans up
    proc.wait()
    assert not (run_dir / "round_01" / "eval" / "manifest.json").exists()
    recorded = os.stat(first_new).st_mtime_ns

    resumed = iterate(config)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert "round 0/1: 01_generate_rollouts" not in out  # round 0 was finished: nothing of it runs again
    assert os.stat(first_new).st_mtime_ns == recorded  # the episode recorded before the kill was kept

    r0, r1 = run_dir / "round_00", run_dir / "round_01"
    episodes = sorted(n for n in os.listdir(r1 / "rollouts") if n.startswith("episode_"))
    assert episodes == [f"episode_{i:05d}.npz" for i in range(5)]
    assert os.path.samefile(r0 / "rollouts" / "episode_00000.npz", r1 / "rollouts" / "episode_00000.npz")
    assert os.path.samefile(r0 / "vision" / "best.pt", r1 / "vision" / "best.pt")  # V is kept (refit_vision false)
    with np.load(r1 / "rollouts" / "episode_00004.npz") as ep:
        assert ep["obs"].shape[1:] == (64, 64, 3) and len(ep["actions"]) <= 40
    rollouts = json.load(open(r1 / "rollouts" / "manifest.json"))
    assert rollouts["config"]["rollouts"]["policy"] == "controller"
    assert rollouts["config"]["rollouts"]["controller"].endswith(os.path.join("round_00", "controller", "controller.pt"))
    memory = json.load(open(r1 / "mdnrnn" / "manifest.json"))
    assert memory["config"]["memory"]["init_from"].endswith(os.path.join("round_00", "mdnrnn", "best.pt"))
    assert memory["metrics"]["epochs"] == 1 and memory["inputs"]["train_episodes"] + memory["inputs"]["held_out_episodes"] == 5

    rows = list(csv.DictReader(open(run_dir / "rounds.csv")))
    assert [r["round"] for r in rows] == ["0", "1"]
    assert [int(r["new_episodes"]) for r in rows] == [3, 2] and [int(r["episodes"]) for r in rows] == [3, 5]
    for k, r in enumerate(rows):
        new = range(3) if k == 0 else range(3, 5)
        steps = sum(len(load_episode(str(r1 / "rollouts" / f"episode_{i:05d}.npz"), ("rewards",))["rewards"]) for i in new)
        assert int(r["data_steps"]) == steps
        scores = json.load(open(run_dir / f"round_{k:02d}" / "eval" / "scores.json"))
        assert float(r["real_mean"]) == pytest.approx(scores["mean"]) and int(r["real_episodes"]) == scores["episodes"]
        assert int(r["eval_steps"]) > sum(scores["steps"])  # + 05's held-out play
    controller = [json.load(open(run_dir / f"round_{k:02d}" / "controller" / "manifest.json"))["metrics"] for k in (0, 1)]
    assert controller[0]["env"] == "real" and controller[0]["generations"] == 1  # the bootstrap C
    assert int(rows[0]["c_real_steps"]) == controller[0]["env_steps"] > 0 and int(rows[0]["dream_steps"]) == 0
    assert controller[1]["kind"] == "actor_critic" and controller[1]["updates"] == 2  # iterative.final_round_sets
    assert int(rows[1]["c_real_steps"]) == 0 and int(rows[1]["dream_steps"]) > 0
    assert [r["controller"] for r in rows] == ["CMA-ES in the real env", "actor-critic in M"]
    assert rows[0]["prev_m_new_nll"] == "" and np.isfinite(float(rows[1]["prev_m_new_nll"]))  # round 0's M, new data
    assert [int(r["real_episodes"]) for r in rows] == [2, 3]  # iterative.eval_episodes, then evaluate.episodes
    assert int(rows[1]["real_steps_total"]) == sum(int(r["data_steps"]) + int(r["c_real_steps"]) + int(r["eval_steps"])
                                                   for r in rows)
    table = open(run_dir / "rounds.md").read()
    assert table.count("\n| 0 | CMA-ES in the real env |") == 1 and table.count("\n| 1 | actor-critic in M |") == 1
    assert os.path.getsize(run_dir / "rounds.png") > 0

    # 06 --compare lists each round as a dream-trained run (the thesis's Table 2) and the rounds table
    out = tmp_path / "compare.md"
    proc = subprocess.run([sys.executable, "06_evaluate.py", "--compare", str(run_dir), "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    for k, table in ((0, "## Table 1"), (1, "## Table 2")):  # round 0's bootstrap C was trained in the real env
        rows_of_table = text.split(table)[1].split("##")[0]
        scores = json.load(open(run_dir / f"round_{k:02d}" / "eval" / "scores.json"))
        row = next(line for line in rows_of_table.splitlines() if f"round_{k:02d}`" in line)
        assert f"{scores['mean']:.1f} +- {scores['std']:.1f}" in row
    assert "## Iterative training" in text and text.count("\n| 1 | actor-critic in M | 5 (2) |") == 1

    again = iterate(config)  # all done: nothing runs, the table is rewritten alike
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0 and "->" not in out, err
    assert list(csv.DictReader(open(run_dir / "rounds.csv"))) == rows


def test_later_rounds_can_start_c_at_the_previous_rounds(tmp_path):
    from utils.config import load_config
    from utils.errors import UserError
    from utils.iterative import check_iterative_config, round_overrides

    config = write_config(tmp_path, tmp_path / "run", controller=DREAM_C,
                          iterative={**ITERATIVE, "controller_init": "previous"})
    cfg = load_config(config, [])
    check_iterative_config(cfg)
    assert not any(s.startswith("controller.init_from") for s in round_overrides(cfg, 0))
    previous = os.path.join(str(tmp_path / "run"), "round_00", "controller", "controller.pt")
    assert f"controller.init_from={previous}" in round_overrides(cfg, 1)
    scratch = load_config(config, ["iterative.controller_init=scratch"])
    assert not any(s.startswith("controller.init_from") for s in round_overrides(scratch, 1))
    # the actor-critic continued from round to round (Dreamer's online loop), after a linear real-env bootstrap
    online = load_config(config, ["controller.kind=actor_critic", "iterative.rounds=3",
                                  "iterative.bootstrap_generations=2"])
    check_iterative_config(online)
    assert not any(s.startswith("controller.init_from") for s in round_overrides(online, 1))  # round 0's C: linear
    assert (f"controller.init_from={os.path.join(str(tmp_path / 'run'), 'round_01', 'controller', 'controller.pt')}"
            in round_overrides(online, 2))
    for sets in (["controller.ensemble_fitness=min"],
                 ["controller.ensemble_fitness=min", "memory.ensemble=3", "controller.rollouts_per_candidate=4"]):
        with pytest.raises(UserError, match="controller.ensemble_fitness: min .* needs memory.ensemble >= 2"):
            check_iterative_config(load_config(config, sets))
    check_iterative_config(load_config(config, ["controller.ensemble_fitness=min", "memory.ensemble=2",
                                                "controller.rollouts_per_candidate=4"]))
    with pytest.raises(UserError, match="controller.disagreement_penalty: 1.0 .* needs memory.ensemble >= 2"):
        check_iterative_config(load_config(config, ["controller.disagreement_penalty=1.0"]))
    check_iterative_config(load_config(config, ["controller.disagreement_penalty=1.0", "memory.ensemble=2"]))


def test_a_real_env_bootstrap_trains_the_linear_c_before_actor_critic_rounds(tmp_path):
    from utils.config import load_config
    from utils.iterative import check_iterative_config, round_overrides

    config = write_config(tmp_path, tmp_path / "run", controller={"kind": "actor_critic"},
                          iterative={**ITERATIVE, "bootstrap_generations": 2})
    cfg = load_config(config, [])
    check_iterative_config(cfg)
    round0 = load_config(config, round_overrides(cfg, 0))  # the config that round 0's stages resolve
    assert (round0.controller.kind, round0.controller.env, round0.controller.generations) == ("linear", "real", 2)
    round1 = load_config(config, round_overrides(cfg, 1))
    assert (round1.controller.kind, round1.rollouts.policy) == ("actor_critic", "controller")
    assert round1.rollouts.controller.endswith(os.path.join("round_00", "controller", "controller.pt"))


def test_final_round_sets_change_the_last_rounds_c_only(tmp_path):
    from utils.config import load_config
    from utils.errors import UserError
    from utils.iterative import check_iterative_config, round_overrides

    sets = ["controller.kind=actor_critic", "controller.updates=7"]
    config = write_config(tmp_path, tmp_path / "run", controller=DREAM_C,
                          iterative={**ITERATIVE, "rounds": 3, "controller_init": "previous", "final_round_sets": sets})
    cfg = load_config(config, [])
    check_iterative_config(cfg)
    rounds = [load_config(config, round_overrides(cfg, k)) for k in range(3)]  # what each round's stages resolve
    assert [(r.controller.kind, r.controller.updates) for r in rounds] == [("linear", 2000), ("linear", 2000),
                                                                           ("actor_critic", 7)]
    assert rounds[1].controller.init_from.endswith(os.path.join("round_00", "controller", "controller.pt"))
    assert rounds[2].controller.init_from == ""  # CMA-ES's previous C cannot start an actor-critic
    assert rounds[2].rollouts.controller.endswith(os.path.join("round_01", "controller", "controller.pt"))
    for bad, match in (("controller.kind", "expected section.key=value"),
                       ("controller.nope=1", "iterative.final_round_sets.*unknown key 'controller.nope'"),
                       ("controller.updates=0", "iterative.final_round_sets.*controller.updates"),
                       ("seed=3", "iterative.final_round_sets: 'seed' is set by the driver"),
                       ("iterative.rounds=9", "'iterative.rounds' is set by the driver"),
                       ("controller.env=real", "controller.env: iterative training trains C inside M only")):
        with pytest.raises(UserError, match=match):  # each refused before any round runs
            check_iterative_config(load_config(config, [f"iterative.final_round_sets=[{bad}]"]))
    continued = ["controller.kind=actor_critic", "iterative.final_round_sets=[controller.actor_critic.units=8]"]
    with pytest.raises(UserError, match="controller_init previous .* cannot change .*actor_critic.units"):
        check_iterative_config(load_config(config, continued))
    check_iterative_config(load_config(config, [*continued, "iterative.controller_init=scratch"]))
    with pytest.raises(UserError, match="only round's C is the real-env bootstrap"):
        check_iterative_config(load_config(config, ["iterative.rounds=1", "iterative.bootstrap_generations=2"]))
    with pytest.raises(UserError, match="iterative.final_round_sets.*expected a list of strings"):
        load_config(config, ["iterative.final_round_sets=controller.kind=actor_critic"])


def test_iterative_config_errors(tmp_path):
    config = write_config(tmp_path, tmp_path / "run", iterative=ITERATIVE)  # TINY trains C in the real env
    proc = iterate(config)
    _, err = proc.communicate(timeout=120)
    assert_user_error(subprocess.CompletedProcess(proc.args, proc.returncode, "", err), "controller.env", "dream")
    assert not (tmp_path / "run").exists()
    config = write_config(tmp_path, tmp_path / "run", controller=DREAM_C,
                          iterative={**ITERATIVE, "refit_vision": True})
    proc = iterate(config)
    _, err = proc.communicate(timeout=120)
    assert_user_error(subprocess.CompletedProcess(proc.args, proc.returncode, "", err), "iterative.memory_init",
                      "scratch")
    # a resumed run with another config is refused, naming the key
    config = write_config(tmp_path, tmp_path / "run", controller=DREAM_C, iterative=ITERATIVE)
    os.makedirs(tmp_path / "run")
    from utils.config import dump_config, load_config

    (tmp_path / "run" / "iterative_config.yaml").write_text(dump_config(load_config(config, ["controller.popsize=8"])))
    proc = iterate(config)
    _, err = proc.communicate(timeout=120)
    assert_user_error(subprocess.CompletedProcess(proc.args, proc.returncode, "", err), "controller.popsize")
    assert sorted(os.listdir(tmp_path / "run")) == ["iterative_config.yaml"]


def test_bad_baseline_is_refused_before_any_work(tmp_path):
    config = write_config(tmp_path, tmp_path / "run", controller=DREAM_C, iterative=ITERATIVE)
    proc = iterate(config, "--baseline", str(tmp_path / "nothing"))
    _, err = proc.communicate(timeout=120)
    assert_user_error(subprocess.CompletedProcess(proc.args, proc.returncode, "", err), "--baseline", "history.csv")
    assert not (tmp_path / "run").exists()


def test_01_records_the_c_that_evaluate_params_names(tiny_run, tmp_path):
    """With evaluate.params=mean, rollouts.policy=controller records the final CMA-ES mean, as 06 scores it (a
    dream-trained C is then never picked by a real-env score); with best, the best held-out mean."""
    import importlib

    import torch

    from utils.config import load_config

    stage01 = importlib.import_module("01_generate_rollouts")
    saved = torch.load(os.path.join(tiny_run["run_dir"], "controller", "controller.pt"), weights_only=True)
    saved["params_mean"] = saved["state_dict"]["params"] + 0.5  # a final mean unlike the best held-out one
    path = str(tmp_path / "controller.pt")
    torch.save(saved, path)
    for params, expected in (("mean", saved["params_mean"]), ("best", saved["state_dict"]["params"])):
        config = write_config(tmp_path, tmp_path / "run", evaluate={"params": params},
                              rollouts={"policy": "controller", "controller": path})
        ckpts, paths = stage01.agent_checkpoints(load_config(config, []))
        assert torch.equal(ckpts["controller"]["state_dict"]["params"], expected)
        assert paths["controller"] == os.path.abspath(path)


def _processes_naming(text: str) -> list[int]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            continue
        if text in cmdline and not zombie:
            pids.append(int(pid))
    return pids


def test_a_terminated_driver_stops_its_stage_and_exits(tmp_path):
    """SIGTERM to the driver alone (what `kill PID` or a scheduler sends): the running stage is terminated
    and the driver exits with 128 + 15, instead of waiting on a stage that is gone."""
    run_dir = tmp_path / "run"
    config = write_config(tmp_path, run_dir, controller=DREAM_C, iterative=ITERATIVE,
                          env={"max_episode_steps": 1000}, rollouts={"episodes": 40, "max_steps": 1000, "workers": 1})
    proc = iterate(config)
    deadline = time.monotonic() + 120
    while not _processes_naming(f"run_dir={run_dir}") and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_naming(f"run_dir={run_dir}"), proc.communicate()[1][-3000:]
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    deadline = time.monotonic() + 20
    while _processes_naming(f"run_dir={run_dir}") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _processes_naming(f"run_dir={run_dir}")
