#!/usr/bin/env python
"""Env-step throughput of stages 01 and 05 against the raw env, measured in one run on the same cores.

    python benchmarks/throughput.py [--workers 2] [--episodes 4] [--steps 1000]

Three measurements, all through the one episode loop (utils/episodes.py), each with `--workers` processes playing `--episodes`
episodes of `--steps` steps on the same env seeds:

- raw:  CarRacing-v3 (gym.make, no frame wrapper) stepped with uniform random
        actions, nothing else;
- 01:   stage 01's task (random policy, frame preprocessing, npz written);
- 05:   stage 05's task (V encode, C, M update every step) with a conv VAE
        (z 32) and an MDN-RNN (256 units) of the real sizes;
- 05 ray: the same on the Ray backend (`--workers` actors of a local Ray).

Prints steps/s for each and the ratios 01/raw (target >= 0.9), 05/raw
(target >= 0.8) and 05 ray / 05 (target >= 0.9), and the time each backend
spends per task on an empty task.
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
from utils.checkpoints import read_checkpoint, save_model  # noqa: E402
from utils.config import (  # noqa: E402
    BackendConfig,  # noqa: E402
    EnvConfig,
    RolloutsConfig,
)
from utils.episodes import RandomPolicy, agent_task, init_agent_worker, init_recorder, record_task, run_episode  # noqa: E402
from utils.parallel import WorkerPool  # noqa: E402
from utils.ray_backend import RayPool  # noqa: E402


def init_random_worker(env_cfg: EnvConfig) -> dict:
    """The raw env (gym.make, no frame wrapper) with uniform random actions."""
    env = gym.make(env_cfg.id, max_episode_steps=env_cfg.max_episode_steps)
    return {"env": env, "policy": RandomPolicy("uniform", env.action_space)}


def random_task(state: dict, task: dict) -> dict:
    """One random-policy episode through the episode loop: {"steps"}."""
    episode = run_episode(state["env"], state["policy"], task["seed"], task["max_steps"])
    return {"steps": episode.steps}


def init_noop() -> dict:
    """Worker state of the empty task."""
    return {}


def noop_task(state: dict, task: int) -> int:
    """The empty task: returns its argument."""
    return task


def task_overhead_s(pool, n: int = 200) -> float:
    """Seconds a pool spends per task on an empty task: dispatch, transport and gathering."""
    with pool:
        pool.map(range(len(pool.workers)))  # warm-up
        start = time.perf_counter()
        pool.map(range(n))
        return (time.perf_counter() - start) / n


def measure(pool, tasks: list) -> float:
    """Env steps/s of `tasks` on `pool`, after one warm-up task per worker."""
    pool.map(tasks[: len(pool.workers)])  # warm-up: imports, first reset
    start = time.perf_counter()
    results = pool.map(tasks)
    return sum(r["steps"] for r in results) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--episodes", type=int, default=4)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray backend's row")
    args = parser.parse_args()
    env_cfg = EnvConfig(max_episode_steps=args.steps)
    seeds = [10_000 + i for i in range(args.episodes)]
    rates, overhead = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        with WorkerPool(args.workers, init_random_worker, (env_cfg,), random_task) as pool:
            rates["raw"] = measure(pool, [{"seed": s, "max_steps": args.steps} for s in seeds])

        ro_cfg = RolloutsConfig(policy="uniform", max_steps=args.steps)
        with WorkerPool(args.workers, init_recorder, (env_cfg, ro_cfg), record_task) as pool:
            rates["01"] = measure(pool, list(enumerate(seeds)))

        vision_path, mdnrnn_path = os.path.join(tmp, "vision.pt"), os.path.join(tmp, "mdnrnn.pt")
        save_model(vision_path, ConvVAE(VAEConfig(z_dim=32)))
        save_model(mdnrnn_path, MDNRNN(MDNRNNConfig(hidden=256, gaussians=5), z_dim=32, action_dim=3))
        params = np.random.default_rng(0).normal(scale=0.1, size=3 * (32 + 256 + 1)).astype(np.float32)
        tasks = [{"params": params, "seed": s, "max_steps": args.steps, "early_stop_steps": 0} for s in seeds]
        agent_args = (read_checkpoint(vision_path), read_checkpoint(mdnrnn_path), env_cfg, LinearControllerConfig())
        with WorkerPool(args.workers, init_agent_worker, agent_args, agent_task) as pool:
            rates["05"] = measure(pool, tasks)
            overhead["local"] = task_overhead_s(WorkerPool(args.workers, init_noop, (), noop_task))
        if not args.no_ray:
            ray_backend = BackendConfig(kind="ray", actors=args.workers)
            with RayPool(ray_backend, init_agent_worker, agent_args, agent_task) as pool:
                rates["05 ray"] = measure(pool, tasks)
            overhead["ray"] = task_overhead_s(RayPool(ray_backend, init_noop, (), noop_task))

    print(f"CarRacing-v3, {args.workers} worker processes, {args.episodes} episodes x up to {args.steps} steps each")
    print(f"{'':6s}{'steps/s':>10s}{'ratio to raw':>14s}{'target':>8s}")
    for name, target in (("raw", None), ("01", 0.9), ("05", 0.8)):
        ratio = rates[name] / rates["raw"]
        verdict = "" if target is None else f">= {target}  {'ok' if ratio >= target else 'BELOW'}"
        print(f"{name:6s}{rates[name]:10.1f}{ratio:14.3f}  {verdict}")
    if "05 ray" in rates:
        ratio = rates["05 ray"] / rates["05"]
        print(f"05 on the Ray backend ({args.workers} actors of a local Ray): {rates['05 ray']:.1f} steps/s, "
              f"{ratio:.3f} x the local backend's 05  (target >= 0.9  {'ok' if ratio >= 0.9 else 'BELOW'})")
    print("overhead per task (an empty task, 200 in a row): "
          + ", ".join(f"{name} {1000 * seconds:.2f} ms" for name, seconds in overhead.items()))


if __name__ == "__main__":
    main()
