#!/usr/bin/env python
"""Stage 01: record rollouts of the real env, with a random policy or a trained controller.

    python 01_generate_rollouts.py --config configs/carracing_vae.yaml
    python 01_generate_rollouts.py --config CFG --set rollouts.episodes=90 rollouts.policy=controller \
        rollouts.controller=runs/carracing_vae/controller/controller.pt   # iterative training

Writes <run_dir>/rollouts/episode_NNNNN.npz (one per episode, written
atomically; see utils/episodes.py run_episode for the arrays) and manifest.json. Episode i
uses env seed utils.seeding.env_seed(seed, "rollouts", i). Rerunning skips the
episodes already on disk, so a killed run resumes.

rollouts.policy=controller plays the trained C of rollouts.controller, with the
V and M it was trained with (its parameters chosen by evaluate.params, as 06 plays it),
plus N(0, rollouts.action_noise^2) exploration noise added before C's tanh bound
(Ha & Schmidhuber's iterative training, section 5): raising rollouts.episodes
above what is on disk adds such episodes beside the random ones, and 03 and 04
then retrain M on both.
"""

from __future__ import annotations

import os
import time

import numpy as np
from tqdm import tqdm

from utils.checkpoints import load_model
from utils.cli import load_stage_config, open_stage_dir, run_stage, stage_parser
from utils.config import config_to_dict
from utils.envs import check_env
from utils.episodes import expected_episode_s, init_recorder, record_task
from utils.errors import UserError
from utils.io import episode_path, list_episodes, save_bytes, write_manifest
from utils.parallel import check_backend, make_pool
from utils.seeding import env_seed


def agent_checkpoints(cfg) -> tuple[dict, dict] | tuple[None, None]:
    """For rollouts.policy=controller, ({"vision", "mdnrnn", "controller"} checkpoint dicts, their paths);
    (None, None) otherwise.

    Raises:
        UserError: rollouts.controller unset, not a controller checkpoint, or its V / M gone.
    """
    if cfg.rollouts.policy != "controller":
        return None, None
    path = cfg.rollouts.controller
    if not path:
        raise UserError("rollouts.controller: rollouts.policy=controller needs the path of a trained controller.pt")
    model, controller = load_model(path, "controller")
    if cfg.evaluate.params == "mean":  # the C that 06 would score: the final CMA-ES mean (or actor), not the
        model.set_params(controller["params_mean"])  # best held-out re-evaluation, a real-env selection
        controller = {**controller, "state_dict": model.state_dict()}
    paths = {**(controller.get("inputs") or {}), "controller": os.path.abspath(path)}
    ckpts = {"controller": controller, "vision": load_model(paths.get("vision", ""), "vision")[1],
             "mdnrnn": load_model(paths.get("mdnrnn", ""), "memory")[1]}
    return ckpts, paths


def main(argv: list[str] | None = None) -> None:
    args = stage_parser(__doc__.splitlines()[1]).parse_args(argv)
    cfg = load_stage_config(args)
    agent, paths = agent_checkpoints(cfg)
    check_env(cfg.env)
    check_backend(cfg.backend)
    out_dir = open_stage_dir(cfg, "rollouts")
    start = time.perf_counter()

    todo = [i for i in range(cfg.rollouts.episodes) if not os.path.exists(episode_path(out_dir, i))]
    skipped = cfg.rollouts.episodes - len(todo)
    who = f"controller {paths['controller']} + noise {cfg.rollouts.action_noise:g}" if agent else cfg.rollouts.policy
    print(f"[01] {cfg.env.id}: {len(todo)} episodes to record ({who}), {skipped} already in {out_dir}")
    stats = []
    if todo:
        tasks = [(i, env_seed(cfg.seed, "rollouts", i)) for i in todo]
        steps = cfg.rollouts.max_steps or cfg.env.max_episode_steps
        def write(index: int, result: dict) -> dict:  # as each episode arrives, from whichever worker
            save_bytes(episode_path(out_dir, result["index"]), result.pop("npz"))
            return result

        with make_pool(cfg.backend, cfg.rollouts.workers, init_recorder, (cfg.env, cfg.rollouts, agent), record_task,
                       first_timeout_s=expected_episode_s(cfg.env, steps), task_steps=steps) as pool:
            stats = pool.map(tasks, progress="01 rollouts", on_result=write)
    wall = time.perf_counter() - start
    steps = sum(s["steps"] for s in stats)
    returns = [s["return"] for s in stats]
    metrics = {
        "episodes_on_disk": len(list_episodes(out_dir)),
        "episodes_recorded": len(stats),
        "steps_recorded": steps,
        "steps_per_s": steps / wall if stats else None,
        "policy": cfg.rollouts.policy,
        "random_return_mean": float(np.mean(returns)) if returns else None,  # of the episodes recorded now
        "random_return_std": float(np.std(returns)) if returns else None,
    }
    write_manifest(out_dir, "01_generate_rollouts", config_to_dict(cfg), {}, wall, metrics)
    if stats:
        tqdm.write(
            f"[01] recorded {len(stats)} episodes, {steps} steps in {wall:.1f} s "
            f"({steps / wall:.0f} steps/s); {cfg.rollouts.policy}-policy return {np.mean(returns):.1f} +- {np.std(returns):.1f}"
        )


if __name__ == "__main__":
    run_stage(main)
