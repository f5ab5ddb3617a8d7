"""The RSSM as M: its KL terms, the common M interface, checkpoints, and stages 04-06 with memory.kind rssm."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from torch import distributions as D

from conftest import NVAE_TINY, assert_ok, run_script, write_config
from models import MEMORY_KINDS
from models.controller import LinearController, LinearControllerConfig
from models.dream import DreamEnv, dream_returns
from models.rssm import RSSM, RSSMConfig, RSSMOptions
from utils.checkpoints import load_model, save_model
from utils.errors import UserError

LOW, HIGH = np.array([-1.0, 0.0, 0.0], np.float32), np.array([1.0, 1.0, 1.0], np.float32)


def rssm(classes=0, free_nats=1.0, z_dim=6):
    torch.manual_seed(0)
    options = RSSMOptions(stoch=4, classes=classes, units=16, free_nats=free_nats)
    return RSSM(RSSMConfig(hidden=12, rssm=options), z_dim=z_dim, action_dim=3)


def window(B=3, T=5, z_dim=6):
    g = torch.Generator().manual_seed(1)
    z, a = torch.randn(B, T + 1, z_dim, generator=g), torch.rand(B, T, 3, generator=g)
    return z, a, torch.randn(B, T, generator=g), torch.zeros(B, T), torch.ones(B, T), torch.ones(B, T)


@pytest.mark.parametrize("classes", [0, 4])
def test_kl_is_non_negative_matches_torch_and_the_free_nats_floor_holds(classes):
    m = rssm(classes, free_nats=3.0)
    _, priors, posts = m.filter(*window()[:2])
    kl, balanced = m.kl_terms(priors, posts)
    assert kl.shape == balanced.shape == (3, 5)
    assert (kl >= 0).all()
    torch.testing.assert_close(kl[:, 2], D.kl_divergence(m._dist(posts[:, 2]), m._dist(priors[:, 2])))
    assert (balanced >= 3.0 - 1e-6).all()  # each side floored at free_nats, and the weights sum to 1
    # above the floor the balance is alpha KL(sg(q) || p) + (1 - alpha) KL(q || sg(p)), both equal to KL in value
    m.options.free_nats = 0.0
    torch.testing.assert_close(m.kl_terms(priors, posts)[1], kl)


@pytest.mark.parametrize("classes", [0, 4])
def test_loss_terms_and_gradients(classes):
    m = rssm(classes, free_nats=0.0)  # below the floor the KL has no gradient (free nats): test above it
    terms = m.loss(*window())
    assert set(terms) == {"loss", "nll", "z_nll", "kl", "reward_mse", "done_bce"}
    assert all(torch.isfinite(v) for v in terms.values())
    # nll is the negative ELBO per latent dimension: reconstruction plus KL per step over z_dim
    torch.testing.assert_close(terms["nll"], terms["z_nll"] + terms["kl"] / 6)
    terms["loss"].backward()
    assert all(p.grad is not None for p in m.parameters())
    assert m.prior_net[0].weight.grad.abs().sum() > 0  # the KL trains the prior
    assert m.posterior_net[0].weight.grad.abs().sum() > 0


def test_discrete_state_is_one_hot_with_straight_through_gradients():
    m = rssm(classes=4)
    h = torch.randn(2, 12)
    dist = m._dist(m.prior_net(h))
    s = m._sample(dist, generator=torch.Generator().manual_seed(0))
    assert s.shape == (2, 16)
    torch.testing.assert_close(s.detach().view(2, 4, 4).sum(-1), torch.ones(2, 4))
    torch.testing.assert_close(s.detach(), s.detach().round())  # one-hot up to float rounding
    (s * torch.arange(16.0)).sum().backward()  # straight-through: a gradient reaches the prior's logits
    assert m.prior_net[-1].weight.grad.abs().sum() > 0
    probs = dist.base_dist.probs
    assert probs.min() >= m.options.unimix / 4 - 1e-6  # the uniform mix keeps every class possible


def test_the_interface_drives_the_dream_and_the_batched_dream_alike():
    m = rssm().eval()
    starts = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
    controller = LinearController(LinearControllerConfig(), m.feature_dim, LOW, HIGH)
    theta = np.random.default_rng(1).normal(scale=0.3, size=controller.num_params).astype(np.float32)
    controller.set_params(theta)
    env = DreamEnv(m, starts, LOW, HIGH, temperature=1.0, max_steps=15)
    obs, _ = env.reset(seed=3, options={"start": 1})
    assert obs.shape == (m.feature_dim,)
    generator = torch.Generator()
    generator.set_state(env._generator.get_state())
    total, done = 0.0, False
    while not done:
        obs, reward, terminated, truncated, _ = env.step(controller(torch.from_numpy(obs)[None])[0].numpy())
        total, done = total + reward, terminated or truncated
    batched, lengths = dream_returns(m, theta[None], starts[1:2], LOW, HIGH, 1.0, 15, generator)
    assert batched[0] == pytest.approx(total, rel=1e-5, abs=1e-5) and lengths[0] == env._t


def test_round_trip_and_the_wrong_kind(tmp_path):
    for classes in (0, 4):
        m = rssm(classes).eval()
        path = str(tmp_path / f"rssm{classes}.pt")
        save_model(path, m)
        again, ckpt = load_model(path, "memory")
        assert isinstance(again, RSSM) and ckpt["kind"] == "rssm" and again.config == m.config
        z, a = window()[:2]
        state = again.observe(again.initial_state(3), z[:, 0])
        ref = m.observe(m.initial_state(3), z[:, 0])
        torch.testing.assert_close(again.features(again.transition(state, a[:, 0])),
                                   m.features(m.transition(ref, a[:, 0])))
    with pytest.raises(UserError, match=r"rssm0.pt: checkpoint of kind 'rssm', expected a vision checkpoint"):
        load_model(str(tmp_path / "rssm0.pt"), "vision")
    assert set(MEMORY_KINDS) >= {"mdnrnn", "rssm"}


def test_stages_04_to_06_with_an_rssm_on_the_nvae(tiny_nvae_run, tmp_path):
    """The NVAE as V here (the TSSM's and the actor-critic's stage tests use the conv VAE)."""
    run_dir = tmp_path / "run"
    for stage in ("rollouts", "vision", "latents"):
        shutil.copytree(os.path.join(tiny_nvae_run["run_dir"], stage), run_dir / stage)
    memory = {"kind": "rssm", "hidden": 16, "seq_len": 8, "batch_size": 4, "epochs": 2, "threads": 1,
              "rssm": {"stoch": 4, "classes": 4, "units": 16}}
    config = write_config(tmp_path, run_dir, vision=NVAE_TINY, memory=memory,
                          evaluate={"episodes": 3, "max_steps": 30})
    proc = run_script("04_train_mdnrnn", config)
    assert_ok(proc)
    assert "M = rssm" in proc.stdout
    log = [json.loads(line) for line in open(run_dir / "mdnrnn" / "train_log.jsonl")]
    assert len(log) == 2 and all(row["val_kl"] >= 0 and np.isfinite(row["val_nll"]) for row in log)
    m, _ = load_model(str(run_dir / "mdnrnn" / "best.pt"), "memory")
    assert isinstance(m, RSSM) and m.feature_dim == 16 + 16
    for stage in ("05_train_controller", "06_evaluate"):
        assert_ok(run_script(stage, config))
    scores = json.load(open(run_dir / "eval" / "scores.json"))
    assert scores["episodes"] == 3 and np.isfinite(scores["mean"])
