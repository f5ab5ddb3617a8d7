"""Real environments, frame preprocessing, random policies and action squashing.

Frames: the env's uint8 (96, 96, 3) CarRacing observation becomes V's input,
uint8 (S, S, 3) with S = env.frame_size, optionally without the 12-row
dashboard at the bottom (Ha & Schmidhuber crop it; it shows speed, which a
controller can use, so we keep it by default).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from utils.config import EnvConfig
from utils.errors import UserError

CARRACING_DASHBOARD_ROWS = 12


def make_env(env_cfg: EnvConfig, render_mode: str | None = None):
    """Create the real gymnasium env named by `env_cfg.id`.

    Raises:
        UserError: the id is not a registered gymnasium env.
    """
    import gymnasium as gym

    try:
        return gym.make(env_cfg.id, max_episode_steps=env_cfg.max_episode_steps, render_mode=render_mode)
    except gym.error.Error as exc:
        raise UserError(f"env.id: cannot make {env_cfg.id!r} ({exc})") from None


def preprocess_frame(obs: np.ndarray, env_cfg: EnvConfig) -> np.ndarray:
    """uint8 (H, W, 3) env frame -> uint8 (S, S, 3) frame for V (bilinear resize)."""
    if env_cfg.crop_dashboard and env_cfg.id.startswith("CarRacing"):
        obs = obs[:-CARRACING_DASHBOARD_ROWS]
    size = env_cfg.frame_size
    if obs.shape[0] == size and obs.shape[1] == size:
        return np.ascontiguousarray(obs)
    return np.array(Image.fromarray(obs).resize((size, size), Image.BILINEAR))


def frames_to_tensor(frames: np.ndarray):
    """uint8 (B, H, W, 3) -> float32 torch tensor (B, 3, H, W) in [0, 1]."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # (B, 3, H, W) view
    return x.contiguous().float().div_(255.0)  # contiguous NCHW: channels-last strides make convs slow


class RandomPolicy:
    """Random exploration actions in the env's Box action space.

    `uniform`: an independent uniform sample each step. `brownian`: a clipped
    random walk a_{t+1} = clip(a_t + sqrt(dt) * N(0, I), low, high), started
    uniformly, as in ctallec/world-models; it holds steering and throttle long
    enough for the car to actually move along (and off) the track.
    """

    def __init__(self, kind: str, action_space, rng: np.random.Generator, dt: float = 0.02):
        self.kind, self.rng, self.dt = kind, rng, dt
        self.low = action_space.low.astype(np.float32)
        self.high = action_space.high.astype(np.float32)
        self.action = self._uniform()

    def _uniform(self) -> np.ndarray:
        return self.rng.uniform(self.low, self.high).astype(np.float32)

    def __call__(self) -> np.ndarray:
        if self.kind == "uniform":
            return self._uniform()
        step = np.sqrt(self.dt) * self.rng.standard_normal(self.low.shape).astype(np.float32)
        self.action = np.clip(self.action + step, self.low, self.high)
        return self.action.copy()


def squash_to_bounds(u, low, high):
    """Map unbounded controller outputs into [low, high] with a tanh: low + (high - low) * (tanh(u) + 1) / 2.

    Works on numpy arrays or torch tensors of shape (..., A); for CarRacing
    (low = [-1, 0, 0], high = [1, 1, 1]) steering is tanh(u) and gas and brake
    are (tanh(u) + 1) / 2.
    """
    import torch

    if isinstance(u, torch.Tensor):
        low_t = torch.as_tensor(low, dtype=u.dtype)
        high_t = torch.as_tensor(high, dtype=u.dtype)
        return low_t + (high_t - low_t) * (torch.tanh(u) + 1) / 2
    return low + (high - low) * (np.tanh(u) + 1) / 2
