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

Joint kinematics (PandaReach, `joint_kinematics: true`, with the heads): a
second small MLP maps the arm's 7 joint angles (rad) to the gripper's position
(m), trained beside the heads on the recorded proprio and achieved_goal: a
learned forward kinematics. The controller input offset_kinematics_proprio
reads the goal from V's heads (pixels) and the gripper from this map (the
joint angles), which stays right where the arm leaves the poses the pixels were
trained on.
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


class JointKinematics(nn.Module):
    """Joint angles q float32 (B, 7), rad -> the gripper's position float32 (B, 3), m: a learned forward
    kinematics (two hidden layers of `hidden` SiLU units), trained on the rollouts' proprio and achieved_goal."""

    def __init__(self, joints: int = 7, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(joints, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 3))

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return self.net(q)


def kinematics_terms(kinematics: JointKinematics, proprio: torch.Tensor, gripper: torch.Tensor,
                     std: float) -> dict[str, torch.Tensor]:
    """The joint kinematics' loss terms for a batch: `kinematics` = its Gaussian NLL (nats/image, std `std` m)
    and `kinematics_cm` = its mean Euclidean error, cm, without gradient.

    proprio: float32 (B, 7) joint angles, rad; gripper: float32 (B, 3) the recorded gripper positions, m.
    """
    predicted = kinematics(proprio)
    terms = {"kinematics": position_nll(predicted[:, None], gripper[:, None], std).mean()}
    with torch.no_grad():
        terms["kinematics_cm"] = 100 * (predicted - gripper).norm(dim=-1).mean()
    return terms


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
    joint_kinematics: bool = param(False, "PandaReach, with position_heads: an MLP from the joint angles (rad) to "
                                   "the gripper's position (m), trained with V on the rollouts' proprio and "
                                   "achieved_goal; controller.inputs offset_kinematics_proprio reads it")


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
        self.joint_kinematics = make_joint_kinematics(config)

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

    def positions(self, z: torch.Tensor, joints: torch.Tensor | None = None) -> torch.Tensor:
        """z float32 (B, z_dim) -> the position heads' goal and gripper float32 (B, 2, 3), m; with joints float32
        (B, 7) (rad), the gripper from the joint kinematics instead.

        Raises:
            ValueError: a V trained without position heads (or without joint kinematics, given joints).
        """
        return read_positions(self, z, joints)

    def sample_prior(self, n: int, temperature: float = 1.0) -> torch.Tensor:
        """n frames decoded from z ~ N(0, temperature^2 I): float32 (n, 3, 64, 64)."""
        z = torch.randn(n, self.z_dim, device=self.to_mu.weight.device) * temperature
        return self.decode(z)

    def loss(self, x: torch.Tensor, positions: torch.Tensor | None = None,
             proprio: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Training loss and ELBO terms for a batch, all scalars averaged over the batch.

        x float32 (B, 3, 64, 64) in [0, 1]; positions: float32 (B, 2, 3), the recorded goal and gripper (m), for
        a V with position heads (ignored without); proprio: float32 (B, 7), the joint angles (rad), for a V with
        joint kinematics (`kinematics` and `kinematics_cm` join the terms). Returns a dict: `recon` = -log p(x|z) (nats/image, one
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
        return add_position_terms(self, terms, z, mu, positions, proprio)

    def objective(self, x: torch.Tensor, progress: float, positions: torch.Tensor | None = None,
                  proprio: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The training loss of one batch: `loss` itself (the conv VAE has no schedule; `progress` in
        [0, 1] is accepted so that both V kinds train through one call)."""
        return self.loss(x, positions, proprio)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """decode(mu(x)): the reconstruction M and C's z stands for. float32 (B, 3, 64, 64)."""
        return self.decode(self.encode(x)[0])


def make_joint_kinematics(config: VAEConfig) -> JointKinematics | None:
    """The joint kinematics of a V config, or None.

    Raises:
        ValueError: joint_kinematics without position_heads (it is trained and read beside them).
    """
    if not config.joint_kinematics:
        return None
    if not config.position_heads:
        raise ValueError("vision.joint_kinematics needs vision.position_heads: true (it replaces the heads' gripper)")
    return JointKinematics()


def read_positions(vision: nn.Module, z: torch.Tensor, joints: torch.Tensor | None = None) -> torch.Tensor:
    """The position heads of V (either kind) on z float32 (B, z_dim) -> float32 (B, 2, 3), m: the goal and the
    gripper; given joints float32 (B, 7) (rad), the gripper comes from V's joint kinematics instead.

    Raises:
        ValueError: a V trained without position heads, or joints given to a V without joint kinematics.
    """
    if vision.position_heads is None:
        raise ValueError("this V has no position heads (train it with vision.position_heads: true)")
    positions = vision.position_heads(z)
    if joints is None:
        return positions
    if getattr(vision, "joint_kinematics", None) is None:
        raise ValueError("this V has no joint kinematics (train it with vision.joint_kinematics: true)")
    return torch.stack([positions[:, 0], vision.joint_kinematics(joints.to(positions.dtype))], dim=1)


def add_position_terms(vision: nn.Module, terms: dict, z: torch.Tensor, mu: torch.Tensor,
                       positions: torch.Tensor | None, proprio: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """`terms` plus the position heads' (`position_terms`), their NLL added to `loss`, when V has heads and the
    batch has positions; and the joint kinematics' (`kinematics_terms`, on the gripper of `positions`) when V has
    it and the batch has proprio float32 (B, 7); `terms` unchanged otherwise."""
    if vision.position_heads is None or positions is None:
        return terms
    std = vision.config.position_std
    heads = position_terms(vision.position_heads, z, mu, positions, std)
    out = {**terms, **heads, "loss": terms["loss"] + heads["positions"]}
    kinematics = getattr(vision, "joint_kinematics", None)
    if kinematics is not None and proprio is not None:
        joint_terms = kinematics_terms(kinematics, proprio, positions[:, 1], std)
        out = {**out, **joint_terms, "loss": out["loss"] + joint_terms["kinematics"]}
    return out
