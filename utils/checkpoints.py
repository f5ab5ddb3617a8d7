"""Checkpoint files: written atomically, read without running code, checked for their kind.

A checkpoint is the dict of `models.checkpoint_dict` (kind, config, sizes,
state_dict) plus plain extras (the run config, optimizer state, history). It
holds tensors and plain types only and is read with
`torch.load(weights_only=True)`: a file that carries any other object (a
crafted pickle that would run code) is refused with one line, before anything
in it is executed.
"""

from __future__ import annotations

import os

import torch

from models import FAMILIES, checkpoint_dict, from_checkpoint_dict
from models.controller import INPUTS
from utils.errors import UserError
from utils.io import save_torch


def read_checkpoint(path: str) -> dict:
    """The checkpoint dict of `path`, loaded with weights_only=True on the CPU.

    Raises:
        UserError: missing or unreadable file, a file holding anything but tensors and plain types, or not a
            dict with a kind.
    """
    if not os.path.isfile(path):
        raise UserError(f"{path}: checkpoint not found (run the stage that writes it first)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad or unsafe file
        why = "it holds objects other than tensors and plain types" if "weights_only" in str(exc) else type(exc).__name__
        raise UserError(f"{path}: refused, not a readable checkpoint ({why})") from None
    if not isinstance(ckpt, dict) or "kind" not in ckpt:
        raise UserError(f"{path}: not a checkpoint of this project (no kind)")
    return ckpt


def load_model(path: str, family: str):
    """Rebuild the model of `family` (vision | memory | controller) saved at `path`: (model in eval mode, the
    checkpoint dict).

    Raises:
        UserError: any error of `read_checkpoint`, a checkpoint of another family, or one that does not build.
    """
    ckpt = read_checkpoint(path)
    if ckpt["kind"] not in FAMILIES[family]:
        raise UserError(f"{path}: checkpoint of kind {ckpt['kind']!r}, expected a {family} checkpoint "
                        f"({', '.join(FAMILIES[family])})")
    try:
        return from_checkpoint_dict(ckpt, family), ckpt
    except (ValueError, KeyError) as exc:
        raise UserError(f"{path}: {exc}") from None


def save_model(path: str, model, **extra) -> None:
    """Write `models.checkpoint_dict(model, **extra)` atomically.

    Raises:
        UserError: the weights hold NaN or inf (nothing is written: a diverged model never reaches a file).
    """
    ckpt = checkpoint_dict(model, **extra)
    bad = [k for k, v in ckpt["state_dict"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"{path}: not written: the weights of {model.kind} hold NaN or inf ({bad[0]}, ...); "
                        "training diverged, lower the learning rate")
    save_torch(path, ckpt)


def load_world_model(vision_path: str, mdnrnn_path: str, z_dim: int | None = None, memory_kind: str | None = None):
    """Load V and M and check that they agree on z_dim (and with the config's `vision.z_dim` and `memory.kind`).

    Raises:
        UserError: a missing or wrong-kind checkpoint, an M of another kind than `memory_kind`, or mismatched
            latent sizes.
    """
    vision, _ = load_model(vision_path, "vision")
    mdnrnn, _ = load_model(mdnrnn_path, "memory")
    if memory_kind is not None and mdnrnn.kind != memory_kind:
        raise UserError(f"{mdnrnn_path}: M of kind {mdnrnn.kind!r}, but key 'memory.kind' is {memory_kind!r}; train "
                        "M with this config (stage 04) or set memory.kind to match")
    if mdnrnn.z_dim != vision.z_dim:
        raise UserError(
            f"{mdnrnn_path}: M trained on z_dim={mdnrnn.z_dim}, but {vision_path} has z_dim={vision.z_dim}"
        )
    if z_dim is not None and vision.z_dim != z_dim:
        raise UserError(f"{vision_path}: checkpoint has z_dim={vision.z_dim} but key 'vision.z_dim' is {z_dim}")
    return vision, mdnrnn


def has_position_heads(vision) -> bool:
    """True for a V trained with position heads (vision.position_heads: models/vae.py PositionHeads)."""
    return getattr(vision, "position_heads", None) is not None


def check_reads_vision(controller_inputs: str, vision, vision_path: str) -> None:
    """Refuse a C whose inputs read V's position heads or joint kinematics (models.controller.INPUTS) beside a V
    without them.

    Raises:
        UserError: naming the inputs and the V checkpoint.
    """
    offset = INPUTS[controller_inputs].offset
    if offset in ("vision", "vision_kinematics") and not has_position_heads(vision):
        raise UserError(f"controller.inputs: {controller_inputs} reads V's position heads, but {vision_path} has none "
                        "(train V with vision.position_heads: true)")
    if offset == "vision_kinematics" and getattr(vision, "joint_kinematics", None) is None:
        raise UserError(f"controller.inputs: {controller_inputs} reads V's joint kinematics, but {vision_path} has "
                        "none (train V with vision.joint_kinematics: true)")
