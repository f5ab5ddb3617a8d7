#!/usr/bin/env python
"""Stage 05: train C: the linear C with CMA-ES (real env or M's dream), or the actor-critic in M's imagination.

    python 05_train_controller.py --config configs/carracing_vae.yaml [--overwrite]

Reads V (<run_dir>/vision/best.pt) and M (<run_dir>/mdnrnn/best.pt), runs
CMA-ES with a pool of worker processes that each hold an env plus V and M
(controller.env=real), or with the population stepped as one torch batch
inside M from the starts of stage 03's latent episodes (controller.env=dream;
the pool then only re-evaluates the CMA-ES mean in the real env; controller.dream_starts
anywhere starts the dream mid-episode; controller.init_from starts CMA-ES at a trained C), and writes
<run_dir>/controller/: controller.pt, history.csv, learning_curve.png,
cmaes_state.npz (data only) and manifest.json. With controller.kind=actor_critic
it trains the actor and critic only in M's imagination, from M's filtered states
of stage 03's latent windows, re-evaluates the actor in the real env every
controller.eval_every updates, and writes latest.pt (the resume state) instead
of cmaes_state.npz. A killed run resumes where it stopped when the same command
is run again; --overwrite starts over.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from models.actor_critic import ActorCritic
from models.controller import INPUTS, LinearController, needed_info
from utils.checkpoints import check_reads_vision, load_model, load_world_model
from utils.cli import load_stage_config, open_stage_dir, run_stage, stage_dir, stage_parser
from utils.cmaes_trainer import ControllerTrainer
from utils.config import config_to_dict
from utils.data import LatentWindows, check_latents, split_episodes, start_latents
from utils.envs import info_input_dims, make_env
from utils.errors import UserError
from utils.imagination_trainer import ImaginationTrainer
from utils.io import list_episodes, write_manifest
from utils.parallel import check_backend
from utils.seeding import seed_everything
from utils.training import resolve_device


def check_ensemble_options(cc, mdnrnn, mdnrnn_path: str) -> None:
    """controller.ensemble_fitness=min and controller.disagreement_penalty > 0 (CMA-ES of the linear C in the
    dream; the keys are unused elsewhere, as dream_starts is) need an ensemble M; min also needs its K members to
    divide a candidate's rollouts.

    Raises:
        UserError: a single M, or rollouts_per_candidate not a multiple of K; before anything is written.
    """
    if cc.kind != "linear" or cc.env != "dream":
        return
    members = len(getattr(mdnrnn, "members", ()))
    for key, wanted in (("ensemble_fitness", cc.ensemble_fitness == "min"), ("disagreement_penalty",
                                                                           cc.disagreement_penalty > 0)):
        if wanted and members < 2:
            raise UserError(f"controller.{key}: {getattr(cc, key)} compares the members of an ensemble M "
                            f"(memory.ensemble >= 2), but {mdnrnn_path} is a single M")
    if cc.ensemble_fitness == "min" and cc.rollouts_per_candidate % members:
        raise UserError(f"controller.rollouts_per_candidate: {cc.rollouts_per_candidate} must be a multiple of the "
                        f"{members} ensemble members of {mdnrnn_path} for controller.ensemble_fitness=min")


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[1])
    parser.add_argument("--vision", help="vision checkpoint (default: <run_dir>/vision/best.pt)")
    parser.add_argument("--mdnrnn", help="M's checkpoint, any memory kind (default: <run_dir>/mdnrnn/best.pt)")
    parser.add_argument("--overwrite", action="store_true", help="start over instead of resuming")
    args = parser.parse_args(argv)
    cfg = load_stage_config(args)
    vision_path = args.vision or os.path.join(stage_dir(cfg, "vision"), "best.pt")
    mdnrnn_path = args.mdnrnn or os.path.join(stage_dir(cfg, "mdnrnn"), "best.pt")
    cc = cfg.controller
    needs = needed_info(cc.inputs)
    if needs and (cc.env == "dream" or not set(needs) <= set(info_input_dims(cfg.env))):
        raise UserError(f"controller.inputs: {cc.inputs} needs the real env of a task that gives {', '.join(needs)} "
                        f"(PandaReach); got controller.env={cc.env}, env.id={cfg.env.id}")
    if INPUTS[cc.inputs].offset == "vision" and cc.env == "dream":
        raise UserError(f"controller.inputs: {cc.inputs} is trained in the real env only for now (controller.env=real)")
    if cc.kind == "actor_critic" and cc.inputs != "z_h":
        raise UserError(f"controller.inputs: the actor-critic reads M's features only (z_h), got {cc.inputs}")
    if cc.kind == "actor_critic" and not cc.actor_critic.min_std < cc.actor_critic.max_std:
        raise UserError(f"controller.actor_critic.min_std ({cc.actor_critic.min_std}) must be below "
                        f"controller.actor_critic.max_std ({cc.actor_critic.max_std})")
    vision, mdnrnn = load_world_model(vision_path, mdnrnn_path, cfg.vision.z_dim, cfg.memory.kind)
    check_ensemble_options(cc, mdnrnn, mdnrnn_path)
    check_reads_vision(cc.inputs, vision, vision_path)
    env = make_env(cfg.env)
    low, high = env.action_space.low, env.action_space.high
    env.close()
    if cc.kind == "actor_critic":
        train_actor_critic(cfg, args, vision_path, mdnrnn_path, mdnrnn, low, high)
        return
    dream = None
    if cc.env == "dream":
        torch.set_num_threads(cc.threads)
        files = list_episodes(stage_dir(cfg, "latents"), "latents")
        check_latents(files)
        windows = LatentWindows(files, cfg.memory.seq_len) if cc.dream_starts == "anywhere" else None
        dream = (mdnrnn.to(resolve_device(cc.device, "controller.device")), start_latents(files), windows)
    controller = LinearController.for_world_model(cc.model_config(), mdnrnn.feature_dim, low, high,
                                                  info_input_dims(cfg.env))
    initial = initial_controller(cfg, controller)
    trainer = ControllerTrainer(cfg, vision_path, mdnrnn_path, controller, stage_dir(cfg, "controller"), dream,
                                initial)
    state = trainer.load_or_create(args.overwrite)  # a bad resume state stops the stage before anything is written
    check_backend(cfg.backend)
    open_stage_dir(cfg, "controller")
    where = "in the real env"
    if dream and cc.dream_starts == "anywhere":
        where = (f"in the dream (tau {cc.temperature:g}, starting after real windows of {cfg.memory.seq_len} steps "
                 f"anywhere in {len(dream[1])} episodes, <= {cc.max_steps or cfg.env.max_episode_steps} steps)")
    elif dream:
        where = f"in the dream (tau {cc.temperature:g}, {len(dream[1])} start latents)"
    if dream and cc.ensemble_fitness == "min":
        where += f", fitness of the worst of {len(mdnrnn.members)} world members"
    if dream and cc.disagreement_penalty:
        where += (f", reward minus {cc.disagreement_penalty:g} x the spread of {len(mdnrnn.members)} members' "
                  "rewards (MOPO)")
    if initial:
        where += f", from the C of {initial[0]}"
    print(f"[05] CMA-ES {where}: C sees {cc.inputs}, {controller.num_params} parameters, population {cc.popsize} x "
          f"{cc.rollouts_per_candidate} rollouts, {cc.generations} generations, {cc.workers} workers")
    start = time.perf_counter()
    state = trainer.run(state)
    history, best = state["history"], state["best"]
    steps = sum(r["env_steps"] for r in history)
    dream_steps = sum(r.get("dream_steps", 0) for r in history)
    write_manifest(
        trainer.out_dir,
        "05_train_controller",
        config_to_dict(cfg),
        {"vision": os.path.abspath(vision_path), "mdnrnn": os.path.abspath(mdnrnn_path)},
        time.perf_counter() - start,
        {
            "generations": state["generation"],
            "env": cc.env,
            "env_steps": steps,
            "env_steps_per_s": steps / max(1e-9, sum(r["seconds"] for r in history)),
            "dream_steps": dream_steps,
            "heldout_steps": sum(int(r.get("heldout_steps") or 0) for r in history),
            "best_generation": best and best["generation"],
            "best_heldout_mean": best and best["heldout_mean"],
            "best_heldout_std": best and best["heldout_std"],
            "worker_restarts": history[-1]["worker_restarts"] if history else 0,
        },
    )
    final = next((r for r in reversed(history) if r.get("heldout_mean") not in (None, "")), None)
    if cfg.evaluate.params == "mean" and final:  # the C that 06 and 01 use: the final mean, never picked
        print(f"[05] final CMA-ES mean (evaluate.params: mean) at generation {final['generation']}: "
              f"{float(final['heldout_mean']):.1f} +- {float(final['heldout_std']):.1f} on {cc.eval_episodes} "
              "held-out episodes (logged only)")
    elif best:
        print(f"[05] best CMA-ES mean at generation {best['generation']}: "
              f"{best['heldout_mean']:.1f} +- {best['heldout_std']:.1f} on {cc.eval_episodes} held-out episodes")


def initial_controller(cfg, controller: LinearController) -> tuple[str, np.ndarray] | None:
    """controller.init_from's (path, params float32 (num_params,)): the C that evaluate.params names in that
    checkpoint (params_mean for mean), where CMA-ES starts; None when the key is empty.

    Raises:
        UserError: not a linear controller checkpoint, or one whose inputs or actions differ from this C's.
    """
    path = cfg.controller.init_from
    if not path:
        return None
    model, ckpt = load_model(path, "controller")
    if model.kind != "linear" or model.num_params != controller.num_params or model.inputs != controller.inputs:
        raise UserError(f"controller.init_from: {path} holds a {model.kind} C with {model.num_params} parameters "
                        f"({getattr(model, 'inputs', '?')}); this run's linear C has {controller.num_params} "
                        f"({controller.inputs})")
    if cfg.evaluate.params == "mean":
        model.set_params(ckpt["params_mean"])
    return path, model.get_params()


def initial_actor_critic(cfg, ac: ActorCritic) -> str | None:
    """controller.init_from for the actor-critic: load that checkpoint's actor, critic, slow critic and return
    scale into `ac` (the actor that evaluate.params names: the final one, params_mean, for mean; with
    actor_critic.actor_average > 0 the average restarts at that actor), so a round of
    iterative training continues the previous round's actor-critic in the new M (Dreamer's online loop: the
    actor keeps learning while M is refitted on the episodes it recorded). The optimizers start afresh.
    Returns the path, or None when the key is empty.

    Raises:
        UserError: not an actor-critic checkpoint, or one of another width, feature size or action bounds.
    """
    path = cfg.controller.init_from
    if not path:
        return None
    model, ckpt = load_model(path, "controller")
    if model.kind != "actor_critic" or (model.sizes(), model.config.units) != (ac.sizes(), ac.config.units):
        theirs = f"units {model.config.units}, {model.sizes()}" if model.kind == "actor_critic" else "its parameters"
        raise UserError(f"controller.init_from: {path} holds a {model.kind} C ({theirs}); this run's actor-critic "
                        f"has units {ac.config.units}, {ac.sizes()}")
    theirs = {k: v for k, v in model.state_dict().items() if not k.startswith("averaged_actor.")}
    ac.load_state_dict({**ac.state_dict(), **theirs})  # the averaged actor, if either has one, restarts below
    if cfg.evaluate.params == "mean":
        ac.set_params(ckpt["params_mean"])
    ac.reset_averaged_actor()
    return path


def train_actor_critic(cfg, args, vision_path: str, mdnrnn_path: str, memory, low, high) -> None:
    """controller.kind actor_critic: updates in M's imagination from the windows of stage 04's training
    episodes, held-out real re-evaluations (utils/imagination_trainer.py)."""
    cc = cfg.controller
    torch.set_num_threads(cc.threads)
    files = list_episodes(stage_dir(cfg, "latents"), "latents")
    check_latents(files)
    train, _ = split_episodes(files, cfg.memory.holdout_fraction, cfg.seed)  # M's own training episodes
    seed_everything(cfg.controller_seed)  # the networks' initial weights: a rerun of the same config is the same run
    ac = ActorCritic.for_world_model(cc.model_config(), memory.feature_dim, low, high)
    initial = initial_actor_critic(cfg, ac)
    trainer = ImaginationTrainer(cfg, vision_path, mdnrnn_path, memory, ac, train or files, stage_dir(cfg, "controller"),
                                 initial)
    state = trainer.load_or_create(args.overwrite)  # a bad resume state stops the stage before anything is written
    check_backend(cfg.backend)
    open_stage_dir(cfg, "controller")
    h = cc.actor_critic.horizon
    print(f"[05] actor-critic in the imagination of M ({cfg.memory.kind}, {memory.feature_dim} features, tau "
          f"{cc.temperature:g}): horizon {h}, "
          f"{cc.batch_windows} windows of {cfg.memory.seq_len + 1} start states per update, {cc.updates} updates, "
          f"held-out real re-evaluation every {cc.eval_every}" + (f", from the actor-critic of {initial}" if initial else ""))
    start = time.perf_counter()
    state = trainer.run(state)
    history, best = state["history"], state["best"]
    write_manifest(
        trainer.out_dir, "05_train_controller", config_to_dict(cfg), dict(trainer.paths),
        time.perf_counter() - start,
        {"kind": "actor_critic", "updates": state["update"], "dream_steps": sum(r["dream_steps"] for r in history),
         "heldout_steps": sum(int(r.get("heldout_steps") or 0) for r in history),
         "best_update": best and best["update"], "best_heldout_mean": best and best["heldout_mean"],
         "best_heldout_std": best and best["heldout_std"],
         "worker_restarts": history[-1]["worker_restarts"] if history else 0},
    )
    if best:
        print(f"[05] best actor at update {best['update']}: {best['heldout_mean']:.1f} +- {best['heldout_std']:.1f} on "
              f"{cc.eval_episodes} held-out episodes")


if __name__ == "__main__":
    run_stage(main)
