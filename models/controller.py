"""Linear controller C of World Models: a_t = squash(W [z_t, h_t] + b).

squash maps each output into the env's action bounds with a tanh
(utils.envs.squash_to_bounds). For CarRacing (z 32, h 256, 3 actions) this
is 3 * 288 + 3 = 867 parameters, as in Ha & Schmidhuber (2018). The
parameters are one flat float vector for CMA-ES: W row-major, then b.

With controller.inputs = z_h_proprio (PandaReach), C also sees the proprio
vector q_t (the 7 joint angles, rad): a_t = squash(W [z_t, h_t, q_t] + b).
z_h_proprio_goal adds the goal position g (3,) from the env's state as well:
not the thesis's setting (the goal should come from the pixels) but the
upper bound of what a linear C can learn on a given budget.
"""

from __future__ import annotations

import numpy as np
import torch

from utils.envs import squash_to_bounds


# controller.inputs -> the env info entries C reads besides z and h, in this order
INFO_INPUTS = {"z_h": (), "z_h_proprio": ("proprio",), "z_h_proprio_goal": ("proprio", "desired_goal")}


class LinearController:
    """a = squash(W x + b) with x = [z, h, info entries of INFO_INPUTS[inputs]] float32 (B, in_dim) -> a float32
    (B, A) in bounds.

    Raises:
        ValueError: `set_params` with a vector of the wrong size; a call whose inputs do not add up to in_dim;
            an unknown `inputs`.
    """

    kind = "controller"

    def __init__(self, in_dim: int, action_low, action_high, inputs: str = "z_h"):
        if inputs not in INFO_INPUTS:
            raise ValueError(f"controller inputs must be one of {tuple(INFO_INPUTS)}, got {inputs!r}")
        self.in_dim, self.inputs = int(in_dim), inputs
        self.low = np.asarray(action_low, dtype=np.float32)
        self.high = np.asarray(action_high, dtype=np.float32)
        self.action_dim = len(self.low)
        self.weight = torch.zeros(self.action_dim, self.in_dim)
        self.bias = torch.zeros(self.action_dim)

    @classmethod
    def for_world_model(cls, z_dim: int, hidden: int, action_low, action_high, inputs: str = "z_h",
                        info_dims: dict[str, int] | None = None) -> "LinearController":
        """The controller of a V with z_dim and an M with `hidden` units, plus the sizes `info_dims` of the env's
        info entries that `inputs` names (utils.envs.info_input_dims).

        Raises:
            ValueError: `inputs` names an entry the env does not give (e.g. proprio on CarRacing).
        """
        info_dims = info_dims or {}
        missing = [key for key in INFO_INPUTS.get(inputs, ()) if key not in info_dims]
        if missing:
            raise ValueError(f"controller inputs {inputs} need info[{missing[0]!r}], which this env does not give")
        extra = sum(info_dims[key] for key in INFO_INPUTS.get(inputs, ()))
        return cls(z_dim + hidden + extra, action_low, action_high, inputs)

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
        return self.action_dim * (self.in_dim + 1)

    def set_params(self, flat: np.ndarray) -> None:
        flat = np.asarray(flat, dtype=np.float32).ravel()
        if flat.size != self.num_params:
            raise ValueError(f"controller expects {self.num_params} parameters, got {flat.size}")
        w = flat[: self.action_dim * self.in_dim].reshape(self.action_dim, self.in_dim)
        self.weight = torch.from_numpy(w.copy())
        self.bias = torch.from_numpy(flat[self.action_dim * self.in_dim :].copy())

    def get_params(self) -> np.ndarray:
        return np.concatenate([self.weight.numpy().ravel(), self.bias.numpy()]).astype(np.float32)

    def __call__(self, z: torch.Tensor, h: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """z (B, D), h (B, H) and, for inputs beyond z_h, extra (B, E) = `info_vector`, float32 -> action (B, A)."""
        parts = [z, h] if extra is None else [z, h, extra.to(z.dtype)]
        x = torch.cat(parts, dim=-1)  # (B, in_dim)
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"controller ({self.inputs}) takes {self.in_dim} inputs, got {x.shape[-1]}")
        return squash_to_bounds(x @ self.weight.T + self.bias, self.low, self.high)

    def hparams(self) -> dict:
        return dict(in_dim=self.in_dim, action_low=self.low.tolist(), action_high=self.high.tolist(), inputs=self.inputs)
