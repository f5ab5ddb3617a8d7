"""Real environments whose observations are V-ready frames.

`make_env` builds the env of the config as a chain of gymnasium wrappers, so
every consumer (the episode loop of stages 01, 05, 06 and the benchmarks, the
agent) receives uint8 (S, S, 3) frames with S = env.frame_size:

- CarRacing-v3: the env's own (96, 96, 3) observation, optionally without the
  12-row dashboard at the bottom (Ha & Schmidhuber crop it; it shows speed,
  which a controller can use, so we keep it by default).
- PandaReach (panda-gym, e.g. PandaReachJoints-v3, or the project's
  PandaReachMarkerJoints-v3 of utils/panda_tasks.py, whose goal marker radius
  and shadows the config sets): `PandaPixels` replaces the state dict by
  `env.render()` from the camera of the env config (84x84 as in the thesis)
  and moves the joint angles (`proprio`) and `desired_goal` into `info`.

`PreprocessFrame` then resizes the frame to V's input, uint8 (S, S, 3)
(`preprocess_frame`, bilinear).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from PIL import Image

from utils.config import EnvConfig
from utils.errors import UserError

CARRACING_DASHBOARD_ROWS = 12
PANDA_JOINTS = 7  # the Panda arm's joints: proprio is their angles (rad)


def is_panda(env_id: str) -> bool:
    """True for panda-gym env ids (PandaReachJoints-v3, ...), which are seen through `PandaPixels`."""
    return env_id.startswith("Panda")


def info_input_dims(env_cfg: EnvConfig) -> dict[str, int]:
    """Sizes of the info entries the env gives that a controller may read (controller.inputs)."""
    if not is_panda(env_cfg.id):
        return {}
    return {"proprio": PANDA_JOINTS, "proprio_centred": PANDA_JOINTS, "desired_goal": 3, "achieved_goal": 3}


def make_env(env_cfg: EnvConfig, render_mode: str | None = None, pixels: bool = True):
    """Create the real env named by `env_cfg.id`; its observations are V-ready uint8 (S, S, 3) frames,
    S = env_cfg.frame_size.

    pixels=False leaves a PandaReach env with its state dict and no rendering (about 60x faster:
    for policies that do not look, such as the random baseline).

    Raises:
        UserError: the id is not a registered gymnasium (or panda-gym) env, panda-gym is not installed, or
            env.goal_radius / env.render_shadows / env.views changed for one of panda-gym's own ids, or an odd
            env.render_size with env.views: 2.
    """
    kwargs = {"max_episode_steps": env_cfg.max_episode_steps}
    if is_panda(env_cfg.id):
        try:
            import panda_gym  # noqa: F401 - registers the Panda envs with gymnasium
        except ImportError as exc:
            raise UserError(f"env.id: {env_cfg.id} needs panda-gym ({exc}); install requirements.txt") from None

        from utils.panda_tasks import MARKER_ENV_IDS, PANDA_GYM_GOAL_RADIUS, register_marker_envs

        if env_cfg.id in MARKER_ENV_IDS:
            register_marker_envs()
            kwargs |= {"goal_radius": env_cfg.goal_radius, "shadows": env_cfg.render_shadows}
            if env_cfg.views == 2:
                if env_cfg.render_size % 2:
                    raise UserError(f"env.render_size: two views share the frame's width, so it must be even; got "
                                    f"{env_cfg.render_size}")
                kwargs["second_view"] = (env_cfg.view2_distance, env_cfg.view2_yaw, env_cfg.view2_pitch)
        else:
            changed = [key for key, differs in (("env.goal_radius", env_cfg.goal_radius != PANDA_GYM_GOAL_RADIUS),
                                                ("env.render_shadows", not env_cfg.render_shadows),
                                                ("env.views", env_cfg.views != 1)) if differs]
            if changed:
                raise UserError(f"{changed[0]}: panda-gym's {env_cfg.id} draws one view of a goal of radius "
                                f"{PANDA_GYM_GOAL_RADIUS} m with shadows; use the project's ids "
                                f"({', '.join(MARKER_ENV_IDS)}) to change it")
        kwargs |= {
            "render_width": env_cfg.render_size, "render_height": env_cfg.render_size,
            "render_distance": env_cfg.camera_distance, "render_yaw": env_cfg.camera_yaw,
            "render_pitch": env_cfg.camera_pitch,
            "render_target_position": np.array([env_cfg.camera_target_x, env_cfg.camera_target_y,
                                                env_cfg.camera_target_z]),
            "disable_env_checker": True,  # it only warns about panda-gym's unbounded state spaces, which we replace
        }
    else:
        kwargs["render_mode"] = render_mode
    try:
        env = gym.make(env_cfg.id, **kwargs)
    except gym.error.Error as exc:
        raise UserError(f"env.id: cannot make {env_cfg.id!r} ({exc})") from None
    if not pixels:
        return env
    if is_panda(env_cfg.id):
        env = PandaPixels(env)
    if not isinstance(env.observation_space, gym.spaces.Box) or len(env.observation_space.shape) != 3:
        env.close()
        raise UserError(f"env.id: {env_cfg.id} does not give image observations (H, W, 3); World Models needs "
                        "frames")
    return PreprocessFrame(env, env_cfg)


def check_env(env_cfg: EnvConfig) -> None:
    """Make and close the env once, so that a bad env.id stops a stage before any worker starts.

    Raises:
        UserError: see make_env.
    """
    make_env(env_cfg, pixels=False).close()


def camera_axes(env_cfg: EnvConfig) -> np.ndarray:
    """PandaReach: float64 (3, 3) whose rows are the first camera's right, up and backward unit vectors in the world
    frame (pybullet's view matrix for env.camera_*), so `axes @ v` gives a world vector v (m) in camera
    coordinates: across the image (right, up) and along the camera's axis (depth, towards the camera).

    Follows pybullet's computeViewMatrixFromYawPitchRoll (an OpenGL look-at matrix), the call panda-gym's render
    makes; raises nothing for finite angles."""
    import pybullet  # panda-gym's simulator; computing a view matrix needs no physics client

    view = pybullet.computeViewMatrixFromYawPitchRoll(
        cameraTargetPosition=[env_cfg.camera_target_x, env_cfg.camera_target_y, env_cfg.camera_target_z],
        distance=env_cfg.camera_distance, yaw=env_cfg.camera_yaw, pitch=env_cfg.camera_pitch, roll=0, upAxisIndex=2)
    return np.asarray(view, dtype=np.float64).reshape(4, 4).T[:3, :3]  # OpenGL's column-major order


def goal_marker_mask(frames: np.ndarray) -> np.ndarray:
    """uint8 (..., H, W, 3) frames -> bool (..., H, W): the pixels of panda-gym's green goal sphere.

    TinyRenderer draws it opaque at RGB about (17, 155, 17); this test matched the
    true marker pixels in 120 of 120 frames (docs/notes/panda_gym.md).
    """
    r, g, b = (frames[..., i].astype(np.int16) for i in range(3))
    return (g > 100) & (g - r > 40) & (g - b > 40)


class PandaPixels(gym.Wrapper):
    """A panda-gym env seen from pixels: the observation is `env.render()`, uint8 (R, R, 3).

    `info` of reset and step gains `proprio`, float32 (7,), the joint angles in
    rad, `proprio_centred`, float32 (7,), the same minus the arm's neutral pose
    (panda-gym's `neutral_joint_values`, where every episode starts), rad,
    `desired_goal`, float32 (3,), the goal position in m, and `achieved_goal`,
    float32 (3,), the end effector's position in m, all of the state the
    returned frame shows (desired_goal and achieved_goal: labels for V's
    position heads, and C's upper-bound inputs, never its pixel inputs). `info["is_success"]` (the end effector
    within 0.05 m of the goal) comes from panda-gym's step, which also
    terminates the episode on success.
    """

    def __init__(self, env):
        super().__init__(env)
        base = env.unwrapped
        self.observation_space = gym.spaces.Box(0, 255, (base.render_height, base.render_width, 3), np.uint8)

    def _info(self, obs: dict, info: dict) -> dict:
        robot = self.env.unwrapped.robot
        proprio = np.array([robot.get_joint_angle(i) for i in range(PANDA_JOINTS)], dtype=np.float32)
        centred = proprio - np.asarray(robot.neutral_joint_values[:PANDA_JOINTS], dtype=np.float32)
        return {**info, "proprio": proprio, "proprio_centred": centred, "desired_goal": np.asarray(obs["desired_goal"], dtype=np.float32),
                "achieved_goal": np.asarray(obs["achieved_goal"], dtype=np.float32)}

    def _frame(self) -> np.ndarray:
        return np.ascontiguousarray(self.env.render()[..., :3], dtype=np.uint8)

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        return self._frame(), self._info(obs, info)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return self._frame(), reward, terminated, truncated, self._info(obs, info)


class PreprocessFrame(gym.ObservationWrapper):
    """Observations resized to V's input: uint8 (H, W, 3) -> uint8 (S, S, 3), S = env.frame_size
    (`preprocess_frame`)."""

    def __init__(self, env, env_cfg: EnvConfig):
        super().__init__(env)
        self.env_cfg = env_cfg
        size = env_cfg.frame_size
        self.observation_space = gym.spaces.Box(0, 255, (size, size, 3), np.uint8)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return preprocess_frame(observation, self.env_cfg)


def preprocess_frame(obs: np.ndarray, env_cfg: EnvConfig) -> np.ndarray:
    """uint8 (H, W, 3) env frame -> uint8 (S, S, 3) frame for V (bilinear resize)."""
    if env_cfg.crop_dashboard and env_cfg.id.startswith("CarRacing"):
        obs = obs[:-CARRACING_DASHBOARD_ROWS]
    size = env_cfg.frame_size
    if obs.shape[0] == size and obs.shape[1] == size:
        return np.ascontiguousarray(obs)
    return np.array(Image.fromarray(obs).resize((size, size), Image.BILINEAR))
