"""Episodes in the real env: rollout recording (stage 01) and the V-M-C agent (01, 05, 06).

Stage 01 records with a random policy or, for Ha & Schmidhuber's iterative
training (section 5), with a trained V-M-C agent plus Gaussian action noise,
so that M also sees what happens when the car drives.

The frame of an episode follows this path: env observation (uint8 96x96x3)
-> `preprocess_frame` (uint8 64x64x3) -> V.encode -> z = mu (32,) ->
C([z, h]) -> action -> env.step; then M.advance(z, action) updates h.
On PandaReach the observation is the 84x84 `env.render()` frame
(utils.envs.PandaPixels), z has 8 dims, and with controller.inputs =
z_h_proprio C also reads info["proprio"], the 7 joint angles.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from models import load_mdnrnn, load_vision
from models.controller import LinearController
from utils.config import EnvConfig, RolloutsConfig
from utils.envs import RandomPolicy, frames_to_tensor, make_env, info_input_dims, preprocess_frame
from utils.io import episode_path, save_npz

EPISODE_EXTRAS = ("proprio", "desired_goal")  # per-step info of task envs, saved in the rollout npz


# ---------------------------------------------------------------- stage 01: random rollouts


def record_episode(env, env_cfg: EnvConfig, ro_cfg: RolloutsConfig, seed: int, agent: "Agent | None" = None
                   ) -> dict[str, np.ndarray]:
    """Play one episode with the random policy of rollouts.policy, or with `agent` (V-M-C) plus
    N(0, rollouts.action_noise^2) noise on its action; return the arrays of the rollout npz contract.

    obs uint8 (T, S, S, 3) is the frame seen *before* actions[t]; actions float32
    (T, A), the actions played (after noise and clipping); rewards float32 (T,)
    received for actions[t]; terminated, truncated bool (T,); seed int64. Task
    extras the env puts in info (PandaReach: proprio float32 (T, 7) joint angles
    in rad, desired_goal float32 (T, 3) in m) are recorded beside obs, of the
    same state.
    """
    obs, info = env.reset(seed=seed)
    env.action_space.seed(seed)
    rng = np.random.default_rng(seed)
    if agent is None:
        policy = RandomPolicy(ro_cfg.policy, env.action_space, rng, ro_cfg.brownian_dt)
    else:
        agent.reset()
        policy = lambda: agent.act(obs, rng, ro_cfg.action_noise, info)[0]  # noqa: E731 - reads the current obs
    max_steps = ro_cfg.max_steps or env_cfg.max_episode_steps
    frames, actions, rewards, terms, truncs = [], [], [], [], []
    extras = {key: [] for key in EPISODE_EXTRAS if key in info}
    for t in range(max_steps):
        frames.append(preprocess_frame(obs, env_cfg))
        for key, values in extras.items():
            values.append(info[key])
        action = policy()
        obs, reward, terminated, truncated, info = env.step(action)
        truncated = truncated or t == max_steps - 1
        actions.append(action)
        rewards.append(reward)
        terms.append(terminated)
        truncs.append(truncated and not terminated)
        if terminated or truncated:
            break
    return {
        "obs": np.stack(frames).astype(np.uint8),
        "actions": np.stack(actions).astype(np.float32),
        "rewards": np.asarray(rewards, dtype=np.float32),
        "terminated": np.asarray(terms, dtype=bool),
        "truncated": np.asarray(truncs, dtype=bool),
        "seed": np.int64(seed),
        **{key: np.stack(values).astype(np.float32) for key, values in extras.items()},
    }


def init_rollout_worker(env_cfg: EnvConfig, ro_cfg: RolloutsConfig, out_dir: str, agent_paths: dict | None = None
                        ) -> dict:
    """Worker state for stage 01: one env, where to write episodes, and for policy=controller the agent
    (agent_paths: {"vision", "mdnrnn", "controller"} checkpoint paths)."""
    state = {"env": make_env(env_cfg), "env_cfg": env_cfg, "ro_cfg": ro_cfg, "out_dir": out_dir, "agent": None}
    if agent_paths:
        torch.set_num_threads(1)
        worker = init_agent_worker(agent_paths["vision"], agent_paths["mdnrnn"], env_cfg)
        worker["env"].close()
        ckpt = torch.load(agent_paths["controller"], map_location="cpu", weights_only=False)
        worker["agent"].controller = LinearController(**ckpt["hparams"])
        worker["agent"].controller.set_params(ckpt["params_best"])
        state["agent"] = worker["agent"]
    return state


def rollout_task(state: dict, task: tuple[int, int]) -> dict:
    """Record episode `index` with env seed `seed` and write it atomically; return its stats."""
    index, seed = task
    start = time.perf_counter()
    episode = record_episode(state["env"], state["env_cfg"], state["ro_cfg"], seed, state["agent"])
    save_npz(episode_path(state["out_dir"], index), **episode)
    return {
        "index": index,
        "steps": len(episode["actions"]),
        "return": float(episode["rewards"].sum()),
        "seconds": time.perf_counter() - start,
    }


# ---------------------------------------------------------------- stages 05 and 06: the agent


class Agent:
    """V, M and C acting together in the real env, one frame at a time (no gradients)."""

    def __init__(self, vision, mdnrnn, controller: LinearController, env_cfg: EnvConfig):
        self.vision, self.mdnrnn, self.controller, self.env_cfg = vision, mdnrnn, controller, env_cfg
        self.reset()

    def reset(self) -> None:
        self.state = self.mdnrnn.initial_state(1)

    @torch.inference_mode()
    def act(self, obs: np.ndarray, rng: np.random.Generator | None = None, noise_std: float = 0.0,
            info: dict | None = None) -> tuple[np.ndarray, torch.Tensor]:
        """uint8 env observation -> (float32 action (A,) in bounds, z (1, D)); advances M's state with
        the action returned. noise_std > 0 adds N(0, noise_std^2) noise from `rng`, clipped to the bounds.
        `info` (of the env step that gave obs) holds C's extra inputs when controller.inputs reads any."""
        x = frames_to_tensor(preprocess_frame(obs, self.env_cfg)[None])  # (1, 3, S, S)
        z, _ = self.vision.encode(x)  # (1, D): the posterior mean
        extra = self.controller.info_vector(info or {})
        action = self.controller(z, self.state[0][0], extra)  # (1, A)
        if noise_std > 0:
            noisy = action.numpy() + rng.normal(0.0, noise_std, action.shape)
            action = torch.from_numpy(np.clip(noisy, self.controller.low, self.controller.high).astype(np.float32))
        self.state = self.mdnrnn.advance(z, action, self.state)
        return action[0].numpy(), z


@dataclass
class EpisodeResult:
    ret: float
    steps: int
    early_stopped: bool
    frames: list = field(default_factory=list)  # uint8 (S, S, 3) frames, when recorded
    success: bool | None = None  # info["is_success"] at the last step, for envs that report it (PandaReach)


def run_agent_episode(
    env, agent: Agent, seed: int, max_steps: int = 0, early_stop_steps: int = 0, record: bool = False
) -> EpisodeResult:
    """One episode of the agent on env seed `seed`.

    early_stop_steps k > 0 ends the episode after k steps without a new best
    cumulative return (a car stuck on the grass only loses 0.1 per step); use it
    for training only, never for evaluation.
    """
    obs, info = env.reset(seed=seed)
    agent.reset()
    max_steps = max_steps or env.spec.max_episode_steps
    total, best, since_best, frames = 0.0, -np.inf, 0, []
    for t in range(max_steps):
        if record:
            frames.append(preprocess_frame(obs, agent.env_cfg))
        action, _ = agent.act(obs, info=info)
        obs, reward, terminated, truncated, info = env.step(action)
        total += float(reward)
        success = bool(info["is_success"]) if "is_success" in info else None
        if total > best:
            best, since_best = total, 0
        else:
            since_best += 1
        if terminated or truncated:
            return EpisodeResult(total, t + 1, False, frames, success)
        if early_stop_steps and since_best >= early_stop_steps:
            return EpisodeResult(total, t + 1, True, frames, success)
    return EpisodeResult(total, max_steps, False, frames, success)


def init_agent_worker(vision_path: str, mdnrnn_path: str, env_cfg: EnvConfig, threads: int = 1,
                      inputs: str = "z_h") -> dict:
    """Worker state for stages 05 and 06: an env plus V, M and an empty C seeing `inputs`
    (controller.inputs)."""
    torch.set_num_threads(threads)
    vision, _ = load_vision(vision_path)
    mdnrnn, _ = load_mdnrnn(mdnrnn_path)
    env = make_env(env_cfg)
    controller = LinearController.for_world_model(
        vision.z_dim, mdnrnn.hidden, env.action_space.low, env.action_space.high, inputs, info_input_dims(env_cfg)
    )
    return {"env": env, "agent": Agent(vision, mdnrnn, controller, env_cfg)}


def agent_task(state: dict, task: dict) -> dict:
    """task: {params, seed, max_steps, early_stop_steps} -> {return, steps, early_stopped, seed}."""
    agent: Agent = state["agent"]
    agent.controller.set_params(task["params"])
    result = run_agent_episode(
        state["env"], agent, task["seed"], task.get("max_steps", 0), task.get("early_stop_steps", 0)
    )
    return {"return": result.ret, "steps": result.steps, "early_stopped": result.early_stopped, "seed": task["seed"],
            "success": result.success}
