#!/usr/bin/env python
"""Env-step throughput of stages 01 and 05 against the raw env, measured in one run on the same cores.

    python benchmarks/throughput.py [--workers 2] [--episodes 4] [--steps 1000]

Three measurements, all through the one episode loop (utils/episodes.py), each with `--workers` processes playing `--episodes`
episodes of `--steps` steps on the same env seeds:

- raw:  CarRacing-v3 (gym.make, no frame wrapper) stepped with uniform random
        actions, nothing else;
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

import gymnasium as gym  # noqa: E402

from models.controller import LinearControllerConfig  # noqa: E402
from models.mdnrnn import MDNRNN, MDNRNNConfig  # noqa: E402
from models.vae import ConvVAE, VAEConfig  # noqa: E402
from utils.checkpoints import save_model  # noqa: E402
from utils.config import EnvConfig, RolloutsConfig  # noqa: E402
from utils.episodes import (RandomPolicy, agent_task, init_agent_worker, init_recorder, record_task,  # noqa: E402
                            run_episode)
from utils.parallel import WorkerPool  # noqa: E402


def init_random_worker(env_cfg: EnvConfig) -> dict:
    """The raw env (gym.make, no frame wrapper) with uniform random actions."""
    env = gym.make(env_cfg.id, max_episode_steps=env_cfg.max_episode_steps)
    return {"env": env, "policy": RandomPolicy("uniform", env.action_space)}


def random_task(state: dict, task: dict) -> dict:
    episode = run_episode(state["env"], state["policy"], task["seed"], task["max_steps"])
    return {"steps": episode.steps}


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
        with WorkerPool(args.workers, init_random_worker, (env_cfg,), random_task) as pool:
            rates["raw"] = measure(pool, [{"seed": s, "max_steps": args.steps} for s in seeds])

        ro_cfg = RolloutsConfig(policy="uniform", max_steps=args.steps)
        with WorkerPool(args.workers, init_recorder, (env_cfg, ro_cfg, tmp), record_task) as pool:
            rates["01"] = measure(pool, list(enumerate(seeds)))

        vision_path, mdnrnn_path = os.path.join(tmp, "vision.pt"), os.path.join(tmp, "mdnrnn.pt")
        save_model(vision_path, ConvVAE(VAEConfig(z_dim=32)))
        save_model(mdnrnn_path, MDNRNN(MDNRNNConfig(hidden=256, gaussians=5), z_dim=32, action_dim=3))
        params = np.random.default_rng(0).normal(scale=0.1, size=3 * (32 + 256 + 1)).astype(np.float32)
        tasks = [{"params": params, "seed": s, "max_steps": args.steps, "early_stop_steps": 0} for s in seeds]
        agent_args = (vision_path, mdnrnn_path, env_cfg, LinearControllerConfig())
        with WorkerPool(args.workers, init_agent_worker, agent_args, agent_task) as pool:
            rates["05"] = measure(pool, tasks)

    print(f"CarRacing-v3, {args.workers} worker processes, {args.episodes} episodes x up to {args.steps} steps each")
    print(f"{'':6s}{'steps/s':>10s}{'ratio to raw':>14s}{'target':>8s}")
    for name, target in (("raw", None), ("01", 0.9), ("05", 0.8)):
        ratio = rates[name] / rates["raw"]
        verdict = "" if target is None else f">= {target}  {'ok' if ratio >= target else 'BELOW'}"
        print(f"{name:6s}{rates[name]:10.1f}{ratio:14.3f}  {verdict}")


if __name__ == "__main__":
    main()
