"""Shipped agents: V, M and C of a trained run in one small file that anyone can play (06 --agent).

    06_evaluate.py --config CFG --ship agents/carracing_vae     # pack the run's agent, then score the packed one
    06_evaluate.py --agent agents/carracing_vae/agent.pt --set evaluate.episodes=100 run_dir=runs/shipped

`agent.pt` holds {kind: "agent", format, vision, memory, controller, config}: three checkpoint dicts (kind,
config, sizes, state_dict) with floating-point weights in half precision, and the resolved config of the run
they were trained in. Tensors and plain types only: it loads with `torch.load(weights_only=True)`, like every
checkpoint here. C carries the parameters 06 evaluated (evaluate.params: best or mean).

`unpack_agent` writes the three back as float32 checkpoints into a run folder (vision/best.pt, mdnrnn/best.pt,
controller/controller.pt), so stage 06 plays a shipped agent exactly as it plays a trained run. The score a
shipped agent is quoted at is the score of the half-precision agent, measured by `--ship` after packing.
"""

from __future__ import annotations

import os

import torch

from models import from_checkpoint_dict
from utils.checkpoints import read_checkpoint
from utils.errors import UserError
from utils.io import save_torch

FORMAT = "world-models-agent/1"
PARTS = {"vision": ("vision", "best.pt"), "memory": ("mdnrnn", "best.pt"), "controller": ("controller", "controller.pt")}


def _model_part(ckpt: dict, dtype: torch.dtype) -> dict:
    """kind, config, sizes and state_dict (floating tensors cast to `dtype`) of a checkpoint dict."""
    weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    return {"kind": ckpt["kind"], "config": ckpt["config"], "sizes": ckpt["sizes"], "state_dict": weights}


def pack_agent(vision_path: str, mdnrnn_path: str, controller, controller_ckpt: dict, config: dict) -> dict:
    """The shipped agent of a run: V and M from their checkpoints, C from the evaluated `controller` (its
    parameters as 06 played them), all floating weights in float16, and the run's resolved `config`.

    Raises:
        UserError: a weight that float16 cannot hold.
    """
    unit = _unit(controller.kind)
    c = _model_part({**controller_ckpt, "state_dict": controller.state_dict()}, torch.float16)
    c |= {"best": controller_ckpt.get("best"), unit: controller_ckpt.get(unit, 0)}  # where training picked it
    agent = {"kind": "agent", "format": FORMAT, "config": config,
             "vision": _model_part(read_checkpoint(vision_path), torch.float16),
             "memory": _model_part(read_checkpoint(mdnrnn_path), torch.float16), "controller": c}
    for part in PARTS:  # a weight beyond float16's range (65504) would ship as inf
        bad = [k for k, v in agent[part]["state_dict"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise UserError(f"cannot ship: {part} weight {bad[0]} does not fit in float16 (|w| > 65504)")
    return agent


def _unit(kind: str) -> str:
    return "update" if kind == "actor_critic" else "generation"


def save_agent(path: str, agent: dict) -> None:
    """Write a packed agent atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_torch(path, agent)


def read_agent(path: str) -> dict:
    """A shipped agent read without running code.

    Raises:
        UserError: not a readable checkpoint, or not a shipped agent of this format.
    """
    agent = read_checkpoint(path)
    if agent.get("kind") != "agent" or agent.get("format") != FORMAT or not all(p in agent for p in PARTS):
        raise UserError(f"{path}: not a shipped agent ({FORMAT}: vision, memory and controller)")
    return agent


def unpack_agent(agent: dict, run_dir: str) -> dict[str, str]:
    """Write the agent's V, M and C as float32 checkpoints under run_dir; returns their paths by 06's names
    (vision, mdnrnn, controller). C's checkpoint names the unpacked V and M as its inputs."""
    paths = {}
    for part, (folder, name) in PARTS.items():
        path = os.path.join(run_dir, folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        paths["mdnrnn" if part == "memory" else part] = path
    for part, (folder, name) in PARTS.items():
        ckpt = _model_part(agent[part], torch.float32)
        if part == "controller":  # the extras 06 and 01 read from a trained C's checkpoint
            try:
                params = from_checkpoint_dict(ckpt, "controller").get_params()
            except ValueError as exc:
                raise UserError(f"shipped agent: {exc}") from None
            unit = _unit(ckpt["kind"])
            ckpt |= {"params_mean": torch.from_numpy(params), "best": agent[part].get("best"),
                     unit: agent[part].get(unit, 0), "inputs": {k: os.path.abspath(paths[k]) for k in ("vision", "mdnrnn")}}
        save_torch(os.path.join(run_dir, folder, name), ckpt)
    return paths
