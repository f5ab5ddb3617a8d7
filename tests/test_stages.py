"""Every stage script end to end through a subprocess on real CarRacing-v3, checking what it wrote."""

import csv
import json
import os

import numpy as np
import torch
from PIL import Image

from conftest import assert_ok, run_script, write_config
from utils.checkpoints import load_model, read_checkpoint
from utils.seeding import env_seed


def test_01_rollouts(tiny_run):
    folder = os.path.join(tiny_run["run_dir"], "rollouts")
    files = sorted(f for f in os.listdir(folder) if f.endswith(".npz"))
    assert files == ["episode_00000.npz", "episode_00001.npz", "episode_00002.npz"]
    for i, name in enumerate(files):
        with np.load(os.path.join(folder, name)) as ep:
            T = len(ep["actions"])
            assert T == 40
            assert ep["obs"].shape == (T, 64, 64, 3) and ep["obs"].dtype == np.uint8
            assert ep["actions"].shape == (T, 3) and ep["actions"].dtype == np.float32
            assert ep["rewards"].shape == ep["terminated"].shape == ep["truncated"].shape == (T,)
            assert ep["truncated"][-1] and not ep["truncated"][:-1].any()
            assert int(ep["seed"]) == env_seed(7, "rollouts", i)
            low, high = np.array([-1, 0, 0]), np.array([1, 1, 1])
            assert (ep["actions"] >= low).all() and (ep["actions"] <= high).all()
            assert ep["obs"].std() > 10  # real frames, not blank
    manifest = json.load(open(os.path.join(folder, "manifest.json")))
    assert manifest["metrics"]["episodes_on_disk"] == 3 and manifest["config"]["seed"] == 7
    assert os.path.exists(os.path.join(folder, "config.yaml"))


def test_01_rerun_skips_episodes_on_disk(tiny_run):
    folder = os.path.join(tiny_run["run_dir"], "rollouts")
    before = {f: os.stat(os.path.join(folder, f)).st_mtime_ns for f in os.listdir(folder) if f.endswith(".npz")}
    proc = run_script("01_generate_rollouts", tiny_run["config"])
    assert_ok(proc)
    assert "0 episodes to record (brownian), 3 already" in proc.stdout
    after = {f: os.stat(os.path.join(folder, f)).st_mtime_ns for f in before}
    assert before == after


def test_02_vision_checkpoints_and_log(tiny_run):
    folder = os.path.join(tiny_run["run_dir"], "vision")
    vision, ckpt = load_model(os.path.join(folder, "best.pt"), "vision")
    assert ckpt["kind"] == "vae" and vision.z_dim == 8 and ckpt["config"]["z_dim"] == 8 and ckpt["sizes"] == {"frame_size": 64}
    assert ckpt["run_config"]["vision"]["z_dim"] == 8 and "optimizer" in ckpt
    assert len(ckpt["split"]["held_out"]) == 1 and len(ckpt["split"]["train"]) == 2
    log = [json.loads(line) for line in open(os.path.join(folder, "train_log.jsonl"))]
    assert [row["epoch"] for row in log] == [1]
    for key in ("recon", "kl", "neg_elbo", "val_neg_elbo", "val_mse", "skipped_updates"):
        assert np.isfinite(log[0][key])
    assert os.path.exists(os.path.join(folder, "latest.pt"))
    assert "neg_elbo" in tiny_run["outputs"]["02_train_nvae"].stdout


def test_02_resumes_from_latest(tiny_run, tmp_path):
    """A second call with more epochs continues the same run instead of starting over."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(os.path.join(tiny_run["run_dir"], "rollouts"), run_dir / "rollouts")
    shutil.copytree(os.path.join(tiny_run["run_dir"], "vision"), run_dir / "vision")
    config = write_config(tmp_path, run_dir, vision={"epochs": 2})
    proc = run_script("02_train_nvae", config)
    assert_ok(proc)
    assert "resuming at epoch 2/2" in proc.stdout
    log = [json.loads(line) for line in open(run_dir / "vision" / "train_log.jsonl")]
    first = [json.loads(line) for line in open(os.path.join(tiny_run["run_dir"], "vision", "train_log.jsonl"))]
    assert [row["epoch"] for row in log] == [1, 2] and log[0] == first[0]


def test_03_latents(tiny_run):
    folder = os.path.join(tiny_run["run_dir"], "latents")
    vision, _ = load_model(os.path.join(tiny_run["run_dir"], "vision", "best.pt"), "vision")
    path = os.path.join(folder, "episode_00000.npz")
    with np.load(path) as lat, np.load(os.path.join(tiny_run["run_dir"], "rollouts", "episode_00000.npz")) as ep:
        assert lat["mu"].shape == lat["logvar"].shape == (40, 8) and lat["mu"].dtype == np.float32
        np.testing.assert_array_equal(lat["actions"], ep["actions"])
        x = torch.from_numpy(ep["obs"][:5]).permute(0, 3, 1, 2).float() / 255
        np.testing.assert_allclose(lat["mu"][:5], vision.encode(x)[0].detach().numpy(), atol=1e-4)
    manifest = json.load(open(os.path.join(folder, "manifest.json")))
    assert manifest["metrics"]["z_dim"] == 8 and manifest["metrics"]["action_dim"] == 3


def test_04_mdnrnn(tiny_run):
    folder = os.path.join(tiny_run["run_dir"], "mdnrnn")
    m, ckpt = load_model(os.path.join(folder, "best.pt"), "memory")
    assert (m.z_dim, m.action_dim, m.hidden, m.gaussians) == (8, 3, 16, 3)
    log = [json.loads(line) for line in open(os.path.join(folder, "train_log.jsonl"))]
    assert np.isfinite(log[-1]["val_nll"]) and "val_done_bce" in log[-1]


def test_05_controller(tiny_run):
    """history.csv, and controller.pt whose best parameters, replayed here on the held-out tracks through the
    episode loop, score exactly the held-out mean that history.csv recorded for them."""
    from utils.cmaes_trainer import heldout_seeds
    from utils.config import load_config
    from utils.envs import make_env
    from utils.episodes import AgentPolicy, load_agent, run_episode

    folder = os.path.join(tiny_run["run_dir"], "controller")
    rows = list(csv.DictReader(open(os.path.join(folder, "history.csv"))))
    assert [int(r["generation"]) for r in rows] == [1, 2]
    assert rows[0]["heldout_mean"] == "" and rows[1]["heldout_mean"] != ""
    controller, ckpt = load_model(os.path.join(folder, "controller.pt"), "controller")
    assert ckpt["kind"] == "linear" and controller.num_params == 3 * (8 + 16 + 1)
    assert ckpt["best"]["generation"] == 2 and ckpt["params_mean"].shape == (controller.num_params,)
    cfg = load_config(tiny_run["config"])
    env = make_env(cfg.env)
    agent = load_agent(read_checkpoint(ckpt["inputs"]["vision"]), read_checkpoint(ckpt["inputs"]["mdnrnn"]), cfg.env,
                       ckpt, env.action_space)
    returns = [run_episode(env, AgentPolicy(agent), seed).ret for seed in heldout_seeds(cfg)]
    assert f"{np.mean(returns)}".startswith(rows[1]["heldout_mean"][:8]) and float(rows[1]["heldout_mean"]) == np.mean(returns)
    assert Image.open(os.path.join(folder, "learning_curve.png")).size[0] > 100
    # Training episodes are capped at controller.max_steps=30 for 4 candidates x 1 rollout.
    assert all(int(r["env_steps"]) <= 4 * 30 for r in rows)
    # the held-out re-evaluation's real steps are counted apart (1 full episode of at most the env's 100 steps)
    assert [0 < int(r["heldout_steps"]) <= 100 if r["heldout_mean"] else r["heldout_steps"] == "" for r in rows] == \
        [True, True]


def test_05_resumes_where_it_stopped(tiny_run, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    for stage in ("vision", "mdnrnn", "controller"):
        shutil.copytree(os.path.join(tiny_run["run_dir"], stage), run_dir / stage)
    config = write_config(tmp_path, run_dir, controller={"generations": 3})
    proc = run_script("05_train_controller", config)
    assert_ok(proc)
    assert "resuming at generation 3/3" in proc.stdout
    rows = list(csv.DictReader(open(run_dir / "controller" / "history.csv")))
    first = list(csv.DictReader(open(os.path.join(tiny_run["run_dir"], "controller", "history.csv"))))
    assert [int(r["generation"]) for r in rows] == [1, 2, 3] and rows[:2] == first


def test_06_evaluation(tiny_run):
    folder = os.path.join(tiny_run["run_dir"], "eval")
    scores = json.load(open(os.path.join(folder, "scores.json")))
    assert scores["episodes"] == 3 and len(scores["returns"]) == 3
    assert scores["mean"] == np.mean(scores["returns"]) and scores["std"] == np.std(scores["returns"])
    assert scores["seeds"] == [env_seed(7, "evaluate", i) for i in range(3)]
    assert all(s == 40 for s in scores["steps"])  # evaluation never stops early
    report = open(os.path.join(folder, "report.md")).read()
    assert f"{scores['mean']:.1f} +- {scores['std']:.1f}" in report
    gif = Image.open(os.path.join(folder, "episode.gif"))
    assert gif.size == (2 * 64 * 2, 64 * 2) and gif.n_frames == 20
    grid = Image.open(os.path.join(folder, "reconstructions.png"))
    assert grid.size == (4 * 64 * 2, 2 * 64 * 2)
    out = tiny_run["outputs"]["06_evaluate"].stdout
    assert f"{scores['mean']:.1f} +- {scores['std']:.1f} over 3 held-out episodes" in out


def test_01_records_with_a_trained_controller_for_iterative_training(tiny_run, tmp_path):
    """rollouts.policy=controller adds episodes played by a trained V-M-C agent plus action noise beside
    the random ones already on disk; noise 0 replays C's own actions exactly."""
    import shutil

    from conftest import assert_ok, assert_user_error, run_script, write_config

    controller = os.path.join(tiny_run["run_dir"], "controller", "controller.pt")
    played = {}
    for noise in (0.0, 0.0, 0.3):
        run_dir = tmp_path / f"run{len(played)}"
        shutil.copytree(os.path.join(tiny_run["run_dir"], "rollouts"), run_dir / "rollouts")
        rollouts = {"episodes": 4, "max_steps": 40, "workers": 1, "policy": "controller", "controller": controller,
                    "action_noise": noise}
        proc = run_script("01_generate_rollouts", write_config(tmp_path, run_dir, rollouts=rollouts))
        assert_ok(proc)
        assert "1 episodes to record (controller" in proc.stdout
        ep = np.load(run_dir / "rollouts" / "episode_00003.npz")
        assert ep["obs"].shape == (40, 64, 64, 3) and ep["actions"].shape == (40, 3)
        assert (ep["actions"][:, 1:] >= 0).all() and (np.abs(ep["actions"]) <= 1).all()  # gas, brake in [0, 1]
        played[len(played)] = ep["actions"]
    np.testing.assert_array_equal(played[0], played[1])  # deterministic without noise
    assert 0.05 < np.abs(played[2] - played[0]).mean() < 0.5

    bad = write_config(tmp_path, tmp_path / "bad", rollouts={"episodes": 1, "policy": "controller"})
    assert_user_error(run_script("01_generate_rollouts", bad), "rollouts.controller")
    assert not (tmp_path / "bad").exists()
