#!/usr/bin/env python
"""Training speed of each M kind and of the actor-critic's imagination on each, on the same latents.

    python benchmarks/memory_speed.py [--episodes 2] [--threads 2] [--blocks 5] [--steps 3]

Data: `--episodes` CarRacing-v3 episodes of stage 01's brownian policy encoded by a conv VAE (z 32;
benchmarks/training_speed.py's recorder). Sizes: configs/carracing_vae.yaml's memory section (hidden 256,
32 windows of 32 steps) with each kind's defaults (configs/blocks/rssm.yaml: a Gaussian s of 32; the TSSM:
2 blocks, 4 heads, context 32), and configs/blocks/actor_critic.yaml's controller (16 windows x 33 start
states, horizon 15: 7,920 imagined steps per update).

Prints, per M kind, in one process on `--threads` torch threads (median over `--blocks` blocks of `--steps`):
M's training updates/s (stage 04's memory_update), and the actor-critic's imagination updates/s and imagined
steps/s with gradients (models.actor_critic.imagination_update, M frozen).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from training_speed import record_data, time_rows  # noqa: E402  (benchmarks/ is the script's folder)

from models import MEMORY_KINDS  # noqa: E402
from models.actor_critic import ActorCritic, filtered_states, imagination_update  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.data import LatentWindows  # noqa: E402
from utils.training import build_model, make_adam, memory_update  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=0, help="steps per recorded episode (0: 1000)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    configs = os.path.join(ROOT, "configs")
    with tempfile.TemporaryDirectory() as tmp:
        _, latents = record_data(tmp, args.episodes, args.max_steps)
        torch.set_num_threads(args.threads)
        rows, imagined = {}, {}
        for kind in MEMORY_KINDS:
            cfg = load_config([os.path.join(configs, "carracing_vae.yaml"), os.path.join(configs, "blocks", "rssm.yaml"),
                               os.path.join(configs, "blocks", "actor_critic.yaml")], [f"memory.kind={kind}"])
            mc, cc = cfg.memory, cfg.controller
            data = LatentWindows(latents, mc.seq_len)
            torch.manual_seed(0)
            memory = build_model("memory", kind, mc.model_config(), z_dim=32, action_dim=3)
            opt = make_adam(memory, mc.lr)
            rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
            pairs = data.windows(rng)

            def update(memory=memory, opt=opt, data=data, pairs=pairs, rng=rng, gen=gen, cfg=cfg) -> None:
                picked = [pairs[i] for i in rng.choice(len(pairs), size=cfg.memory.batch_size)]
                memory_update(memory, opt, data, picked, cfg, gen)

            frozen = build_model("memory", kind, mc.model_config(), z_dim=32, action_dim=3).eval().requires_grad_(False)
            ac = ActorCritic.for_world_model(cc.model_config(), frozen.feature_dim, [-1, 0, 0], [1, 1, 1])
            ac_opts = (torch.optim.Adam(ac.actor.parameters()), torch.optim.Adam(ac.critic.parameters()))

            def imagination(frozen=frozen, ac=ac, ac_opts=ac_opts, data=data, pairs=pairs, rng=rng, cc=cc) -> None:
                picked = [pairs[i] for i in rng.choice(len(pairs), size=cc.batch_windows)]
                b = {k: torch.from_numpy(v) for k, v in data.batch(picked).items()}
                imagination_update(frozen, ac, *ac_opts, filtered_states(frozen, b["mu"], b["actions"]))

            rows[f"{kind} M update"] = update
            rows[f"{kind} imagination"] = imagination
            imagined[kind] = cc.batch_windows * (mc.seq_len + 1) * cc.actor_critic.horizon
        ms = time_rows(rows, args.blocks, args.steps)
    print(f"\ntorch threads {args.threads}; M: 32 windows x 32 steps per update; actor-critic: "
          f"{next(iter(imagined.values()))} imagined steps (with gradients) per update")
    print(f"{'M kind':8s}{'M update ms':>14s}{'updates/s':>11s}{'imagination ms':>16s}{'updates/s':>11s}"
          f"{'imagined steps/s':>18s}")
    for kind in MEMORY_KINDS:
        m, i = ms[f"{kind} M update"], ms[f"{kind} imagination"]
        print(f"{kind:8s}{m:14.1f}{1000 / m:11.2f}{i:16.1f}{1000 / i:11.2f}{imagined[kind] * 1000 / i:18.0f}")


if __name__ == "__main__":
    main()
