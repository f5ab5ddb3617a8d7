#!/usr/bin/env python
"""How well M's reward and done heads match held-out real episodes (the dream's reward and termination).

    python benchmarks/check_mdnrnn_heads.py --config configs/carracing_vae.yaml [--mdnrnn PATH]

Runs M (<run_dir>/mdnrnn/best.pt) over each held-out latent episode of stage 04's
split (z = the posterior mean of every frame, the real actions) and prints, over all
held-out steps: the Pearson correlation and MSE of predicted against real reward, and
the precision and recall of done (sigmoid(done logit) > 0.5, as in the dream)
against the real `terminated` flag, with the counts they come from. Under
memory.reward_smoothing > 0 it also prints the reward's correlation with the
smoothed rewards, the head's training target. With --open-loop K (an MDN-RNN) it
also prints M's held-out losses on its own dream over K steps (models.mdnrnn.open_loop_terms,
windows of memory.seq_len steps) beside the teacher-forced ones on the same windows.
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.mdnrnn import smoothed_rewards  # noqa: E402
from utils.checkpoints import load_model  # noqa: E402
from utils.cli import load_stage_config, run_stage, stage_dir, stage_parser  # noqa: E402
from utils.data import LATENT_KEYS, LatentWindows, split_episodes  # noqa: E402
from utils.evaluation import head_metrics, head_predictions  # noqa: E402
from utils.io import list_episodes, load_episode  # noqa: E402
from utils.training import check_memory_options, memory_terms  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--mdnrnn", help="M's checkpoint, any memory kind (default: <run_dir>/mdnrnn/best.pt)")
    parser.add_argument("--open-loop", type=int, default=0, metavar="K",
                        help="also M's held-out losses on its own dream over K steps (2 <= K < memory.seq_len)")
    args = parser.parse_args(argv)
    cfg = load_stage_config(args)
    if args.open_loop:
        cfg.memory.open_loop_horizon = args.open_loop
        check_memory_options(cfg)
    mdnrnn, _ = load_model(args.mdnrnn or os.path.join(stage_dir(cfg, "mdnrnn"), "best.pt"), "memory")
    _, held = split_episodes(list_episodes(stage_dir(cfg, "latents"), "latents"), cfg.memory.holdout_fraction, cfg.seed)
    columns = {"pred_reward": [], "real_reward": [], "done_prob": [], "real_done": []}
    smoothed = []
    for path in held:
        episode = load_episode(path, LATENT_KEYS)
        reward, done = head_predictions(mdnrnn, episode)
        for key, value in zip(columns, (reward, episode["rewards"], done, episode["terminated"])):
            columns[key].append(value)
        smoothed.append(smoothed_rewards(episode["rewards"], cfg.memory.reward_smoothing))
    m = head_metrics(*(np.concatenate(v) for v in columns.values()))
    fmt = lambda v: "undefined" if v is None else f"{v:.3f}"  # noqa: E731
    print(f"M's heads on {len(held)} held-out episodes ({m['steps']} steps) of {stage_dir(cfg, 'latents')}")
    print(f"reward: Pearson r {m['reward_corr']:.3f}, MSE {m['reward_mse']:.4f}")
    if cfg.memory.reward_smoothing:
        r = np.corrcoef(np.concatenate(columns["pred_reward"]), np.concatenate(smoothed))[0, 1]
        print(f"reward against the rewards smoothed by sigma {cfg.memory.reward_smoothing:g} (the head's target): "
              f"Pearson r {r:.3f}")
    print(f"done:   precision {fmt(m['done_precision'])} ({m['done_predicted']} predicted), "
          f"recall {fmt(m['done_recall'])} ({m['done_real']} real terminal steps)")
    if args.open_loop:
        t = memory_terms(mdnrnn, LatentWindows(held, cfg.memory.seq_len, cfg.memory.reward_smoothing), cfg)
        print(f"windows of {cfg.memory.seq_len} steps, z drawn from the posteriors: teacher-forced nll {t['nll']:.4f} "
              f"nats/dim, reward mse {t['reward_mse']:.4f}; open loop over {args.open_loop} steps (M reads its own "
              f"z): nll {t['open_loop_nll']:.4f}, reward mse {t['open_loop_reward_mse']:.4f}")


if __name__ == "__main__":
    run_stage(main)
