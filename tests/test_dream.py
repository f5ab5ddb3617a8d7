"""The dream env around M and the batched dream rollout (models/dream.py)."""

import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

from models.controller import LinearController, LinearControllerConfig, batched_actions
from models.dream import DreamEnv, burn_in, dream_returns
from models.mdnrnn import MDNRNN, MDNRNNConfig
from models.vae import ConvVAE, VAEConfig

LOW, HIGH = np.array([-1.0, 0.0, 0.0], np.float32), np.array([1.0, 1.0, 1.0], np.float32)


def tiny_world(z_dim=4, hidden=8, done_bias=-3.0):
    torch.manual_seed(0)
    m = MDNRNN(MDNRNNConfig(hidden=hidden, gaussians=2), z_dim=z_dim, action_dim=3).eval()
    with torch.no_grad():
        m.done_head.bias.fill_(done_bias)  # a done probability well below 0.5 at first
    starts = np.random.default_rng(0).normal(size=(5, z_dim)).astype(np.float32)
    return m, starts


def test_dream_env_passes_the_gymnasium_checker():
    m, starts = tiny_world()
    env = DreamEnv(m, starts, LOW, HIGH, temperature=1.15, max_steps=20)
    check_env(env, skip_render_check=True)
    obs, info = env.reset(seed=1)
    assert obs.shape == (4 + 8,) and obs.dtype == np.float32 and 0 <= info["start"] < 5
    np.testing.assert_allclose(obs[:4], starts[info["start"]])  # h starts at 0
    assert np.all(obs[4:] == 0)


def test_dream_env_renders_through_v_and_truncates():
    m, _ = tiny_world(z_dim=8)
    vae = ConvVAE(VAEConfig(z_dim=8)).eval()
    env = DreamEnv(m, np.zeros((1, 8), np.float32), LOW, HIGH, max_steps=3, vision=vae, render_mode="rgb_array")
    env.reset(seed=0)
    frame = env.render()
    assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8
    flags = [env.step(env.action_space.sample())[3] for _ in range(3)]
    assert flags == [False, False, True]


def test_done_head_terminates_the_episode():
    m, starts = tiny_world(done_bias=5.0)
    env = DreamEnv(m, starts, LOW, HIGH, max_steps=50)
    env.reset(seed=0)
    _, _, terminated, truncated, _ = env.step(np.zeros(3, np.float32))
    assert terminated and not truncated


def test_batched_rollout_matches_the_one_step_api():
    """One row of the batch: the same episode, step for step, as DreamEnv driven by C."""
    m, starts = tiny_world()
    controller = LinearController(LinearControllerConfig(), 4 + 8, LOW, HIGH)
    theta = np.random.default_rng(1).normal(scale=0.5, size=controller.num_params).astype(np.float32)
    controller.set_params(theta)
    env = DreamEnv(m, starts, LOW, HIGH, temperature=1.0, max_steps=40)
    obs, _ = env.reset(seed=7, options={"start": 2})
    generator = torch.Generator()
    generator.set_state(env._generator.get_state())
    total, done = 0.0, False
    while not done:
        action = controller(torch.from_numpy(obs)[None])[0].numpy()
        obs, reward, terminated, truncated, _ = env.step(action)
        total, done = total + reward, terminated or truncated
    batched, lengths = dream_returns(m, theta[None], starts[2:3], LOW, HIGH, 1.0, 40, generator)
    assert batched.shape == (1,) and batched[0] == pytest.approx(total, rel=1e-5, abs=1e-5)
    assert lengths[0] == env._t


def test_batched_rollout_of_a_population():
    m, starts = tiny_world()
    thetas = np.random.default_rng(2).normal(size=(6, 3 * 13)).astype(np.float32)
    run = lambda seed: dream_returns(m, thetas, starts[[0, 1, 2, 0, 1, 2]], LOW, HIGH, 1.0, 25, torch.Generator().manual_seed(seed))  # noqa: E731
    (a, len_a), (b, _) = run(0), run(0)
    assert a.shape == (6,) and np.isfinite(a).all() and np.array_equal(a, b) and (len_a == 25).all()
    with torch.no_grad():
        m.done_head.bias.fill_(5.0)  # every episode ends after its first step: one reward each
    one_step, lengths = run(0)
    assert (lengths == 1).all()
    state = m.observe(m.initial_state(6), torch.from_numpy(starts[[0, 1, 2, 0, 1, 2]]))
    reward, _ = m.heads(m.transition(state, batched_actions(torch.from_numpy(thetas), m.features(state), LOW, HIGH)))
    np.testing.assert_allclose(one_step, reward.detach().double().numpy(), rtol=1e-6)


def test_a_dream_started_after_a_real_window_continues_ms_filtered_state():
    """burn_in folds a real window into M exactly as M's sequence API does; a window of one frame is the
    first-frame start."""
    m, starts = tiny_world()
    rng = np.random.default_rng(3)
    z = torch.from_numpy(rng.normal(size=(2, 6, 4)).astype(np.float32))
    a = torch.from_numpy(rng.uniform(0, 1, size=(2, 5, 3)).astype(np.float32))
    h, c, last_z = burn_in(m, z, a)
    _, _, _, (h_seq, c_seq) = m(z[:, :5], a)  # the LSTM over [z_t, a_t], t < 5
    torch.testing.assert_close(h, h_seq[0])
    torch.testing.assert_close(c, c_seq[0])
    assert torch.equal(last_z, z[:, 5])
    thetas = rng.normal(size=(3, 3 * 13)).astype(np.float32)
    one_frame = burn_in(m, torch.from_numpy(starts[:3, None]), torch.zeros(3, 0, 3))
    from_window, _ = dream_returns(m, thetas, one_frame, LOW, HIGH, 1.0, 20, torch.Generator().manual_seed(4))
    from_z, _ = dream_returns(m, thetas, starts[:3], LOW, HIGH, 1.0, 20, torch.Generator().manual_seed(4))
    np.testing.assert_array_equal(from_window, from_z)
    mid, _ = dream_returns(m, thetas[:2], (h, c, last_z), LOW, HIGH, 1.0, 20, torch.Generator().manual_seed(4))
    assert not np.allclose(mid, from_z[:2])  # M's memory of the window changes the dream


def test_dream_speed_benchmark_runs():
    import os
    import subprocess
    import sys

    from conftest import ROOT

    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "dream_speed.py"), "--workers", "1", "--batch", "4", "--steps", "20"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    rates = {line.split()[0]: float(line.split()[1]) for line in proc.stdout.splitlines()
             if line.split() and line.split()[0] in ("real", "dream", "ratio")}
    assert rates["real"] > 0 and rates["dream"] > 0  # steps/s actually measured
    assert rates["ratio"] == pytest.approx(rates["dream"] / rates["real"], rel=0.01)


def test_05_trains_in_the_dream_end_to_end(tiny_run, tmp_path):
    """Stage 05 with controller.env=dream: fitness from the batched dream, the CMA-ES mean re-evaluated
    in the real env; a resume under the other env is refused."""
    import csv
    import os
    import shutil
    import subprocess
    import sys

    from conftest import ROOT, assert_ok, assert_user_error, run_script, write_config

    run_dir = tmp_path / "run"
    for stage in ("vision", "latents", "mdnrnn"):
        shutil.copytree(os.path.join(tiny_run["run_dir"], stage), run_dir / stage)
    config = write_config(tmp_path, run_dir, controller={"env": "dream", "temperature": 1.15})
    proc = run_script("05_train_controller", config)
    assert_ok(proc)
    assert "in the dream (tau 1.15, 3 start latents)" in proc.stdout
    rows = list(csv.DictReader(open(run_dir / "controller" / "history.csv")))
    assert [int(r["generation"]) for r in rows] == [1, 2]
    assert all(int(r["env_steps"]) == 0 and 0 < int(r["dream_steps"]) <= 4 * 30 for r in rows)
    assert rows[1]["heldout_mean"] != ""  # the transfer measurement, in the real env
    assert_ok(run_script("06_evaluate", config))  # 3 real episodes, and the dream GIF beside the first
    from PIL import Image

    gif = Image.open(run_dir / "eval" / "dream.gif")
    assert gif.size == (2 * 64 * 2, 64 * 2) and gif.n_frames > 1
    report = open(run_dir / "eval" / "report.md").read()
    assert "dream.gif" in report and "| dream (M at tau 1.15) | 3 |" in report
    import json

    scores = json.load(open(run_dir / "eval" / "scores.json"))
    dream = scores["dream"]  # the score C has in the dream, beside the real one
    assert dream["temperature"] == 1.15 and dream["episodes"] == len(dream["returns"]) == 3
    assert np.mean(dream["returns"]) == pytest.approx(dream["mean"]) and 1 <= dream["mean_length"] <= 40  # evaluate.max_steps
    out = tmp_path / "compare.md"  # Table 2 of the comparison: the real and the dream score of this run
    assert_ok(subprocess.run([sys.executable, os.path.join(ROOT, "06_evaluate.py"), "--compare", str(run_dir),
                              "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120))
    row = next(line for line in out.read_text().split("## Table 2")[1].splitlines() if f"`{run_dir}`" in line)
    assert f"| {scores['mean']:.1f} +- {scores['std']:.1f} (3) | {dream['mean']:.1f} +- {dream['std']:.1f} (3) | 694 +- 16 |" in row
    assert "2 x 4 x 1, tau 1.15" in row and "## Table 1" not in out.read_text()
    real = write_config(tmp_path, run_dir, controller={"generations": 3})
    assert_user_error(run_script("05_train_controller", real), "saved with env=dream, this run has real")


def test_head_metrics_and_the_heads_script(tiny_run):
    import json
    import os
    import subprocess
    import sys

    from conftest import ROOT

    from utils.evaluation import head_metrics

    m = head_metrics(np.array([0.0, 1.0, 2.0, 3.0]), np.array([0.0, 2.0, 4.0, 6.0]),
                     np.array([0.9, 0.2, 0.7, 0.1]), np.array([1, 1, 0, 0]))
    assert m["reward_corr"] == pytest.approx(1.0) and m["reward_mse"] == pytest.approx(3.5)
    assert (m["done_precision"], m["done_recall"], m["done_real"], m["done_predicted"]) == (0.5, 0.5, 2, 2)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "check_mdnrnn_heads.py"), "--config", tiny_run["config"]],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "held-out episodes (40 steps)" in proc.stdout and "reward: Pearson r" in proc.stdout
    script = [sys.executable, os.path.join(ROOT, "benchmarks", "check_mdnrnn_heads.py"), "--config", tiny_run["config"]]
    proc = subprocess.run(script + ["--open-loop", "4"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    with open(os.path.join(tiny_run["run_dir"], "mdnrnn", "manifest.json")) as f:
        val_nll = json.load(f)["metrics"]["val_nll"]  # stage 04's held-out NLL of best.pt: the same windows and draws
    assert f"teacher-forced nll {val_nll:.4f} nats/dim" in proc.stdout and "open loop over 4 steps" in proc.stdout
    proc = subprocess.run(script + ["--open-loop", "8"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "memory.open_loop_horizon" in proc.stderr and "got 8" in proc.stderr


def test_memory_fit_repeats_stage_04s_held_out_nll(tiny_run):
    """memory_fit (the iterative rounds' check of an M on new episodes) on stage 04's held-out split gives the
    held-out NLL stage 04 logged for best.pt: the same windows, the same seeded z draws."""
    import os

    from utils.checkpoints import load_model
    from utils.config import load_config
    from utils.data import split_episodes
    from utils.evaluation import head_metrics, head_predictions, memory_fit
    from utils.io import list_episodes, load_episode

    cfg = load_config(tiny_run["config"])
    memory, ckpt = load_model(os.path.join(tiny_run["run_dir"], "mdnrnn", "best.pt"), "memory")
    _, held = split_episodes(list_episodes(os.path.join(tiny_run["run_dir"], "latents"), "latents"),
                             cfg.memory.holdout_fraction, cfg.seed)
    fit = memory_fit(memory, held, cfg)
    assert fit["nll"] == pytest.approx(ckpt["metrics"]["val_nll"], rel=1e-6) and fit["steps"] == 40
    episode = load_episode(held[0], ("mu", "actions", "rewards", "terminated", "truncated"))
    predicted = head_predictions(memory, episode)[0]
    assert fit["reward_corr"] == pytest.approx(head_metrics(predicted, episode["rewards"], predicted * 0,
                                                            episode["terminated"])["reward_corr"])


def test_temperature_sweep_trains_and_scores_each_tau(tiny_run, tmp_path):
    import json
    import os
    import subprocess
    import sys

    from conftest import ROOT, assert_ok, assert_user_error, write_config

    config = write_config(tmp_path, tmp_path / "sweep", controller={"env": "dream"}, evaluate={"episodes": 2})
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "temperature_sweep.py"), "--config", config,
           "--from", tiny_run["run_dir"], "--taus", "0.5", "1.3"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert_ok(proc)
    table = (tmp_path / "sweep_sweep.md").read_text()
    for tau in ("0.5", "1.3"):
        run_dir = tmp_path / f"sweep_tau{tau}"
        scores = json.load(open(run_dir / "eval" / "scores.json"))
        assert scores["dream"]["temperature"] == float(tau)
        assert os.path.samefile(run_dir / "mdnrnn" / "best.pt", os.path.join(tiny_run["run_dir"], "mdnrnn", "best.pt"))
        d = scores["dream"]
        assert (f"| {tau} | {d['mean']:.1f} +- {d['std']:.1f} (2 episodes) | "
                f"{scores['mean']:.1f} +- {scores['std']:.1f} (2 episodes) | 2 |") in table
    real = write_config(tmp_path, tmp_path / "sweep", controller={"env": "real"})
    assert_user_error(subprocess.run(cmd[:3] + [real] + cmd[4:], cwd=ROOT, capture_output=True, text=True, timeout=60),
                      "controller.env must be dream")


def test_dream_exploits_replays_the_cmaes_means_and_plays_c(tiny_run, tmp_path):
    """benchmarks/dream_exploits.py: the replayed generation-g mean is the one stage 05 re-evaluated (the
    final one is controller.pt's params_mean), each M's dream scores it, and C's real behaviour is printed."""
    import os
    import subprocess
    import sys

    from conftest import ROOT, assert_ok, assert_user_error

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from dream_exploits import cmaes_means

    from utils.checkpoints import load_model

    run = tiny_run["run_dir"]
    means, meta = cmaes_means(os.path.join(run, "controller", "cmaes_state.npz"))
    _, ckpt = load_model(os.path.join(run, "controller", "controller.pt"), "controller")
    assert len(means) == 3 and np.allclose(means[-1], ckpt["params_mean"].numpy(), atol=1e-6)
    assert np.abs(means[0]).max() == 0 and np.abs(means[2] - means[1]).max() > 0
    other = os.path.join(run, "mdnrnn", "best.pt")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "dream_exploits.py"), "--config",
                           tiny_run["config"], "--other-mdnrnn", other, "--every", "1", "--episodes", "2",
                           "--tracks", "1", "--steps", "6", "--write-generation", "1", str(tmp_path / "g1.pt")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert_ok(proc)
    _, g1 = load_model(str(tmp_path / "g1.pt"), "controller")
    np.testing.assert_array_equal(g1["params_mean"].numpy(), means[1].astype(np.float32))
    assert g1["generation"] == 1 and g1["inputs"] == ckpt["inputs"]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [int(r.split("|")[1]) for r in rows] == [0, 1, 2]
    held = next(r for r in meta["history"] if r.get("heldout_mean") is not None)
    assert rows[held["generation"]].rstrip().endswith(f"{held['heldout_mean']:.1f} +- {held['heldout_std']:.1f} |")
    cells = rows[2].split("|")[2:4]
    assert cells[0] == cells[1]  # the same M given twice: the same seeded dream
    assert "track 0: 6 steps, return" in proc.stdout and "gas" in proc.stdout
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "dream_exploits.py"), "--config",
                          tiny_run["config"], "--every", "0"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert_user_error(bad, "--every")
