#!/usr/bin/env python
"""The random policy's score on a run's evaluation episodes: the floor for 06's numbers.

    python benchmarks/random_policy.py --config configs/panda_reach_vae.yaml [--episodes 100] [--policy uniform]

Plays --episodes episodes (default evaluate.episodes) of uniform random actions
(or the brownian walk of stage 01) on the same held-out env seeds as
06_evaluate.py, without rendering (the policy does not look), and writes
<run_dir>/eval/random_policy.json: returns, mean +- std and, for envs that
report info["is_success"] (PandaReach), the success rate, which
`06_evaluate.py --compare` puts beside the run's own in Table 3.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.cli import load_stage_config, run_stage, stage_dir, stage_parser  # noqa: E402
from utils.envs import make_env  # noqa: E402
from utils.episodes import RandomPolicy, run_episode  # noqa: E402
from utils.io import save_json  # noqa: E402
from utils.report import RANDOM_POLICY_FILE  # noqa: E402
from utils.seeding import env_seed  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[1])
    parser.add_argument("--episodes", type=int, help="episodes (default: evaluate.episodes)")
    parser.add_argument("--policy", choices=("uniform", "brownian"), default="uniform")
    args = parser.parse_args(argv)
    cfg = load_stage_config(args)
    episodes = args.episodes or cfg.evaluate.episodes
    seeds = [env_seed(cfg.seed, "evaluate", i) for i in range(episodes)]
    env = make_env(cfg.env, pixels=False)
    start = time.perf_counter()
    policy = RandomPolicy(args.policy, env.action_space, cfg.rollouts.brownian_dt)
    results = [run_episode(env, policy, s) for s in seeds]
    env.close()
    returns = np.array([r.ret for r in results])
    scores = {"env": cfg.env.id, "policy": args.policy, "episodes": episodes, "mean": float(returns.mean()),
              "std": float(returns.std()), "returns": returns.tolist(), "steps": [r.steps for r in results],
              "seeds": seeds, "seconds": time.perf_counter() - start}
    line = f"random policy ({args.policy}) on {cfg.env.id}: {scores['mean']:.2f} +- {scores['std']:.2f}"
    if all(r.success is not None for r in results):
        successes = [r.success for r in results]
        scores |= {"success_rate": float(np.mean(successes)), "successes": successes}
        line += f", success {100 * scores['success_rate']:.0f} %"
    out_dir = stage_dir(cfg, "eval")
    os.makedirs(out_dir, exist_ok=True)
    save_json(os.path.join(out_dir, RANDOM_POLICY_FILE), scores)
    print(f"{line} over {episodes} held-out episodes; {os.path.join(out_dir, RANDOM_POLICY_FILE)}")


if __name__ == "__main__":
    run_stage(main)
