"""The dream: M's own simulation of the environment (Ha & Schmidhuber 2018, section 4.4-4.5).

`DreamEnv` is a gymnasium.Env around a trained MDN-RNN: the observation is
[z_t, h_t], an action goes through M.step, the next z is sampled from M's
mixture at temperature tau, and the reward and termination come from M's
heads (done when sigmoid(done logit) > 0.5). An episode starts from the z of
the first frame of a real episode (utils.data.start_latents reads them from
stage 03's output) with h = 0. `render()` decodes z through V.

`dream_returns` steps many controllers through the dream at once, as one torch
batch (population x rollouts per candidate), the fast path for CMA-ES.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch

from models.controller import batched_actions
from models.likelihood import frames_to_tensor
from models.mdnrnn import MDNRNN, mdn_sample

DONE_THRESHOLD = 0.5  # terminate when M's done probability exceeds this


class DreamEnv(gym.Env):
    """gymnasium.Env whose dynamics are M's.

    Args:
        mdnrnn: a trained MDNRNN (kept in eval mode, stepped with batch 1 on CPU).
        starts: float32 (N, z_dim), the z an episode may start from (a reset draws one).
        action_low, action_high: the real env's action bounds, float (A,).
        temperature: tau of M's mixture sampling (Ha & Schmidhuber section 4.5).
        max_steps: episode length cap (truncated=True there).
        vision: optional V for `render()` (rgb_array of decode(z), uint8 (S, S, 3)).

    Observation: float32 (z_dim + hidden,) = [z_t, h_t]. Reward: M's predicted
    reward, float. A reset with `options={"start": i}` starts from starts[i].

    Raises:
        ValueError: starts of the wrong shape for M.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 50}

    def __init__(
        self,
        mdnrnn: MDNRNN,
        starts: np.ndarray,
        action_low,
        action_high,
        temperature: float = 1.0,
        max_steps: int = 1000,
        vision=None,
        render_mode: str | None = None,
    ):
        starts = np.asarray(starts, dtype=np.float32)
        if starts.ndim != 2 or starts.shape[1] != mdnrnn.z_dim or len(starts) == 0:
            raise ValueError(f"dream starts: expected float (N >= 1, {mdnrnn.z_dim}), got shape {starts.shape}")
        self.mdnrnn = mdnrnn.eval()
        self.starts = torch.from_numpy(starts)
        self.temperature, self.max_steps = float(temperature), int(max_steps)
        self.vision, self.render_mode = vision, render_mode
        self.action_space = gym.spaces.Box(np.asarray(action_low, np.float32), np.asarray(action_high, np.float32))
        obs_dim = mdnrnn.z_dim + mdnrnn.hidden
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32)
        self._generator = torch.Generator()
        self._z = self._state = None
        self._t = 0

    def _observation(self) -> np.ndarray:
        return torch.cat([self._z[0], self._state[0][0, 0]]).numpy().astype(np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._generator.manual_seed(int(self.np_random.integers(2**63 - 1)))
        index = (options or {}).get("start", int(self.np_random.integers(len(self.starts))))
        self._z = self.starts[index : index + 1].clone()
        self._state = self.mdnrnn.initial_state(1)
        self._t = 0
        return self._observation(), {"start": index}

    @torch.no_grad()
    def step(self, action):
        a = torch.as_tensor(np.asarray(action, dtype=np.float32)).view(1, -1)
        params, reward, done_logit, self._state = self.mdnrnn.step(self._z, a, self._state)
        self._z = mdn_sample(params, self.temperature, self._generator)
        self._t += 1
        terminated = bool(torch.sigmoid(done_logit[0]) > DONE_THRESHOLD)
        truncated = self._t >= self.max_steps and not terminated
        return self._observation(), float(reward[0]), terminated, truncated, {}

    @torch.no_grad()
    def render(self):
        if self.render_mode != "rgb_array" or self.vision is None:
            return None
        frame = self.vision.decode(self._z, self.temperature)[0]  # (3, S, S) in [0, 1]
        return (frame.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)


@torch.no_grad()
def dream_returns(
    mdnrnn: MDNRNN,
    params: np.ndarray,
    starts: np.ndarray,
    action_low,
    action_high,
    temperature: float,
    max_steps: int,
    generator: torch.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Returns of B dream episodes stepped together: row i runs controller params[i] from z = starts[i].

    params float (B, n_params); starts float (B, z_dim). An episode ends at M's done or after
    max_steps; finished rows stop collecting reward. Returns (returns float64 (B,), episode
    lengths int64 (B,)). With B = 1 and the same generator state this is exactly a DreamEnv
    episode driven by LinearController with params[0]. Runs on M's device; `generator` must be on it too.
    """
    device = next(mdnrnn.parameters()).device
    z = torch.as_tensor(np.asarray(starts, np.float32)).to(device)
    theta = torch.as_tensor(np.asarray(params, np.float32)).to(device)
    state = mdnrnn.initial_state(len(z))
    alive = torch.ones(len(z), dtype=torch.bool, device=device)
    total = torch.zeros(len(z), dtype=torch.float64, device=device)
    lengths = torch.zeros(len(z), dtype=torch.int64, device=device)
    for _ in range(max_steps):
        a = batched_actions(theta, torch.cat([z, state[0][0]], dim=1), action_low, action_high)
        mix, reward, done_logit, state = mdnrnn.step(z, a, state)
        z = mdn_sample(mix, temperature, generator)
        total += torch.where(alive, reward.double(), torch.zeros_like(total))
        lengths += alive.long()
        alive &= ~(torch.sigmoid(done_logit) > DONE_THRESHOLD)
        if not alive.any():
            break
    return total.cpu().numpy(), lengths.cpu().numpy()


def dream_score(mdnrnn: MDNRNN, starts: np.ndarray, params: np.ndarray, action_low, action_high,
                temperature: float, episodes: int, max_steps: int, seed: int) -> dict:
    """Return of one controller (params float (n_params,)) in M's dream: `episodes` batched episodes from
    start latents drawn (with replacement, seeded) from `starts` float (N, z_dim), <= max_steps each.

    Returns {"temperature", "episodes", "mean", "std", "mean_length", "returns" (list of float)}.
    """
    rng = np.random.default_rng(seed)
    picked = starts[rng.integers(len(starts), size=episodes)]
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    batch = np.repeat(np.asarray(params, np.float32)[None], episodes, axis=0)
    with torch.inference_mode():
        returns, lengths = dream_returns(mdnrnn, batch, picked, action_low, action_high, temperature, max_steps,
                                         generator)
    return {"temperature": float(temperature), "episodes": episodes, "mean": float(returns.mean()),
            "std": float(returns.std()), "mean_length": float(lengths.mean()), "returns": returns.tolist()}


@torch.inference_mode()
def dream_frames(vision, mdnrnn: MDNRNN, controller, first_frame: np.ndarray, temperature: float, steps: int,
                 seed: int) -> list[np.ndarray]:
    """Frames uint8 (S, S, 3) of a dream episode of at most `steps` steps driven by `controller` (a
    LinearController reading [z, h]), started from z = mu(first_frame) (uint8 (S, S, 3)) and decoded through V
    at `temperature` (DreamEnv.render)."""
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
