#!/usr/bin/env python
"""Compare the vision models of several runs on the same held-out frames, and their controllers.

    python benchmarks/compare_vision.py runs/carracing_vae runs/carracing_nvae [--frames 2048]

For each run directory (stages 01-02 done; 05-06 optional) prints one row:

- negative ELBO in bits/dim (models/likelihood.bits_per_dim): exact for the
  discretized logistic mixture; for the Gaussian, (-ELBO + D ln 256) / (D ln 2),
  D = 3 S^2, the density on [0, 1] put on 8-bit bins without dequantization
  noise (an approximation); not defined for Bernoulli (nan). Compare bits/dim
  only between runs with the same likelihood;
- reconstruction MSE and PSNR from the full posterior (conv VAE: decode(mu);
  NVAE: every group at its posterior mean);
- reconstruction MSE from the flat z alone, decode(encode(x)) (NVAE: lower
  groups drawn from the prior at temperature 1, seeded);
- parameter count and training images/s (from the run's train_log.jsonl);
- the 06 score (mean +- std over its evaluation episodes) and the stage-05
  budget (generations, env steps), where the run has them.

The held-out frames are those of the first run's held-out episodes; the other
runs must have been trained on the same rollouts with the same split (same
rollouts folder and seed), which is checked.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.likelihood import frames_to_tensor  # noqa: E402
from models.likelihood import bits_per_dim  # noqa: E402
from utils.data import sample_frames  # noqa: E402
from utils.checkpoints import load_model, read_checkpoint  # noqa: E402
from utils.errors import UserError  # noqa: E402


def psnr(mse: float) -> float:
    """Peak signal-to-noise ratio in dB for images in [0, 1]."""
    return 10 * math.log10(1.0 / max(mse, 1e-12))


@torch.no_grad()
def vision_metrics(vision, frames: np.ndarray, batch_size: int = 128, seed: int = 0) -> dict:
    """Held-out metrics of one V on uint8 frames (N, S, S, 3); see the module docstring."""
    torch.manual_seed(seed)
    sums = {"neg_elbo": 0.0, "mse_full": 0.0, "mse_z": 0.0}
    for b in range(0, len(frames), batch_size):
        x = frames_to_tensor(frames[b : b + batch_size])
        n = len(x)
        sums["neg_elbo"] += vision.loss(x)["neg_elbo"].item() * n
        full = vision.reconstruct_full(x) if hasattr(vision, "reconstruct_full") else vision.reconstruct(x)
        sums["mse_full"] += (full - x).pow(2).mean().item() * n
        sums["mse_z"] += (vision.reconstruct(x) - x).pow(2).mean().item() * n
    out = {k: v / len(frames) for k, v in sums.items()}
    dims = frames[0].size
    out["bits_per_dim"] = bits_per_dim(out["neg_elbo"], dims, vision.likelihood)
    out["psnr_full"] = psnr(out["mse_full"])
    out["params"] = sum(p.numel() for p in vision.parameters())
    return out


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def run_row(run_dir: str, frames: np.ndarray) -> dict:
    """Every number of one run's row."""
    vision, ckpt = load_model(os.path.join(run_dir, "vision", "best.pt"), "vision")
    row = {"run": run_dir, "kind": vision.kind, "z_dim": vision.z_dim, "likelihood": vision.likelihood}
    row.update(vision_metrics(vision, frames))
    log_path = os.path.join(run_dir, "vision", "train_log.jsonl")
    with open(log_path) as f:
        rates = [json.loads(line)["images_per_s"] for line in f if line.strip()]
    row["train_images_per_s"] = float(np.mean(rates)) if rates else float("nan")
    row["vision_epochs"] = len(rates)
    scores = _read_json(os.path.join(run_dir, "eval", "scores.json"))
    if scores:
        row.update(score_mean=scores["mean"], score_std=scores["std"], score_episodes=scores["episodes"])
    controller = _read_json(os.path.join(run_dir, "controller", "manifest.json"))
    if controller:
        row.update(generations=controller["metrics"]["generations"], env_steps=controller["metrics"]["env_steps"])
    row["held_out"] = ckpt.get("split", {}).get("held_out", [])
    return row


def held_out_frames(run_dir: str, n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    ckpt = read_checkpoint(os.path.join(run_dir, "vision", "best.pt"))
    names = ckpt.get("split", {}).get("held_out", [])
    if not names:
        raise UserError(f"{run_dir}/vision/best.pt: no held-out split recorded")
    files = [os.path.join(run_dir, "rollouts", name) for name in names]
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        raise UserError(f"{missing[0]}: held-out rollout not found")
    return sample_frames(files, n, seed), names


def markdown_table(rows: list[dict], n_frames: int) -> str:
    head = (
        f"| run | V | z | likelihood | -ELBO (bits/dim) | MSE full posterior | PSNR full (dB) | MSE from z | params | "
        f"train img/s | score ({rows[0].get('score_episodes', '-')} episodes) | 05 budget |"
    )
    lines = [f"Held-out frames: {n_frames}", "", head, "|" + " --- |" * 12]
    for r in rows:
        score = f"{r['score_mean']:.1f} +- {r['score_std']:.1f}" if "score_mean" in r else "-"
        budget = f"{r['generations']} gen, {r['env_steps']} steps" if "generations" in r else "-"
        lines.append(
            f"| {r['run']} | {r['kind']} | {r['z_dim']} | {r['likelihood']} | {r['bits_per_dim']:.3f} | {r['mse_full']:.5f} | "
            f"{r['psnr_full']:.2f} | {r['mse_z']:.5f} | {r['params']:,} | {r['train_images_per_s']:.1f} | {score} | {budget} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories (their run_dir)")
    parser.add_argument("--frames", type=int, default=2048, help="held-out frames to score")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    frames, names = held_out_frames(args.runs[0], args.frames, args.seed)
    rows = []
    for run in args.runs:
        row = run_row(run, frames)
        if row["held_out"] != names:
            raise UserError(f"{run}: held-out episodes differ from {args.runs[0]}'s; train both on the same rollouts and seed")
        rows.append(row)
    print(markdown_table(rows, len(frames)))


if __name__ == "__main__":
    try:
        main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
