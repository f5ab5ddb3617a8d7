#!/usr/bin/env python
"""Does M's dream recognise a driver? A controller's return in the dream, beside doing nothing.

    python benchmarks/dream_score.py --config configs/carracing_vae.yaml \\
        --controller runs/carracing_vae/controller/controller.pt [--taus 0.5 1.0 1.15] [--episodes 64]

Plays the controller (the parameters 06 scores: its CMA-ES mean with evaluate.params: mean, else the best
held-out mean) and the all-zero controller in M's dream (for an ensemble, also per world member)
(<run_dir>/mdnrnn/best.pt, starts from <run_dir>/latents) for --episodes batched
episodes of up to env.max_episode_steps at each tau, and prints mean +- std. A
dream worth training in gives a controller that drives in the real env a much
higher return than the zero controller. For an ensemble M it also prints the mean over the episodes' steps of
the members' reward spread u, which controller.disagreement_penalty charges lambda times per step.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.dream import dream_score  # noqa: E402
from models.ensemble import MemoryEnsemble, PenalisedEnsemble  # noqa: E402
from utils.checkpoints import load_model  # noqa: E402
from utils.cli import load_stage_config, run_stage, stage_dir, stage_parser  # noqa: E402
from utils.data import start_latents  # noqa: E402
from utils.io import list_episodes  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[1])
    parser.add_argument("--controller", required=True, help="controller.pt, played as 06 plays it (evaluate.params)")
    parser.add_argument("--taus", type=float, nargs="+", default=[0.5, 1.0, 1.15])
    parser.add_argument("--episodes", type=int, default=64)
    args = parser.parse_args(argv)
    cfg = load_stage_config(args)
    torch.set_num_threads(1)
    mdnrnn, _ = load_model(os.path.join(stage_dir(cfg, "mdnrnn"), "best.pt"), "memory")
    starts = start_latents(list_episodes(stage_dir(cfg, "latents"), "latents"))
    c, ckpt = load_model(args.controller, "controller")
    if cfg.evaluate.params == "mean":
        c.set_params(ckpt["params_mean"])
    print(f"M: {stage_dir(cfg, 'mdnrnn')}/best.pt, {len(starts)} start latents, {args.episodes} dream episodes "
          f"of <= {cfg.env.max_episode_steps} steps per row; C: evaluate.params {cfg.evaluate.params}")
    for tau in args.taus:
        for name, params in (("controller", c.get_params()), ("zero controller", np.zeros(c.num_params))):
            d = dream_score(mdnrnn, starts, params, c.low, c.high, tau, args.episodes, cfg.env.max_episode_steps,
                            cfg.seed)
            print(f"tau {tau:g}  {name:16s} {d['mean']:8.1f} +- {d['std']:.1f}  (mean length {d['mean_length']:.0f})")
            if isinstance(mdnrnn, MemoryEnsemble):  # row b's world is member b % K
                k, returns = len(mdnrnn.members), np.array(d["returns"])
                print("  per world member: " + ", ".join(f"{i}: {returns[i::k].mean():.1f} +- {returns[i::k].std():.1f}"
                                                      for i in range(min(k, len(returns)))))
                # the same episodes (same z draws) in MOPO's penalised dream with lambda 1: what each step costs
                charged = dream_score(PenalisedEnsemble(mdnrnn, 1.0), starts, params, c.low, c.high, tau,
                                      args.episodes, cfg.env.max_episode_steps, cfg.seed)
                print(f"  members' reward spread u per step (controller.disagreement_penalty charges lambda u): "
                      f"{(d['mean'] - charged['mean']) / d['mean_length']:.4f}")


if __name__ == "__main__":
    run_stage(main)
