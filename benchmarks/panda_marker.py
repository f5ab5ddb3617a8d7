#!/usr/bin/env python
"""How large is PandaReach's goal marker in V's frames, and what do shadows cost?

    python benchmarks/panda_marker.py --config configs/panda_reach_vae.yaml [--goals 20] [--radii 0.02 0.05]

For each goal radius (m) and shadows on and off, makes the project's PandaReachMarker variant of the config's
env id (utils/panda_tasks.py: PandaReachJoints-v3 -> PandaReachMarkerJoints-v3; the config's camera and
frame sizes) and resets it on the first --goals evaluation seeds. Prints the marker's pixels in the V-ready
frame (env.frame_size, `goal_marker_mask`) as min / median / max, the share of goals where it shows at all,
with env.views: 2 the share where it shows in each view (the frame's left and right halves) and in both, and
resets per second (each reset renders one frame).

Raises (exit 2): a config whose env is not PandaReach; --goals < 1; a radius <= 0.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.cli import load_stage_config, run_stage, stage_parser  # noqa: E402
from utils.envs import goal_marker_mask, make_env  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.seeding import env_seed  # noqa: E402


def marker_env_id(env_id: str) -> str:
    """panda-gym's Reach id -> the project's variant: PandaReach{Joints}{Dense}-v3 -> PandaReachMarker{...}-v3."""
    if not env_id.startswith("PandaReach"):
        raise UserError(f"env.id: {env_id} is not a PandaReach env; this benchmark measures PandaReach's goal marker")
    return env_id if env_id.startswith("PandaReachMarker") else "PandaReachMarker" + env_id[len("PandaReach"):]


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[1])
    parser.add_argument("--goals", type=int, default=20, help="evaluation goals per setting")
    parser.add_argument("--radii", type=float, nargs="+", default=[0.02, 0.05], help="goal marker radii (m)")
    args = parser.parse_args(argv)
    cfg = load_stage_config(args)
    env_id = marker_env_id(cfg.env.id)
    if args.goals < 1 or min(args.radii) <= 0:
        raise UserError("--goals must be >= 1 and every --radii value > 0")
    print(f"{env_id}, {cfg.env.render_size} px render -> {cfg.env.frame_size} px frames, {args.goals} evaluation "
          "goals per row")
    print("| radius (m) | shadows | marker px min / median / max | goals where it shows | in each view; in all "
          "| resets/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for radius in args.radii:
        for shadows in (True, False):
            env = make_env(dataclasses.replace(cfg.env, id=env_id, goal_radius=radius, render_shadows=shadows))
            pixels, per_view, start = [], [], time.perf_counter()
            for i in range(args.goals):
                frame, _ = env.reset(seed=env_seed(cfg.seed, "evaluate", i))
                mask = goal_marker_mask(frame)
                pixels.append(int(mask.sum()))
                per_view.append([view.any() for view in np.array_split(mask, cfg.env.views, axis=1)])
            rate = args.goals / (time.perf_counter() - start)
            env.close()
            shown = np.array(per_view)
            views = " / ".join(f"{share:.0%}" for share in shown.mean(axis=0))
            print(f"| {radius:g} | {'on' if shadows else 'off'} | {min(pixels)} / {np.median(pixels):g} / "
                  f"{max(pixels)} | {np.mean(np.array(pixels) > 0):.0%} | {views}; {shown.all(axis=1).mean():.0%} "
                  f"| {rate:.1f} |", flush=True)


if __name__ == "__main__":
    run_stage(main)
