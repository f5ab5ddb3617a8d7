#!/usr/bin/env python
"""Stage 02: train the vision model V (vision.kind: vae | nvae) on the rollout frames.

    python 02_train_nvae.py --config configs/carracing_vae.yaml

Reads <run_dir>/rollouts/, holds out episodes (vision.holdout_fraction, split
by episode), and writes <run_dir>/vision/: best.pt (lowest held-out loss, the
V that later stages use), latest.pt (to resume: rerun the same command),
train_log.jsonl (ELBO terms per epoch) and manifest.json.
"""

from __future__ import annotations

import os
import time

from utils.cli import load_stage_config, open_stage_dir, run_stage, stage_dir, stage_parser
from utils.config import config_to_dict
from utils.data import check_position_labels, check_rollouts, split_episodes
from utils.errors import UserError
from utils.io import list_episodes, write_manifest
from utils.seeding import seed_everything
from utils.training import build_model, resolve_device, train_vision


def main(argv: list[str] | None = None) -> None:
    args = stage_parser(__doc__.splitlines()[1]).parse_args(argv)
    cfg = load_stage_config(args)
    seed_everything(cfg.seed)
    rollouts = stage_dir(cfg, "rollouts")
    files = list_episodes(rollouts)
    lengths = dict(zip(files, check_rollouts(files, cfg.env.frame_size)))
    train, held = split_episodes(files, cfg.vision.holdout_fraction, cfg.seed)
    if not held:
        raise UserError(f"{rollouts}: need at least 2 episodes to hold one out (found {len(files)})")
    if cfg.vision.joint_kinematics and not cfg.vision.position_heads:
        raise UserError("vision.joint_kinematics: true needs vision.position_heads: true (it replaces the heads' "
                        "gripper)")
    if cfg.vision.position_heads:
        check_position_labels(files, cfg.vision.joint_kinematics)
    model = build_model("vision", cfg.vision.kind, cfg.vision.model_config(), frame_size=cfg.env.frame_size)
    device = resolve_device(cfg.vision.device)
    out_dir = open_stage_dir(cfg, "vision")
    print(f"[02] {cfg.vision.kind} z={cfg.vision.z_dim}: {len(train)} training / {len(held)} held-out episodes")
    start = time.perf_counter()
    history = train_vision(cfg, model.to(device), train, [lengths[f] for f in train], held, out_dir)
    best = min(history, key=lambda r: r["val_loss"])
    write_manifest(
        out_dir,
        "02_train_nvae",
        config_to_dict(cfg),
        {"rollouts": os.path.abspath(rollouts), "train_episodes": len(train), "held_out_episodes": len(held)},
        time.perf_counter() - start,
        {"epochs": len(history), "best_epoch": best["epoch"], **{k: v for k, v in best.items() if k.startswith("val_")}},
    )
    print(f"[02] best held-out epoch {best['epoch']}: neg_elbo {best['val_neg_elbo']:.1f} nats, mse {best['val_mse']:.5f}"
          + (f", position heads: goal {best['val_goal_cm']:.1f} cm, gripper {best['val_gripper_cm']:.1f} cm"
             if "val_goal_cm" in best else "")
          + (f", joint kinematics: gripper {best['val_kinematics_cm']:.2f} cm" if "val_kinematics_cm" in best else ""))


if __name__ == "__main__":
    run_stage(main)
