"""Stage 05 for controller.kind actor_critic: C trained only in M's imagination, re-evaluated in the real env.

Every update starts imagination from M's filtered states of `controller.batch_windows` real latent windows
(stage 03's posterior means, stage 04's training episodes) and calls models.actor_critic.imagination_update.
Every `controller.eval_every` updates the actor plays `controller.eval_episodes` held-out real episodes (the
same seed stream as the CMA-ES re-evaluations, on the config's backend, for logging and for picking the best
actor) and the run writes a history.csv row, `latest.pt` (networks, optimizers, return scale, history: the
resume state, tensors and plain types only) and `controller.pt` (the best held-out actor so far; the last
actor's parameters beside it as `params_mean`). With actor_critic.actor_average > 0 the actor that plays, is
picked and is saved is the averaged actor (ActorCritic.deployed_params). A killed run resumes at its last row.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

import numpy as np
import torch
from tqdm import tqdm

from models.actor_critic import ActorCritic, ActorCriticConfig, filtered_states, imagination_update
from utils.checkpoints import read_checkpoint, save_model
from utils.cmaes_trainer import heldout_seeds
from utils.config import Config, config_to_dict
from utils.data import LatentWindows
from utils.episodes import agent_task, expected_episode_s, init_agent_worker
from utils.errors import UserError
from utils.io import atomic_path, file_sha256, save_csv
from utils.parallel import make_pool

HISTORY_FIELDS = ["update", "imagined_return", "actor_loss", "critic_loss", "entropy", "return_scale",
                  "skipped_updates", "dream_steps", "heldout_steps", "heldout_mean", "heldout_std", "seconds", "worker_restarts"]


def write_history(path: str, history: list[dict]) -> None:
    """history.csv: one row per `eval_every` updates, the columns of HISTORY_FIELDS."""
    save_csv(path, history, HISTORY_FIELDS)


def plot_history(history: list[dict], path: str, title: str) -> None:
    """learning_curve.png: the mean imagined lambda-return and the held-out real return against updates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    updates = [r["update"] for r in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(updates, [r["imagined_return"] for r in history], label="imagined lambda-return (mean R_0)")
    mean, std = np.array([r["heldout_mean"] for r in history]), np.array([r["heldout_std"] for r in history])
    ax.errorbar(updates, mean, yerr=std, fmt="o-", capsize=3, label="held-out real return (mean +- std)")
    ax.set_xlabel("imagination updates")
    ax.set_ylabel("return")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


class ImaginationTrainer:
    """Runs (or resumes) `controller.updates` imagination updates of an ActorCritic inside the frozen `memory`.

    Args:
        cfg: the run's config; vision_path, mdnrnn_path: V's and M's checkpoints (the real-env workers load them);
        memory: M, loaded from mdnrnn_path; ac: an ActorCritic on M's features (fresh, or loaded from
        controller.init_from); latent_files: the latent episodes whose windows start imagination; out_dir:
        <run_dir>/controller; init_from: the checkpoint `ac` was started from (controller.init_from), part of
        what a resume state must match.
    """

    def __init__(self, cfg: Config, vision_path: str, mdnrnn_path: str, memory, ac: ActorCritic,
                 latent_files: list[str], out_dir: str, init_from: str | None = None):
        self.cfg, self.out_dir, self.ac = cfg, out_dir, ac
        self.memory = memory.eval().requires_grad_(False)  # frozen: only the actor and the critic learn
        self.paths = {"vision": os.path.abspath(vision_path), "mdnrnn": os.path.abspath(mdnrnn_path)}
        if init_from:
            self.paths["init_from"] = os.path.abspath(init_from)
        self.input_sha256 = {k: file_sha256(p) for k, p in self.paths.items()}
        self.windows = LatentWindows(latent_files, cfg.memory.seq_len)
        c = ac.config
        self.actor_opt = torch.optim.Adam(ac.actor.parameters(), lr=c.actor_lr)
        self.critic_opt = torch.optim.Adam(ac.critic.parameters(), lr=c.critic_lr)
        self.state_path = os.path.join(out_dir, "latest.pt")

    def load_or_create(self, overwrite: bool) -> dict:
        """The run so far (networks and optimizers restored from latest.pt) or a new one.

        Raises:
            UserError: a resume state of another C, another config of C, or other V, M or init_from checkpoints.
        """
        fresh = {"update": 0, "history": [], "best": None, "elapsed_s": 0.0}
        if overwrite or not os.path.exists(self.state_path):
            return fresh
        ckpt = read_checkpoint(self.state_path)
        config = ckpt.get("config")
        if isinstance(config, dict):  # a key added since the state was saved counts at its default
            config = {**dataclasses.asdict(ActorCriticConfig()), **config}
        saved = (ckpt.get("kind"), config, ckpt.get("sizes"), ckpt.get("temperature", 1.0))
        wanted = (self.ac.kind, config_to_dict(self.cfg)["controller"]["actor_critic"], self.ac.sizes(),
                  self.cfg.controller.temperature)
        if saved != wanted:
            raise UserError(f"{self.state_path}: saved for {saved[0]} {saved[1]} {saved[2]} at tau {saved[3]}, "
                            f"this run has {wanted[0]} {wanted[1]} {wanted[2]} at tau {wanted[3]}; pass --overwrite "
                            "to start over")
        if ckpt.get("input_sha256") != self.input_sha256:
            raise UserError(f"{self.state_path}: saved for other V, M or controller.init_from checkpoints than "
                            f"{', '.join(self.paths.values())}; pass --overwrite to start over")
        self.ac.load_state_dict(ckpt["state_dict"])
        self.actor_opt.load_state_dict(ckpt["actor_optimizer"])
        self.critic_opt.load_state_dict(ckpt["critic_optimizer"])
        best = ckpt["best"]
        if best is not None:
            best = {**best, "params": ckpt["best_params"].numpy()}
        return {"update": ckpt["update"], "history": ckpt["history"], "best": best, "elapsed_s": ckpt["elapsed_s"]}

    def _save(self, state: dict) -> None:
        best = state["best"]
        save_model(self.state_path, self.ac, actor_optimizer=self.actor_opt.state_dict(),
                   critic_optimizer=self.critic_opt.state_dict(), update=state["update"], history=state["history"],
                   elapsed_s=state["elapsed_s"], input_sha256=self.input_sha256,
                   temperature=self.cfg.controller.temperature,
                   best=None if best is None else {k: v for k, v in best.items() if k != "params"},
                   best_params=None if best is None else torch.from_numpy(best["params"]))
        write_history(os.path.join(self.out_dir, "history.csv"), state["history"])
        training, final = self.ac.get_params(), self.ac.deployed_params()
        self.ac.set_params(final if best is None else best["params"])
        save_model(os.path.join(self.out_dir, "controller.pt"), self.ac, params_mean=torch.from_numpy(final),
                   best=None if best is None else {k: v for k, v in best.items() if k != "params"},
                   update=state["update"], inputs=self.paths, run_config=config_to_dict(self.cfg))
        self.ac.set_params(training)

    def _start_states(self, update: int):
        """M's filtered states on `batch_windows` windows drawn for this update (seeded by C's seed,
        cfg.controller_seed, and the update)."""
        cc = self.cfg.controller
        rng = np.random.default_rng([self.cfg.controller_seed, 5, update])
        pairs = self.windows.windows(rng)
        picked = [pairs[i] for i in rng.choice(len(pairs), size=cc.batch_windows, replace=len(pairs) < cc.batch_windows)]
        b = {k: torch.from_numpy(v) for k, v in self.windows.batch(picked).items()}
        return filtered_states(self.memory, b["mu"], b["actions"])

    def run(self, state: dict) -> dict:
        """Train from `state` (load_or_create) to controller.updates or the wall-time budget; returns the state."""
        cfg, cc = self.cfg, self.cfg.controller
        budget_s = 60 * cc.max_wall_minutes
        if state["update"] >= cc.updates:
            tqdm.write(f"[05] all {cc.updates} updates done; nothing to do")
        elif state["update"]:
            tqdm.write(f"[05] resuming at update {state['update'] + 1}/{cc.updates} from {self.state_path}")
        init_args = (read_checkpoint(self.paths["vision"]), read_checkpoint(self.paths["mdnrnn"]), cfg.env, self.ac.config)
        with make_pool(cfg.backend, cc.workers, init_agent_worker, init_args, agent_task,
                       timeout_s=cc.worker_timeout_s, max_retries=cc.max_retries,
                       first_timeout_s=expected_episode_s(cfg.env), task_steps=cfg.env.max_episode_steps) as pool:
            bar = tqdm(total=cc.updates, initial=state["update"], desc="05 actor-critic", unit="upd", disable=None)
            while state["update"] < cc.updates and not (budget_s and state["elapsed_s"] >= budget_s):
                start, sums, n = time.perf_counter(), {}, 0
                block = min(cc.eval_every, cc.updates - state["update"])
                for u in range(state["update"], state["update"] + block):
                    generator = torch.Generator().manual_seed(cfg.controller_seed * 1_000_003 + u)
                    torch.manual_seed(cfg.controller_seed * 1_000_003 + u)  # the actor's own sampling (rsample)
                    out = imagination_update(self.memory, self.ac, self.actor_opt, self.critic_opt,
                                             self._start_states(u), generator, cc.temperature)
                    for k, v in out.items():
                        sums[k] = sums.get(k, 0.0) + v
                    n += 1
                    bar.update(1)
                if not all(math.isfinite(v) for v in sums.values()):
                    raise UserError(f"{self.out_dir}: updates {state['update'] + 1}-{state['update'] + block} gave "
                                    "non-finite losses; nothing of them was saved (lower the learning rates)")
                params = self.ac.deployed_params()
                tasks = [{"params": params, "seed": s, "max_steps": 0, "early_stop_steps": 0} for s in heldout_seeds(cfg)]
                played = pool.map(tasks, progress="held-out")
                held = np.array([r["return"] for r in played])
                state["update"] += block
                row = {"update": state["update"], **{k: sums[k] / n for k in ("imagined_return", "actor_loss",
                                                                             "critic_loss", "entropy")},
                       "return_scale": float(self.ac.return_scale), "skipped_updates": int(sums["skipped"]),
                       "dream_steps": block * cc.batch_windows * (cfg.memory.seq_len + 1) * self.ac.config.horizon,
                       "heldout_steps": int(sum(r["steps"] for r in played)),  # the only real steps of 05
                       "heldout_mean": float(held.mean()), "heldout_std": float(held.std()),
                       "seconds": round(time.perf_counter() - start, 2), "worker_restarts": pool.restarts}
                if state["best"] is None or row["heldout_mean"] > state["best"]["heldout_mean"]:
                    state["best"] = {"params": params, "update": state["update"], "heldout_mean": row["heldout_mean"],
                                     "heldout_std": row["heldout_std"]}
                state["elapsed_s"] += row["seconds"]
                state["history"].append(row)
                self._save(state)
                tqdm.write(f"[05] update {state['update']}/{cc.updates} imagined {row['imagined_return']:.2f} "
                           f"actor {row['actor_loss']:.3f} critic {row['critic_loss']:.3f} entropy "
                           f"{row['entropy']:.2f} held-out {row['heldout_mean']:.1f} +- {row['heldout_std']:.1f} "
                           f"({row['seconds']:.0f} s)")
            bar.close()
        if state["history"]:
            plot_history(state["history"], os.path.join(self.out_dir, "learning_curve.png"),
                         f"actor-critic in the imagination of M ({cfg.memory.kind}) on {cfg.env.id}")
        return state

