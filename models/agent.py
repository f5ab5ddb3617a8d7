"""The V-M-C agent of World Models acting in a real env, one frame at a time (Ha & Schmidhuber 2018, fig. 8).

A frame's path from the env to an action, all in models/:

    frame uint8 (S, S, 3), V-ready (utils.envs.make_env resizes it)
    -> likelihood.frames_to_tensor          float32 (1, 3, S, S) in [0, 1]
    -> V.encode (vae.py / nvae.py)          z = mu (1, z_dim), the posterior mean
    -> M.observe(state, z)                  M's state holds z_t (mdnrnn.py: [z_t, h_t]; rssm.py: [h_t, s_t])
    -> C(M.features(state) (+ info inputs, V.positions(z))) (controller.py)   action float32 (1, A) in bounds
    -> M.transition(state, action)          the state for the next frame

On PandaReach, C may also read info["proprio"] (the 7 joint angles), V's
position heads on z (goal minus gripper; the gripper from V's joint kinematics
on the joint angles for offset_kinematics_proprio) and, as an upper bound, the
goal from the state (controller.inputs).
"""

from __future__ import annotations

import numpy as np
import torch

from models.controller import perturb_in_bounds
from models.likelihood import frames_to_tensor


class Agent:
    """V, M and C acting together (no gradients), for any V kind and any M kind.

    Args:
        vision: a trained V (encode: float32 (B, 3, S, S) -> mu, logvar (B, z_dim)).
        memory: a trained M with the interface of models/__init__.py (initial_state, observe, features,
            transition).
        controller: C (features, extra) -> action (B, A) in the env's bounds; `extra_inputs(info, positions)`
            gives extra, positions being V.positions(z) when C `reads_positions`.
    """

    def __init__(self, vision, memory, controller):
        self.vision, self.memory, self.controller = vision, memory, controller
        self.reset()

    def reset(self) -> None:
        """Forget the episode: M's initial state."""
        self.state = self.memory.initial_state(1)

    @torch.inference_mode()
    def act(self, frame: np.ndarray, info: dict | None = None, rng: np.random.Generator | None = None,
            noise_std: float = 0.0) -> np.ndarray:
        """V-ready frame uint8 (S, S, 3) -> action float32 (A,) in bounds; advances M with the action returned.

        info: the env info of the step that gave the frame (C's extra inputs, if controller.inputs reads any).
        noise_std > 0 adds N(0, noise_std^2) exploration noise drawn from `rng` before C's tanh bound
        (models.controller.perturb_in_bounds), and M sees the action played (Ha & Schmidhuber section 5: M
        learns from what was played).
        """
        z, _ = self.vision.encode(frames_to_tensor(frame[None]))  # (1, D): the posterior mean
        self.state = self.memory.observe(self.state, z)
        positions = None
        if self.controller.reads_positions:  # (1, 2, 3), m: the goal from z; the gripper too, or from the joint angles
            joints = torch.from_numpy(np.asarray((info or {})["proprio"], dtype=np.float32))[None] \
                if self.controller.reads_joint_kinematics else None
            positions = self.vision.positions(z, joints)
        action = self.controller(self.memory.features(self.state), self.controller.extra_inputs(info or {}, positions))
        if noise_std > 0:
            action = torch.from_numpy(perturb_in_bounds(action.numpy(), self.controller.low, self.controller.high,
                                                        noise_std, rng))
        self.state = self.memory.transition(self.state, action)
        return action[0].numpy()
