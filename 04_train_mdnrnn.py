#!/usr/bin/env python
"""Stage 04: train the memory model M (memory.kind: mdnrnn | rssm | tssm) on sequences of latents.

    python 04_train_mdnrnn.py --config configs/carracing_vae.yaml

Reads <run_dir>/latents/ (z_dim and action_dim come from its manifest),
trains on windows of z sampled from each frame's mu and logvar, and writes
<run_dir>/mdnrnn/ (the folder of M, whatever its kind): best.pt (lowest
held-out loss), latest.pt (resume by rerunning), train_log.jsonl (held-out NLL
of z_{t+1} in nats per dimension, per epoch) and manifest.json.
"""

from __future__ import annotations

import os
import time

from utils.cli import load_stage_config, open_stage_dir, run_stage, stage_dir, stage_parser
from utils.config import config_to_dict
from utils.data import check_latents, split_episodes
from utils.errors import UserError
from utils.io import list_episodes, load_episode, read_manifest, write_manifest
from utils.seeding import seed_everything
from utils.training import build_model, check_init_from, check_memory_options, resolve_device, train_memory


def main(argv: list[str] | None = None) -> None:
    args = stage_parser(__doc__.splitlines()[1]).parse_args(argv)
    cfg = load_stage_config(args)
    seed_everything(cfg.seed)
    latents = stage_dir(cfg, "latents")
    files = list_episodes(latents, "latents")
    check_latents(files)
    manifest = read_manifest(latents)
    sizes, sha = manifest["metrics"], manifest["inputs"]["vision_sha256"]
    for f in files:  # every episode must come from the V the manifest names, else z means different things
        if str(load_episode(f, ("vision_sha256",))["vision_sha256"]) != sha:
            raise UserError(f"{f}: encoded by another vision checkpoint than {latents}/manifest.json names; rerun 03")
    train, held = split_episodes(files, cfg.memory.holdout_fraction, cfg.seed)
    if not held:
        raise UserError(f"{latents}: need at least 2 episodes to hold one out (found {len(files)})")
    resolve_device(cfg.memory.device, "memory.device")
    mc = cfg.memory
    check_memory_options(cfg)
    if mc.init_from:  # checked before the stage folder is touched
        check_init_from(mc.init_from, build_model("memory", mc.kind, mc.model_config(), z_dim=sizes["z_dim"],
                                                     action_dim=sizes["action_dim"], members=mc.ensemble))
    out_dir = open_stage_dir(cfg, "mdnrnn")
    members = f" x {mc.ensemble} (ensemble)" if mc.ensemble > 1 else ""
    print(f"[04] M = {cfg.memory.kind}{members}, z={sizes['z_dim']} a={sizes['action_dim']}: {len(train)} training / {len(held)} held-out episodes")
    start = time.perf_counter()
    history = train_memory(cfg, train, held, sizes["z_dim"], sizes["action_dim"], out_dir)
    best = min(history, key=lambda r: r["val_loss"])
    write_manifest(
        out_dir,
        "04_train_mdnrnn",
        config_to_dict(cfg),
        {"latents": os.path.abspath(latents), "train_episodes": len(train), "held_out_episodes": len(held)},
        time.perf_counter() - start,
        {"epochs": len(history), "best_epoch": best["epoch"], **{k: v for k, v in best.items() if k.startswith("val_")}},
    )
    open_loop = f", open loop over {mc.open_loop_horizon} steps: nll {best['val_open_loop_nll']:.4f}, reward mse " \
        f"{best['val_open_loop_reward_mse']:.4f}" if mc.open_loop_horizon else ""
    print(f"[04] best held-out epoch {best['epoch']}: nll {best['val_nll']:.4f} nats/dim, reward mse "
          f"{best['val_reward_mse']:.4f}{open_loop}")


if __name__ == "__main__":
    run_stage(main)
