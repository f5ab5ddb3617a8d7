#!/usr/bin/env python
"""How well M's reward and done heads match held-out real episodes (the dream's reward and termination).

    python benchmarks/check_mdnrnn_heads.py --config configs/carracing_vae.yaml [--mdnrnn PATH]

Runs M (<run_dir>/mdnrnn/best.pt) over each held-out latent episode of stage 04's
split (z = the posterior mean of every frame, the real actions) and prints, over all
held-out steps: the Pearson correlation and MSE of predicted against real reward, and
the precision and recall of done (sigmoid(done logit) > 0.5, as in the dream)
against the real `terminated` flag, with the counts they come from.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.dream import DONE_THRESHOLD  # noqa: E402
from utils.checkpoints import load_model  # noqa: E402
from utils.cli import load_stage_config, run_stage, stage_dir, stage_parser  # noqa: E402
from utils.data import LATENT_KEYS, split_episodes  # noqa: E402
from utils.io import list_episodes, load_episode  # noqa: E402


@torch.no_grad()
def head_predictions(memory, episode: dict) -> tuple[np.ndarray, np.ndarray]:
    """Predicted reward float (T,) and done probability float (T,) for one latent episode, by filtering
    through M's interface (any memory kind): the heads of step t read the state after a_t and z_{t+1} (after
    the last action, which has no next frame, M imagines z_{t+1})."""
    z = torch.from_numpy(episode["mu"])
    a = torch.from_numpy(episode["actions"].astype(np.float32))
    state = memory.observe(memory.initial_state(1), z[:1])
    rewards, dones = [], []
    for t in range(len(a)):
        state = memory.transition(state, a[t : t + 1])
        state = memory.observe(state, z[t + 1 : t + 2]) if t + 1 < len(z) else memory.imagine(state)
        reward, done_logit = memory.heads(state)
        rewards.append(float(reward[0]))
        dones.append(float(torch.sigmoid(done_logit[0])))
    return np.array(rewards, np.float32), np.array(dones, np.float32)


def head_metrics(pred_reward, real_reward, done_prob, real_done) -> dict:
    """Correlation, MSE, and done precision / recall (None where undefined) over concatenated steps."""
    predicted = done_prob > DONE_THRESHOLD
    real_done = real_done.astype(bool)
    tp = int((predicted & real_done).sum())
    return {
        "steps": len(real_reward),
        "reward_corr": float(np.corrcoef(pred_reward, real_reward)[0, 1]),
        "reward_mse": float(np.mean((pred_reward - real_reward) ** 2)),
        "done_real": int(real_done.sum()),
        "done_predicted": int(predicted.sum()),
        "done_precision": tp / predicted.sum() if predicted.any() else None,
        "done_recall": tp / real_done.sum() if real_done.any() else None,
    }


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--mdnrnn", help="M's checkpoint, any memory kind (default: <run_dir>/mdnrnn/best.pt)")
    args = parser.parse_args(argv)
    cfg = load_stage_config(args)
    mdnrnn, _ = load_model(args.mdnrnn or os.path.join(stage_dir(cfg, "mdnrnn"), "best.pt"), "memory")
    _, held = split_episodes(list_episodes(stage_dir(cfg, "latents"), "latents"), cfg.memory.holdout_fraction, cfg.seed)
    columns = {"pred_reward": [], "real_reward": [], "done_prob": [], "real_done": []}
    for path in held:
        episode = load_episode(path, LATENT_KEYS)
        reward, done = head_predictions(mdnrnn, episode)
        for key, value in zip(columns, (reward, episode["rewards"], done, episode["terminated"])):
            columns[key].append(value)
    m = head_metrics(*(np.concatenate(v) for v in columns.values()))
    fmt = lambda v: "undefined" if v is None else f"{v:.3f}"  # noqa: E731
    print(f"M's heads on {len(held)} held-out episodes ({m['steps']} steps) of {stage_dir(cfg, 'latents')}")
    print(f"reward: Pearson r {m['reward_corr']:.3f}, MSE {m['reward_mse']:.4f}")
    print(f"done:   precision {fmt(m['done_precision'])} ({m['done_predicted']} predicted), "
          f"recall {fmt(m['done_recall'])} ({m['done_real']} real terminal steps)")


if __name__ == "__main__":
    run_stage(main)
