#!/usr/bin/env python
"""Dream steps/s (the batched MDN-RNN rollout of stage 05 in the dream) against real CarRacing-v3.

    python benchmarks/dream_speed.py [--workers 2] [--batch 256] [--steps 1000]

Both on the same cores, in one run:

- real:  CarRacing-v3 with uniform random actions in `--workers` processes
         (benchmarks/throughput.py's raw measurement, 2 episodes per worker);
- dream: models.dream.dream_returns with `--batch` linear controllers (a CMA-ES
         population times its rollouts per candidate) stepped together through
         an MDN-RNN of the real size (z 32, 256 units, 5 Gaussians), torch on
         `--workers` threads. M is untrained (speed does not depend on its
         weights) with its done head biased off, so every episode runs `--steps`.

Prints both rates and the ratio dream / real (target >= 50).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.dream import dream_returns  # noqa: E402
from models.mdnrnn import MDNRNN, MDNRNNConfig  # noqa: E402
from throughput import init_random_worker, measure, random_task  # noqa: E402  (benchmarks/ is the script's folder)
from utils.config import EnvConfig  # noqa: E402
from utils.parallel import WorkerPool  # noqa: E402

LOW, HIGH = np.array([-1.0, 0.0, 0.0], np.float32), np.array([1.0, 1.0, 1.0], np.float32)


def dream_rate(batch: int, steps: int, threads: int) -> float:
    """Dream env steps per second of one batched rollout of `batch` episodes x `steps` steps."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    m = MDNRNN(MDNRNNConfig(hidden=256, gaussians=5), z_dim=32, action_dim=3).eval()
    with torch.no_grad():
        m.done_head.bias.fill_(-20.0)
    rng = np.random.default_rng(0)
    params = rng.normal(scale=0.1, size=(batch, 3 * (32 + 256 + 1))).astype(np.float32)
    starts = rng.normal(size=(batch, 32)).astype(np.float32)
    dream_returns(m, params, starts, LOW, HIGH, 1.0, 10, torch.Generator().manual_seed(0))  # warm-up
    start = time.perf_counter()
    dream_returns(m, params, starts, LOW, HIGH, 1.0, steps, torch.Generator().manual_seed(1))
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="real-env processes and dream torch threads")
    parser.add_argument("--batch", type=int, default=256, help="dream episodes stepped together")
    parser.add_argument("--steps", type=int, default=1000)
    args = parser.parse_args()
    env_cfg = EnvConfig(max_episode_steps=args.steps)
    tasks = [{"seed": 20_000 + i, "max_steps": args.steps} for i in range(2 * args.workers)]
    with WorkerPool(args.workers, init_random_worker, (env_cfg,), random_task) as pool:
        real = measure(pool, tasks)
    dream = dream_rate(args.batch, args.steps, args.workers)
    print(f"same {args.workers} cores: real CarRacing-v3 in {args.workers} processes, dream batch {args.batch} x {args.steps} steps")
    print(f"real   {real:12.1f} steps/s")
    print(f"dream  {dream:12.1f} steps/s")
    ratio = dream / real
    print(f"ratio  {ratio:12.1f}   target >= 50  {'ok' if ratio >= 50 else 'BELOW'}")


if __name__ == "__main__":
    main()
