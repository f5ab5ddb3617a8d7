"""The one episode loop, the policies it plays, and the worker tasks built on it.

`run_episode(env, policy, seed, ...)` plays one episode of a real env made by
utils.envs.make_env (V-ready frames) and, when asked, records it. Every
consumer goes through it:

- stage 01 records rollouts (`record_task`, with `RandomPolicy` or a trained
  agent plus exploration noise: `AgentPolicy`);

Worker state is built from checkpoint dicts, not paths, so that a worker on
another machine (the Ray backend) needs no file of this one.
- stage 05 scores CMA-ES candidates and stage 06 evaluates C (`agent_task`),
  and 06 replays an episode for its GIFs;
- benchmarks/throughput.py and benchmarks/random_policy.py.

A policy has `reset(seed)` (called after env.reset) and `__call__(frame, info)
-> action`. The agent itself (V -> C -> M) is models.agent.Agent.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from models.agent import Agent
from models.controller import LinearControllerConfig
from models import controller_for_world_model, from_checkpoint_dict
from utils.config import EnvConfig, RolloutsConfig
from utils.envs import info_input_dims, make_env
from utils.io import npz_bytes

EPISODE_EXTRAS = ("proprio", "desired_goal", "achieved_goal")  # per-step info of task envs, saved in the rollout npz


class RandomPolicy:
    """Random exploration actions in the env's Box action space, seeded per episode.

    `uniform`: an independent uniform sample each step. `brownian`: a clipped
    random walk a_{t+1} = clip(a_t + sqrt(dt) * N(0, I), low, high), started
    uniformly, as in ctallec/world-models; it holds steering and throttle long
    enough for the car to actually move along (and off) the track.
    """

    def __init__(self, kind: str, action_space, dt: float = 0.02):
        self.kind, self.dt = kind, dt
        self.low = action_space.low.astype(np.float32)
        self.high = action_space.high.astype(np.float32)

    def reset(self, seed: int) -> None:
        """A new episode: the generator seeded with the episode's env seed, the walk started uniformly."""
        self.rng = np.random.default_rng(seed)
        self.action = self._uniform()

    def _uniform(self) -> np.ndarray:
        return self.rng.uniform(self.low, self.high).astype(np.float32)

    def __call__(self, frame=None, info=None) -> np.ndarray:
        if self.kind == "uniform":
            return self._uniform()
        step = np.sqrt(self.dt) * self.rng.standard_normal(self.low.shape).astype(np.float32)
        self.action = np.clip(self.action + step, self.low, self.high)
        return self.action.copy()


class AgentPolicy:
    """The V-M-C agent as a policy, plus N(0, noise_std^2) exploration noise seeded per episode."""

    def __init__(self, agent: Agent, noise_std: float = 0.0):
        self.agent, self.noise_std = agent, noise_std

    def reset(self, seed: int) -> None:
        """A new episode: M's state h = 0, the noise generator seeded with the episode's env seed."""
        self.agent.reset()
        self.rng = np.random.default_rng(seed)

    def __call__(self, frame: np.ndarray, info: dict) -> np.ndarray:
        return self.agent.act(frame, info, self.rng, self.noise_std)


@dataclass
class Episode:
    """What run_episode returns."""

    ret: float  # the return: sum of rewards
    steps: int
    early_stopped: bool = False
    success: bool | None = None  # info["is_success"] at the last step, for envs that report it (PandaReach)
    arrays: dict = field(default_factory=dict)  # with record=True: the rollout npz arrays (`run_episode`)


def run_episode(env, policy, seed: int, max_steps: int = 0, early_stop_steps: int = 0, record: bool = False
                ) -> Episode:
    """Play one episode of `policy` on env seed `seed`.

    max_steps: cap on steps (0: the env's time limit); the last step counts as truncated.
    early_stop_steps k > 0 ends the episode after k steps without a new best cumulative return (a car stuck
    on the grass only loses 0.1 per step); for training only, never for evaluation.

    With record=True, `arrays` holds the rollout npz contract: obs uint8 (T, S, S, 3), the frame seen *before*
    actions[t]; actions float32 (T, A), as played; rewards float32 (T,) received for actions[t]; terminated,
    truncated bool (T,); seed int64; and the task extras the env puts in info (PandaReach: proprio float32
    (T, 7) joint angles in rad, desired_goal float32 (T, 3) and achieved_goal float32 (T, 3), the goal's and the
    end effector's positions in m), of the same state as obs.
    """
    obs, info = env.reset(seed=seed)
    env.action_space.seed(seed)
    policy.reset(seed)
    max_steps = max_steps or env.spec.max_episode_steps
    total, best, since_best, success = 0.0, -np.inf, 0, None
    rec = {"obs": [], "actions": [], "rewards": [], "terminated": [], "truncated": []} if record else None
    extras = {key: [] for key in EPISODE_EXTRAS if key in info} if record else {}
    for t in range(max_steps):
        if record:
            rec["obs"].append(obs)
            for key, values in extras.items():
                values.append(info[key])
        action = policy(obs, info)
        obs, reward, terminated, truncated, info = env.step(action)
        total += float(reward)
        success = bool(info["is_success"]) if "is_success" in info else None
        env_truncated, truncated = bool(truncated), bool(truncated) or t == max_steps - 1
        if record:
            rec["actions"].append(action)
            rec["rewards"].append(reward)
            rec["terminated"].append(terminated)
            rec["truncated"].append(truncated and not terminated)
        if total > best:
            best, since_best = total, 0
        else:
            since_best += 1
        stop_early = bool(early_stop_steps) and since_best >= early_stop_steps
        if terminated or truncated or stop_early:
            break
    episode = Episode(total, t + 1, stop_early and not (terminated or env_truncated), success)
    if record:
        episode.arrays = {
            "obs": np.stack(rec["obs"]).astype(np.uint8),
            "actions": np.stack(rec["actions"]).astype(np.float32),
            "rewards": np.asarray(rec["rewards"], dtype=np.float32),
            "terminated": np.asarray(rec["terminated"], dtype=bool),
            "truncated": np.asarray(rec["truncated"], dtype=bool),
            "seed": np.int64(seed),
            **{key: np.stack(values).astype(np.float32) for key, values in extras.items()},
        }
    return episode


# ---------------------------------------------------------------- worker tasks (utils/parallel.py)


def load_agent(vision: dict, memory: dict, env_cfg: EnvConfig, controller: LinearControllerConfig | dict,
               action_space) -> Agent:
    """The agent of V's and M's checkpoint dicts (utils.checkpoints.read_checkpoint, checked by the stage) plus C:
    an empty C of `controller` (the config dataclass of its kind), or the trained C of a controller checkpoint dict."""
    vision, memory = from_checkpoint_dict(vision, "vision"), from_checkpoint_dict(memory, "memory")
    if isinstance(controller, dict):
        c = from_checkpoint_dict(controller, "controller")
    else:
        c = controller_for_world_model(controller, memory.feature_dim, action_space.low, action_space.high,
                                       info_input_dims(env_cfg))
    return Agent(vision, memory, c)


def init_recorder(env_cfg: EnvConfig, ro_cfg: RolloutsConfig, agent_ckpts: dict | None = None) -> dict:
    """Worker state for stage 01: one env and the policy of rollouts.policy (for `controller`, agent_ckpts =
    {"vision", "mdnrnn", "controller"} checkpoint dicts)."""
    torch.set_num_threads(1)
    env = make_env(env_cfg)
    if agent_ckpts:
        agent = load_agent(agent_ckpts["vision"], agent_ckpts["mdnrnn"], env_cfg, agent_ckpts["controller"],
                           env.action_space)
        policy = AgentPolicy(agent, ro_cfg.action_noise)
    else:
        policy = RandomPolicy(ro_cfg.policy, env.action_space, ro_cfg.brownian_dt)
    return {"env": env, "policy": policy, "max_steps": ro_cfg.max_steps}


def record_task(state: dict, task: tuple[int, int]) -> dict:
    """Record episode `index` with env seed `seed`: its stats and `npz`, the bytes of its rollout file (written
    by the stage, wherever the worker runs)."""
    index, seed = task
    start = time.perf_counter()
    episode = run_episode(state["env"], state["policy"], seed, state["max_steps"], record=True)
    return {"index": index, "steps": episode.steps, "return": episode.ret, "seconds": time.perf_counter() - start,
            "npz": npz_bytes(**episode.arrays)}


def init_agent_worker(vision: dict, memory: dict, env_cfg: EnvConfig, controller: LinearControllerConfig,
                      threads: int = 1) -> dict:
    """Worker state for stages 05 and 06: an env plus V and M (checkpoint dicts) and an empty C of `controller` (the
    config dataclass of C's kind; each task sets C's flat parameters)."""
    torch.set_num_threads(threads)
    env = make_env(env_cfg)
    agent = load_agent(vision, memory, env_cfg, controller, env.action_space)
    return {"env": env, "policy": AgentPolicy(agent)}


def agent_task(state: dict, task: dict) -> dict:
    """task: {params, seed, max_steps, early_stop_steps} -> {return, steps, early_stopped, seed, success}."""
    policy: AgentPolicy = state["policy"]
    policy.agent.controller.set_params(task["params"])
    episode = run_episode(state["env"], policy, task["seed"], task.get("max_steps", 0), task.get("early_stop_steps", 0))
    return {"return": episode.ret, "steps": episode.steps, "early_stopped": episode.early_stopped,
            "seed": task["seed"], "success": episode.success}


def expected_episode_s(env_cfg: EnvConfig, max_steps: int = 0) -> float:
    """A generous bound on one episode's wall time, for hang detection before any episode has finished: the
    slowest env here steps at ~20/s with V, M and C (PandaReach rendering); allow 4 steps/s plus start-up."""
    return 60.0 + (max_steps or env_cfg.max_episode_steps) / 4.0

