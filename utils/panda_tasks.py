"""The project's PandaReach variant: panda-gym's Reach task with a goal marker of a chosen radius, rendered with
or without shadows, registered with gymnasium under ids of its own (panda-gym itself is not patched).

Why: panda-gym draws the goal as a ghost sphere of radius 0.02 m, about 6 pixels of a 64x64 frame from the
project's camera, so V's reconstructions drop it (shared/guide/panda.md). The sphere is visual only: a larger
one changes nothing of the task. Radius 0.05 m equals the success threshold.

    PandaReachMarker-v3, PandaReachMarkerDense-v3             end-effector control
    PandaReachMarkerJoints-v3, PandaReachMarkerJointsDense-v3 joint control (the thesis's setting)

Each takes panda-gym's PandaReachEnv arguments (reward, control, camera) plus `goal_radius` (m, > 0; 0.02 gives
panda-gym's scene), `shadows` (bool; panda-gym's render always draws them, and rendering without is
about twice as fast) and `second_view` (a second camera, its image tiled beside the first: depth, which one
view leaves ambiguous). Task, success test (5 cm), reward and the 50-step limit are panda-gym's own
(`panda_gym.envs.tasks.reach.Reach`, whose only change here is the radius of the marker it creates).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pybullet
from panda_gym.envs.core import RobotTaskEnv
from panda_gym.envs.robots.panda import Panda
from panda_gym.envs.tasks.reach import Reach
from panda_gym.pybullet import PyBullet

PANDA_GYM_GOAL_RADIUS = 0.02  # m: the marker panda-gym's Reach creates
MARKER_ENV_IDS = ("PandaReachMarker-v3", "PandaReachMarkerDense-v3", "PandaReachMarkerJoints-v3",
                  "PandaReachMarkerJointsDense-v3")


class MarkerReach(Reach):
    """panda-gym's Reach whose goal marker (a ghost sphere, never collided with) has radius `goal_radius` m."""

    def __init__(self, sim, get_ee_position, goal_radius: float = PANDA_GYM_GOAL_RADIUS, **kwargs):
        self.goal_radius = float(goal_radius)  # read by _create_scene, which Reach.__init__ calls
        super().__init__(sim, get_ee_position, **kwargs)

    def _create_scene(self) -> None:
        """Reach's scene (plane, table, target), the target of radius goal_radius; tests check that radius 0.02
        renders panda-gym's frames pixel for pixel."""
        self.sim.create_plane(z_offset=-0.4)
        self.sim.create_table(length=1.1, width=0.7, height=0.4, x_offset=-0.3)
        self.sim.create_sphere(body_name="target", radius=self.goal_radius, mass=0.0, ghost=True,
                               position=np.zeros(3), rgba_color=np.array([0.1, 0.9, 0.1, 0.3]))


class PandaReachMarkerEnv(RobotTaskEnv):
    """PandaReachEnv (panda_gym.envs.panda_tasks) with `MarkerReach`, an optional shadow-free render and an
    optional second camera.

    Args: those of panda-gym's PandaReachEnv, plus goal_radius (m, > 0), shadows (bool) and second_view
    ((distance m, yaw deg, pitch deg) of a second camera aimed at render_target_position, or None). With a second
    view, `render` tiles the two views side by side into one (render_height, render_width) frame: each is a
    camera image render_width // 2 wide, the middle of what that camera sees at the scale of a full-width image.

    Raises:
        ValueError: goal_radius <= 0, or a second view with an odd render_width.
    """

    def __init__(self, render_mode: str = "rgb_array", reward_type: str = "sparse", control_type: str = "ee",
                 renderer: str = "Tiny", render_width: int = 720, render_height: int = 480,
                 render_target_position: np.ndarray | None = None, render_distance: float = 1.4,
                 render_yaw: float = 45, render_pitch: float = -30, render_roll: float = 0,
                 goal_radius: float = PANDA_GYM_GOAL_RADIUS, shadows: bool = True,
                 second_view: tuple[float, float, float] | None = None) -> None:
        if not goal_radius > 0:
            raise ValueError(f"goal_radius must be > 0 m, got {goal_radius}")
        if second_view is not None and render_width % 2:
            raise ValueError(f"two views tile render_width, which must be even; got {render_width}")
        sim = PyBullet(render_mode=render_mode, renderer=renderer)
        robot = Panda(sim, block_gripper=True, base_position=np.array([-0.6, 0.0, 0.0]), control_type=control_type)
        task = MarkerReach(sim, reward_type=reward_type, get_ee_position=robot.get_ee_position,
                           goal_radius=goal_radius)
        super().__init__(robot, task, render_width=render_width, render_height=render_height,
                         render_target_position=render_target_position, render_distance=render_distance,
                         render_yaw=render_yaw, render_pitch=render_pitch, render_roll=render_roll)
        self.shadows = bool(shadows)
        self.cameras = [(self.render_distance, self.render_yaw, self.render_pitch)]  # (m, deg, deg)
        if second_view is not None:
            self.cameras.append(tuple(float(v) for v in second_view))

    def camera_images(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per camera of `cameras`: (uint8 (render_height, W, 3) RGB, int32 (render_height, W) segmentation: the
        pybullet body id seen at each pixel, -1 for none), W = render_width // len(cameras). panda-gym's lens
        (60 degrees vertical field of view), its renderer, shadows only if `shadows`."""
        client, width = self.sim.physics_client, self.render_width // len(self.cameras)
        projection = client.computeProjectionMatrixFOV(fov=60, aspect=width / self.render_height,
                                                       nearVal=0.1, farVal=100.0)  # panda-gym's lens
        images = []
        for distance, yaw, pitch in self.cameras:
            view = client.computeViewMatrixFromYawPitchRoll(
                cameraTargetPosition=self.render_target_position, distance=distance, yaw=yaw, pitch=pitch,
                roll=self.render_roll, upAxisIndex=2)
            _, _, rgba, _, seg = client.getCameraImage(width=width, height=self.render_height, viewMatrix=view,
                                                       projectionMatrix=projection, shadow=self.shadows,
                                                       renderer=pybullet.ER_BULLET_HARDWARE_OPENGL)
            rgb = np.asarray(rgba, dtype=np.uint8).reshape(self.render_height, width, 4)[..., :3]
            images.append((rgb, np.asarray(seg, dtype=np.int32).reshape(self.render_height, width)))
        return images

    def render(self) -> np.ndarray | None:
        """uint8 (render_height, render_width, 3): panda-gym's camera (its own render when one view with
        shadows), or the views of `camera_images` side by side."""
        if (self.shadows and len(self.cameras) == 1) or self.sim.render_mode != "rgb_array":
            return super().render()
        return np.concatenate([rgb for rgb, _ in self.camera_images()], axis=1)


def register_marker_envs() -> None:
    """Register MARKER_ENV_IDS with gymnasium (once per process), with panda-gym's step limit (50)."""
    for env_id in MARKER_ENV_IDS:
        if env_id in gym.registry:
            continue
        gym.register(id=env_id, entry_point=PandaReachMarkerEnv, max_episode_steps=50,
                     kwargs={"reward_type": "dense" if "Dense" in env_id else "sparse",
                             "control_type": "joints" if "Joints" in env_id else "ee"})
