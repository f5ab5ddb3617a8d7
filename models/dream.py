"""The dream: M's own simulation of the environment (Ha & Schmidhuber 2018, section 4.4-4.5).

`DreamEnv` is a gymnasium.Env around a trained M of any kind (the interface of
models/__init__.py): the observation is M's features (what C reads: [z_t, h_t]
for the MDN-RNN), an action goes through M.transition, the next state is
sampled by M.imagine at temperature tau, and the reward and termination come
from M.heads (done when sigmoid(done logit) > 0.5). An episode starts from M's
initial state having observed the z of the first frame of a real episode
(utils.data.start_latents reads them from stage 03's output). `render()`
decodes M.latent(state) through V.

`dream_returns` steps many controllers through the dream at once, as one torch
batch (population x rollouts per candidate), the fast path for CMA-ES. Its
episodes start either from first frames, as above, or from M's state after a
real window (`burn_in`): anywhere in a real episode, so that a short dream
stays near the data M was fitted to (the start states of Dreamer's imagination,
Hafner et al. 2020, section 3).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch

from models.controller import batched_actions
from models.likelihood import frames_to_tensor

DONE_THRESHOLD = 0.5  # terminate when M's done probability exceeds this


class DreamEnv(gym.Env):
    """gymnasium.Env whose dynamics are M's.

    Args:
        memory: a trained M (kept in eval mode, stepped with batch 1 on CPU).
        starts: float32 (N, z_dim), the z an episode may start from (a reset draws one).
        action_low, action_high: the real env's action bounds, float (A,).
        temperature: tau of M's sampling (Ha & Schmidhuber section 4.5).
        max_steps: episode length cap (truncated=True there).
        vision: optional V for `render()` (rgb_array of decode(M.latent(state)), uint8 (S, S, 3)).

    Observation: float32 (M.feature_dim,) = M.features(state). Reward: M's
    predicted reward, float. A reset with `options={"start": i}` starts from starts[i].

    Raises:
        ValueError: starts of the wrong shape for M.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 50}

    def __init__(
        self,
        memory,
        starts: np.ndarray,
        action_low,
        action_high,
        temperature: float = 1.0,
        max_steps: int = 1000,
        vision=None,
        render_mode: str | None = None,
    ):
        starts = np.asarray(starts, dtype=np.float32)
        if starts.ndim != 2 or starts.shape[1] != memory.z_dim or len(starts) == 0:
            raise ValueError(f"dream starts: expected float (N >= 1, {memory.z_dim}), got shape {starts.shape}")
        self.memory = memory.eval()
        self.starts = torch.from_numpy(starts)
        self.temperature, self.max_steps = float(temperature), int(max_steps)
        self.vision, self.render_mode = vision, render_mode
        self.action_space = gym.spaces.Box(np.asarray(action_low, np.float32), np.asarray(action_high, np.float32))
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (memory.feature_dim,), np.float32)
        self._generator = torch.Generator()
        self._state = None
        self._t = 0

    def _observation(self) -> np.ndarray:
        return self.memory.features(self._state)[0].numpy().astype(np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._generator.manual_seed(int(self.np_random.integers(2**63 - 1)))
        index = (options or {}).get("start", int(self.np_random.integers(len(self.starts))))
        with torch.no_grad():
            self._state = self.memory.observe(self.memory.initial_state(1), self.starts[index : index + 1].clone())
        self._t = 0
        return self._observation(), {"start": index}

    @torch.no_grad()
    def step(self, action):
        a = torch.as_tensor(np.asarray(action, dtype=np.float32)).view(1, -1)
        state = self.memory.transition(self._state, a)
        self._state = self.memory.imagine(state, self.temperature, self._generator)
        reward, done_logit = self.memory.heads(self._state)
        self._t += 1
        terminated = bool(torch.sigmoid(done_logit[0]) > DONE_THRESHOLD)
        truncated = self._t >= self.max_steps and not terminated
        return self._observation(), float(reward[0]), terminated, truncated, {}

    @torch.no_grad()
    def render(self):
        if self.render_mode != "rgb_array" or self.vision is None:
            return None
        frame = self.vision.decode(self.memory.latent(self._state), self.temperature)[0]  # (3, S, S) in [0, 1]
        return (frame.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)


@torch.no_grad()
def burn_in(memory, z: torch.Tensor, a: torch.Tensor):
    """M's state after filtering real windows: z float32 (B, T+1, z_dim) latents and a float32 (B, T, A) the
    actions between them -> the M state (batch B) after observing z[:, T], on z's device. A dream continued from
    it starts mid-episode with M's memory of the T steps before."""
    state = memory.observe(memory.initial_state(len(z)), z[:, 0])
    for t in range(a.shape[1]):
        state = memory.observe(memory.transition(state, a[:, t]), z[:, t + 1])
    return state


@torch.no_grad()
def dream_returns(
    memory,
    params: np.ndarray,
    starts: np.ndarray,
    action_low,
    action_high,
    temperature: float,
    max_steps: int,
    generator: torch.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Returns of B dream episodes stepped together: row i runs controller params[i] from starts row i.

    memory: a trained M of any kind; params float (B, n_params) of linear controllers, or any C as a callable
    (features (B, F) -> actions (B, A), e.g. an ActorCritic); starts: float (B, z_dim), the first real latents
    (M starts having observed them), or an M state of batch B on M's device (e.g. `burn_in`). An episode ends at
    M's done or after max_steps; finished rows stop collecting reward. Returns (returns float64 (B,), episode
    lengths int64 (B,)). With B = 1 and the same generator state this is exactly a DreamEnv
    episode driven by LinearController with params[0]. Runs on M's device; `generator` must be on it too.
    """
    device = next(memory.parameters()).device
    if isinstance(starts, tuple):
        state = starts
    else:
        z = torch.as_tensor(np.asarray(starts, np.float32)).to(device)
        state = memory.observe(memory.initial_state(len(z)), z)
    if callable(params):
        policy = params
    else:
        theta = torch.as_tensor(np.asarray(params, np.float32)).to(device)
        policy = lambda x: batched_actions(theta, x, action_low, action_high)  # noqa: E731
    batch = len(state[0])
    alive = torch.ones(batch, dtype=torch.bool, device=device)
    total = torch.zeros(batch, dtype=torch.float64, device=device)
    lengths = torch.zeros(batch, dtype=torch.int64, device=device)
    for _ in range(max_steps):
        a = policy(memory.features(state))
        state = memory.imagine(memory.transition(state, a), temperature, generator)
        reward, done_logit = memory.heads(state)
        total += torch.where(alive, reward.double(), torch.zeros_like(total))
        lengths += alive.long()
        alive &= ~(torch.sigmoid(done_logit) > DONE_THRESHOLD)
        if not alive.any():
            break
    return total.cpu().numpy(), lengths.cpu().numpy()


def dream_score(memory, starts: np.ndarray, params: np.ndarray, action_low, action_high,
                temperature: float, episodes: int, max_steps: int, seed: int) -> dict:
    """Return of one controller (a linear C's params float (n_params,), or any C as a callable on M's features)
    in M's dream: `episodes` batched episodes from start latents drawn (with replacement, seeded) from `starts`
    float (N, z_dim), <= max_steps each.

    Returns {"temperature", "episodes", "mean", "std", "mean_length", "returns" (list of float)}.
    """
    rng = np.random.default_rng(seed)
    picked = starts[rng.integers(len(starts), size=episodes)]
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    batch = params if callable(params) else np.repeat(np.asarray(params, np.float32)[None], episodes, axis=0)
    with torch.inference_mode():
        returns, lengths = dream_returns(memory, batch, picked, action_low, action_high, temperature, max_steps,
                                         generator)
    return {"temperature": float(temperature), "episodes": episodes, "mean": float(returns.mean()),
            "std": float(returns.std()), "mean_length": float(lengths.mean()), "returns": returns.tolist()}


@torch.inference_mode()
def dream_frames(vision, memory, controller, first_frame: np.ndarray, temperature: float, steps: int,
                 seed: int) -> list[np.ndarray]:
    """Frames uint8 (S, S, 3) of a dream episode of at most `steps` steps driven by `controller` (a
    LinearController reading M's features), started from z = mu(first_frame) (uint8 (S, S, 3)) and decoded
    through V at `temperature` (DreamEnv.render)."""
    z0 = vision.encode(frames_to_tensor(first_frame[None]))[0].numpy()
    env = DreamEnv(memory, z0, controller.low, controller.high, temperature, steps, vision, "rgb_array")
    obs, _ = env.reset(seed=seed)
    frames = [env.render()]
    for _ in range(steps - 1):
        obs, _, terminated, truncated, _ = env.step(controller(torch.from_numpy(obs)[None])[0].numpy())
        frames.append(env.render())
        if terminated or truncated:
            break
    return frames
