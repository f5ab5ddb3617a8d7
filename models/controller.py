"""Linear controller C of World Models: a_t = squash(W [z_t, h_t] + b).

squash maps each output into the env's action bounds with a tanh
(utils.envs.squash_to_bounds). For CarRacing (z 32, h 256, 3 actions) this
is 3 * 288 + 3 = 867 parameters, as in Ha & Schmidhuber (2018). The
parameters are one flat float vector for CMA-ES: W row-major, then b.

With controller.inputs = z_h_proprio (PandaReach), C also sees the proprio
vector p_t (the 7 joint angles, rad): a_t = squash(W [z_t, h_t, p_t] + b).
"""

from __future__ import annotations

import numpy as np
import torch

from utils.envs import squash_to_bounds


INPUTS = ("z_h", "z_h_proprio")


class LinearController:
    """a = squash(W x + b) with x = [z, h] (or [z, h, proprio]) float32 (B, in_dim) -> a float32 (B, A) in bounds.

    Raises:
        ValueError: `set_params` with a vector of the wrong size; a call whose inputs do not add up to in_dim;
            an unknown `inputs`.
    """

    kind = "controller"

    def __init__(self, in_dim: int, action_low, action_high, inputs: str = "z_h"):
        if inputs not in INPUTS:
            raise ValueError(f"controller inputs must be one of {INPUTS}, got {inputs!r}")
        self.in_dim, self.inputs = int(in_dim), inputs
        self.low = np.asarray(action_low, dtype=np.float32)
        self.high = np.asarray(action_high, dtype=np.float32)
        self.action_dim = len(self.low)
        self.weight = torch.zeros(self.action_dim, self.in_dim)
        self.bias = torch.zeros(self.action_dim)

    @classmethod
    def for_world_model(cls, z_dim: int, hidden: int, action_low, action_high, inputs: str = "z_h",
                        proprio_dim: int = 0) -> "LinearController":
        """The controller of a V with z_dim and an M with `hidden` units; z_h_proprio adds proprio_dim inputs.

        Raises:
            ValueError: inputs z_h_proprio with proprio_dim 0 (an env without a proprio vector).
        """
        if inputs == "z_h_proprio" and proprio_dim <= 0:
            raise ValueError("controller.inputs z_h_proprio needs an env with a proprio vector (PandaReach)")
        extra = proprio_dim if inputs == "z_h_proprio" else 0
        return cls(z_dim + hidden + extra, action_low, action_high, inputs)

    @property
    def uses_proprio(self) -> bool:
        return self.inputs == "z_h_proprio"

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

    def __call__(self, z: torch.Tensor, h: torch.Tensor, proprio: torch.Tensor | None = None) -> torch.Tensor:
        """z (B, D), h (B, H) and, for inputs z_h_proprio, proprio (B, P), all float32 -> action (B, A)."""
        parts = [z, h] if proprio is None else [z, h, proprio.to(z.dtype)]
        x = torch.cat(parts, dim=-1)  # (B, in_dim)
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"controller ({self.inputs}) takes {self.in_dim} inputs, got {x.shape[-1]}")
        return squash_to_bounds(x @ self.weight.T + self.bias, self.low, self.high)

    def hparams(self) -> dict:
        return dict(in_dim=self.in_dim, action_low=self.low.tolist(), action_high=self.high.tolist(), inputs=self.inputs)
