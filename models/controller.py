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

Inputs in the units a linear C can use (PandaReach; shared/guide/panda.md: on
[q - q0, 10 (g - ee)] a linear C reaches 100 % where on [q, g] it stays near
20 %):
- offset_proprio: [(g^ - e^) / 10 cm, q - q0], with g^ and e^ V's position
  heads' goal and gripper read from z_t (pixels), q0 the arm's neutral pose;
- offset: [(g^ - e^) / 10 cm] alone (pixels only);
- offset_kinematics_proprio: [(g^ - e(q)) / 10 cm, q - q0]: the goal from V's
  heads (pixels), the gripper from V's joint kinematics e(q) (the joint
  angles; models/vae.py), so a pose the pixels were not trained on does not
  corrupt the gripper's position;
- state_offset_proprio: [(g - ee) / 10 cm, q - q0] with g and ee from the
  env's state: the upper bound of the ones above.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from models.hparams import param

POSITION_UNIT = 0.1  # m: C reads goal-minus-gripper offsets in 10 cm units


@dataclass(frozen=True)
class ControllerInputs:
    """What C reads, in this order: M's features ([z, h] for the MDN-RNN) if `features`; the goal-minus-gripper
    offset / POSITION_UNIT if `offset` is "vision" (V's position heads on z), "vision_kinematics" (the goal from
    V's heads, the gripper from V's joint kinematics on info["proprio"]) or "state" (the env info's
    desired_goal and achieved_goal); then the env info entries `info` (utils.envs.info_input_dims)."""

    features: bool
    info: tuple[str, ...] = ()
    offset: str | None = None


INPUTS = {
    "z_h": ControllerInputs(True),
    "z_h_proprio": ControllerInputs(True, ("proprio",)),
    "z_h_proprio_goal": ControllerInputs(True, ("proprio", "desired_goal")),
    "offset_proprio": ControllerInputs(False, ("proprio_centred",), "vision"),
    "offset": ControllerInputs(False, (), "vision"),
    "offset_kinematics_proprio": ControllerInputs(False, ("proprio_centred",), "vision_kinematics"),
    "state_offset_proprio": ControllerInputs(False, ("proprio_centred",), "state"),
}
OFFSET_INFO = {"vision": (), "vision_kinematics": ("proprio",), "state": ("desired_goal", "achieved_goal"),
               None: ()}  # the info an offset reads


def needed_info(inputs: str) -> tuple[str, ...]:
    """The env info entries C of `inputs` reads (its own and those of its offset)."""
    spec = INPUTS[inputs]
    return OFFSET_INFO[spec.offset] + spec.info


def input_dim(inputs: str, feature_dim: int, info_dims: dict[str, int]) -> int:
    """The size of C's input x for `inputs`, M's `feature_dim` and the env's info entry sizes.

    Raises:
        ValueError: `inputs` names an info entry the env does not give (e.g. proprio on CarRacing).
    """
    spec = INPUTS[inputs]
    missing = [key for key in needed_info(inputs) if key not in info_dims]
    if missing:
        raise ValueError(f"controller inputs {inputs} need info[{missing[0]!r}], which this env does not give")
    return feature_dim * spec.features + 3 * (spec.offset is not None) + sum(info_dims[k] for k in spec.info)


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
                        "position from the state: an upper bound, not from pixels) | offset_proprio ((goal - gripper) "
                        "/ 10 cm from V's position heads, joint angles minus the neutral pose) | offset (the offset "
                        "alone: pixels only) | offset_kinematics_proprio (as offset_proprio, the gripper from V's joint "
                        "kinematics on the joint angles) | state_offset_proprio (the offset from the state: the upper "
                        "bound)",
                        choices=tuple(INPUTS))


class LinearController:
    """a = squash(W x + b) with x = the inputs of INPUTS[inputs] (`ControllerInputs`) float32 (B, in_dim) -> a
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
        if config.inputs not in INPUTS:
            raise ValueError(f"controller inputs must be one of {tuple(INPUTS)}, got {config.inputs!r}")
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
        if config.inputs not in INPUTS:
            raise ValueError(f"controller inputs must be one of {tuple(INPUTS)}, got {config.inputs!r}")
        return cls(config, input_dim(config.inputs, feature_dim, info_dims or {}), action_low, action_high)

    def sizes(self) -> dict:
        """The sizes V, M and the env fixed (stored beside the config in a checkpoint)."""
        return {"in_dim": self.in_dim, "action_low": self.low.tolist(), "action_high": self.high.tolist()}

    @property
    def info_keys(self) -> tuple[str, ...]:
        """The env info entries C reads (empty for z_h): C acts only in a real env that gives them."""
        return needed_info(self.inputs)

    @property
    def features_only(self) -> bool:
        """True when C reads M's features and nothing else (z_h): the only C that can act in M's dream."""
        return INPUTS[self.inputs] == ControllerInputs(True)

    @property
    def reads_positions(self) -> bool:
        """True when C reads V's position heads (the agent then passes them to `extra_inputs`)."""
        return INPUTS[self.inputs].offset in ("vision", "vision_kinematics")

    @property
    def reads_joint_kinematics(self) -> bool:
        """True when the gripper C reads comes from V's joint kinematics on info["proprio"] (V.positions(z, q))."""
        return INPUTS[self.inputs].offset == "vision_kinematics"

    def extra_inputs(self, info: dict, positions: torch.Tensor | None = None) -> torch.Tensor | None:
        """C's inputs besides M's features, float32 (1, E), or None for z_h: the offset (ControllerInputs), then
        info[key] for the spec's info entries.

        info: the env info of the frame's step; positions: V.positions(z) float32 (1, 2, 3) (goal, gripper, m),
        needed when `reads_positions` (V.positions(z, q) when `reads_joint_kinematics`).
        """
        spec = INPUTS[self.inputs]
        parts = []
        if self.reads_positions:
            parts.append((positions[:, 0] - positions[:, 1]).float() / POSITION_UNIT)
        elif spec.offset == "state":
            goal, gripper = (np.asarray(info[k], dtype=np.float32) for k in ("desired_goal", "achieved_goal"))
            parts.append(torch.from_numpy((goal - gripper) / POSITION_UNIT)[None])
        parts += [torch.from_numpy(np.asarray(info[k], dtype=np.float32))[None] for k in spec.info]
        return torch.cat(parts, dim=-1) if parts else None

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
        """M's features (B, F) ([z, h] for the MDN-RNN; ignored by inputs that do not read them) and, for inputs
        beyond z_h, extra (B, E) = `extra_inputs`, float32 -> action (B, A)."""
        parts = ([features] if INPUTS[self.inputs].features else []) + ([] if extra is None else [extra.to(features.dtype)])
        x = torch.cat(parts, dim=-1)  # (B, in_dim)
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"controller ({self.inputs}) takes {self.in_dim} inputs, got {x.shape[-1]}")
        w, b = split_params(self.params, self.action_dim, self.in_dim)
        return squash_to_bounds(x @ w.T + b, self.low, self.high)
