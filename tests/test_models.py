"""V, M and C: losses against closed forms and torch.distributions, shapes, save/load round trips."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import distributions as D

from models.controller import LinearController, LinearControllerConfig, batched_actions, squash_to_bounds
from models.mdnrnn import (MDNRNN, MDNRNNConfig, MixtureParams, mdn_nll, mdn_sample, mdnrnn_loss, open_loop_starts,
                           open_loop_terms, smoothed_rewards)
from models.vae import ConvVAE, VAEConfig, gaussian_kl
from utils.checkpoints import load_model, load_world_model, save_model
from conftest import CreatesAFile
from utils.errors import UserError


def mdnrnn(z_dim, action_dim, hidden=16, gaussians=5):
    return MDNRNN(MDNRNNConfig(hidden=hidden, gaussians=gaussians), z_dim=z_dim, action_dim=action_dim)


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


def test_mdn_nll_gradients_match_mixture_same_family():
    torch.manual_seed(1)
    fields = [torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    target = torch.randn(3, 4, dtype=torch.float64)
    ours = torch.autograd.grad(mdn_nll(MixtureParams(*fields), target).sum(), fields)
    logit, mu, log_sigma = fields
    mix = D.MixtureSameFamily(D.Categorical(logits=logit), D.Normal(mu, log_sigma.exp()))
    theirs = torch.autograd.grad(-mix.log_prob(target).sum(), fields)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


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
    vae = ConvVAE(VAEConfig(z_dim=32))
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
        ConvVAE(VAEConfig(), frame_size=84)


def test_mdnrnn_shapes_and_step_matches_sequence():
    torch.manual_seed(0)
    m = mdnrnn(6, 3).eval()
    z, a = torch.randn(2, 4, 6), torch.randn(2, 4, 3)
    params, reward, done, state = m(z, a)
    assert params.mu.shape == (2, 4, 6, 5) and reward.shape == done.shape == (2, 4)
    assert params.log_sigma.min() >= m.min_log_sigma and params.log_sigma.max() <= m.max_log_sigma
    s = m.initial_state(2)  # the one-step interface: observe z_t, read [z_t, h_t], transition with a_t
    for t in range(4):
        s = m.observe(s, z[:, t])
        torch.testing.assert_close(m.features(s), torch.cat([z[:, t], s[0]], -1))
        s = m.transition(s, a[:, t])
        r_t, d_t = m.heads(s)
        torch.testing.assert_close(m._mixture(s[0]).mu, params.mu[:, t])
        torch.testing.assert_close(r_t, reward[:, t])
        torch.testing.assert_close(d_t, done[:, t])
    torch.testing.assert_close(s[0], state[0][0])


def test_mdnrnn_loss_ignores_whatever_the_padding_holds():
    """Two batches that differ only where the masks say padding give the same loss, term by term."""
    torch.manual_seed(0)
    m = mdnrnn(4, 2, hidden=8, gaussians=2)
    z, a = torch.randn(2, 6, 4), torch.randn(2, 5, 2)
    r, d = torch.randn(2, 5), torch.zeros(2, 5)
    next_valid = torch.tensor([[1.0, 1, 1, 1, 1], [1, 1, 0, 0, 0]])  # row 1: 3 real steps, z_3 is its last frame
    step_valid = torch.tensor([[1.0, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    z2, a2, r2, d2 = z.clone(), a.clone(), r.clone(), d.clone()
    z2[1, 3:] = 1e3  # padded latents (targets and inputs after the episode's end)
    a2[1, 3:] = -7.0
    r2[1, 3:] = 50.0
    d2[1, 3:] = 1.0
    clean = mdnrnn_loss(m, z, a, r, d, next_valid, step_valid)
    padded = mdnrnn_loss(m, z2, a2, r2, d2, next_valid, step_valid)
    for key in ("loss", "nll", "reward_mse", "done_bce"):
        torch.testing.assert_close(padded[key], clean[key])
    unmasked = mdnrnn_loss(m, z2, a2, r2, d2, torch.ones(2, 5), torch.ones(2, 5))
    assert unmasked["loss"] > clean["loss"] + 100  # the test can fail: without the masks the padding counts


def test_open_loop_terms_are_the_dreams_errors_on_the_real_actions():
    """One open-loop run (T 5, horizon 4: it starts at step 2) equals M's dream by the one-step interface: filter
    z_0, z_1, read z_2, then imagine with the same generator, scored on the real z, reward and done of steps 3
    and 4 (step 5 is past the window); a padded step drops out."""
    torch.manual_seed(0)
    m = mdnrnn(4, 2, hidden=8, gaussians=3)
    B, T, k = 3, 5, 4
    assert open_loop_starts(T, k) == [2]
    z, a = torch.randn(B, T + 1, 4), torch.randn(B, T, 2)
    r, d = torch.randn(B, T), (torch.rand(B, T) > 0.5).float()
    next_valid, step_valid = torch.ones(B, T), torch.ones(B, T)
    next_valid[0, 4] = step_valid[0, 4] = 0.0  # row 0's episode ended at step 3
    got = open_loop_terms(m, z, a, r, d, next_valid, step_valid, k, torch.Generator().manual_seed(5))

    gen = torch.Generator().manual_seed(5)
    s = m.initial_state(B)
    for t in range(3):
        s = m.transition(m.observe(s, z[:, t]), a[:, t])
    s = m.imagine(s, 1.0, gen)
    nll, r_err, d_err, n_z, n_r = 0.0, 0.0, 0.0, 0, 0
    for t in (3, 4):
        s = m.transition(s, a[:, t])
        reward, done_logit = m.heads(s)
        keep = step_valid[:, t].bool()
        nll += mdn_nll(m._mixture(s[0]), z[:, t + 1])[next_valid[:, t].bool()].sum()
        r_err += (reward - r[:, t]).pow(2)[keep].sum()
        d_err += F.binary_cross_entropy_with_logits(done_logit, d[:, t], reduction="none")[keep].sum()
        n_z, n_r = n_z + int(next_valid[:, t].sum()), n_r + int(keep.sum())
        s = m.imagine(s, 1.0, gen)
    torch.testing.assert_close(got["open_loop_nll"], nll / n_z / 4)
    torch.testing.assert_close(got["open_loop_reward_mse"], r_err / n_r)
    torch.testing.assert_close(got["open_loop_done_bce"], d_err / n_r)
    teacher_forced = mdnrnn_loss(m, z, a, r, d, next_valid, step_valid)
    assert abs(float((got["open_loop_reward_mse"] - teacher_forced["reward_mse"]).detach())) > 1e-3  # it can fail


def test_open_loop_reward_error_reaches_the_mixture_through_the_sampled_z():
    """The imagined z is reparameterised, so the reward error after it trains the mixture that drew it; with
    horizon 0 the loss is the teacher-forced one and the keys are absent."""
    torch.manual_seed(1)
    m = mdnrnn(4, 2, hidden=8, gaussians=2)
    z, a, r = torch.randn(2, 9, 4), torch.randn(2, 8, 2), torch.randn(2, 8)
    ones = torch.ones(2, 8)
    open_loop_terms(m, z, a, r, 0 * ones, ones, ones, 4)["open_loop_reward_mse"].backward()
    assert m.mdn_head.weight.grad.abs().sum() > 0
    plain = m.loss(z, a, r, 0 * ones, ones, ones)
    assert set(plain) == {"loss", "nll", "reward_mse", "done_bce"}
    both = m.loss(z, a, r, 0 * ones, ones, ones, open_loop_horizon=4, open_loop_weight=0.5)
    extra = both["open_loop_nll"] + both["open_loop_reward_mse"] + both["open_loop_done_bce"]
    torch.testing.assert_close(both["loss"], plain["loss"] + 0.5 * extra, rtol=0, atol=1e-5)
    for horizon in (1, 8):
        with pytest.raises(ValueError, match="open_loop_horizon"):
            open_loop_terms(m, z, a, r, 0 * ones, ones, ones, horizon)


def test_smoothed_rewards_conserve_the_return_and_spread_a_tile_as_a_gaussian():
    rewards = np.full(200, -0.1)
    rewards[[50, 53, 120]] += 3.3  # three tiles
    rewards[-1] = -100.0  # off the playfield: a terminal penalty at the episode's end
    smooth = smoothed_rewards(rewards, 3.0)
    assert smooth.dtype == np.float32 and smooth.shape == (200,)
    assert smooth.sum() == pytest.approx(rewards.sum(), abs=1e-3)  # the return, ends included
    penalty = smoothed_rewards(np.eye(1, 200, 199)[0] * -100.0, 3.0)
    assert penalty[-13:].sum() == pytest.approx(-100.0, abs=1e-3)  # within 4 sigma, before the end
    half_kernel = np.exp(-0.5 * (np.arange(13) / 3.0) ** 2)  # what of the kernel falls inside the episode
    assert penalty[-1] == pytest.approx(-100.0 / half_kernel.sum(), rel=1e-5)  # spread backwards, not amplified
    spike = np.zeros(101)
    spike[50] = 1.0
    expected = np.exp(-0.5 * ((np.arange(101) - 50) / 2.0) ** 2) / (2.0 * math.sqrt(2 * math.pi))
    np.testing.assert_allclose(smoothed_rewards(spike, 2.0), expected * (np.abs(np.arange(101) - 50) <= 8)
                               / expected[42:59].sum() * expected.sum(), atol=1e-6)
    assert np.array_equal(smoothed_rewards(rewards, 0.0), rewards.astype(np.float32))
    short = np.array([1.0, 0.0])  # an episode shorter than the kernel keeps its return
    assert smoothed_rewards(short, 5.0).sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="sigma"):
        smoothed_rewards(rewards, -1.0)


def test_controller_parameter_count_and_bounds():
    low, high = np.array([-1, 0, 0], np.float32), np.array([1, 1, 1], np.float32)
    c = LinearController(LinearControllerConfig(), 32 + 256, low, high)
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


def test_batched_actions_equal_one_controller_per_row():
    low, high = np.array([-1, 0, 0], np.float32), np.array([1, 1, 1], np.float32)
    rng = np.random.default_rng(1)
    params = torch.from_numpy(rng.normal(size=(5, 3 * (7 + 1))).astype(np.float32))
    x = torch.randn(5, 7)
    rows = []
    for i in range(5):
        c = LinearController(LinearControllerConfig(), 7, low, high)
        c.set_params(params[i].numpy())
        rows.append(c(x[i : i + 1, :4], x[i : i + 1, 4:]))
    torch.testing.assert_close(batched_actions(params, x, low, high), torch.cat(rows))


def test_vision_save_load_round_trip(tmp_path):
    vae = ConvVAE(VAEConfig(z_dim=8, kl_tolerance=0.0)).eval()
    path = str(tmp_path / "v.pt")
    save_model(path, vae, step=3)
    loaded, ckpt = load_model(path, "vision")
    assert ckpt["step"] == 3 and loaded.z_dim == 8 and loaded.config == vae.config
    x = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(loaded.encode(x), vae.encode(x))


def test_mdnrnn_round_trip_and_wrong_kind(tmp_path):
    m = mdnrnn(8, 3).eval()
    path = str(tmp_path / "m.pt")
    save_model(path, m)
    loaded, _ = load_model(path, "memory")
    z, a = torch.randn(1, 2, 8), torch.randn(1, 2, 3)
    torch.testing.assert_close(loaded(z, a)[0].mu, m(z, a)[0].mu)
    with pytest.raises(UserError, match=r"m.pt: checkpoint of kind 'mdnrnn', expected a vision checkpoint \(vae, nvae\)"):
        load_model(path, "vision")
    vpath = str(tmp_path / "v.pt")
    save_model(vpath, ConvVAE(VAEConfig(z_dim=4)))
    with pytest.raises(UserError, match="m.pt: M trained on z_dim=8, but .*v.pt has z_dim=4"):
        load_world_model(vpath, path)


def test_kl_closed_form_value():
    # KL(N(1, e^0) || N(0, 1)) = 0.5 per dimension
    assert gaussian_kl(torch.ones(1, 4), torch.zeros(1, 4)).item() == pytest.approx(2.0)
    assert math.isclose(gaussian_kl(torch.zeros(1, 1), torch.log(torch.tensor([[4.0]]))).item(), 0.5 * (4 - math.log(4) - 1), rel_tol=1e-6)


def test_a_crafted_checkpoint_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = str(tmp_path / "best.pt")
    vae = ConvVAE(VAEConfig(z_dim=4))
    torch.save({"kind": "vae", "config": {"z_dim": 4}, "sizes": {"frame_size": 64}, "state_dict": vae.state_dict(),
                "payload": CreatesAFile(str(marker))}, path)
    with pytest.raises(UserError, match="best.pt: refused.*objects other than tensors and plain types"):
        load_model(path, "vision")
    assert not marker.exists()


def test_non_finite_weights_are_never_written(tmp_path):
    vae = ConvVAE(VAEConfig(z_dim=4))
    with torch.no_grad():
        vae.to_mu.weight[0, 0] = float("nan")
    path = tmp_path / "best.pt"
    with pytest.raises(UserError, match="not written: the weights of vae hold NaN or inf"):
        save_model(str(path), vae)
    assert not path.exists() and list(tmp_path.iterdir()) == []  # no temporary file left behind either


def test_exploration_noise_is_added_before_the_tanh_bound():
    """perturb_in_bounds: squash(unsquash(a) + eps). Actions stay in bounds; noise 0 returns a; an action resting
    on a bound (CarRacing's brake at 0) stays near it, where noise added after the bound and clipped would
    brake by 0.4 sigma on average; at the centre (steering 0) the spread is sigma."""
    from models.controller import perturb_in_bounds, unsquash_from_bounds

    low, high = np.array([-1.0, 0.0, 0.0], np.float32), np.array([1.0, 1.0, 1.0], np.float32)
    rng = np.random.default_rng(0)
    action = np.tile(np.array([0.0, 0.3, 0.0], np.float32), (20000, 1))  # steer 0, some gas, no brake
    np.testing.assert_allclose(perturb_in_bounds(action, low, high, 0.0, rng), action, atol=1e-6)
    np.testing.assert_allclose(squash_to_bounds(unsquash_from_bounds(action, low, high), low, high), action, atol=1e-6)
    noisy = perturb_in_bounds(action, low, high, 0.1, rng)
    assert noisy.dtype == np.float32 and (noisy >= low).all() and (noisy <= high).all()
    assert abs(noisy[:, 0].std() - 0.1) < 0.005 and abs(noisy[:, 0].mean()) < 0.003
    clipped = np.clip(action + rng.normal(0.0, 0.1, action.shape), low, high)
    assert clipped[:, 2].mean() > 0.035 and noisy[:, 2].mean() < 1e-4  # the brake: clipped noise brakes, ours not
    assert 0 < noisy[:, 1].std() < 0.1  # gas at 0.3: the tanh's slope there, 2 * 0.3 * 0.7 = 0.42, scales it
