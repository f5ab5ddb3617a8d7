"""Linear controller C of World Models: a_t = squash(W [z_t, h_t] + b).

squash maps each output into the env's action bounds with a tanh
(`squash_to_bounds`). For CarRacing (z 32, h 256, 3 actions) this is
3 * 288 + 3 = 867 parameters, as in Ha & Schmidhuber (2018). The parameters
are one flat float vector for CMA-ES, laid out by `split_params` (W row-major,
then b): the one-controller form (`LinearController.__call__`) and the
population form the batched dream uses (`batched_actions`) both read it there.

With controller.inputs = z_h_proprio (PandaReach), C also sees the proprio
vector q_t (the 7 joint angles, rad): a_t = squash(W [z_t, h_t, q_t] + b).
z_h_proprio_goal adds the goal position g (3,) from the env's state as well:
not the thesis's setting (the goal should come from the pixels) but the
upper bound of what a linear C can learn on a given budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from models.hparams import param

# controller.inputs -> the env info entries C reads besides z and h, in this order
INFO_INPUTS = {"z_h": (), "z_h_proprio": ("proprio",), "z_h_proprio_goal": ("proprio", "desired_goal")}


def squash_to_bounds(u, low, high):
    """Map unbounded controller outputs into [low, high] with a tanh: low + (high - low) * (tanh(u) + 1) / 2.

    Works on numpy arrays or torch tensors of shape (..., A); for CarRacing
    (low = [-1, 0, 0], high = [1, 1, 1]) steering is tanh(u) and gas and brake
    are (tanh(u) + 1) / 2.
    """
    if isinstance(u, torch.Tensor):
        low_t = torch.as_tensor(low, dtype=u.dtype, device=u.device)
        high_t = torch.as_tensor(high, dtype=u.dtype, device=u.device)
        return low_t + (high_t - low_t) * (torch.tanh(u) + 1) / 2
    return low + (high - low) * (np.tanh(u) + 1) / 2


def unsquash_from_bounds(action, low, high, margin: float = 1e-6) -> np.ndarray:
    """The inverse of `squash_to_bounds` on numpy: action float (..., A) in [low, high] -> u float (..., A), with
    actions on a bound moved `margin` (in tanh units) inside it so that u stays finite (|u| <= 7.3)."""
    unit = np.clip(2 * (action - low) / (high - low) - 1, -1 + margin, 1 - margin)
    return np.arctanh(unit)


def perturb_in_bounds(action: np.ndarray, low, high, noise_std: float, rng: np.random.Generator) -> np.ndarray:
    """Exploration noise for a tanh-bounded C: action float (..., A) in [low, high] -> squash(u + eps), eps ~
    N(0, noise_std^2) in the units of u (before the tanh, as a tanh-Gaussian policy samples: Haarnoja et al.
    2018, SAC, appendix C), float32. Raises nothing; noise_std 0 returns the action (up to float rounding).

    Why not a + eps clipped to the bounds: an action that rests on a bound (CarRacing's brake at 0) would pick up
    a one-sided mean of 0.4 noise_std (0.04 of brake at 0.1), enough to stop a C that drives on little gas.
    Here a saturated action stays near its bound, and at the centre of the range (steering 0) the noise has
    std noise_std * (high - low) / 2.
    """
    u = unsquash_from_bounds(np.asarray(action, dtype=np.float64), low, high)
    return squash_to_bounds(u + rng.normal(0.0, noise_std, u.shape), low, high).astype(np.float32)


def split_params(params: torch.Tensor, action_dim: int, in_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The flat parameter layout of C, written once: params float (..., A * in_dim + A) -> W (..., A, in_dim)
    (row-major), b (..., A).

    Raises:
        ValueError: a last dimension other than A * in_dim + A.
    """
    n = action_dim * (in_dim + 1)
    if params.shape[-1] != n:
        raise ValueError(f"controller expects {n} parameters, got {params.shape[-1]}")
    w = params[..., : action_dim * in_dim].reshape(*params.shape[:-1], action_dim, in_dim)
    return w, params[..., action_dim * in_dim :]


def batched_actions(params: torch.Tensor, x: torch.Tensor, low, high) -> torch.Tensor:
    """B linear controllers applied row by row: params float (B, A * in_dim + A), x float (B, in_dim) ->
    actions float (B, A) in [low, high] (the population form of `LinearController`)."""
    w, b = split_params(params, len(low), x.shape[1])
    return squash_to_bounds(torch.bmm(w, x[:, :, None])[:, :, 0] + b, low, high)


@dataclass
class LinearControllerConfig:
    """C's hyperparameters. Its input size and action bounds come from V, M and the env."""

    inputs: str = param("z_h", "what C sees: z_h (M's features: [z, h] for the MDN-RNN, [h, s] for the RSSM; "
                        "pixels only) | z_h_proprio (+ the joint angles; PandaReach) | z_h_proprio_goal (+ the goal "
                        "position from the state: an upper bound, not from pixels)", choices=tuple(INFO_INPUTS))


class LinearController:
    """a = squash(W x + b) with x = [M's features, info entries of INFO_INPUTS[inputs]] float32 (B, in_dim) -> a
    float32 (B, A) in bounds; the features are [z, h] for the MDN-RNN and [h, s] for the RSSM.

    Args:
        config: LinearControllerConfig; in_dim: size of x; action_low, action_high: float (A,) bounds.

    Raises:
        ValueError: an unknown `inputs`; `set_params` with a vector of the wrong size; a call whose inputs do
            not add up to in_dim.
    """

    kind = "linear"
    config_class = LinearControllerConfig

    def __init__(self, config: LinearControllerConfig | None = None, in_dim: int = 1, action_low=(-1.0,),
                 action_high=(1.0,)):
        config = config or LinearControllerConfig()
        if config.inputs not in INFO_INPUTS:
            raise ValueError(f"controller inputs must be one of {tuple(INFO_INPUTS)}, got {config.inputs!r}")
        self.config, self.in_dim, self.inputs = config, int(in_dim), config.inputs
        self.low = np.asarray(action_low, dtype=np.float32)
        self.high = np.asarray(action_high, dtype=np.float32)
        self.action_dim = len(self.low)
        self.params = torch.zeros(self.num_params)

    @classmethod
    def for_world_model(cls, config: LinearControllerConfig, feature_dim: int, action_low, action_high,
                        info_dims: dict[str, int] | None = None) -> "LinearController":
        """The controller of an M whose features C reads have `feature_dim` entries (M.feature_dim: z_dim +
        hidden for the MDN-RNN), plus the sizes `info_dims` of the env's info entries that config.inputs names
        (utils.envs.info_input_dims).

        Raises:
            ValueError: `inputs` names an entry the env does not give (e.g. proprio on CarRacing).
        """
        info_dims = info_dims or {}
        missing = [key for key in INFO_INPUTS.get(config.inputs, ()) if key not in info_dims]
        if missing:
            raise ValueError(f"controller inputs {config.inputs} need info[{missing[0]!r}], which this env does "
                             "not give")
        extra = sum(info_dims[key] for key in INFO_INPUTS.get(config.inputs, ()))
        return cls(config, feature_dim + extra, action_low, action_high)

    def sizes(self) -> dict:
        """The sizes V, M and the env fixed (stored beside the config in a checkpoint)."""
        return {"in_dim": self.in_dim, "action_low": self.low.tolist(), "action_high": self.high.tolist()}

    @property
    def info_keys(self) -> tuple[str, ...]:
        """The env info entries C reads besides z and h (empty for z_h)."""
        return INFO_INPUTS[self.inputs]

    def info_vector(self, info: dict) -> torch.Tensor | None:
        """(1, E) float32 concatenation of info[key] for `info_keys`, or None for z_h."""
        if not self.info_keys:
            return None
        return torch.from_numpy(np.concatenate([np.asarray(info[k], dtype=np.float32) for k in self.info_keys]))[None]

    @property
    def num_params(self) -> int:
        """A * (in_dim + 1): the length of C's flat parameter vector."""
        return self.action_dim * (self.in_dim + 1)

    def set_params(self, flat) -> None:
        """flat float (num_params,) (numpy or torch), laid out as `split_params` reads it."""
        flat = torch.as_tensor(np.asarray(flat, dtype=np.float32).ravel())
        split_params(flat, self.action_dim, self.in_dim)  # raises on a wrong size
        self.params = flat.clone()

    def get_params(self) -> np.ndarray:
        """A copy of C's flat parameters, float32 (num_params,), W row-major then b."""
        return self.params.numpy().copy()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """{"params": float32 (num_params,)}: what a checkpoint stores (models.checkpoint_dict)."""
        return {"params": self.params.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Set the parameters of a `state_dict`. Raises ValueError on a vector of the wrong size."""
        self.set_params(state["params"])

    def eval(self) -> "LinearController":
        """No-op (C has no training mode); lets checkpoint loading treat every model alike."""
        return self

    def __call__(self, features: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """M's features (B, F) ([z, h] for the MDN-RNN) and, for inputs beyond z_h, extra (B, E) = `info_vector`,
        float32 -> action (B, A)."""
        x = features if extra is None else torch.cat([features, extra.to(features.dtype)], dim=-1)  # (B, in_dim)
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"controller ({self.inputs}) takes {self.in_dim} inputs, got {x.shape[-1]}")
        w, b = split_params(self.params, self.action_dim, self.in_dim)
        return squash_to_bounds(x @ w.T + b, self.low, self.high)
