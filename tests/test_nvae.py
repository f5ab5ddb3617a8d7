"""The NVAE: residual-normal KL, group shapes, spectral regulariser, NaN safety, round trip, learning."""

import numpy as np
import pytest
import torch
from torch import distributions as D

from models.nvae import (NVAE, AutoregressiveFlow, NVAEConfig, NVAEOptions, free_nats_top, kl_balance_term,
                         kl_warmup_coeff, residual_normal_kl)
from utils.checkpoints import load_model, save_model
from utils.config import config_from_dict
from utils.errors import UserError
from utils.training import build_model, guarded_step


def nvae(frame_size: int = 64, z_dim: int = 32, kl_tolerance: float = 0.0, **options) -> NVAE:
    """An NVAE from flat keyword arguments: V's shared hyperparameters plus NVAEOptions."""
    return NVAE(NVAEConfig(z_dim=z_dim, kl_tolerance=kl_tolerance, nvae=NVAEOptions(**options)), frame_size)

TINY = dict(frame_size=32, channels=4, preprocess_blocks=1, latent_scales=2, groups_per_scale=1, latent_channels=2, z_dim=128)


def test_residual_normal_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mu_p, logsig_p = torch.randn(3, 2, 4, 4), 0.5 * torch.randn(3, 2, 4, 4)
    dmu, dlogsig = torch.randn(3, 2, 4, 4), 0.5 * torch.randn(3, 2, 4, 4)
    q = D.Normal(mu_p + dmu, torch.exp(logsig_p + dlogsig))
    p = D.Normal(mu_p, torch.exp(logsig_p))
    torch.testing.assert_close(residual_normal_kl(dmu, dlogsig, logsig_p), D.kl_divergence(q, p))


@pytest.mark.parametrize(
    "frame_size,pre,scales,lc,z_dim",
    [(64, 2, 3, 2, 32), (64, 1, 3, 1, 64), (96, 2, 3, 2, 72), (32, 1, 2, 4, 256)],
)
def test_latent_group_shapes(frame_size, pre, scales, lc, z_dim):
    m = nvae(z_dim=z_dim, frame_size=frame_size, channels=4, preprocess_blocks=pre, latent_scales=scales,
             groups_per_scale=2, latent_channels=lc).eval()
    x = torch.rand(2, 3, frame_size, frame_size)
    feats = m._encoder_features(x)
    top = frame_size // 2 ** (pre + scales - 1)
    expected = [top * 2 ** (k // 2) for k in range(2 * scales)]  # coarsest first, 2 groups per scale
    assert [f.shape[-1] for f in feats] == expected
    _, kls = m._top_down(feats, None, 1.0, 2)
    assert [tuple(k.shape) for k in kls] == [(2, lc, s, s) for s in expected]
    mu, logvar = m.encode(x)
    assert mu.shape == logvar.shape == (2, z_dim)
    assert m.decode(mu).shape == x.shape and m.reconstruct_full(x).shape == x.shape


def test_sizes_the_architecture_cannot_take():
    with pytest.raises(ValueError, match="frame_size=84 cannot be halved 4 times"):
        nvae(frame_size=84)
    with pytest.raises(ValueError, match=r"z_dim=16 must equal latent_channels \* top_size\^2 = 2 \* 4\^2 = 32"):
        nvae(z_dim=16)
    cfg = config_from_dict({"run_dir": "r", "vision": {"kind": "nvae", "z_dim": 16}})
    with pytest.raises(UserError, match="vision kind nvae: vision.z_dim=16"):
        build_model("vision", cfg.vision.kind, cfg.vision.model_config(), frame_size=cfg.env.frame_size)


def test_spectral_regulariser_lowers_the_largest_singular_value():
    torch.manual_seed(0)
    m = nvae(**TINY)
    before = m.spectral_norms(power_iterations=30).detach()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    for _ in range(20):
        opt.zero_grad()
        m.spectral_norms().sum().backward()
        opt.step()
    after = m.spectral_norms(power_iterations=30).detach()
    assert after.sum() < 0.9 * before.sum()
    w = [mod.weight.detach().flatten(1) for mod in m.modules() if isinstance(mod, torch.nn.Conv2d)][0]
    assert after[0].item() == pytest.approx(torch.linalg.matrix_norm(w, ord=2).item(), rel=1e-3)


def test_non_finite_updates_are_skipped():
    m = nvae(**TINY)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in m.parameters()]
    x = torch.rand(2, 3, 32, 32)
    assert not guarded_step(m.loss(x)["loss"] * float("nan"), m.parameters(), opt, 1.0)
    finite_loss_nan_grad = m.loss(x)["loss"] + torch.sqrt((m.h0 * 0).sum())  # d sqrt(u)/du at 0 is inf
    assert torch.isfinite(finite_loss_nan_grad)
    assert not guarded_step(finite_loss_nan_grad, m.parameters(), opt, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert guarded_step(m.loss(x)["loss"], m.parameters(), opt, 1.0)
    assert not all(torch.equal(a, b) for a, b in zip(before, m.parameters()))


def test_kl_warmup_and_balancing():
    assert kl_warmup_coeff(0.0, 0.3) == 1e-4 and kl_warmup_coeff(0.15, 0.3) == pytest.approx(0.5)
    assert kl_warmup_coeff(0.5, 0.3) == 1.0 and kl_warmup_coeff(0.1, 0.0) == 1.0
    kl = torch.tensor([[10.0, 1.0], [30.0, 3.0]])
    balanced = kl_balance_term(kl, torch.tensor([1.0, 1.0]))
    coeff = torch.tensor([20.01, 2.01]) / torch.tensor([20.01, 2.01]).mean()
    torch.testing.assert_close(balanced, (kl * coeff).sum(1))


def test_free_nats_on_the_top_group():
    kl = torch.tensor([[1.0, 5.0], [3.0, 7.0]], requires_grad=True)
    floored = free_nats_top(kl, floor=4.0)  # top batch mean 2 < 4: constant, no gradient to the top group
    assert floored[:, 0].tolist() == [4.0, 4.0] and floored[:, 1].tolist() == [5.0, 7.0]
    floored.sum().backward()
    assert kl.grad[:, 0].tolist() == [0.0, 0.0] and kl.grad[:, 1].tolist() == [1.0, 1.0]
    assert free_nats_top(kl, floor=2.0) is kl and free_nats_top(kl, floor=0.0) is kl
    # wired through the model: the training loss sees the floor, the reported KL and ELBO do not
    m = nvae(**TINY, kl_tolerance=100.0).eval()
    t = m.loss(torch.rand(2, 3, 32, 32))
    others = sum(t[f"kl_group{k}"] for k in range(1, m.n_groups))
    torch.testing.assert_close(t["loss"], t["recon"] + 100.0 * m.z_dim + others)
    torch.testing.assert_close(t["neg_elbo"], t["recon"] + t["kl"])


def test_save_load_round_trip(tmp_path):
    m = nvae(**TINY).eval()
    path = str(tmp_path / "nvae.pt")
    save_model(path, m, step=1)
    loaded, ckpt = load_model(path, "vision")
    assert isinstance(loaded, NVAE) and ckpt["kind"] == "nvae"
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded.encode(x), m.encode(x))
    torch.manual_seed(1)
    a = loaded.decode(m.encode(x)[0])
    torch.manual_seed(1)
    torch.testing.assert_close(a, m.decode(m.encode(x)[0]))


def carracing_frames(n: int) -> torch.Tensor:
    from models.likelihood import frames_to_tensor
    from utils.config import EnvConfig
    from utils.envs import make_env

    env_cfg = EnvConfig()
    env = make_env(env_cfg)
    obs, _ = env.reset(seed=123)
    frames = []
    rng = np.random.default_rng(0)
    for _ in range(n):
        frames.append(obs)  # V-ready: make_env resizes
        obs, *_ = env.step(rng.uniform([-1, 0, 0], [1, 1, 0.2]).astype(np.float32))
    env.close()
    return frames_to_tensor(np.stack(frames))


def test_short_training_on_carracing_frames_lowers_the_loss():
    torch.manual_seed(0)
    x = carracing_frames(96)
    m = nvae(z_dim=32, channels=4, preprocess_blocks=2, latent_scales=3, groups_per_scale=1, latent_channels=2)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    m.eval()
    with torch.no_grad():
        before = m.loss(x)["neg_elbo"].item()
    m.train()
    for step in range(40):
        batch = x[torch.randint(0, len(x), (16,))]
        loss = m.loss(batch, kl_coeff=kl_warmup_coeff(step / 40, 0.3), kl_balance=True)["loss"] + 0.1 * m.regularization()
        assert guarded_step(loss, m.parameters(), opt, 200.0)
    m.eval()
    with torch.no_grad():
        after = m.loss(x)["neg_elbo"].item()
    assert after < before - 100, (before, after)


@pytest.mark.parametrize("reverse", [False, True])
def test_autoregressive_flow_has_a_triangular_jacobian_with_its_log_det(reverse):
    """IAF step: dz'_i/dz_j = 0 for pixels j after i (in the step's order); the diagonal is the
    returned element-wise log-det; so log|det J| = its sum (Kingma et al. 2016)."""
    torch.manual_seed(0)
    flow = AutoregressiveFlow(channels=2, context_channels=3, hidden=8, reverse=reverse)
    torch.nn.init.normal_(flow.out.weight, std=0.3)  # leave the identity initialisation
    z, context = torch.randn(1, 2, 3, 3), torch.randn(1, 3, 3, 3)
    jac = torch.autograd.functional.jacobian(lambda v: flow(v.view(1, 2, 3, 3), context)[0].flatten(), z.flatten())
    _, log_det = flow(z, context)
    order = torch.arange(9).view(3, 3)
    order = order.flip(0, 1) if reverse else order
    pixel = order.flatten().repeat(2)  # raster position of every element (channel-major flattening)
    later = pixel[None, :] > pixel[:, None]
    assert jac[later].abs().max() == 0
    same_pixel_other_channel = (pixel[None, :] == pixel[:, None]) & ~torch.eye(18, dtype=torch.bool)
    assert jac[same_pixel_other_channel].abs().max() == 0
    torch.testing.assert_close(torch.diagonal(jac).log(), log_det.flatten())
    assert torch.linalg.slogdet(jac)[1] == pytest.approx(log_det.sum().item(), abs=1e-4)


def test_nvae_with_posterior_flows_trains_and_round_trips(tmp_path):
    torch.manual_seed(0)
    m = nvae(**TINY, num_flows=2)
    assert [len(f) for f in m.flows] == [0, 2]  # the top group stays Gaussian
    x = torch.rand(4, 3, 32, 32)
    terms = m.loss(x)
    assert torch.isfinite(terms["loss"]) and terms["kl_group1"].shape == ()
    terms["loss"].backward()
    assert m.flows[1][0].out.weight.grad.abs().sum() > 0
    m.eval()
    path = str(tmp_path / "nvae.pt")
    save_model(path, m, step=1)
    loaded, _ = load_model(path, "vision")
    torch.testing.assert_close(loaded.reconstruct_full(x), m.reconstruct_full(x))
