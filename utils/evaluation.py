"""Stage 06's work: play C on held-out episodes, score it (real and dream), check V, and write the media.

`evaluate_run` is the whole stage for one run; the script only resolves paths
and writes the manifest. Every episode goes through the one episode loop
(utils/episodes.py), in worker processes for the scores and in this process
for the episode replayed into the GIFs.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from models.agent import Agent
from models.controller import LinearController, input_dim
from models.dream import DONE_THRESHOLD, dream_frames, dream_score
from models.likelihood import frames_to_tensor, to_uint8
from utils.checkpoints import check_reads_vision, has_position_heads, load_model, load_world_model, read_checkpoint
from utils.cli import stage_dir
from utils.data import (KINEMATICS_KEY, LATENT_KEYS, POSITION_KEYS, LatentWindows, check_latents, sample_frames, sample_steps,
                        stack_positions, start_latents)
from utils.envs import camera_axes, check_env, goal_marker_mask, info_input_dims, is_panda, make_env
from utils.episodes import AgentPolicy, agent_task, expected_episode_s, init_agent_worker, run_episode
from utils.errors import UserError
from utils.fid import fid_unavailable, vision_fid
from utils.io import list_episodes, load_episode, save_json
from utils.media import save_episode_gif, save_reconstruction_grid, save_side_by_side_gif, save_world_model_gif
from utils.parallel import make_pool
from utils.report import budget_summary, plot_training_curves, write_run_report
from utils.seeding import env_seed

GOAL_MARKER_FRAMES = 512  # held-out frames for the PandaReach goal-marker check


@torch.no_grad()
def head_predictions(memory, episode: dict) -> tuple[np.ndarray, np.ndarray]:
    """Predicted reward float (T,) and done probability float (T,) for one latent episode, by filtering
    through M's interface (any memory kind): the heads of step t read the state after a_t and z_{t+1} (after
    the last action, which has no next frame, M imagines z_{t+1})."""
    z = torch.from_numpy(episode["mu"])
    a = torch.from_numpy(episode["actions"].astype(np.float32))
    state = memory.observe(memory.initial_state(1), z[:1])
    rewards, dones = [], []
    for t in range(len(a)):
        state = memory.transition(state, a[t : t + 1])
        state = memory.observe(state, z[t + 1 : t + 2]) if t + 1 < len(z) else memory.imagine(state)
        reward, done_logit = memory.heads(state)
        rewards.append(float(reward[0]))
        dones.append(float(torch.sigmoid(done_logit[0])))
    return np.array(rewards, np.float32), np.array(dones, np.float32)


def head_metrics(pred_reward, real_reward, done_prob, real_done) -> dict:
    """Correlation, MSE, and done precision / recall (None where undefined) over concatenated steps."""
    predicted = done_prob > DONE_THRESHOLD
    real_done = real_done.astype(bool)
    tp = int((predicted & real_done).sum())
    return {
        "steps": len(real_reward),
        "reward_corr": float(np.corrcoef(pred_reward, real_reward)[0, 1]),
        "reward_mse": float(np.mean((pred_reward - real_reward) ** 2)),
        "done_real": int(real_done.sum()),
        "done_predicted": int(predicted.sum()),
        "done_precision": tp / predicted.sum() if predicted.any() else None,
        "done_recall": tp / real_done.sum() if real_done.any() else None,
    }


def memory_fit(memory, files: list[str], cfg) -> dict:
    """How well M predicts the latent episodes `files`: `nll` of z_{t+1} (nats per latent dim per step, as stage
    04 logs it), `reward_corr` (Pearson r of the reward head against the real rewards; None when either is
    constant) and `steps`."""
    from utils.training import memory_terms

    nll = memory_terms(memory, LatentWindows(files, cfg.memory.seq_len), cfg)["nll"]
    predicted, real = [], []
    for path in files:
        episode = load_episode(path, LATENT_KEYS)
        predicted.append(head_predictions(memory, episode)[0])
        real.append(episode["rewards"])
    predicted, real = np.concatenate(predicted), np.concatenate(real)
    corr = float(np.corrcoef(predicted, real)[0, 1]) if predicted.std() > 0 and real.std() > 0 else None
    return {"nll": float(nll), "reward_corr": corr, "steps": int(len(real))}


def load_evaluated_agent(cfg, vision_path: str, mdnrnn_path: str, controller_path: str):
    """V, M and C (with evaluate.params: best or mean) of a run, checked against each other, the config and
    the env: (vision, mdnrnn, controller, controller checkpoint dict).

    Raises:
        UserError: a missing or wrong-kind checkpoint, or sizes that do not agree.
    """
    controller, ckpt = load_model(controller_path, "controller")
    vision, mdnrnn = load_world_model(vision_path, mdnrnn_path, cfg.vision.z_dim, cfg.memory.kind)
    if controller.kind != cfg.controller.kind:
        raise UserError(f"{controller_path}: C of kind {controller.kind!r}, but key 'controller.kind' is "
                        f"{cfg.controller.kind!r}")
    check_env(cfg.env)
    try:
        wanted = input_dim(controller.inputs, mdnrnn.feature_dim, info_input_dims(cfg.env))
    except ValueError as exc:
        raise UserError(f"{controller_path}: {exc} ({cfg.env.id})") from None
    if controller.in_dim != wanted:
        raise UserError(f"{controller_path}: controller ({controller.inputs}) takes {controller.in_dim} inputs, but "
                        f"M ({mdnrnn.feature_dim} features) and {cfg.env.id} give {wanted}")
    check_reads_vision(controller.inputs, vision, vision_path)
    if cfg.evaluate.params == "mean":
        controller.set_params(ckpt["params_mean"])
    return vision, mdnrnn, controller, ckpt


def play(cfg, vision_path: str, mdnrnn_path: str, controller: LinearController, seeds: list[int]) -> list[dict]:
    """One full episode of C per seed (no early stop), on the config's backend (evaluate.workers processes, or
    Ray actors): agent_task results in seed order."""
    ec = cfg.evaluate
    params = controller.get_params()
    tasks = [{"params": params, "seed": s, "max_steps": ec.max_steps, "early_stop_steps": 0} for s in seeds]
    steps = ec.max_steps or cfg.env.max_episode_steps
    init_args = (read_checkpoint(vision_path), read_checkpoint(mdnrnn_path), cfg.env, controller.config)
    with make_pool(cfg.backend, ec.workers, init_agent_worker, init_args, agent_task,
                   timeout_s=cfg.controller.worker_timeout_s, max_retries=cfg.controller.max_retries,
                   first_timeout_s=expected_episode_s(cfg.env, steps), task_steps=steps) as pool:
        return pool.map(tasks, progress="06 evaluate")


def score(results: list[dict], seeds: list[int]) -> dict:
    """Returns, mean, std, min, max, steps and seeds; the success rate where the env reports is_success."""
    returns = np.array([r["return"] for r in results])
    scores = {"episodes": len(returns), "mean": float(returns.mean()), "std": float(returns.std()),
              "min": float(returns.min()), "max": float(returns.max()), "returns": returns.tolist(),
              "steps": [r["steps"] for r in results], "seeds": seeds}
    if all(r["success"] is not None for r in results):  # PandaReach: info["is_success"] at each episode's end
        successes = [bool(r["success"]) for r in results]
        scores |= {"success_rate": float(np.mean(successes)), "successes": successes}
    return scores


def held_out_files(cfg, vision_path: str) -> list[str]:
    """The rollout files V held out (empty when the split or the files are gone)."""
    held_out = read_checkpoint(vision_path).get("split", {}).get("held_out", [])
    files = [os.path.join(stage_dir(cfg, "rollouts"), f) for f in held_out]
    return [f for f in files if os.path.exists(f)]


def held_out_frames(cfg, vision_path: str, n: int) -> np.ndarray | None:
    """n frames uint8 (n, S, S, 3) of V's held-out rollouts (None when the split or the files are gone)."""
    files = held_out_files(cfg, vision_path)
    return sample_frames(files, n, cfg.seed) if files and n > 0 else None


@torch.inference_mode()
def position_head_error(vision, cfg, vision_path: str, n: int) -> dict | None:
    """PandaReach, V with position heads: their error on n held-out frames, read from mu (the z C sees), against
    the recorded positions: {"frames", "goal_cm", "gripper_cm" (mean Euclidean errors, cm), "offset_cm" (the error
    of goal minus gripper, what C's offset inputs read), "goal_within_5cm" (fraction), "goal_across_cm" and
    "goal_depth_cm" (the goal's mean error across the first camera's image and along its axis: what one view
    leaves ambiguous is depth)}; with V's joint kinematics also "kinematics_cm" (its gripper's mean error) and
    "offset_kinematics_cm" (the offset offset_kinematics_proprio reads); None without held-out files or without
    position labels in them."""
    files = held_out_files(cfg, vision_path)
    if not files or n <= 0:
        return None
    kinematics = getattr(vision, "joint_kinematics", None) is not None
    try:
        steps = sample_steps(files, n, cfg.seed, ("obs",) + POSITION_KEYS + ((KINEMATICS_KEY,) if kinematics else ()))
    except UserError:  # rollouts without labels: nothing to compare with
        return None
    truth = torch.from_numpy(stack_positions(steps))  # (N, 2, 3), m
    z = vision.encode(frames_to_tensor(steps["obs"]))[0]
    predicted = vision.positions(z)
    error = (predicted - truth).norm(dim=-1)  # (N, 2), m
    offset_error = lambda p: ((p[:, 0] - p[:, 1]) - (truth[:, 0] - truth[:, 1])).norm(dim=-1)  # noqa: E731
    in_camera = (predicted[:, 0] - truth[:, 0]).double() @ torch.from_numpy(camera_axes(cfg.env)).T  # (N, 3), m
    out = {"frames": len(truth), "goal_cm": float(100 * error[:, 0].mean()),
           "gripper_cm": float(100 * error[:, 1].mean()), "offset_cm": float(100 * offset_error(predicted).mean()),
           "goal_within_5cm": float((error[:, 0] < 0.05).float().mean()),
           "goal_across_cm": float(100 * in_camera[:, :2].norm(dim=-1).mean()),
           "goal_depth_cm": float(100 * in_camera[:, 2].abs().mean())}
    if kinematics:
        with_joints = vision.positions(z, torch.from_numpy(steps[KINEMATICS_KEY].astype(np.float32)))
        out.update(kinematics_cm=float(100 * (with_joints[:, 1] - truth[:, 1]).norm(dim=-1).mean()),
                   offset_kinematics_cm=float(100 * offset_error(with_joints).mean()))
    return out


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


def dream_verdict(cfg, mdnrnn, controller: LinearController) -> dict | None:
    """C's score in M's dream at controller.temperature from the starts of stage 03's episodes, or None (no
    latents, or a C reading inputs the dream does not have): for a dream-trained C, the score it believes it
    has (Ha & Schmidhuber's Doom table); for a real-trained C, whether M's dream recognises a driver at all."""
    latents = stage_dir(cfg, "latents")
    if not controller.features_only or not os.path.isdir(latents) or not any(n.endswith(".npz") for n in os.listdir(latents)):
        return None
    files = list_episodes(latents, "latents")
    check_latents(files)
    ec = cfg.evaluate
    policy = controller.get_params() if controller.kind == "linear" else controller  # a callable on M's features
    return dream_score(mdnrnn, start_latents(files), policy, controller.low, controller.high,
                       cfg.controller.temperature, ec.episodes, ec.max_steps or cfg.env.max_episode_steps,
                       env_seed(cfg.seed, "evaluate", 0))


def write_media(cfg, out_dir: str, vision, mdnrnn, controller: LinearController, vision_path: str, seed: int,
                scores: dict) -> tuple[dict, int]:
    """episode.gif (replaying the episode of `seed` here), world_model.gif (that episode, V's reconstruction and
    M's dream from its first frame), dream.gif for a dream-trained C, reconstructions.png,
    training_curves.png and, on PandaReach, the goal-marker check (into `scores`). Returns ({caption: file},
    GIF frame count)."""
    ec = cfg.evaluate
    torch.set_num_threads(1)
    env = make_env(cfg.env)
    episode = run_episode(env, AgentPolicy(Agent(vision, mdnrnn, controller)), seed, ec.max_steps, record=True)
    env.close()
    frames = list(episode.arrays["obs"])
    n_gif = save_episode_gif(os.path.join(out_dir, "episode.gif"), vision, frames, ec.gif_every, ec.gif_max_frames)
    media = {f"episode {seed} (return {episode.ret:.1f}): frame | reconstruction": "episode.gif"}
    dream = None if not controller.features_only else dream_frames(  # a C reading more than M has no dream
        vision, mdnrnn, controller, frames[0], cfg.controller.temperature, len(frames), cfg.seed)
    if dream is not None:
        save_world_model_gif(os.path.join(out_dir, "world_model.gif"), vision, frames, dream, ec.gif_every,
                             ec.gif_max_frames)
        media[f"episode {seed}: real frame | V's reconstruction | M's dream from the first frame (tau "
              f"{cfg.controller.temperature:g}), same C"] = "world_model.gif"
    trained_in_m = cfg.controller.env == "dream" or controller.kind == "actor_critic"
    if dream is not None and trained_in_m:  # C in M's dream beside C on the real track
        save_side_by_side_gif(os.path.join(out_dir, "dream.gif"), frames, dream, ec.gif_every, ec.gif_max_frames)
        media[f"real episode {seed} | dream from its first frame (tau {cfg.controller.temperature:g}), same C"] = "dream.gif"
    held = held_out_frames(cfg, vision_path, ec.recon_frames)
    if held is not None:
        save_reconstruction_grid(os.path.join(out_dir, "reconstructions.png"), vision, held)
        media["held-out frames (top) and reconstructions (bottom)"] = "reconstructions.png"
        if is_panda(cfg.env.id):
            scores["goal_marker"] = goal_marker_visibility(vision, held_out_frames(cfg, vision_path, GOAL_MARKER_FRAMES))
            g = scores["goal_marker"]
            print(f"[06] goal marker: in {100 * g['in_frames']:.0f} % of {g['frames']} held-out frames, kept by V's "
                  f"reconstruction in {100 * g['in_reconstructions']:.0f} % of those")
        positions = position_head_error(vision, cfg, vision_path, GOAL_MARKER_FRAMES) if has_position_heads(vision) else None
        if positions:
            scores["position_heads"] = positions
            print(f"[06] V's position heads on {positions['frames']} held-out frames: goal {positions['goal_cm']:.1f} cm, "
                  f"gripper {positions['gripper_cm']:.1f} cm, goal - gripper {positions['offset_cm']:.1f} cm (mean "
                  f"errors); goal within 5 cm in {100 * positions['goal_within_5cm']:.0f} %; the goal's error across "
                  f"the first camera's image {positions['goal_across_cm']:.1f} cm, along its axis "
                  f"{positions['goal_depth_cm']:.1f} cm")
            if "kinematics_cm" in positions:
                print(f"[06] V's joint kinematics: gripper {positions['kinematics_cm']:.2f} cm, goal (heads) - gripper "
                      f"(kinematics) {positions['offset_kinematics_cm']:.1f} cm (mean errors)")
    if plot_training_curves(cfg.run_dir, os.path.join(out_dir, "training_curves.png")):
        media["training curves: V and M per epoch, C per generation"] = "training_curves.png"
    return media, n_gif


def evaluate_run(cfg, out_dir: str, vision_path: str, mdnrnn_path: str, controller_path: str, loaded: tuple
                 ) -> tuple[dict, int]:
    """The whole of stage 06 for one run: scores.json, the media, fid.json and report.md in `out_dir`.
    `loaded` is what load_evaluated_agent returned for the three paths. Returns (scores, GIF frame count)."""
    ec = cfg.evaluate
    vision, mdnrnn, controller, ckpt = loaded
    seeds = [env_seed(cfg.seed, "evaluate", i) for i in range(ec.episodes)]
    scores = {"env": cfg.env.id, **score(play(cfg, vision_path, mdnrnn_path, controller, seeds), seeds)}
    unit = "update" if controller.kind == "actor_critic" else "generation"  # what C's training counts
    best_at = (ckpt["best"] or {}).get(unit, ckpt[unit])
    scores |= {"params": ec.params, "params_unit": unit, "params_generation": best_at if ec.params == "best" else ckpt[unit],
               "controller": os.path.abspath(controller_path), "inputs": controller.inputs}
    dream = dream_verdict(cfg, mdnrnn, controller)
    if dream is not None:
        scores["dream"] = dream
    save_json(os.path.join(out_dir, "scores.json"), scores)
    media, n_gif = write_media(cfg, out_dir, vision, mdnrnn, controller, vision_path, seeds[0], scores)
    save_json(os.path.join(out_dir, "scores.json"), scores)
    fid = None
    if ec.fid_frames > 0:
        fid = compute_fid(cfg, vision, vision_path)
        save_json(os.path.join(out_dir, "fid.json"), fid)
    write_run_report(os.path.join(out_dir, "report.md"), cfg, scores, budget_summary(cfg.run_dir), media, fid)
    return scores, n_gif
