#!/usr/bin/env python
"""Env-step throughput of stages 01 and 05 against the raw env, measured in one run on the same cores.

    python benchmarks/throughput.py [--workers 2] [--episodes 4] [--steps 1000]

Three measurements, each with `--workers` processes playing `--episodes`
episodes of `--steps` steps on the same env seeds:

- raw:  CarRacing-v3 stepped with uniform random actions, nothing else;
- 01:   stage 01's task (random policy, frame preprocessing, npz written);
- 05:   stage 05's task (V encode, C, M update every step) with a conv VAE
        (z 32) and an MDN-RNN (256 units) of the real sizes.

Prints steps/s for each and the ratios 01/raw (target >= 0.9) and 05/raw
(target >= 0.8).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models import vision_checkpoint  # noqa: E402
from models.mdnrnn import MDNRNN  # noqa: E402
from models.vae import ConvVAE  # noqa: E402
from utils.config import EnvConfig, RolloutsConfig  # noqa: E402
from utils.envs import make_env  # noqa: E402
from utils.io import save_torch  # noqa: E402
from utils.parallel import WorkerPool  # noqa: E402
from utils.rollout import agent_task, init_agent_worker, init_rollout_worker, rollout_task  # noqa: E402


def init_raw_worker(env_cfg: EnvConfig) -> dict:
    return {"env": make_env(env_cfg)}


def raw_task(state: dict, task: dict) -> dict:
    env = state["env"]
    env.reset(seed=task["seed"])
    env.action_space.seed(task["seed"])
    for t in range(task["max_steps"]):
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            break
    return {"steps": t + 1}


def measure(pool: WorkerPool, tasks: list) -> float:
    pool.map(tasks[: len(pool.workers)])  # warm-up: imports, first reset
    start = time.perf_counter()
    results = pool.map(tasks)
    return sum(r["steps"] for r in results) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--episodes", type=int, default=4)
    parser.add_argument("--steps", type=int, default=1000)
    args = parser.parse_args()
    env_cfg = EnvConfig(max_episode_steps=args.steps)
    seeds = [10_000 + i for i in range(args.episodes)]
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        with WorkerPool(args.workers, init_raw_worker, (env_cfg,), raw_task) as pool:
            rates["raw"] = measure(pool, [{"seed": s, "max_steps": args.steps} for s in seeds])

        ro_cfg = RolloutsConfig(policy="uniform", max_steps=args.steps)
        with WorkerPool(args.workers, init_rollout_worker, (env_cfg, ro_cfg, tmp), rollout_task) as pool:
            rates["01"] = measure(pool, list(enumerate(seeds)))

        vision_path, mdnrnn_path = os.path.join(tmp, "vision.pt"), os.path.join(tmp, "mdnrnn.pt")
        save_torch(vision_path, vision_checkpoint(ConvVAE(z_dim=32)))
        m = MDNRNN(32, 3, 256, 5)
        save_torch(mdnrnn_path, {"kind": "mdnrnn", "hparams": m.hparams(), "state_dict": m.state_dict()})
        params = np.random.default_rng(0).normal(scale=0.1, size=3 * (32 + 256 + 1)).astype(np.float32)
        tasks = [{"params": params, "seed": s, "max_steps": args.steps, "early_stop_steps": 0} for s in seeds]
        with WorkerPool(args.workers, init_agent_worker, (vision_path, mdnrnn_path, env_cfg), agent_task) as pool:
            rates["05"] = measure(pool, tasks)

    print(f"CarRacing-v3, {args.workers} worker processes, {args.episodes} episodes x up to {args.steps} steps each")
    print(f"{'':6s}{'steps/s':>10s}{'ratio to raw':>14s}{'target':>8s}")
    for name, target in (("raw", None), ("01", 0.9), ("05", 0.8)):
        ratio = rates[name] / rates["raw"]
        verdict = "" if target is None else f">= {target}  {'ok' if ratio >= target else 'BELOW'}"
        print(f"{name:6s}{rates[name]:10.1f}{ratio:14.3f}  {verdict}")


if __name__ == "__main__":
    main()
