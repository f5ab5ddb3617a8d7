"""Output likelihoods against torch.distributions and closed forms (models/likelihood.py)."""

import pytest
import torch
from torch import distributions as D

from models.likelihood import bits_per_dim, output_channels, pixel_mean, reconstruction_nll
from models.nvae import NVAE, NVAEConfig, NVAEOptions
from models.vae import ConvVAE, VAEConfig


def test_gaussian_nll_matches_normal_log_prob():
    x, mean = torch.rand(3, 3, 4, 4), torch.rand(3, 3, 4, 4).clamp(0.01, 0.99)
    expected = -D.Normal(mean, 0.3).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(reconstruction_nll(x, torch.logit(mean), "gaussian", 0.3), expected)
    torch.testing.assert_close(pixel_mean(torch.logit(mean), "gaussian"), mean)


def test_bernoulli_nll_matches_bernoulli_log_prob():
    x, logits = torch.randint(0, 2, (2, 3, 4, 4)).float(), 3 * torch.randn(2, 3, 4, 4)
    expected = -D.Bernoulli(logits=logits).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(reconstruction_nll(x, logits, "bernoulli"), expected)


def _bin_probability(level: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """P(8-bit level) under a logistic on [-1, 1] cut into 256 bins, float64, from torch.distributions."""
    logistic = D.TransformedDistribution(
        D.Uniform(torch.zeros_like(mean), torch.ones_like(mean)),
        [D.transforms.SigmoidTransform().inv, D.transforms.AffineTransform(mean, log_scale.exp())],
    )
    centre = 2 * level / 255 - 1
    upper = torch.where(level == 255, torch.ones_like(mean), logistic.cdf(torch.clamp(centre + 1 / 255, max=1.0)))
    lower = torch.where(level == 0, torch.zeros_like(mean), logistic.cdf(torch.clamp(centre - 1 / 255, min=-1.0)))
    return upper - lower


def _component(mean, log_scale, coeff, logit=0.0) -> torch.Tensor:
    """Params (1, 10, 1, 1) of a one-component mixture."""
    params = torch.zeros(1, 10, 1, 1)
    params[0, 0] = logit
    params[0, 1:4, 0, 0], params[0, 4:7, 0, 0] = mean, log_scale
    params[0, 7:10, 0, 0] = torch.atanh(coeff)  # the coefficients pass through a tanh
    return params


@pytest.mark.parametrize("level", [0, 1, 77, 128, 200, 254, 255])
def test_logistic_mixture_matches_logistic_cdfs_with_channel_coupling(level):
    """One component: P(R) P(G | R) P(B | R, G), each a difference of logistic CDFs with the
    G and B means shifted by c * (the pixel's own R, G) (PixelCNN++ eq. 3)."""
    f64 = dict(dtype=torch.float64)
    mean, log_scale = torch.tensor([-0.3, 0.1, 0.6], **f64), torch.tensor([-2.0, -2.5, -1.5], **f64)
    coeff = torch.tensor([0.5, -0.3, 0.2], **f64)
    levels = torch.tensor([level, (level * 7) % 256, 255 - level], **f64)
    v = 2 * levels / 255 - 1
    coupled = mean + torch.stack([0 * v[0], coeff[0] * v[0], coeff[1] * v[0] + coeff[2] * v[1]])
    expected = -torch.log(_bin_probability(levels, coupled, log_scale)).sum()
    x = (levels / 255).float().view(1, 3, 1, 1)
    got = reconstruction_nll(x, _component(mean.float(), log_scale.float(), coeff.float()), "logistic_mixture")[0]
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


def test_logistic_mixture_weights_components_by_softmax():
    torch.manual_seed(0)
    a = _component(torch.tensor([-0.2, 0.3, 0.0]), torch.tensor([-2.0, -1.0, -3.0]), torch.tensor([0.1, 0.2, -0.4]), 0.7)
    b = _component(torch.tensor([0.5, -0.6, 0.2]), torch.tensor([-1.0, -2.0, -2.0]), torch.tensor([-0.5, 0.0, 0.3]), -0.4)
    # Two components: [logits (2) | means, log-scales, coefficients (each 2 components x 3 channels)].
    blocks = [torch.stack([a[:, 1 + 3 * j : 4 + 3 * j], b[:, 1 + 3 * j : 4 + 3 * j]], 1).reshape(1, 6, 1, 1) for j in range(3)]
    mix = torch.cat([a[:, :1], b[:, :1], *blocks], 1)
    x = torch.randint(0, 256, (5, 3, 1, 1)).float() / 255
    log_w = torch.log_softmax(torch.tensor([0.7, -0.4]), 0)
    nll_a = reconstruction_nll(x, a.expand(5, -1, -1, -1), "logistic_mixture")
    nll_b = reconstruction_nll(x, b.expand(5, -1, -1, -1), "logistic_mixture")
    expected = -torch.logsumexp(torch.stack([log_w[0] - nll_a, log_w[1] - nll_b]), 0)
    torch.testing.assert_close(reconstruction_nll(x, mix.expand(5, -1, -1, -1), "logistic_mixture"), expected)


def test_logistic_mixture_mean_and_bits_per_dim():
    params = torch.zeros(2, 10, 4, 4)
    params[:, 1:4] = torch.tensor([-1.5, 0.0, 0.5])[None, :, None, None]  # R below the range: clipped to 0
    mean = pixel_mean(params, "logistic_mixture")
    assert mean.shape == (2, 3, 4, 4)
    torch.testing.assert_close(mean[0, :, 0, 0], torch.tensor([0.0, 0.5, 0.75]))
    assert bits_per_dim(48 * 3 * 2 * 0.6931471805599453, 48 * 3, "logistic_mixture") == pytest.approx(2.0)
    assert bits_per_dim(0.0, 10, "gaussian") == pytest.approx(8.0)
    with pytest.raises(ValueError, match="vision.likelihood='poisson'"):
        output_channels("poisson")


@pytest.mark.parametrize("kind", ["vae", "nvae"])
def test_both_vision_kinds_take_the_logistic_mixture(kind):
    torch.manual_seed(0)
    if kind == "vae":
        model, size = ConvVAE(VAEConfig(z_dim=8, likelihood="logistic_mixture", mixtures=4)), 64
    else:
        size = 32
        options = NVAEOptions(channels=4, preprocess_blocks=1, latent_scales=2, groups_per_scale=1)
        model = NVAE(NVAEConfig(z_dim=128, likelihood="logistic_mixture", mixtures=4, nvae=options), frame_size=32)
    x = torch.randint(0, 256, (2, 3, size, size)).float() / 255
    terms = model.loss(x)
    assert torch.isfinite(terms["loss"]) and terms["recon"] > 0  # a discrete -log P is non-negative
    terms["loss"].backward()
    model.eval()
    recon = model.reconstruct(x)
    assert recon.shape == x.shape and 0 <= recon.min() and recon.max() <= 1
