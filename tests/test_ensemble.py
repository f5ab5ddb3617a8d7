"""models/ensemble.py: K Ms behind one M interface; row b's world is member b % K, member 0 the agent."""

import numpy as np
import pytest
import torch

from models import build, checkpoint_dict, from_checkpoint_dict
from models.dream import dream_returns
from models.ensemble import MemoryEnsemble, PenalisedEnsemble
from models.mdnrnn import MDNRNNConfig
from models.rssm import RSSMConfig, RSSMOptions
from models.tssm import TSSMConfig, TSSMOptions

CONFIGS = {"mdnrnn": MDNRNNConfig(hidden=8, gaussians=2),
           "rssm": RSSMConfig(hidden=8, rssm=RSSMOptions(stoch=4, units=8)),
           "tssm": TSSMConfig(hidden=8, tssm=TSSMOptions(layers=1, heads=2, context=4))}
Z, A, B = 4, 3, 5


def steps(memory, z, a, generator):
    """Filter 2 real steps, then imagine 2: C's features, the heads and the latent after every step."""
    out = []
    state = memory.observe(memory.initial_state(len(z)), z[:, 0])
    for t in range(4):
        out.append(memory.features(state))
        state = memory.transition(state, a[:, t])
        state = memory.observe(state, z[:, t + 1]) if t < 2 else memory.imagine(state, 1.0, generator)
        out += [*memory.heads(state), memory.latent(state)]
    return out


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_each_rows_world_is_its_member_and_member_0_drives_for_every_memory_kind(kind):
    torch.manual_seed(0)
    ensemble = build("memory", kind, CONFIGS[kind], z_dim=Z, action_dim=A, members=2).eval()
    assert isinstance(ensemble, MemoryEnsemble) and ensemble.kind == kind
    assert ensemble.sizes() == {"z_dim": Z, "action_dim": A, "members": 2}
    first, second = ensemble.members
    assert not torch.equal(next(first.parameters()), next(second.parameters()))  # initialised apart
    z, a = torch.randn(B, 3, Z), torch.rand(B, 4, A)
    with torch.no_grad():
        together = steps(ensemble, z, a, torch.Generator().manual_seed(1))
        # by hand: each member's world on its rows (member 0's rows drawn first, as the ensemble draws them),
        # and member 0 filtering every row's z: the real ones, then the world's
        gen = torch.Generator().manual_seed(1)
        worlds = [m.observe(m.initial_state(len(z[i::2])), z[i::2, 0]) for i, m in enumerate(ensemble.members)]
        agent = first.observe(first.initial_state(B), z[:, 0])
        expected = []
        for t in range(4):
            expected.append(first.features(agent))
            worlds = [m.transition(w, a[i::2, t]) for (i, m), w in zip(enumerate(ensemble.members), worlds)]
            agent = first.transition(agent, a[:, t])
            if t < 2:
                worlds = [m.observe(w, z[i::2, t + 1]) for (i, m), w in zip(enumerate(ensemble.members), worlds)]
                latent = z[:, t + 1]
            else:
                worlds = [m.imagine(w, 1.0, gen) for m, w in zip(ensemble.members, worlds)]
                latent = torch.empty(B, Z)
                for i, (m, w) in enumerate(zip(ensemble.members, worlds)):
                    latent[i::2] = m.latent(w)
            agent = first.observe(agent, latent)
            for j in range(3):  # reward, done logit, latent: interleave the members' rows
                merged = torch.empty(B) if j < 2 else torch.empty(B, Z)
                for i, (m, w) in enumerate(zip(ensemble.members, worlds)):
                    merged[i::2] = (*m.heads(w), m.latent(w))[j]
                expected.append(merged)
    assert len(together) == len(expected)
    for got, want in zip(together, expected):
        torch.testing.assert_close(got, want)


def test_a_batch_of_one_is_member_0_and_the_loss_is_the_members_mean():
    torch.manual_seed(0)
    ensemble = build("memory", "mdnrnn", CONFIGS["mdnrnn"], z_dim=Z, action_dim=A, members=3)
    z = torch.randn(1, Z)
    state = ensemble.observe(ensemble.initial_state(1), z)
    alone = ensemble.members[0].observe(ensemble.members[0].initial_state(1), z)
    a = torch.rand(1, A)
    torch.testing.assert_close(ensemble.heads(ensemble.transition(state, a)),
                               ensemble.members[0].heads(ensemble.members[0].transition(alone, a)))
    batch = (torch.randn(2, 6, Z), torch.rand(2, 5, A), torch.randn(2, 5), torch.zeros(2, 5), torch.ones(2, 5),
             torch.ones(2, 5))
    terms = ensemble.loss(*batch, reward_weight=0.5)
    each = [m.loss(*batch, reward_weight=0.5) for m in ensemble.members]
    for name in ("loss", "nll", "reward_mse", "done_bce"):
        assert terms[name].item() == pytest.approx(np.mean([t[name].item() for t in each]), rel=1e-6)
    terms["loss"].backward()
    assert all(p.grad is not None for p in ensemble.parameters())  # every member learns


def test_checkpoint_round_trip_keeps_the_members_and_a_dream_spreads_rows_over_them():
    torch.manual_seed(0)
    ensemble = build("memory", "mdnrnn", CONFIGS["mdnrnn"], z_dim=Z, action_dim=A, members=2).eval()
    ckpt = checkpoint_dict(ensemble)
    assert ckpt["kind"] == "mdnrnn" and ckpt["sizes"]["members"] == 2
    loaded = from_checkpoint_dict(ckpt, "memory")
    assert isinstance(loaded, MemoryEnsemble) and len(loaded.members) == 2
    params = np.random.default_rng(0).normal(size=(4, A * (Z + 8) + A)).astype(np.float32)
    starts = np.random.default_rng(1).normal(size=(4, Z)).astype(np.float32)
    low, high = np.array([-1.0, 0, 0]), np.ones(3)
    returns = [dream_returns(m, params, starts, low, high, 1.0, 10, torch.Generator().manual_seed(2))[0]
               for m in (ensemble, loaded)]
    np.testing.assert_array_equal(*returns)
    with pytest.raises(ValueError, match="at least 2 members"):
        MemoryEnsemble([ensemble.members[0]])
    other = build("memory", "mdnrnn", MDNRNNConfig(hidden=6, gaussians=2), z_dim=Z, action_dim=A)
    with pytest.raises(ValueError, match="same kind, config and sizes"):
        MemoryEnsemble([ensemble.members[0], other])


def test_the_penalised_dream_is_the_ensembles_dream_minus_lambda_times_the_members_reward_spread():
    """PenalisedEnsemble (MOPO): lambda 0 gives exactly MemoryEnsemble's dream for the same generator; with lambda
    > 0 a step's reward is its world's minus lambda times the std of every member's reward, each member having
    filtered the same z sequence."""
    torch.manual_seed(0)
    ensemble = build("memory", "mdnrnn", CONFIGS["mdnrnn"], z_dim=Z, action_dim=A, members=3).eval()
    params, starts = np.random.default_rng(0).normal(0, 0.5, (7, (Z + 8) * A + A)), np.random.randn(7, Z)
    low, high = np.array([-1.0, 0, 0]), np.ones(3)
    def play(memory):
        return dream_returns(memory, params, starts, low, high, 1.0, 12, torch.Generator().manual_seed(3))

    plain, unpenalised = play(ensemble), play(PenalisedEnsemble(ensemble, 0.0))
    penalised = play(PenalisedEnsemble(ensemble, 2.0))
    np.testing.assert_array_equal(plain[0], unpenalised[0])
    assert (penalised[0] < plain[0]).all()  # the same dream (same z draws), every step charged
    pessimist = PenalisedEnsemble(ensemble, 2.0)
    z, a = torch.randn(B, Z), torch.rand(B, A)
    with torch.no_grad():
        state = pessimist.imagine(pessimist.transition(pessimist.observe(pessimist.initial_state(B), z), a), 1.0,
                                  torch.Generator().manual_seed(4))
        world = ensemble.imagine(ensemble.transition(ensemble.observe(ensemble.initial_state(B), z), a), 1.0,
                                 torch.Generator().manual_seed(4))
        next_z = ensemble.latent(world)
        torch.testing.assert_close(pessimist.latent(state), next_z)
        torch.testing.assert_close(pessimist.features(state), ensemble.features(world))
        every = torch.stack([m.heads(m.observe(m.transition(m.observe(m.initial_state(B), z), a), next_z))[0]
                             for m in ensemble.members])  # (3, B): each member on every row
        reward, done = pessimist.heads(state)
        world_reward, world_done = ensemble.heads(world)
    torch.testing.assert_close(reward, world_reward - 2.0 * every.std(dim=0))
    torch.testing.assert_close(done, world_done)
    with pytest.raises(ValueError, match="ensemble M"):
        PenalisedEnsemble(ensemble.members[0], 1.0)
    with pytest.raises(ValueError, match=">= 0"):
        PenalisedEnsemble(ensemble, -1.0)


def test_min_ensemble_fitness_is_the_worst_members_mean():
    from utils.cmaes_trainer import candidate_fitness

    # candidate c's rollout j dreams in member j % 2: columns 0 and 2 are member 0's, 1 and 3 member 1's
    returns = np.array([[10.0, 0.0, 30.0, 4.0],     # member means 20 and 2
                        [-5.0, 50.0, -15.0, 70.0]])  # member means -10 and 60
    np.testing.assert_allclose(candidate_fitness(returns), [11.0, 25.0])
    np.testing.assert_allclose(candidate_fitness(returns, members=2), [2.0, -10.0])
    np.testing.assert_allclose(candidate_fitness(returns, members=4), returns.min(axis=1))
    with pytest.raises(ValueError, match=r"rollouts_per_candidate \(4\) must be a multiple"):
        candidate_fitness(returns, members=3)


def test_stages_04_to_06_with_an_ensemble_of_two(tiny_run, tmp_path):
    """04 with memory.ensemble=2 saves both members in one checkpoint; 05 trains C in their dream from real
    windows; 06 scores C in the real env and the dream. A fine-tune from a single M is refused before 04 writes."""
    import json
    import os
    import shutil

    from conftest import assert_ok, assert_user_error, run_script, write_config

    from utils.checkpoints import load_model

    run_dir = tmp_path / "run"
    for stage in ("vision", "latents"):
        shutil.copytree(os.path.join(tiny_run["run_dir"], stage), run_dir / stage)
    config = write_config(tmp_path, run_dir, memory={"ensemble": 2},
                          controller={"env": "dream", "dream_starts": "anywhere", "rollouts_per_candidate": 2,
                                      "generations": 1, "eval_every": 1, "max_steps": 12})
    single = os.path.join(tiny_run["run_dir"], "mdnrnn", "best.pt")
    assert_user_error(run_script("04_train_mdnrnn", config, "--set", f"memory.init_from={single}"),
                      "memory.init_from", "'members': 2")
    assert not (run_dir / "mdnrnn").exists()
    proc = run_script("04_train_mdnrnn", config)
    assert_ok(proc)
    assert "M = mdnrnn x 2 (ensemble)" in proc.stdout
    memory, ckpt = load_model(str(run_dir / "mdnrnn" / "best.pt"), "memory")
    assert isinstance(memory, MemoryEnsemble) and ckpt["sizes"]["members"] == 2
    for stage in ("05_train_controller", "06_evaluate"):
        assert_ok(run_script(stage, config))
    scores = json.load(open(run_dir / "eval" / "scores.json"))
    assert np.isfinite(scores["mean"]) and np.isfinite(scores["dream"]["mean"])
    # benchmarks/dream_score.py plays C as 06 does: with evaluate.params=mean, the final CMA-ES mean
    import subprocess
    import sys

    from conftest import ROOT

    from models.dream import dream_score
    from utils.data import start_latents
    from utils.io import list_episodes

    c, c_ckpt = load_model(str(run_dir / "controller" / "controller.pt"), "controller")
    c_ckpt["params_mean"] = c_ckpt["state_dict"]["params"] + 0.5  # a final mean unlike the best held-out one
    edited = tmp_path / "controller.pt"
    torch.save(c_ckpt, edited)
    proc = subprocess.run([sys.executable, "benchmarks/dream_score.py", "--config", config, "--set",
                           "evaluate.params=mean", "--controller", str(edited), "--taus", "1.0", "--episodes", "4"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert_ok(proc)
    starts = start_latents(list_episodes(str(run_dir / "latents"), "latents"))
    played, best = (dream_score(memory, starts, p.numpy(), c.low, c.high, 1.0, 4, 100, 7)["mean"]
                    for p in (c_ckpt["params_mean"], c_ckpt["state_dict"]["params"]))
    assert "  per world member: 0: " in proc.stdout and ", 1: " in proc.stdout
    printed = next(line for line in proc.stdout.splitlines() if line.startswith("tau 1  controller"))
    assert float(printed.split()[3]) == pytest.approx(played, abs=0.06) and abs(played - best) > 0.1

    # controller.ensemble_fitness=min: a state trained with the mean is not resumed with it, a single M and a
    # member count that does not divide the rollouts are refused before 05 writes, and it trains
    history = (run_dir / "controller" / "history.csv").read_bytes()
    assert_user_error(run_script("05_train_controller", config, "--set", "controller.ensemble_fitness=min"),
                      "ensemble_fitness=mean", "has min")
    assert_user_error(run_script("05_train_controller", config, "--mdnrnn", single, "--overwrite", "--set",
                                 "controller.ensemble_fitness=min"), "controller.ensemble_fitness", "single M")
    assert_user_error(run_script("05_train_controller", config, "--overwrite", "--set",
                                 "controller.ensemble_fitness=min", "controller.rollouts_per_candidate=3"),
                      "rollouts_per_candidate: 3", "2 ensemble")
    assert (run_dir / "controller" / "history.csv").read_bytes() == history
    proc = run_script("05_train_controller", config, "--overwrite", "--set", "controller.ensemble_fitness=min")
    assert_ok(proc)
    assert "fitness of the worst of 2 world members" in proc.stdout

    # controller.disagreement_penalty (MOPO): refused for a single M, not resumed from a state without it, trains
    history = (run_dir / "controller" / "history.csv").read_bytes()
    assert_user_error(run_script("05_train_controller", config, "--mdnrnn", single, "--overwrite", "--set",
                                 "controller.disagreement_penalty=1.0"), "controller.disagreement_penalty", "single M")
    assert_user_error(run_script("05_train_controller", config, "--set", "controller.ensemble_fitness=min",
                                 "controller.disagreement_penalty=1.0"), "disagreement_penalty=0.0", "has 1.0")
    assert (run_dir / "controller" / "history.csv").read_bytes() == history
    proc = run_script("05_train_controller", config, "--overwrite", "--set", "controller.disagreement_penalty=1.0")
    assert_ok(proc)
    assert "reward minus 1 x the spread of 2 members' rewards (MOPO)" in proc.stdout
