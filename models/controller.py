"""Linear controller C of World Models: a_t = squash(W [z_t, h_t] + b).

squash maps each output into the env's action bounds with a tanh
(utils.envs.squash_to_bounds). For CarRacing (z 32, h 256, 3 actions) this
is 3 * 288 + 3 = 867 parameters, as in Ha & Schmidhuber (2018). The
parameters are one flat float vector for CMA-ES: W row-major, then b.
"""

from __future__ import annotations

import numpy as np
import torch

from utils.envs import squash_to_bounds


class LinearController:
    """a = squash(W x + b) with x = [z, h] float32 (B, in_dim) -> a float32 (B, A) in bounds.

    Raises:
        ValueError: `set_params` with a vector of the wrong size.
    """

    kind = "controller"

    def __init__(self, in_dim: int, action_low, action_high):
        self.in_dim = int(in_dim)
        self.low = np.asarray(action_low, dtype=np.float32)
        self.high = np.asarray(action_high, dtype=np.float32)
        self.action_dim = len(self.low)
        self.weight = torch.zeros(self.action_dim, self.in_dim)
        self.bias = torch.zeros(self.action_dim)

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

    def __call__(self, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        x = torch.cat([z, h], dim=-1)  # (B, in_dim)
        return squash_to_bounds(x @ self.weight.T + self.bias, self.low, self.high)

    def hparams(self) -> dict:
        return dict(in_dim=self.in_dim, action_low=self.low.tolist(), action_high=self.high.tolist())
