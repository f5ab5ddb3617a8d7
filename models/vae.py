"""Convolutional VAE of World Models (Ha & Schmidhuber 2018, appendix A.1).

Encoder: four 4x4 stride-2 convolutions (32, 64, 128, 256 channels, ReLU) on a
64x64 RGB frame, flattened (2x2x256 = 1024) and mapped to mu and logvar of a
diagonal Gaussian posterior q(z|x) with z of size z_dim. Decoder: a dense layer
to 1024, then deconvolutions 5x5, 5x5, 6x6, 6x6 (stride 2) back to 64x64 with
the channels of the output likelihood (models/likelihood.py: 3 logits passed
through a sigmoid for the paper's Gaussian). Prior p(z) = N(0, I).

Loss (nats per image): negative ELBO = -log p(x|z) + KL(q(z|x) || p(z)), with
Ha & Schmidhuber's KL tolerance: the KL term is max(KL, kl_tolerance * z_dim)
(free nats), so the encoder is not pushed below that many nats of information.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from models.hparams import param
from models.likelihood import LIKELIHOODS, output_channels, pixel_mean, reconstruction_nll


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) summed over the last dim.

    0.5 * sum(mu^2 + exp(logvar) - logvar - 1)  (Kingma & Welling 2014, appendix B).
    mu, logvar: float (B, D). Returns float (B,), nats.
    """
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1.0).sum(dim=-1)


@dataclass
class VAEConfig:
    """V's hyperparameters shared by both kinds (the NVAE's config extends this one).

    The frame size is not among them: it comes from the data (env.frame_size) and is stored
    beside the config in a checkpoint.
    """

    z_dim: int = param(32, "size of the flat latent z that M and C see", minimum=1)
    likelihood: str = param("gaussian", "p(x|z): gaussian (fixed obs_std) | bernoulli | logistic_mixture "
                            "(discretized, PixelCNN++)", choices=LIKELIHOODS)
    mixtures: int = param(10, "components of the logistic_mixture likelihood", minimum=1)
    obs_std: float = param(0.7071, "std of the gaussian likelihood; sqrt(1/2) makes -log p the summed "
                           "squared error + const", above=0)
    kl_tolerance: float = param(0.5, "free nats per dim of z (Ha & Schmidhuber; the NVAE's top group); "
                                "0: plain ELBO", minimum=0)


class ConvVAE(nn.Module):
    """The World Models conv VAE for 64x64 RGB frames.

    Args:
        config: VAEConfig (z_dim 32 for CarRacing in the paper; likelihood, obs_std, kl_tolerance: see the
            module docstring).
        frame_size: side of the square input frames, pixels.

    Raises:
        ValueError: `frame_size` other than 64 (the architecture is fixed to it), or an unknown likelihood.
    """

    kind = "vae"
    config_class = VAEConfig

    def __init__(self, config: VAEConfig | None = None, frame_size: int = 64):
        super().__init__()
        config = config or VAEConfig()
        if frame_size != 64:
            raise ValueError(f"the conv VAE takes 64x64 frames, got env.frame_size={frame_size}")
        self.config, self.frame_size = config, frame_size
        self.z_dim, self.likelihood, self.obs_std = config.z_dim, config.likelihood, config.obs_std
        z_dim = config.z_dim
        out_channels = output_channels(config.likelihood, config.mixtures)
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 32, 4, stride=2), nn.ReLU(),  # (B, 32, 31, 31)
            nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),  # (B, 64, 14, 14)
            nn.Conv2d(64, 128, 4, stride=2), nn.ReLU(),  # (B, 128, 6, 6)
            nn.Conv2d(128, 256, 4, stride=2), nn.ReLU(),  # (B, 256, 2, 2)
            nn.Flatten(),  # (B, 1024)
        )
        self.to_mu = nn.Linear(1024, z_dim)
        self.to_logvar = nn.Linear(1024, z_dim)
        self.from_z = nn.Linear(z_dim, 1024)
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(1024, 128, 5, stride=2), nn.ReLU(),  # (B, 128, 5, 5)
            nn.ConvTranspose2d(128, 64, 5, stride=2), nn.ReLU(),  # (B, 64, 13, 13)
            nn.ConvTranspose2d(64, 32, 6, stride=2), nn.ReLU(),  # (B, 32, 30, 30)
            nn.ConvTranspose2d(32, out_channels, 6, stride=2),  # (B, C, 64, 64): the likelihood's params
        )

    def sizes(self) -> dict:
        """The sizes the data fixed (stored beside the config in a checkpoint)."""
        return {"frame_size": self.frame_size}

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x float32 (B, 3, 64, 64) in [0, 1] -> mu, logvar float32 (B, z_dim) of q(z|x)."""
        h = self.encoder(x)
        return self.to_mu(h), self.to_logvar(h).clamp(-12.0, 6.0)

    def decode(self, z: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """z float32 (B, z_dim) -> mean frame float32 (B, 3, 64, 64) in [0, 1].

        `temperature` is unused for this single-group model (it matters for the
        NVAE's lower groups); it is accepted so both V kinds share one interface.
        """
        return pixel_mean(self._decoder_params(z), self.likelihood)

    def _decoder_params(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, z_dim) -> the likelihood's params float32 (B, C, 64, 64) (models/likelihood.py)."""
        return self.decoder(self.from_z(z)[:, :, None, None])

    def sample_prior(self, n: int, temperature: float = 1.0) -> torch.Tensor:
        """n frames decoded from z ~ N(0, temperature^2 I): float32 (n, 3, 64, 64)."""
        z = torch.randn(n, self.z_dim, device=self.to_mu.weight.device) * temperature
        return self.decode(z)

    def loss(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training loss and ELBO terms for a batch, all scalars averaged over the batch.

        x float32 (B, 3, 64, 64) in [0, 1]. Returns a dict: `recon` = -log p(x|z)
        (nats/image, one reparameterised sample), `kl` (nats/image), `neg_elbo`
        = recon + kl, and `loss` = recon + max(kl, kl_tolerance * z_dim) used
        for the gradient.
        """
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        recon = reconstruction_nll(x, self._decoder_params(z), self.likelihood, self.obs_std).mean()
        kl = gaussian_kl(mu, logvar).mean()
        kl_floor = self.config.kl_tolerance * self.z_dim
        return {
            "loss": recon + torch.clamp(kl, min=kl_floor),
            "recon": recon,
            "kl": kl,
            "neg_elbo": recon + kl,
        }

    def objective(self, x: torch.Tensor, progress: float) -> dict[str, torch.Tensor]:
        """The training loss of one batch: `loss` itself (the conv VAE has no schedule; `progress` in
        [0, 1] is accepted so that both V kinds train through one call)."""
        return self.loss(x)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """decode(mu(x)): the reconstruction M and C's z stands for. float32 (B, 3, 64, 64)."""
        return self.decode(self.encode(x)[0])
