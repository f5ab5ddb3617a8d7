#!/usr/bin/env python
"""What does C do that the episodes M learned from did not? One action dimension, in the data and in C's hands.

    python benchmarks/action_stats.py --config configs/carracing_iterative_vae_ensemble.yaml \\
        --set run_dir=runs/carracing_iterative_vae_ensemble/round_03 \\
        [--controller <run_dir>/controller/controller.pt] [--dim 1] [--above 0.95] [--run 100] [--last 3]

For the latent episodes in <run_dir>/latents (stage 03's output, actions as recorded): the steps, the mean of
action dimension --dim (CarRacing-v3: 0 steer, 1 gas, 2 brake), the share of steps above --above, and every
episode that stays above it for more than --run steps in a row (its index, that many steps, its return).
With --controller: C's mean and std action when it reads M's filtered states (<run_dir>/mdnrnn/best.pt
observing the recorded z) along the last --last episodes, played as 06 plays it (evaluate.params).
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.checkpoints import load_model  # noqa: E402
from utils.cli import load_stage_config, run_stage, stage_dir, stage_parser  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.io import list_episodes, load_episode  # noqa: E402


def longest_run(mask: np.ndarray) -> int:
    """Length of the longest stretch of True in a bool (T,) array."""
    best = current = 0
    for x in mask:
        current = current + 1 if x else 0
        best = max(best, current)
    return best


@torch.no_grad()
def controller_actions(memory, controller, episode: dict) -> np.ndarray:
    """C's actions float (T, A) along one recorded episode: M filters the recorded z and actions."""
    z = torch.from_numpy(episode["mu"])
    a = torch.from_numpy(episode["actions"].astype(np.float32))
    state = memory.observe(memory.initial_state(1), z[:1])
    actions = []
    for t in range(len(a)):
        actions.append(controller(memory.features(state))[0].numpy())
        if t + 1 < len(z):
            state = memory.observe(memory.transition(state, a[t : t + 1]), z[t + 1 : t + 2])
    return np.array(actions)


def fmt(values: np.ndarray) -> str:
    """float (A,) -> "[v0, v1, ...]" with 3 decimals."""
    return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[1])
    parser.add_argument("--controller", help="a controller.pt to play on M's filtered states")
    parser.add_argument("--dim", type=int, default=1, help="the action dimension (CarRacing-v3: 1 = gas)")
    parser.add_argument("--above", type=float, default=0.95)
    parser.add_argument("--run", type=int, default=100, help="list episodes above --above for more steps in a row")
    parser.add_argument("--last", type=int, default=3, help="episodes C is played along (the newest)")
    args = parser.parse_args(argv)
    cfg = load_stage_config(args)
    if args.last < 1:
        raise UserError(f"--last: expected at least 1 episode to play C along, got {args.last}")
    torch.set_num_threads(1)
    files = list_episodes(stage_dir(cfg, "latents"), "latents")
    episodes = [load_episode(path, ("mu", "actions", "rewards")) for path in files]
    if not 0 <= args.dim < episodes[0]["actions"].shape[1]:
        raise UserError(f"--dim: the actions have {episodes[0]['actions'].shape[1]} dimensions, got {args.dim}")
    values = np.concatenate([ep["actions"][:, args.dim] for ep in episodes])
    print(f"{len(files)} episodes, {len(values)} steps: action[{args.dim}] mean {values.mean():.3f}, share above "
          f"{args.above:g} {np.mean(values > args.above):.3f}")
    for path, ep in zip(files, episodes):
        steps = longest_run(ep["actions"][:, args.dim] > args.above)
        if steps > args.run:
            print(f"  {os.path.basename(path)}: {steps} steps above {args.above:g} in a row, return "
                  f"{ep['rewards'].sum():.1f}")
    if args.controller:
        memory, _ = load_model(os.path.join(stage_dir(cfg, "mdnrnn"), "best.pt"), "memory")
        controller, ckpt = load_model(args.controller, "controller")
        if cfg.evaluate.params == "mean":
            controller.set_params(ckpt["params_mean"])
        played = np.concatenate([controller_actions(memory, controller, ep) for ep in episodes[-args.last:]])
        print(f"C on M's filtered states of the last {min(args.last, len(files))} episodes ({len(played)} steps): "
              f"action mean {fmt(played.mean(0))}, std {fmt(played.std(0))}")


if __name__ == "__main__":
    run_stage(main)
