#!/usr/bin/env python
"""Where a PandaReach C's failures come from: the same V, M and C with the gripper's position taken from elsewhere.

    python benchmarks/panda_gripper_source.py --config configs/panda_reach_vae_positions_2views.yaml \
        [--set run_dir=...] [--episodes 100] [--sources heads,kinematics,state]

For a C that reads the goal-minus-gripper offset (controller.inputs offset, offset_proprio or
offset_kinematics_proprio), plays the evaluation goals of 06_evaluate.py (the same env seeds) once per
gripper source, always with the goal from V's position heads (pixels):
- heads: the gripper from V's position heads on z (what offset and offset_proprio read);
- kinematics: from V's joint kinematics on the joint angles (offset_kinematics_proprio; needs a V trained with
  vision.joint_kinematics);
- state: the env's own gripper position (achieved_goal): the bound of a perfect gripper estimate.
Per source it prints the success rate, the mean return and the gripper's mean error (cm); for each failed goal,
the closest approach, the gripper's largest error and the joints' largest distance from the neutral pose (rad).
Writes <run_dir>/eval/gripper_source.json. A diagnostic, not a score: C keeps the parameters it was trained with.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.agent import Agent  # noqa: E402
from models.likelihood import frames_to_tensor  # noqa: E402
from utils.cli import load_stage_config, run_stage, stage_dir, stage_parser  # noqa: E402
from utils.envs import is_panda, make_env  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.evaluation import load_evaluated_agent  # noqa: E402
from utils.io import save_json  # noqa: E402
from utils.seeding import env_seed  # noqa: E402

SOURCES = ("heads", "kinematics", "state")


class GripperFrom:
    """V with its position heads' gripper replaced by another source; the goal stays the heads' (pixels).
    `info` is the env info of the frame being encoded (set by the caller before each action)."""

    def __init__(self, vision, source: str):
        self.vision, self.source, self.info = vision, source, {}

    def __getattr__(self, name):
        return getattr(self.vision, name)

    def positions(self, z: torch.Tensor, joints: torch.Tensor | None = None) -> torch.Tensor:
        goal = self.vision.positions(z)[:, 0]
        if self.source == "heads":
            gripper = self.vision.positions(z)[:, 1]
        elif self.source == "kinematics":
            q = torch.from_numpy(np.asarray(self.info["proprio"], dtype=np.float32))[None]
            gripper = self.vision.positions(z, q)[:, 1]
        else:
            gripper = torch.from_numpy(np.asarray(self.info["achieved_goal"], dtype=np.float32))[None]
        return torch.stack([goal, gripper], dim=1)


def play(env, agent: Agent, wrapped: GripperFrom, seed: int) -> dict:
    obs, info = env.reset(seed=seed)
    agent.reset()
    total, errors, distances, joints = 0.0, [], [], []
    for _ in range(env.spec.max_episode_steps or 50):
        wrapped.info = info
        with torch.no_grad():
            z, _ = wrapped.vision.encode(frames_to_tensor(obs[None]))
            errors.append(float((wrapped.positions(z)[0, 1] - torch.from_numpy(info["achieved_goal"])).norm()))
        distances.append(float(np.linalg.norm(info["desired_goal"] - info["achieved_goal"])))
        joints.append(float(np.abs(info["proprio_centred"]).max()))
        obs, reward, terminated, truncated, info = env.step(agent.act(obs, info))
        total += float(reward)
        if terminated or truncated:
            break
    distances.append(float(np.linalg.norm(info["desired_goal"] - info["achieved_goal"])))
    return {"seed": seed, "success": bool(info["is_success"]), "return": total, "steps": len(errors),
            "gripper_error_mean_cm": 100 * float(np.mean(errors)), "gripper_error_max_cm": 100 * max(errors),
            "closest_cm": 100 * min(distances), "joints_max_rad": max(joints)}


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[1])
    parser.add_argument("--episodes", type=int, default=100, help="evaluation goals (default 100)")
    parser.add_argument("--sources", default="heads,state", help=f"comma-separated, of {', '.join(SOURCES)}")
    args = parser.parse_args(argv)
    cfg = load_stage_config(args)
    sources = args.sources.split(",")
    if not set(sources) <= set(SOURCES) or not sources:
        raise UserError(f"--sources: expected a comma-separated subset of {', '.join(SOURCES)}, got {args.sources!r}")
    if not is_panda(cfg.env.id):
        raise UserError(f"env.id: {cfg.env.id} is not PandaReach; this benchmark swaps the gripper's position")
    paths = {k: os.path.join(stage_dir(cfg, k), name) for k, name in
             (("vision", "best.pt"), ("mdnrnn", "best.pt"), ("controller", "controller.pt"))}
    vision, memory, controller, _ = load_evaluated_agent(cfg, paths["vision"], paths["mdnrnn"], paths["controller"])
    if not controller.reads_positions:
        raise UserError(f"{paths['controller']}: C reads {controller.inputs}, not V's goal-minus-gripper offset")
    if "kinematics" in sources and getattr(vision, "joint_kinematics", None) is None:
        raise UserError(f"{paths['vision']}: --sources kinematics needs a V trained with vision.joint_kinematics: true")
    torch.set_num_threads(1)
    env = make_env(cfg.env)
    seeds = [env_seed(cfg.seed, "evaluate", i) for i in range(args.episodes)]
    report = {"run_dir": cfg.run_dir, "inputs": controller.inputs, "episodes": args.episodes}
    for source in sources:
        start = time.perf_counter()
        wrapped = GripperFrom(vision, source)
        agent = Agent(wrapped, memory, controller)
        results = [play(env, agent, wrapped, s) for s in tqdm(seeds, desc=source, disable=None)]
        returns = np.array([r["return"] for r in results])
        rate = float(np.mean([r["success"] for r in results]))
        error = float(np.mean([r["gripper_error_mean_cm"] for r in results]))
        print(f"gripper from {source}: success {100 * rate:.0f} %, return {returns.mean():.1f} +- {returns.std():.1f}, "
              f"gripper error {error:.2f} cm (mean over steps and goals), {time.perf_counter() - start:.0f} s")
        for r in results:
            if not r["success"]:
                print(f"  failed goal seed {r['seed']}: closest {r['closest_cm']:.1f} cm, gripper error up to "
                      f"{r['gripper_error_max_cm']:.1f} cm, joints up to {r['joints_max_rad']:.2f} rad from neutral")
        report[source] = {"success_rate": rate, "mean": float(returns.mean()), "std": float(returns.std()),
                          "gripper_error_cm": error, "episodes": results}
    env.close()
    out = os.path.join(stage_dir(cfg, "eval"), "gripper_source.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    save_json(out, report)
    print(f"wrote {out}")


if __name__ == "__main__":
    run_stage(main)
