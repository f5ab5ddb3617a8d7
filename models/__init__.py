"""World-model parts: vision V (vae.py), memory M (mdnrnn.py), controller C (controller.py).

`build_vision(cfg)` makes a fresh V from the config; `load_vision(path)` and
`load_mdnrnn(path)` rebuild a trained model from its checkpoint file alone.
"""

from __future__ import annotations

import torch

from models.mdnrnn import MDNRNN
from models.nvae import NVAE
from models.vae import ConvVAE
from utils.config import Config
from utils.errors import UserError
from utils.io import load_checkpoint

VISION_KINDS = {"vae": ConvVAE, "nvae": NVAE}


def build_vision(cfg: Config) -> torch.nn.Module:
    """A fresh, untrained V of kind `cfg.vision.kind`.

    Raises:
        UserError: a size the architecture cannot take (e.g. env.frame_size).
    """
    v = cfg.vision
    try:
        if v.kind == "vae":
            return ConvVAE(
                z_dim=v.z_dim,
                frame_size=cfg.env.frame_size,
                likelihood=v.likelihood,
                obs_std=v.obs_std,
                kl_tolerance=v.kl_tolerance,
                mixtures=v.mixtures,
            )
        if v.kind == "nvae":
            n = v.nvae
            return NVAE(
                z_dim=v.z_dim,
                frame_size=cfg.env.frame_size,
                channels=n.channels,
                preprocess_blocks=n.preprocess_blocks,
                latent_scales=n.latent_scales,
                groups_per_scale=n.groups_per_scale,
                latent_channels=n.latent_channels,
                cells_per_group=n.cells_per_group,
                num_flows=n.num_flows,
                likelihood=v.likelihood,
                obs_std=v.obs_std,
                kl_tolerance=v.kl_tolerance,
                mixtures=v.mixtures,
            )
    except ValueError as exc:
        raise UserError(f"vision.kind={v.kind}: {exc}") from None
    raise UserError(f"vision.kind: unknown kind {v.kind!r}")


def vision_checkpoint(model, **extra) -> dict:
    """Self-describing checkpoint: {kind, hparams, state_dict, ...extra (config, optimizer, step, metrics)}."""
    return {"kind": model.kind, "hparams": model.hparams(), "state_dict": model.state_dict(), **extra}


def load_vision(path: str) -> tuple[torch.nn.Module, dict]:
    """Rebuild V (eval mode, CPU) from a checkpoint written by stage 02.

    Raises:
        UserError: missing or unreadable file, or a checkpoint that is not a V.
    """
    ckpt = load_checkpoint(path, tuple(VISION_KINDS))
    model = VISION_KINDS[ckpt["kind"]](**ckpt["hparams"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt


def load_mdnrnn(path: str) -> tuple[MDNRNN, dict]:
    """Rebuild M (eval mode, CPU) from a checkpoint written by stage 04.

    Raises:
        UserError: missing or unreadable file, or a checkpoint that is not an MDN-RNN.
    """
    ckpt = load_checkpoint(path, MDNRNN.kind)
    model = MDNRNN(**ckpt["hparams"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt


def load_world_model(vision_path: str, mdnrnn_path: str, z_dim: int | None = None):
    """Load V and M and check that they agree on z_dim (and with the config's `vision.z_dim`).

    Raises:
        UserError: a missing or wrong-kind checkpoint, or mismatched latent sizes.
    """
    vision, _ = load_vision(vision_path)
    mdnrnn, _ = load_mdnrnn(mdnrnn_path)
    if mdnrnn.z_dim != vision.z_dim:
        raise UserError(
            f"{mdnrnn_path}: MDN-RNN trained on z_dim={mdnrnn.z_dim}, but {vision_path} has z_dim={vision.z_dim}"
        )
    if z_dim is not None and vision.z_dim != z_dim:
        raise UserError(f"{vision_path}: checkpoint has z_dim={vision.z_dim} but key 'vision.z_dim' is {z_dim}")
    return vision, mdnrnn
