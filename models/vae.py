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

Position heads (PandaReach, `position_heads: true`, both V kinds): a small MLP
reads the goal's and the gripper's 3-D positions (m) from z, trained with V by
the Gaussian NLL of the recorded positions (std `position_std`), so that z has
to carry them however few pixels they cover; this is the auxiliary-task route of
e.g. Jaderberg et al. 2017 (UNREAL). At test time only pixels go in: the heads
read V's z, never the env's state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from models.hparams import param
from models.likelihood import LIKELIHOODS, output_channels, pixel_mean, reconstruction_nll


POSITION_NAMES = ("goal", "gripper")  # the 3-D positions the heads predict, in this order


def position_nll(predicted: torch.Tensor, target: torch.Tensor, std: float) -> torch.Tensor:
    """-log N(target; predicted, std^2 I), nats, summed over every coordinate of one sample.

    predicted, target: float (B, P, 3) positions in m; std in m. Returns float (B,).
    """
    return (0.5 * ((target - predicted) / std).pow(2) + math.log(std * math.sqrt(2 * math.pi))).flatten(1).sum(1)


class PositionHeads(nn.Module):
    """z float32 (B, z_dim) -> positions float32 (B, 2, 3) in m: the goal and the gripper (POSITION_NAMES).

    Two hidden layers of `hidden` ReLU units: the positions need not be linear in z.
    """

    def __init__(self, z_dim: int, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(z_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 3 * len(POSITION_NAMES)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).view(-1, len(POSITION_NAMES), 3)


def position_terms(heads: PositionHeads, z: torch.Tensor, mu: torch.Tensor, positions: torch.Tensor,
                   std: float) -> dict[str, torch.Tensor]:
    """The position heads' loss terms for a batch: `positions` = their NLL (nats/image, read from the sampled z,
    which enters V's loss) and, per name of POSITION_NAMES, `<name>_cm` = the mean Euclidean error of the heads
    read from mu (the z that C sees), cm, without gradient.

    z, mu: float32 (B, z_dim); positions: float32 (B, 2, 3) the recorded goal and gripper positions, m.
    """
    terms = {"positions": position_nll(heads(z), positions, std).mean()}
    with torch.no_grad():
        error_cm = 100 * (heads(mu) - positions).norm(dim=-1).mean(0)  # (P,)
    terms.update({f"{name}_cm": error_cm[i] for i, name in enumerate(POSITION_NAMES)})
    return terms


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
    position_heads: bool = param(False, "PandaReach: MLP heads that read the goal's and the gripper's positions (m) "
                                 "from z, trained with V on the rollouts' desired_goal and achieved_goal; C's "
                                 "offset inputs read them (controller.inputs)")
    position_std: float = param(0.01, "std (m) of the position heads' Gaussian likelihood: an error of one std "
                                "costs 0.5 nat per coordinate", above=0)


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
        self.position_heads = PositionHeads(z_dim) if config.position_heads else None

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

    def positions(self, z: torch.Tensor) -> torch.Tensor:
        """z float32 (B, z_dim) -> the position heads' goal and gripper float32 (B, 2, 3), m.

        Raises:
            ValueError: a V trained without position heads.
        """
        return read_positions(self, z)

    def sample_prior(self, n: int, temperature: float = 1.0) -> torch.Tensor:
        """n frames decoded from z ~ N(0, temperature^2 I): float32 (n, 3, 64, 64)."""
        z = torch.randn(n, self.z_dim, device=self.to_mu.weight.device) * temperature
        return self.decode(z)

    def loss(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Training loss and ELBO terms for a batch, all scalars averaged over the batch.

        x float32 (B, 3, 64, 64) in [0, 1]; positions: float32 (B, 2, 3), the recorded goal and gripper (m), for
        a V with position heads (ignored without). Returns a dict: `recon` = -log p(x|z) (nats/image, one
        reparameterised sample), `kl` (nats/image), `neg_elbo` = recon + kl, and `loss` = recon + max(kl,
        kl_tolerance * z_dim) (+ the heads' NLL `positions`, with `goal_cm` and `gripper_cm`: `position_terms`)
        used for the gradient.
        """
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        recon = reconstruction_nll(x, self._decoder_params(z), self.likelihood, self.obs_std).mean()
        kl = gaussian_kl(mu, logvar).mean()
        kl_floor = self.config.kl_tolerance * self.z_dim
        terms = {
            "loss": recon + torch.clamp(kl, min=kl_floor),
            "recon": recon,
            "kl": kl,
            "neg_elbo": recon + kl,
        }
        return add_position_terms(self, terms, z, mu, positions)

    def objective(self, x: torch.Tensor, progress: float, positions: torch.Tensor | None = None
                  ) -> dict[str, torch.Tensor]:
        """The training loss of one batch: `loss` itself (the conv VAE has no schedule; `progress` in
        [0, 1] is accepted so that both V kinds train through one call)."""
        return self.loss(x, positions)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """decode(mu(x)): the reconstruction M and C's z stands for. float32 (B, 3, 64, 64)."""
        return self.decode(self.encode(x)[0])


def read_positions(vision: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """The position heads of V (either kind) on z float32 (B, z_dim) -> float32 (B, 2, 3), m.

    Raises:
        ValueError: a V trained without position heads.
    """
    if vision.position_heads is None:
        raise ValueError("this V has no position heads (train it with vision.position_heads: true)")
    return vision.position_heads(z)


def add_position_terms(vision: nn.Module, terms: dict, z: torch.Tensor, mu: torch.Tensor,
                       positions: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """`terms` plus the position heads' (`position_terms`), their NLL added to `loss`, when V has heads and the
    batch has positions; `terms` unchanged otherwise."""
    if vision.position_heads is None or positions is None:
        return terms
    heads = position_terms(vision.position_heads, z, mu, positions, vision.config.position_std)
    return {**terms, **heads, "loss": terms["loss"] + heads["positions"]}
