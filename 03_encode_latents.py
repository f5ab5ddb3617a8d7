#!/usr/bin/env python
"""Stage 03: encode every rollout episode with V into per-frame posteriors.

    python 03_encode_latents.py --config configs/carracing_vae.yaml [--vision PATH]

Writes <run_dir>/latents/episode_NNNNN.npz with mu, logvar float32 (T, z_dim)
plus the episode's actions, rewards, terminated, truncated, and manifest.json
(z_dim, action_dim, the vision checkpoint). An episode already encoded by the
same checkpoint (same sha256) is skipped.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
from tqdm import tqdm

from models.likelihood import frames_to_tensor
from utils.checkpoints import load_model
from utils.cli import load_stage_config, open_stage_dir, run_stage, stage_dir, stage_parser
from utils.config import config_to_dict
from utils.data import check_rollouts
from utils.errors import UserError
from utils.io import file_sha256, list_episodes, load_episode, save_npz, write_manifest
from utils.training import resolve_device

EPISODE_KEYS = ("obs", "actions", "rewards", "terminated", "truncated")


@torch.inference_mode()
def encode_frames(vision, frames: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (T, S, S, 3) -> mu, logvar float32 (T, z_dim), encoded on V's device."""
    device = next(vision.parameters()).device
    mus, logvars = [], []
    for b in range(0, len(frames), batch_size):
        mu, logvar = vision.encode(frames_to_tensor(frames[b : b + batch_size]).to(device))
        mus.append(mu.cpu().numpy())
        logvars.append(logvar.cpu().numpy())
    return np.concatenate(mus).astype(np.float32), np.concatenate(logvars).astype(np.float32)


def already_encoded(path: str, sha: str) -> bool:
    if not os.path.exists(path):
        return False
    try:
        with np.load(path) as data:
            return str(data["vision_sha256"]) == sha
    except Exception:  # noqa: BLE001 - an unreadable old file is simply encoded again
        return False


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[1])
    parser.add_argument("--vision", help="vision checkpoint (default: <run_dir>/vision/best.pt)")
    args = parser.parse_args(argv)
    cfg = load_stage_config(args)
    torch.set_num_threads(cfg.vision.threads)
    vision_path = args.vision or os.path.join(stage_dir(cfg, "vision"), "best.pt")
    files = list_episodes(stage_dir(cfg, "rollouts"))
    vision, _ = load_model(vision_path, "vision")
    if vision.z_dim != cfg.vision.z_dim:
        raise UserError(
            f"{vision_path}: checkpoint has z_dim={vision.z_dim} but key 'vision.z_dim' is {cfg.vision.z_dim}"
        )
    check_rollouts(files, vision.frame_size)
    vision.to(resolve_device(cfg.vision.device))
    sha = file_sha256(vision_path)
    out_dir = open_stage_dir(cfg, "latents")
    start, encoded, action_dim = time.perf_counter(), 0, None
    for path in tqdm(files, desc="03 encode", unit="ep", disable=None):
        target = os.path.join(out_dir, os.path.basename(path))
        if already_encoded(target, sha):
            action_dim = action_dim or load_episode(target, ("actions",))["actions"].shape[1]
            continue
        ep = load_episode(path, EPISODE_KEYS)
        mu, logvar = encode_frames(vision, ep["obs"], cfg.latents.batch_size)
        if not (np.isfinite(mu).all() and np.isfinite(logvar).all()):
            raise UserError(f"{vision_path}: encodes {path} to NaN or inf latents; nothing was written for it")
        action_dim = ep["actions"].shape[1]
        save_npz(
            target, mu=mu, logvar=logvar, vision_sha256=np.str_(sha),
            **{k: ep[k] for k in EPISODE_KEYS if k != "obs"},
        )
        encoded += 1
    wall = time.perf_counter() - start
    write_manifest(
        out_dir,
        "03_encode_latents",
        config_to_dict(cfg),
        {"vision": os.path.abspath(vision_path), "vision_sha256": sha, "rollouts": os.path.abspath(stage_dir(cfg, "rollouts"))},
        wall,
        {"episodes": len(files), "encoded": encoded, "z_dim": vision.z_dim, "action_dim": action_dim, "vision_kind": vision.kind},
    )
    print(f"[03] encoded {encoded} episodes ({len(files) - encoded} up to date) into {out_dir} in {wall:.1f} s")


if __name__ == "__main__":
    run_stage(main)
