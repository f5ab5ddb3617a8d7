#!/usr/bin/env python
"""Stage 06: evaluate the trained controller on held-out tracks and write the report.

    python 06_evaluate.py --config configs/carracing_vae.yaml [--set evaluate.episodes=100]
    python 06_evaluate.py --compare runs/carracing_vae runs/carracing_nvae ... [--out runs/compare.md]

Plays evaluate.episodes full episodes (no early stop) on env seeds from the
"evaluate" stream, disjoint from every training seed (utils/seeding.py), and
writes <run_dir>/eval/: scores.json (per-episode returns, mean, std, seeds),
report.md, episode.gif (the frame beside V's reconstruction, for the first
evaluation episode) and reconstructions.png (held-out frames over their
reconstructions), training_curves.png (V, M and C per epoch / generation)
and fid.json (FID of V's reconstructions and prior samples against
evaluate.fid_frames held-out frames, through the optional pytorch-fid extra;
without it, one line says what is missing and the rest is still written). For
a controller trained in the dream (controller.env: dream), also dream.gif:
that real episode beside a dream started from its
first frame, driven by the same controller and decoded through V. Where
stage 03's latents exist, scores.json also holds C's score in M's dream at
controller.temperature, whichever env C was trained in.

--compare builds one report from several evaluated runs, mirroring the
thesis's tables (utils/report.py), and writes it to --out.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
from PIL import Image

from models import load_world_model
from models.controller import LinearController
from utils.cli import load_stage_config, run_stage, stage_dir, stage_parser
from utils.config import config_to_dict
from utils.fid import fid_unavailable, vision_fid
from utils.data import sample_frames
from utils.envs import frames_to_tensor, goal_marker_mask, is_panda, info_input_dims, make_env
from utils.errors import UserError
from utils.dream import DreamEnv, dream_score, start_latents
from utils.io import atomic_path, list_episodes, load_checkpoint, save_json, write_manifest
from utils.parallel import WorkerPool
from utils.report import budget_summary, plot_training_curves, write_compare_report, write_run_report
from utils.rollout import Agent, agent_task, init_agent_worker, run_agent_episode
from utils.seeding import env_seed


GOAL_MARKER_FRAMES = 512  # held-out frames for the PandaReach goal-marker check


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (B, 3, H, W) in [0, 1] -> uint8 (B, H, W, 3)."""
    return (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()


@torch.inference_mode()
def save_episode_gif(path: str, vision, frames: list[np.ndarray], every: int, max_frames: int, scale: int = 2) -> int:
    """GIF of [frame | decode(encode(frame))] for every `every`-th frame; returns the frame count."""
    picked = np.stack(frames[::every][:max_frames])
    recon = to_uint8(vision.reconstruct(frames_to_tensor(picked)))
    return write_gif(path, list(np.concatenate([picked, recon], axis=2)), 40 * every, scale)


def write_gif(path: str, images: list[np.ndarray], duration_ms: int, scale: int = 2) -> int:
    """Animated GIF of uint8 (H, W, 3) images, each scaled up `scale` times; returns the frame count."""
    size = (images[0].shape[1] * scale, images[0].shape[0] * scale)
    frames = [Image.fromarray(image).resize(size, Image.NEAREST) for image in images]
    with atomic_path(path) as tmp:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=duration_ms, loop=0)
    return len(frames)


@torch.inference_mode()
def dream_frames(vision, mdnrnn, controller: LinearController, first_frame: np.ndarray, temperature: float,
                 steps: int, seed: int) -> list[np.ndarray]:
    """Frames uint8 (S, S, 3) of a dream episode driven by `controller`, starting from z = mu(first_frame),
    each decoded through V (DreamEnv.render) at `temperature`."""
    z0 = vision.encode(frames_to_tensor(first_frame[None]))[0].numpy()
    env = DreamEnv(mdnrnn, z0, controller.low, controller.high, temperature, steps, vision, "rgb_array")
    obs, _ = env.reset(seed=seed)
    frames = [env.render()]
    for _ in range(steps - 1):
        z, h = torch.from_numpy(obs[: vision.z_dim])[None], torch.from_numpy(obs[vision.z_dim :])[None]
        obs, _, terminated, truncated, _ = env.step(controller(z, h)[0].numpy())
        frames.append(env.render())
        if terminated or truncated:
            break
    return frames


def save_side_by_side_gif(path: str, left: list[np.ndarray], right: list[np.ndarray], every: int, max_frames: int,
                          scale: int = 2) -> int:
    """GIF of [left | right] for every `every`-th step (the shorter episode holds its last frame)."""
    n = max(len(left), len(right))
    pick = list(range(0, n, every))[:max_frames]
    pairs = [np.concatenate([left[min(i, len(left) - 1)], right[min(i, len(right) - 1)]], axis=1) for i in pick]
    return write_gif(path, pairs, 40 * every, scale)


@torch.inference_mode()
def save_reconstruction_grid(path: str, vision, frames: np.ndarray, scale: int = 2) -> None:
    """PNG: held-out frames (top row) over decode(encode(frame)) (bottom row)."""
    recon = to_uint8(vision.reconstruct(frames_to_tensor(frames)))
    grid = np.concatenate([np.concatenate(list(frames), axis=1), np.concatenate(list(recon), axis=1)], axis=0)
    image = Image.fromarray(grid)
    image = image.resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def held_out_frames(cfg, vision_path: str, n: int) -> np.ndarray | None:
    """n frames uint8 (n, S, S, 3) of V's held-out rollouts (None when the split or the files are gone)."""
    held_out = load_checkpoint(vision_path, cfg.vision.kind).get("split", {}).get("held_out", [])
    files = [os.path.join(stage_dir(cfg, "rollouts"), f) for f in held_out]
    files = [f for f in files if os.path.exists(f)]
    return sample_frames(files, n, cfg.seed) if files and n > 0 else None


@torch.inference_mode()
def goal_marker_visibility(vision, frames: np.ndarray) -> dict:
    """PandaReach: does z keep the goal? Of held-out frames uint8 (N, S, S, 3), the fraction that show the
    goal marker, and of those the fraction whose reconstruction decode(mu(frame)) still shows it."""
    shown = goal_marker_mask(frames).any(axis=(1, 2))
    recon = to_uint8(vision.reconstruct(frames_to_tensor(frames)))
    kept = goal_marker_mask(recon).any(axis=(1, 2))
    return {"frames": len(frames), "in_frames": float(shown.mean()),
            "in_reconstructions": float(kept[shown].mean()) if shown.any() else 0.0}


def compute_fid(cfg, vision, vision_path: str) -> dict:
    """FID of V's reconstructions and prior samples against evaluate.fid_frames held-out frames, or
    {"skipped": reason} (the reason is printed)."""
    reason = fid_unavailable()
    frames = None if reason else held_out_frames(cfg, vision_path, cfg.evaluate.fid_frames)
    if frames is None and not reason:
        reason = "FID skipped: no held-out rollouts on disk (V's split names files under <run_dir>/rollouts)"
    if reason:
        print(f"[06] {reason}")
        return {"skipped": reason}
    if len(frames) < cfg.evaluate.fid_frames:
        print(f"[06] FID: only {len(frames)} held-out frames on disk (evaluate.fid_frames={cfg.evaluate.fid_frames})")
    fid = vision_fid(vision, frames_to_tensor(frames), cfg.seed)
    print(f"[06] FID over N = {fid['frames']} held-out frames: reconstructions {fid['recon']:.2f}, "
          f"prior samples {fid['prior']:.2f}")
    return fid


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[1], config_required=False)
    parser.add_argument("--vision", help="vision checkpoint (default: <run_dir>/vision/best.pt)")
    parser.add_argument("--mdnrnn", help="MDN-RNN checkpoint (default: <run_dir>/mdnrnn/best.pt)")
    parser.add_argument("--controller", help="controller checkpoint (default: <run_dir>/controller/controller.pt)")
    parser.add_argument("--compare", nargs="+", metavar="RUN_DIR", help="evaluated runs to compare (no --config)")
    parser.add_argument("--out", default="runs/compare.md", help="where --compare writes its report")
    args = parser.parse_args(argv)
    if args.compare:
        write_compare_report(args.compare, args.out)
        print(f"[06] comparison of {len(args.compare)} runs: {args.out}")
        return
    if not args.config:
        parser.error("--config is required (or --compare RUN_DIR ...)")
    cfg = load_stage_config(args)
    ec = cfg.evaluate
    vision_path = args.vision or os.path.join(stage_dir(cfg, "vision"), "best.pt")
    mdnrnn_path = args.mdnrnn or os.path.join(stage_dir(cfg, "mdnrnn"), "best.pt")
    controller_path = args.controller or os.path.join(stage_dir(cfg, "controller"), "controller.pt")
    ckpt = load_checkpoint(controller_path, "controller")
    vision, mdnrnn = load_world_model(vision_path, mdnrnn_path, cfg.vision.z_dim)
    controller = LinearController(**ckpt["hparams"])
    dims = info_input_dims(cfg.env)
    extra = sum(dims.get(key, 0) for key in controller.info_keys)
    if controller.in_dim != vision.z_dim + mdnrnn.hidden + extra or not set(controller.info_keys) <= set(dims):
        raise UserError(
            f"{controller_path}: controller ({controller.inputs}) takes {controller.in_dim} inputs, but V, M and "
            f"{cfg.env.id} give z_dim + hidden + info inputs = {vision.z_dim} + {mdnrnn.hidden} + {extra}"
        )
    params = ckpt["params_best"] if ec.params == "best" else ckpt["params_mean"]
    controller.set_params(params)
    out_dir = stage_dir(cfg, "eval")
    os.makedirs(out_dir, exist_ok=True)
    start = time.perf_counter()

    seeds = [env_seed(cfg.seed, "evaluate", i) for i in range(ec.episodes)]
    tasks = [{"params": params, "seed": s, "max_steps": ec.max_steps, "early_stop_steps": 0} for s in seeds]
    with WorkerPool(ec.workers, init_agent_worker, (vision_path, mdnrnn_path, cfg.env, 1, controller.inputs), agent_task,
                    cfg.controller.worker_timeout_s, cfg.controller.max_retries) as pool:
        results = pool.map(tasks, progress="06 evaluate")
    returns = np.array([r["return"] for r in results])
    generation = (ckpt["best"] or {}).get("generation", ckpt["generation"]) if ec.params == "best" else ckpt["generation"]
    scores = {
        "env": cfg.env.id,
        "episodes": len(returns),
        "mean": float(returns.mean()),
        "std": float(returns.std()),
        "min": float(returns.min()),
        "max": float(returns.max()),
        "returns": returns.tolist(),
        "steps": [r["steps"] for r in results],
        "seeds": seeds,
        "params": ec.params,
        "params_generation": generation,
        "controller": os.path.abspath(controller_path),
        "inputs": controller.inputs,
    }
    if all(r["success"] is not None for r in results):  # PandaReach: info["is_success"] at each episode's end
        successes = [bool(r["success"]) for r in results]
        scores |= {"success_rate": float(np.mean(successes)), "successes": successes}
    # The dream's verdict on this C beside the real one: for a dream-trained C, the score it believes it has
    # (Ha & Schmidhuber's Doom table); for a real-trained C, whether M's dream recognises a driver at all.
    latents = stage_dir(cfg, "latents")  # (M's dream has no joint angles or goal to show a C that reads them)
    if not controller.info_keys and os.path.isdir(latents) and any(n.endswith(".npz") for n in os.listdir(latents)):
        starts = start_latents(list_episodes(latents, "latents"))
        scores["dream"] = dream_score(mdnrnn, starts, params, controller.low, controller.high,
                                      cfg.controller.temperature, ec.episodes, ec.max_steps or cfg.env.max_episode_steps,
                                      env_seed(cfg.seed, "evaluate", 0))
    save_json(os.path.join(out_dir, "scores.json"), scores)

    # Media: replay the first evaluation episode in this process, recording frames.
    torch.set_num_threads(1)
    env = make_env(cfg.env)
    episode = run_agent_episode(env, Agent(vision, mdnrnn, controller, cfg.env), seeds[0], ec.max_steps, record=True)
    env.close()
    n_gif = save_episode_gif(os.path.join(out_dir, "episode.gif"), vision, episode.frames, ec.gif_every, ec.gif_max_frames)
    media = {f"episode {seeds[0]} (return {episode.ret:.1f}): frame | reconstruction": "episode.gif"}
    if cfg.controller.env == "dream":  # the controller in M's dream beside the same controller on the real track
        dream = dream_frames(vision, mdnrnn, controller, episode.frames[0], cfg.controller.temperature,
                             len(episode.frames), cfg.seed)
        save_side_by_side_gif(os.path.join(out_dir, "dream.gif"), episode.frames, dream, ec.gif_every, ec.gif_max_frames)
        media[f"real episode {seeds[0]} | dream from its first frame (tau {cfg.controller.temperature:g}), same C"] = "dream.gif"
    frames = held_out_frames(cfg, vision_path, ec.recon_frames)
    if frames is not None:
        save_reconstruction_grid(os.path.join(out_dir, "reconstructions.png"), vision, frames)
        media["held-out frames (top) and reconstructions (bottom)"] = "reconstructions.png"
    if is_panda(cfg.env.id) and frames is not None:
        scores["goal_marker"] = goal_marker_visibility(vision, held_out_frames(cfg, vision_path, GOAL_MARKER_FRAMES))
        save_json(os.path.join(out_dir, "scores.json"), scores)
        g = scores["goal_marker"]
        print(f"[06] goal marker: in {100 * g['in_frames']:.0f} % of {g['frames']} held-out frames, kept by V's "
              f"reconstruction in {100 * g['in_reconstructions']:.0f} % of those")
    if plot_training_curves(cfg.run_dir, os.path.join(out_dir, "training_curves.png")):
        media["training curves: V and M per epoch, C per generation"] = "training_curves.png"
    fid = None
    if ec.fid_frames > 0:
        fid = compute_fid(cfg, vision, vision_path)
        save_json(os.path.join(out_dir, "fid.json"), fid)
    write_run_report(os.path.join(out_dir, "report.md"), cfg, scores, budget_summary(cfg.run_dir), media, fid)
    wall = time.perf_counter() - start
    write_manifest(
        out_dir, "06_evaluate", config_to_dict(cfg),
        {"vision": os.path.abspath(vision_path), "mdnrnn": os.path.abspath(mdnrnn_path), "controller": os.path.abspath(controller_path)},
        wall, {k: scores[k] for k in ("episodes", "mean", "std", "min", "max")} | {"gif_frames": n_gif},
    )
    print(f"[06] {cfg.env.id}: {scores['mean']:.1f} +- {scores['std']:.1f} over {len(returns)} held-out episodes "
          f"(min {scores['min']:.1f}, max {scores['max']:.1f}); report: {os.path.join(out_dir, 'report.md')}")
    if "success_rate" in scores:
        print(f"[06] success rate: {100 * scores['success_rate']:.0f} % of {len(returns)} held-out episodes")
    if "dream" in scores:
        d = scores["dream"]
        print(f"[06] dream (tau {d['temperature']:g}): {d['mean']:.1f} +- {d['std']:.1f} over {d['episodes']} dream episodes")


if __name__ == "__main__":
    run_stage(main)
