"""V, M and C: losses against closed forms and torch.distributions, shapes, save/load round trips."""

import math

import numpy as np
import pytest
import torch
from torch import distributions as D

from models import load_mdnrnn, load_vision, load_world_model, vision_checkpoint
from models.controller import LinearController
from models.mdnrnn import MDNRNN, MixtureParams, mdn_nll, mdn_sample, mdnrnn_loss
from models.vae import ConvVAE, gaussian_kl
from utils.errors import UserError
from utils.envs import squash_to_bounds
from utils.io import save_torch


def test_gaussian_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mu, logvar = torch.randn(5, 7), torch.randn(5, 7)
    q = D.Normal(mu, (0.5 * logvar).exp())
    p = D.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    expected = D.kl_divergence(q, p).sum(-1)
    torch.testing.assert_close(gaussian_kl(mu, logvar), expected)
    assert torch.allclose(gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 3)), torch.zeros(2))


def test_mdn_nll_matches_mixture_same_family():
    torch.manual_seed(0)
    B, T, Dz, K = 2, 3, 4, 5
    params = MixtureParams(torch.randn(B, T, Dz, K), torch.randn(B, T, Dz, K), 0.5 * torch.randn(B, T, Dz, K))
    target = torch.randn(B, T, Dz)
    mix = D.MixtureSameFamily(D.Categorical(logits=params.logit_pi), D.Normal(params.mu, params.log_sigma.exp()))
    expected = -mix.log_prob(target).sum(-1)
    torch.testing.assert_close(mdn_nll(params, target), expected)


def test_mdn_nll_is_finite_far_from_every_component():
    params = MixtureParams(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.full((1, 2, 3), -5.0))
    nll = mdn_nll(params, torch.full((1, 2), 1e3))
    assert torch.isfinite(nll).all() and nll.item() > 0


def test_mdn_sample_low_temperature_is_the_likely_mean():
    logit = torch.tensor([[[0.0, 10.0]]])
    params = MixtureParams(logit, torch.tensor([[[-3.0, 2.0]]]), torch.zeros(1, 1, 2))
    z = mdn_sample(params, temperature=1e-4, generator=torch.Generator().manual_seed(0))
    assert abs(z.item() - 2.0) < 0.05


def test_vae_shapes_and_loss_terms():
    vae = ConvVAE(z_dim=32)
    x = torch.rand(4, 3, 64, 64)
    mu, logvar = vae.encode(x)
    assert mu.shape == logvar.shape == (4, 32)
    out = vae.decode(mu)
    assert out.shape == (4, 3, 64, 64) and out.min() >= 0 and out.max() <= 1
    terms = vae.loss(x)
    assert set(terms) == {"loss", "recon", "kl", "neg_elbo"}
    torch.testing.assert_close(terms["neg_elbo"], terms["recon"] + terms["kl"])
    assert terms["loss"] >= terms["recon"] + 0.5 * 32 - 1e-4  # free nats floor on the KL
    assert vae.sample_prior(3).shape == (3, 3, 64, 64)


def test_vae_rejects_other_frame_sizes():
    with pytest.raises(ValueError, match="64x64"):
        ConvVAE(frame_size=84)


def test_mdnrnn_shapes_and_step_matches_sequence():
    torch.manual_seed(0)
    m = MDNRNN(z_dim=6, action_dim=3, hidden=16, gaussians=5).eval()
    z, a = torch.randn(2, 4, 6), torch.randn(2, 4, 3)
    params, reward, done, state = m(z, a)
    assert params.mu.shape == (2, 4, 6, 5) and reward.shape == done.shape == (2, 4)
    assert params.log_sigma.min() >= m.min_log_sigma and params.log_sigma.max() <= m.max_log_sigma
    s = m.initial_state(2)
    for t in range(4):
        p_t, r_t, d_t, s = m.step(z[:, t], a[:, t], s)
        torch.testing.assert_close(p_t.mu, params.mu[:, t])
        torch.testing.assert_close(r_t, reward[:, t])
    torch.testing.assert_close(s[0], state[0])
    s2 = m.initial_state(2)
    for t in range(4):
        s2 = m.advance(z[:, t], a[:, t], s2)
    torch.testing.assert_close(s2[0], state[0])


def test_mdnrnn_loss_masks_padding():
    torch.manual_seed(0)
    m = MDNRNN(z_dim=4, action_dim=2, hidden=8, gaussians=2)
    z, a = torch.randn(1, 5, 4), torch.randn(1, 4, 2)
    r, d = torch.randn(1, 4), torch.zeros(1, 4)
    ones = torch.ones(1, 4)
    full = mdnrnn_loss(m, z, a, r, d, ones, ones)
    z_bad = z.clone()
    z_bad[0, -1] = 1e6  # padding target: must be ignored when masked
    masked = mdnrnn_loss(m, z_bad, a, r, d, torch.tensor([[1.0, 1, 1, 0]]), ones)
    assert torch.isfinite(masked["loss"])
    assert masked["nll"].item() != pytest.approx(full["nll"].item())


def test_controller_parameter_count_and_bounds():
    low, high = np.array([-1, 0, 0], np.float32), np.array([1, 1, 1], np.float32)
    c = LinearController(32 + 256, low, high)
    assert c.num_params == 867  # Ha & Schmidhuber's CarRacing controller
    params = np.random.default_rng(0).normal(scale=10, size=867)
    c.set_params(params)
    np.testing.assert_allclose(c.get_params(), params.astype(np.float32))
    a = c(torch.randn(64, 32) * 5, torch.randn(64, 256))
    assert a.shape == (64, 3)
    assert (a >= torch.tensor(low)).all() and (a <= torch.tensor(high)).all()
    with pytest.raises(ValueError, match="867"):
        c.set_params(np.zeros(10))


def test_squash_numpy_and_torch_agree():
    u = np.linspace(-3, 3, 9, dtype=np.float32)[:, None].repeat(3, 1)
    low, high = np.array([-1, 0, 0], np.float32), np.array([1, 1, 1], np.float32)
    np.testing.assert_allclose(squash_to_bounds(u, low, high), squash_to_bounds(torch.from_numpy(u), low, high).numpy(), atol=1e-6)
    assert squash_to_bounds(np.zeros(3, np.float32), low, high).tolist() == [0.0, 0.5, 0.5]


def test_vision_save_load_round_trip(tmp_path):
    vae = ConvVAE(z_dim=8, kl_tolerance=0.0).eval()
    path = str(tmp_path / "v.pt")
    save_torch(path, vision_checkpoint(vae, step=3))
    loaded, ckpt = load_vision(path)
    assert ckpt["step"] == 3 and loaded.z_dim == 8 and loaded.kl_tolerance == 0.0
    x = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(loaded.encode(x), vae.encode(x))


def test_mdnrnn_round_trip_and_wrong_kind(tmp_path):
    m = MDNRNN(z_dim=8, action_dim=3, hidden=16).eval()
    path = str(tmp_path / "m.pt")
    save_torch(path, {"kind": "mdnrnn", "hparams": m.hparams(), "state_dict": m.state_dict()})
    loaded, _ = load_mdnrnn(path)
    z, a = torch.randn(1, 2, 8), torch.randn(1, 2, 3)
    torch.testing.assert_close(loaded(z, a)[0].mu, m(z, a)[0].mu)
    with pytest.raises(UserError, match=r"m.pt: checkpoint of kind 'mdnrnn', expected one of \('vae', 'nvae'\)"):
        load_vision(path)
    vpath = str(tmp_path / "v.pt")
    save_torch(vpath, vision_checkpoint(ConvVAE(z_dim=4)))
    with pytest.raises(UserError, match="MDN-RNN trained on z_dim=8"):
        load_world_model(vpath, path)


def test_kl_closed_form_value():
    # KL(N(1, e^0) || N(0, 1)) = 0.5 per dimension
    assert gaussian_kl(torch.ones(1, 4), torch.zeros(1, 4)).item() == pytest.approx(2.0)
    assert math.isclose(gaussian_kl(torch.zeros(1, 1), torch.log(torch.tensor([[4.0]]))).item(), 0.5 * (4 - math.log(4) - 1), rel_tol=1e-6)
