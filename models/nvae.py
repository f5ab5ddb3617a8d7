"""NVAE: a deep hierarchical VAE (Vahdat & Kautz 2020, "NVAE: A Deep Hierarchical
Variational Autoencoder"), written from the paper for small frames and CPU budgets.

Structure (section 3 and figure 2 of the paper):

- bottom-up encoder: a 3x3 stem, `preprocess_blocks` stride-2 encoder cells,
  then `latent_scales` scales of `groups_per_scale` latent groups each; the
  encoder records one feature map per group and halves the resolution (and
  doubles the channels) between scales;
- top-down decoder: starts from a learned constant at the coarsest scale; for
  each latent group (coarsest first) it runs decoder cells, predicts the
  prior p(z_k | z_<k) from its state (N(0, I) for the top group), combines the
  matching encoder feature with its state to predict the residual posterior,
  samples z_k and merges it into its state; then `preprocess_blocks`
  upsampling cells (mirroring the encoder's) back to the frame size and the output likelihood.

Cells (section 3.1): encoder BN-Swish-Conv3x3-BN-Swish-Conv3x3-SE; decoder
BN-Conv1x1(expand)-BN-Swish-depthwise Conv5x5-BN-Swish-Conv1x1-BN-SE; both
residual, with the branch scaled by 0.1. BatchNorm momentum 0.05.

Residual normal posterior (section 3.2, eq. 2): q(z_k | x, z_<k) =
N(mu_p + dmu, sigma_p * dsigma) with KL per element
0.5 * (dmu^2 / sigma_p^2 + dsigma^2 - log dsigma^2 - 1).

Posterior flows (section 3.2 "Inverse autoregressive flows", `num_flows`): in
every group below the top, the residual normal sample z0 goes through
num_flows IAF steps (Kingma et al. 2016, eq. 11-14): [m, s] = AR(z, context),
z <- sigmoid(s) * z + (1 - sigmoid(s)) * m, log|det| = sum log sigmoid(s). AR
is a masked 3x3 convolution stack, autoregressive over pixels in raster order
(reversed in every other step); the context is the feature the posterior is
computed from. The KL of such a group is the one-sample estimate
log q(z | x) - log p(z). The top group stays a diagonal Gaussian, so the mu and
logvar that stage 03 stores describe z exactly.

Training aids (section 3.2): KL warm-up and KL balancing (`kl_balance`), the
spectral regulariser lambda * sum_i sigma_max(W_i) estimated with power
iteration, plus the penalty on BatchNorm scales (`regularization`).

The flat z of World Models: `encode(x)` returns mu and logvar of the top
(coarsest) latent group, flattened to z_dim = latent_channels * top_size^2;
`decode(z, temperature)` fixes the top group to z and draws every lower group
from the learned prior at that temperature.

Free nats on the top group (`kl_tolerance`, the conv VAE's rule from Ha &
Schmidhuber): its KL term is max(KL_top, kl_tolerance * z_dim), batch mean. A
first CPU run without it put only 2.4 nats in the top group (most information
went to the lower groups), so decode(encode(x)) reconstructed 5x worse than the
full posterior; with the floor, information in z costs nothing up to the floor
and the top group fills first. kl_tolerance 0 gives NVAE's plain objective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.hparams import param
from models.likelihood import output_channels, pixel_mean, reconstruction_nll
from models.vae import (PositionHeads, VAEConfig, add_position_terms, gaussian_kl, make_joint_kinematics,
                        read_positions)

BN_MOMENTUM = 0.05
RESIDUAL_SCALE = 0.1


def soft_clamp(x: torch.Tensor, bound: float = 5.0) -> torch.Tensor:
    """bound * tanh(x / bound): keeps log-scales in (-bound, bound) with a gradient everywhere."""
    return bound * torch.tanh(x / bound)


def residual_normal_kl(dmu: torch.Tensor, dlogsig: torch.Tensor, logsig_p: torch.Tensor) -> torch.Tensor:
    """KL(N(mu_p + dmu, sigma_p * dsigma) || N(mu_p, sigma_p)), element-wise (eq. 2 of NVAE), nats.

    All inputs float of one shape; dlogsig = log dsigma, logsig_p = log sigma_p.
    """
    return 0.5 * ((dmu * torch.exp(-logsig_p)).pow(2) + torch.exp(2 * dlogsig) - 2 * dlogsig - 1.0)


class SqueezeExcite(nn.Module):
    """Channel gating (Hu et al. 2018): x * sigmoid(W2 relu(W1 avgpool(x)))."""

    def __init__(self, channels: int):
        super().__init__()
        hidden = max(channels // 16, 4)
        self.fc = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(x.mean(dim=(2, 3)))[:, :, None, None]


def bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, momentum=BN_MOMENTUM)


class EncoderCell(nn.Module):
    """BN-Swish-Conv3x3-BN-Swish-Conv3x3-SE, residual; stride 2 halves H, W (skip: strided 1x1 conv)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.skip = nn.Identity() if (c_in == c_out and stride == 1) else nn.Conv2d(c_in, c_out, 1, stride)
        self.branch = nn.Sequential(
            bn(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, stride, padding=1),
            bn(c_out), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1),
            SqueezeExcite(c_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + RESIDUAL_SCALE * self.branch(x)


class DecoderCell(nn.Module):
    """BN-Conv1x1(expand)-BN-Swish-dwConv5x5-BN-Swish-Conv1x1-BN-SE, residual; `upsample` doubles H, W first."""

    def __init__(self, c_in: int, c_out: int, upsample: bool = False, expand: int = 3):
        super().__init__()
        self.upsample = upsample
        hidden = c_out * expand  # of the output: an upsampling cell halves the channels, and its
        # depthwise conv runs at the doubled resolution, the most expensive place on a CPU
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)
        self.branch = nn.Sequential(
            bn(c_in), nn.Conv2d(c_in, hidden, 1),
            bn(hidden), nn.SiLU(), nn.Conv2d(hidden, hidden, 5, padding=2, groups=hidden),
            bn(hidden), nn.SiLU(), nn.Conv2d(hidden, c_out, 1),
            bn(c_out), SqueezeExcite(c_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.skip(x) + RESIDUAL_SCALE * self.branch(x)


class MaskedConv2d(nn.Conv2d):
    """3x3 convolution whose output at a pixel sees only earlier pixels in raster order
    (PixelCNN masks, van den Oord et al. 2016): mask "A" excludes the centre pixel, "B"
    includes it (safe after an "A" layer, whose outputs already exclude it)."""

    def __init__(self, c_in: int, c_out: int, mask_type: str):
        super().__init__(c_in, c_out, 3, padding=1)
        mask = torch.ones_like(self.weight)
        mask[:, :, 2, :] = 0  # the row below
        mask[:, :, 1, 2] = 0  # the pixel to the right
        if mask_type == "A":
            mask[:, :, 1, 1] = 0  # the pixel itself
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=1)


class AutoregressiveFlow(nn.Module):
    """One inverse autoregressive flow step (Kingma et al. 2016, eq. 14) on a latent map.

    z float (B, C, H, W) and a context feature (B, C_ctx, H, W) -> z' of z's shape and the
    element-wise log|dz'/dz| = log sigmoid(s), float (B, C, H, W). m and s at a pixel depend on z
    only through earlier pixels (raster order, or its reverse with `reverse`), so the Jacobian is
    triangular with diagonal sigmoid(s). Initialised close to the identity: m = 0, gate sigmoid(2) = 0.88.
    """

    def __init__(self, channels: int, context_channels: int, hidden: int = 32, reverse: bool = False):
        super().__init__()
        self.reverse = reverse
        self.first = MaskedConv2d(channels, hidden, "A")
        self.context = nn.Conv2d(context_channels, hidden, 1)
        self.second = MaskedConv2d(hidden, hidden, "B")
        self.out = MaskedConv2d(hidden, 2 * channels, "B")
        nn.init.zeros_(self.out.weight)
        with torch.no_grad():
            self.out.bias.copy_(torch.cat([torch.zeros(channels), torch.full((channels,), 2.0)]))

    def forward(self, z: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.reverse:
            z, context = z.flip(2, 3), context.flip(2, 3)
        h = F.elu(self.first(z) + self.context(context))
        m, s = self.out(F.elu(self.second(h))).chunk(2, dim=1)
        gate = torch.sigmoid(s)
        z = gate * z + (1 - gate) * m
        log_det = F.logsigmoid(s)
        if self.reverse:
            z, log_det = z.flip(2, 3), log_det.flip(2, 3)
        return z, log_det


@dataclass
class NVAEOptions:
    """The NVAE's own hyperparameters (the YAML section `vision.nvae`)."""

    channels: int = param(8, "channels at full resolution; doubled at every halving", minimum=1)
    preprocess_blocks: int = param(2, "stride-2 encoder cells before the first latent scale (mirrored in the "
                                   "decoder)", minimum=0)
    latent_scales: int = param(3, "scales with latent groups; the top one is frame_size / 2^(preprocess_blocks "
                               "+ latent_scales - 1)", minimum=1)
    groups_per_scale: int = param(2, "latent groups per scale", minimum=1)
    latent_channels: int = param(2, "channels of each latent group; z_dim = latent_channels * top_size^2",
                                 minimum=1)
    cells_per_group: int = param(1, "residual cells per group, in the encoder and in the decoder", minimum=1)
    num_flows: int = param(0, "IAF steps in the posterior of every group below the top (thesis Table 4: 2)",
                           minimum=0)
    kl_warmup_fraction: float = param(0.3, "KL weight rises linearly from 1e-4 to 1 over this fraction of "
                                      "updates", minimum=0, below=1)
    kl_balance: bool = param(True, "balance the KL of the groups during warm-up (NVAE section 3.2)")
    spectral_lambda: float = param(0.1, "weight of the spectral + BatchNorm regulariser", minimum=0)


@dataclass
class NVAEConfig(VAEConfig):
    """V's shared hyperparameters (VAEConfig) plus the NVAE's own (`nvae`)."""

    nvae: NVAEOptions = param(NVAEOptions(), "the NVAE's own hyperparameters (used when vision.kind is nvae)")


class NVAE(nn.Module):
    """Hierarchical VAE for RGB frames float32 (B, 3, S, S) in [0, 1]; see the module docstring.

    Args:
        config: NVAEConfig; frame_size: S, pixels.

    Raises:
        ValueError: a frame_size that cannot be halved preprocess_blocks +
            latent_scales - 1 times, a z_dim other than latent_channels *
            top_size^2, or an unknown likelihood.
    """

    kind = "nvae"
    config_class = NVAEConfig

    def __init__(self, config: NVAEConfig | None = None, frame_size: int = 64):
        super().__init__()
        config = config or NVAEConfig()
        n = config.nvae
        z_dim, channels, preprocess_blocks = config.z_dim, n.channels, n.preprocess_blocks
        latent_scales, groups_per_scale, latent_channels = n.latent_scales, n.groups_per_scale, n.latent_channels
        cells_per_group, num_flows = n.cells_per_group, n.num_flows
        halvings = preprocess_blocks + latent_scales - 1
        if frame_size % (2**halvings) or frame_size // (2**halvings) < 1:
            raise ValueError(
                f"env.frame_size={frame_size} cannot be halved {halvings} times "
                f"(preprocess_blocks + latent_scales - 1); use a multiple of {2**halvings}"
            )
        top = frame_size // 2**halvings
        if z_dim != latent_channels * top * top:
            raise ValueError(
                f"vision.z_dim={z_dim} must equal latent_channels * top_size^2 = "
                f"{latent_channels} * {top}^2 = {latent_channels * top * top}"
            )
        self.config = config
        out_channels = output_channels(config.likelihood, config.mixtures)
        self.z_dim, self.frame_size, self.top_size = z_dim, frame_size, top
        self.latent_channels, self.likelihood, self.obs_std = latent_channels, config.likelihood, config.obs_std
        self.top_kl_floor = config.kl_tolerance * z_dim  # free nats of the top group (the flat z)
        ch = [channels * 2**i for i in range(halvings + 1)]  # channels at each resolution level
        scale_ch = ch[preprocess_blocks:]  # finest latent scale first
        self.n_groups = latent_scales * groups_per_scale
        self.groups_per_scale = G = groups_per_scale

        # ---- bottom-up encoder
        self.stem = nn.Conv2d(3, ch[0], 3, padding=1)
        self.preprocess = nn.Sequential(*[EncoderCell(ch[i], ch[i + 1], stride=2) for i in range(preprocess_blocks)])
        self.enc_groups = nn.ModuleList(
            nn.Sequential(*[EncoderCell(scale_ch[s], scale_ch[s]) for _ in range(cells_per_group)])
            for s in range(latent_scales) for _ in range(G)
        )
        self.enc_down = nn.ModuleList(EncoderCell(scale_ch[s], scale_ch[s + 1], stride=2) for s in range(latent_scales - 1))
        self.enc_top = nn.Sequential(nn.ELU(), nn.Conv2d(scale_ch[-1], scale_ch[-1], 1))

        # ---- top-down decoder; group k = 0 is the top (coarsest) one
        self.group_scale = [latent_scales - 1 - k // G for k in range(self.n_groups)]
        gc = [scale_ch[s] for s in self.group_scale]
        self.h0 = nn.Parameter(0.1 * torch.randn(1, scale_ch[-1], top, top))
        self.dec_up = nn.ModuleList(
            DecoderCell(scale_ch[s], scale_ch[s - 1], upsample=True) for s in range(latent_scales - 1, 0, -1)
        )
        self.dec_cells = nn.ModuleList(
            nn.Sequential(*[DecoderCell(gc[k], gc[k]) for _ in range(cells_per_group)]) if k else nn.Identity()
            for k in range(self.n_groups)
        )
        lc = latent_channels
        self.prior = nn.ModuleList(
            nn.Sequential(nn.ELU(), nn.Conv2d(gc[k], 2 * lc, 3, padding=1)) if k else nn.Identity()
            for k in range(self.n_groups)
        )
        self.enc_combine = nn.ModuleList(nn.Conv2d(gc[k], gc[k], 1) if k else nn.Identity() for k in range(self.n_groups))
        self.posterior = nn.ModuleList(nn.Conv2d(gc[k], 2 * lc, 3, padding=1) for k in range(self.n_groups))
        self.flows = nn.ModuleList(
            nn.ModuleList(AutoregressiveFlow(lc, gc[k], reverse=bool(i % 2)) for i in range(num_flows if k else 0))
            for k in range(self.n_groups)
        )
        self.dec_combine = nn.ModuleList(nn.Conv2d(gc[k] + lc, gc[k], 1) for k in range(self.n_groups))
        self.postprocess = nn.Sequential(
            *[DecoderCell(ch[i + 1], ch[i], upsample=True) for i in range(preprocess_blocks - 1, -1, -1)]
        )
        self.to_pixels = nn.Sequential(nn.ELU(), nn.Conv2d(ch[0], out_channels, 3, padding=1))
        # Group sizes (elements per image) weight the KL balancing: bigger groups may carry more nats.
        self.register_buffer(
            "group_sizes", torch.tensor([lc * (top * 2 ** (latent_scales - 1 - s)) ** 2 for s in self.group_scale], dtype=torch.float32)
        )
        self._spectral_u: dict[str, torch.Tensor] = {}
        self.position_heads = PositionHeads(z_dim) if config.position_heads else None  # models/vae.py
        self.joint_kinematics = make_joint_kinematics(config)

    def sizes(self) -> dict:
        """The sizes the data fixed (stored beside the config in a checkpoint)."""
        return {"frame_size": self.frame_size}

    # ------------------------------------------------------------------ encoder
    def _encoder_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps for the groups in top-down order; the first is the top group's."""
        h = self.preprocess(self.stem(2 * x - 1))
        feats = []
        G = self.groups_per_scale
        for k, cells in enumerate(self.enc_groups):  # bottom-up: finest scale first
            h = cells(h)
            feats.append(h)
            scale = k // G
            if (k + 1) % G == 0 and scale < len(self.enc_down):
                h = self.enc_down[scale](h)
        feats = feats[::-1]
        feats[0] = self.enc_top(feats[0])
        return feats

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x float32 (B, 3, S, S) in [0, 1] -> mu, logvar float32 (B, z_dim) of the top group's posterior."""
        mu, logsig = self.posterior[0](self._encoder_features(x)[0]).chunk(2, dim=1)
        return mu.flatten(1), 2 * soft_clamp(logsig).flatten(1)

    # ------------------------------------------------------------------ decoder
    def _top_down(
        self, feats: list[torch.Tensor] | None, z_top: torch.Tensor | None, temperature: float, batch: int, use_mean: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the decoder. With `feats` the posterior is used for every group (except the top when
        `z_top` is given); without, groups are drawn from the prior at `temperature`. Returns the
        decoder output at frame resolution and the per-group KL maps (empty without `feats`)."""
        h = self.h0.expand(batch, -1, -1, -1)
        kls = []
        up = iter(self.dec_up)
        for k in range(self.n_groups):
            if k and self.group_scale[k] != self.group_scale[k - 1]:
                h = next(up)(h)
            h = self.dec_cells[k](h)
            if k:
                mu_p, logsig_p = self.prior[k](h).chunk(2, dim=1)
                logsig_p = soft_clamp(logsig_p)
            else:
                mu_p = logsig_p = torch.zeros(batch, self.latent_channels, self.top_size, self.top_size, device=h.device)
            if k == 0 and z_top is not None:
                z = z_top
            elif feats is not None:
                context = feats[k] + self.enc_combine[k](h) if k else feats[k]
                dmu, dlogsig = self.posterior[k](context).chunk(2, dim=1)
                dlogsig = soft_clamp(dlogsig)
                mu_q, sig_q = mu_p + dmu, torch.exp(logsig_p + dlogsig)
                eps = torch.zeros_like(mu_q) if use_mean else torch.randn_like(mu_q)
                z = mu_q + sig_q * eps
                if len(self.flows[k]):
                    z, kl = self._flow_posterior(k, z, eps, logsig_p + dlogsig, mu_p, logsig_p, context)
                else:
                    kl = residual_normal_kl(dmu, dlogsig, logsig_p)
                kls.append(kl)
            else:
                z = mu_p + temperature * torch.exp(logsig_p) * torch.randn_like(mu_p)
            h = self.dec_combine[k](torch.cat([h, z], dim=1))
        return self.postprocess(h), kls

    def _flow_posterior(self, k, z0, eps, logsig_q, mu_p, logsig_p, context) -> tuple[torch.Tensor, torch.Tensor]:
        """Push the residual normal sample z0 of group k through its IAF steps. Returns z and the
        one-sample KL map log q(z | x) - log p(z | z_<k), both (B, lc, h, w), nats."""
        log_q = -0.5 * eps.pow(2) - logsig_q - 0.5 * math.log(2 * math.pi)
        z = z0
        for flow in self.flows[k]:
            z, log_det = flow(z, context)
            log_q = log_q - log_det
        log_p = -0.5 * ((z - mu_p) * torch.exp(-logsig_p)).pow(2) - logsig_p - 0.5 * math.log(2 * math.pi)
        return z, log_q - log_p

    def _pixels(self, h: torch.Tensor) -> torch.Tensor:
        return pixel_mean(self.to_pixels(h), self.likelihood)

    def decode(self, z: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """z float32 (B, z_dim) (the top group) -> mean frame float32 (B, 3, S, S) in [0, 1];
        lower groups are drawn from the prior at `temperature`."""
        z_top = z.view(-1, self.latent_channels, self.top_size, self.top_size)
        h, _ = self._top_down(None, z_top, temperature, len(z))
        return self._pixels(h)

    def positions(self, z: torch.Tensor, joints: torch.Tensor | None = None) -> torch.Tensor:
        """z float32 (B, z_dim) (the top group) -> the position heads' goal and gripper float32 (B, 2, 3), m; with
        joints float32 (B, 7) (rad), the gripper from the joint kinematics instead (models/vae.py).

        Raises:
            ValueError: an NVAE trained without position heads (or without joint kinematics, given joints).
        """
        return read_positions(self, z, joints)

    def sample_prior(self, n: int, temperature: float = 1.0) -> torch.Tensor:
        """n frames with every group (the top one too) drawn from the prior at `temperature`."""
        z = temperature * torch.randn(n, self.z_dim, device=self.h0.device)
        return self.decode(z, temperature)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """decode(mu(x)): the reconstruction from the flat z alone (lower groups from the prior, tau 1)."""
        return self.decode(self.encode(x)[0])

    @torch.no_grad()
    def reconstruct_full(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction from the full posterior, every group at its posterior mean."""
        h, _ = self._top_down(self._encoder_features(x), None, 1.0, len(x), use_mean=True)
        return self._pixels(h)

    # ------------------------------------------------------------------ objective
    def loss(self, x: torch.Tensor, kl_coeff: float = 1.0, kl_balance: bool = False,
             positions: torch.Tensor | None = None, proprio: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Loss terms for x float32 (B, 3, S, S) in [0, 1]; scalars averaged over the batch, nats/image.

        `recon` = -log p(x | z), `kl` = sum over groups of KL(q || p), `neg_elbo` = recon + kl,
        `loss` = recon + kl_coeff * (balanced) KL, with the top group's KL floored at its free
        nats (module docstring): the objective of the warm-up phase. With position heads and positions float32
        (B, 2, 3) (the recorded goal and gripper, m), `loss` adds their NLL, read from a sample of the top
        group's posterior (models.vae.position_terms); with joint kinematics and proprio float32 (B, 7) (rad),
        its NLL too (models.vae.kinematics_terms).
        """
        feats = self._encoder_features(x)
        h, kls = self._top_down(feats, None, 1.0, len(x))
        recon = reconstruction_nll(x, self.to_pixels(h), self.likelihood, self.obs_std)  # (B,)
        kl_groups = torch.stack([k.flatten(1).sum(1) for k in kls], dim=1)  # (B, n_groups)
        kl = kl_groups.sum(1)
        kl_train = free_nats_top(kl_groups, self.top_kl_floor)
        kl_term = kl_balance_term(kl_train, self.group_sizes) if (kl_balance and kl_coeff < 1.0) else kl_train.sum(1)
        terms = {
            "loss": (recon + kl_coeff * kl_term).mean(),
            "recon": recon.mean(),
            "kl": kl.mean(),
            "neg_elbo": (recon + kl).mean(),
            **{f"kl_group{k}": kl_groups[:, k].mean() for k in range(self.n_groups)},
        }
        if self.position_heads is None or positions is None:
            return terms
        mu, logsig = self.posterior[0](feats[0]).chunk(2, dim=1)  # the top group's posterior, as in encode
        mu, sig = mu.flatten(1), torch.exp(soft_clamp(logsig)).flatten(1)
        return add_position_terms(self, terms, mu + sig * torch.randn_like(mu), mu, positions, proprio)

    def objective(self, x: torch.Tensor, progress: float, positions: torch.Tensor | None = None,
                  proprio: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The training loss of one batch at `progress` in [0, 1] of training: `loss` with KL warm-up and
        balancing (config.nvae) plus spectral_lambda times the regulariser (`reg`), beside `loss`'s terms
        and the warm-up's `kl_coeff`; positions and proprio as in `loss`."""
        n = self.config.nvae
        kl_coeff = kl_warmup_coeff(progress, n.kl_warmup_fraction)
        terms = self.loss(x, kl_coeff=kl_coeff, kl_balance=n.kl_balance, positions=positions, proprio=proprio)
        terms["reg"] = self.regularization()
        terms["loss"] = terms["loss"] + n.spectral_lambda * terms["reg"]
        terms["kl_coeff"] = torch.tensor(kl_coeff)
        return terms

    # ------------------------------------------------------------------ regularisation
    def spectral_norms(self, power_iterations: int = 1) -> torch.Tensor:
        """Largest singular value of every conv weight (reshaped to out x in*k*k), by power iteration.

        The left singular vector estimate u of each layer persists between calls (as in Miyato et
        al. 2018), so one iteration per training step suffices. Returns float (n_convs,), with
        gradients through W only.
        """
        sigmas = []
        for name, m in self.named_modules():
            if isinstance(m, nn.Conv2d):
                w = (m.weight * m.mask if isinstance(m, MaskedConv2d) else m.weight).flatten(1)  # (out, in*k*k)
                u = self._spectral_u.get(name)
                if u is None:
                    u = F.normalize(torch.randn(w.shape[0], device=w.device), dim=0)
                    power_iterations = max(power_iterations, 10)
                with torch.no_grad():
                    for _ in range(power_iterations):
                        v = F.normalize(w.t() @ u, dim=0)
                        u = F.normalize(w @ v, dim=0)
                self._spectral_u[name] = u
                sigmas.append(u @ w @ v)
        return torch.stack(sigmas)

    def batchnorm_scale_penalty(self) -> torch.Tensor:
        """Sum over BatchNorm layers of max |gamma| (NVAE's companion to the spectral regulariser)."""
        return torch.stack([m.weight.abs().max() for m in self.modules() if isinstance(m, nn.BatchNorm2d)]).sum()

    def regularization(self) -> torch.Tensor:
        """Spectral regulariser sum_i sigma_max(W_i) plus the BatchNorm scale penalty (to be scaled by lambda)."""
        return self.spectral_norms().sum() + self.batchnorm_scale_penalty()


def free_nats_top(kl_groups: torch.Tensor, floor: float) -> torch.Tensor:
    """kl_groups float (B, G) with group 0 (the top) replaced by the constant `floor` when its
    batch mean is below it: no gradient pushes the top group under `floor` nats (Kingma et al.
    2016's free bits, in Ha & Schmidhuber's batch-mean form). floor 0 returns kl_groups."""
    if floor <= 0 or kl_groups[:, 0].mean() >= floor:
        return kl_groups
    return torch.cat([torch.full_like(kl_groups[:, :1], floor), kl_groups[:, 1:]], dim=1)


def kl_balance_term(kl_groups: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
    """KL balancing during warm-up (NVAE section 3.2), per image.

    Each group's KL is weighted by a coefficient proportional to its batch-mean KL
    divided by its size, normalised to mean 1 (no gradient through the weights):
    groups that already carry few nats are pushed less, which keeps them from
    collapsing while the KL weight is small. kl_groups float (B, G) -> float (B,).
    """
    per_group = kl_groups.detach().abs().mean(0) + 0.01  # (G,)
    coeff = per_group / group_sizes
    coeff = coeff / coeff.mean()
    return (kl_groups * coeff).sum(1)


def kl_warmup_coeff(progress: float, warmup_fraction: float, minimum: float = 1e-4) -> float:
    """KL weight rising linearly from `minimum` to 1 over the first `warmup_fraction` of training.

    progress: fraction of training done, in [0, 1].
    """
    if warmup_fraction <= 0:
        return 1.0
    return max(minimum, min(1.0, progress / warmup_fraction))


__all__ = ["NVAE", "NVAEConfig", "NVAEOptions", "AutoregressiveFlow", "residual_normal_kl", "free_nats_top", "kl_balance_term", "kl_warmup_coeff", "gaussian_kl"]
