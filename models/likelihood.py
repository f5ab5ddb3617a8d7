"""Output likelihoods p(x | z) of the vision models, shared by the conv VAE and the NVAE.

A decoder ends in `output_channels(likelihood, mixtures)` raw channels ("params");
this module turns them into -log p(x | z) per image and into the mean frame that
M, C, GIFs and reconstruction metrics use.

- `gaussian`: params are logits, mean = sigmoid(params), and each pixel is
  N(x; mean, obs_std^2), a continuous density (its -log can be negative). With
  obs_std = sqrt(1/2) this is the summed squared error of World Models plus a
  constant.
- `bernoulli`: params are logits; binary cross-entropy with x as soft targets.
- `logistic_mixture`: the discretized mixture of logistics of PixelCNN++
  (Salimans et al. 2017, section 2.1-2.2), the likelihood NVAE uses: per pixel,
  `mixtures` components, each with a mean and log-scale per channel and three
  coefficients that make G depend linearly on R, and B on R and G. x is put on
  256 bins of [-1, 1]; the end bins take the tails. A discrete probability, so
  -log p >= 0 and nats / (D ln 2) is bits/dim of 8-bit images directly.

V's pixel format, for every consumer (the agent, training, media): a frame is
uint8 (H, W, 3) from the env; V takes float32 (B, 3, H, W) in [0, 1]
(`frames_to_tensor`) and gives back the same (`to_uint8` returns frames).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

LIKELIHOODS = ("gaussian", "bernoulli", "logistic_mixture")
_BINS = 255.0  # 256 levels of an 8-bit channel: bin half-width 1/255 on [-1, 1]


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) frames -> float32 (B, 3, H, W) in [0, 1], contiguous NCHW (channels-last
    strides make the convolutions slow)."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # (B, 3, H, W) view
    return x.contiguous().float().div_(255.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (B, 3, H, W) in [0, 1] (clamped) -> uint8 (B, H, W, 3) frames."""
    return (x.detach().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def output_channels(likelihood: str, mixtures: int = 10) -> int:
    """Channels the decoder must output for `likelihood` on RGB frames.

    Raises:
        ValueError: an unknown likelihood.
    """
    if likelihood in ("gaussian", "bernoulli"):
        return 3
    if likelihood == "logistic_mixture":
        return 10 * mixtures  # per component: 1 logit, 3 means, 3 log-scales, 3 coefficients
    raise ValueError(f"vision.likelihood={likelihood!r}: expected one of {', '.join(LIKELIHOODS)}")


def _split_mixture(params: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """params (B, 10K, H, W) -> logit_probs (B, K, H, W), means, log_scales, coeffs (B, K, 3, H, W)."""
    b, c, h, w = params.shape
    k = c // 10
    logit_probs = params[:, :k]
    rest = params[:, k:].reshape(b, 3, k, 3, h, w)  # (kind, component, channel)
    means, log_scales, coeffs = rest[:, 0], rest[:, 1].clamp(min=-7.0), torch.tanh(rest[:, 2])
    return logit_probs, means, log_scales, coeffs


def _coupled_means(means: torch.Tensor, coeffs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Channel-autoregressive means: mu_G += c0 x_R, mu_B += c1 x_R + c2 x_G. x (B, 1, 3, H, W) in [-1, 1]."""
    r = means[:, :, 0]
    g = means[:, :, 1] + coeffs[:, :, 0] * x[:, :, 0]
    b = means[:, :, 2] + coeffs[:, :, 1] * x[:, :, 0] + coeffs[:, :, 2] * x[:, :, 1]
    return torch.stack([r, g, b], dim=2)


def logistic_mixture_nll(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """-log P(x) of 8-bit frames under the discretized logistic mixture, per image (nats).

    x: float (B, 3, H, W) in [0, 1], multiples of 1/255. params: float (B, 10K, H, W).
    Returns float (B,).
    """
    logit_probs, means, log_scales, coeffs = _split_mixture(params)
    x = (2 * x - 1).unsqueeze(1)  # (B, 1, 3, H, W) on [-1, 1]
    centered = x - _coupled_means(means, coeffs, x)
    inv_scale = torch.exp(-log_scales)
    upper = inv_scale * (centered + 1 / _BINS)
    lower = inv_scale * (centered - 1 / _BINS)
    log_cdf_upper = upper - F.softplus(upper)  # log sigmoid(upper): the lowest bin takes the left tail
    log_one_minus_cdf_lower = -F.softplus(lower)  # log (1 - sigmoid(lower)): the highest bin the right one
    # Bin mass as a difference of CDFs, taken on the side of the nearer tail so that float32
    # does not cancel two numbers close to 1; where it still underflows, the density at the
    # bin centre times the bin width.
    mid = inv_scale * centered
    bin_mass = torch.where(
        mid > 0, torch.sigmoid(-lower) - torch.sigmoid(-upper), torch.sigmoid(upper) - torch.sigmoid(lower)
    )
    log_density_mid = mid - log_scales - 2 * F.softplus(mid) + math.log(2 / _BINS)
    log_mid_bins = torch.where(bin_mass > 1e-10, torch.log(bin_mass.clamp(min=1e-30)), log_density_mid)
    log_p = torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_one_minus_cdf_lower, log_mid_bins))
    log_p = log_p.sum(dim=2) + F.log_softmax(logit_probs, dim=1)  # (B, K, H, W): channels joint, then weights
    return -torch.logsumexp(log_p, dim=1).flatten(1).sum(1)


def logistic_mixture_mean(params: torch.Tensor) -> torch.Tensor:
    """Mean frame float (B, 3, H, W) in [0, 1]: the mixture-weighted component means, channels
    coupled through the component's own means, each clipped to [-1, 1] (the end bins' tails)."""
    logit_probs, means, _, coeffs = _split_mixture(params)
    r = means[:, :, 0].clamp(-1, 1)
    g = (means[:, :, 1] + coeffs[:, :, 0] * r).clamp(-1, 1)
    b = (means[:, :, 2] + coeffs[:, :, 1] * r + coeffs[:, :, 2] * g).clamp(-1, 1)
    weights = torch.softmax(logit_probs, dim=1).unsqueeze(2)  # (B, K, 1, H, W)
    return ((weights * torch.stack([r, g, b], dim=2)).sum(1) + 1) / 2


def pixel_mean(params: torch.Tensor, likelihood: str) -> torch.Tensor:
    """Decoder params (B, C, H, W) -> mean frame float (B, 3, H, W) in [0, 1]."""
    if likelihood == "logistic_mixture":
        return logistic_mixture_mean(params)
    return torch.sigmoid(params)


def reconstruction_nll(x: torch.Tensor, params: torch.Tensor, likelihood: str, obs_std: float = 0.7071) -> torch.Tensor:
    """-log p(x | z) summed over pixels and channels, per image (nats); see the module docstring.

    x float (B, 3, H, W) in [0, 1]; params float (B, output_channels, H, W). Returns float (B,).

    Raises:
        ValueError: an unknown likelihood.
    """
    if likelihood == "gaussian":
        sq = (x - torch.sigmoid(params)).pow(2).flatten(1).sum(1)
        n = x[0].numel()
        return sq / (2 * obs_std**2) + n * (math.log(obs_std) + 0.5 * math.log(2 * math.pi))
    if likelihood == "bernoulli":
        return F.binary_cross_entropy_with_logits(params, x, reduction="none").flatten(1).sum(1)
    if likelihood == "logistic_mixture":
        return logistic_mixture_nll(x, params)
    raise ValueError(f"vision.likelihood={likelihood!r}: expected one of {', '.join(LIKELIHOODS)}")


def bits_per_dim(nats_per_image: float, dims: int, likelihood: str) -> float:
    """-log p in nats per image -> bits per dimension of 8-bit data.

    A discrete likelihood (logistic_mixture) converts directly. A density on [0, 1]
    (gaussian) is put on 256 bins of width 1/256 first (+ ln 256 per dim): an
    approximation without dequantization noise. Bernoulli on soft targets has no
    such reading: NaN.
    """
    if likelihood == "logistic_mixture":
        return nats_per_image / (dims * math.log(2))
    if likelihood == "gaussian":
        return (nats_per_image + dims * math.log(256)) / (dims * math.log(2))
    return float("nan")
