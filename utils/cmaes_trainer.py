"""CMA-ES training of the linear controller, in the real env or in the dream (stage 05).

Each generation: `es.ask()` gives `popsize` parameter vectors; its fitness is
the mean return over `rollouts_per_candidate` episodes, and `es.tell` gets
minus that (cma minimises).

- controller.env=real: every candidate plays the same tracks (common random
  numbers, so the ranking compares drivers, not tracks) in the worker pool.
- controller.env=dream: every candidate starts from the same real-episode
  starts, drawn per generation, and the whole population x rollouts is
  stepped as one torch batch inside M at temperature tau (utils/dream.py).

Every `eval_every` generations, and after the last, the CMA-ES mean is
re-evaluated on fixed held-out tracks of the real env (in the dream too: that
is the transfer measurement); the mean with the best held-out score is kept as
`best`.

Files in the stage folder: cmaes_state.pkl (the whole run: CMA-ES object,
history, best; rewritten atomically every generation so a killed run resumes
where it stopped), history.csv (one row per generation), controller.pt
(the checkpoint 06 reads), learning_curve.png.
"""

from __future__ import annotations

import csv
import io
import os
import pickle
import time

import numpy as np
import torch
from tqdm import tqdm

from models.controller import LinearController
from utils.config import Config, config_to_dict
from utils.dream import dream_returns
from utils.errors import UserError
from utils.io import atomic_path, file_sha256, save_text, save_torch
from utils.parallel import WorkerPool
from utils.rollout import agent_task, init_agent_worker
from utils.seeding import env_seed

HISTORY_FIELDS = [
    "generation", "best", "mean", "std", "worst", "heldout_mean", "heldout_std",
    "sigma", "env_steps", "dream_steps", "early_stopped", "seconds", "worker_restarts",
]


def heldout_seeds(cfg: Config) -> list[int]:
    """The fixed tracks on which the CMA-ES mean is re-evaluated during training."""
    return [env_seed(cfg.seed, "controller_holdout", i) for i in range(cfg.controller.eval_episodes)]


def generation_seeds(cfg: Config, generation: int) -> list[int]:
    """The tracks every candidate of `generation` (0-based) plays: new ones each generation."""
    r = cfg.controller.rollouts_per_candidate
    return [env_seed(cfg.seed, "controller_train", generation * r + j) for j in range(r)]


def _save_state(path: str, state: dict) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            pickle.dump(state, f)


def _write_history(path: str, history: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS)
    writer.writeheader()
    for row in history:
        writer.writerow({k: row.get(k, "") for k in HISTORY_FIELDS})
    save_text(path, buf.getvalue())


def draw_fitness(ax, history: list[dict], where: str = "training tracks") -> None:
    """Best and mean fitness per generation (+- std band, played on `where`) and the held-out
    re-evaluations of the CMA-ES mean in the real env, on a matplotlib Axes."""
    gens = [r["generation"] for r in history]
    mean = np.array([r["mean"] for r in history])
    std = np.array([r["std"] for r in history])
    ax.plot(gens, [r["best"] for r in history], label=f"best candidate ({where})", color="tab:green")
    ax.plot(gens, mean, label=f"population mean +- std ({where})", color="tab:blue")
    ax.fill_between(gens, mean - std, mean + std, color="tab:blue", alpha=0.2)
    held = [(r["generation"], r["heldout_mean"], r["heldout_std"]) for r in history if r.get("heldout_mean") is not None]
    if held:
        g, m, s = map(np.array, zip(*held))
        ax.errorbar(g, m, yerr=s, fmt="o-", color="tab:red", capsize=3, label="CMA-ES mean, held-out real tracks (full episodes)")
    ax.set_xlabel("generation")
    ax.set_ylabel("return")
    ax.grid(alpha=0.3)


def plot_learning_curve(history: list[dict], path: str, title: str, where: str = "training tracks") -> None:
    """PNG of `draw_fitness` for the whole run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    draw_fitness(ax, history, where)
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


class ControllerTrainer:
    """Runs (or resumes) CMA-ES for `cfg.controller.generations` generations.

    With controller.env=dream, `dream` = (M, start z float32 (N, z_dim)) is required.
    """

    def __init__(self, cfg: Config, vision_path: str, mdnrnn_path: str, in_dim: int, action_low, action_high,
                 out_dir: str, dream: tuple | None = None, inputs: str = "z_h"):
        self.cfg, self.out_dir = cfg, out_dir
        if cfg.controller.env == "dream" and dream is None:
            raise ValueError("controller.env=dream needs M and the start latents")
        self.dream = dream
        self.paths = {"vision": os.path.abspath(vision_path), "mdnrnn": os.path.abspath(mdnrnn_path)}
        self.input_sha256 = {k: file_sha256(p) for k, p in self.paths.items()}
        self.controller = LinearController(in_dim, action_low, action_high, inputs)
        self.state_path = os.path.join(out_dir, "cmaes_state.pkl")

    def _new_state(self) -> dict:
        import cma

        cc = self.cfg.controller
        es = cma.CMAEvolutionStrategy(
            np.zeros(self.controller.num_params),
            cc.sigma0,
            {"popsize": cc.popsize, "seed": self.cfg.seed + 1, "verbose": -9},
        )
        return {"es": es, "generation": 0, "history": [], "best": None, "np_random": np.random.get_state(),
                "num_params": self.controller.num_params, "inputs": self.paths, "env": self.cfg.controller.env,
                "input_sha256": self.input_sha256}

    def load_or_create(self, overwrite: bool) -> dict:
        if overwrite or not os.path.exists(self.state_path):
            return self._new_state()
        try:
            with open(self.state_path, "rb") as f:
                state = pickle.load(f)
        except Exception as exc:  # noqa: BLE001 - any unreadable pickle
            raise UserError(f"{self.state_path}: unreadable CMA-ES state ({type(exc).__name__}); "
                            "pass --overwrite to start over") from None
        if state.get("num_params") != self.controller.num_params:
            raise UserError(f"{self.state_path}: saved for {state.get('num_params')} controller parameters, "
                            f"V and M give {self.controller.num_params}; pass --overwrite to start over")
        if state.get("env", "real") != self.cfg.controller.env:
            raise UserError(f"{self.state_path}: a run with controller.env={state.get('env', 'real')}, not "
                            f"{self.cfg.controller.env}; pass --overwrite to start over")
        if state.get("input_sha256", self.input_sha256) != self.input_sha256:
            changed = [k for k in self.input_sha256 if state["input_sha256"].get(k) != self.input_sha256[k]]
            raise UserError(f"{self.state_path}: saved for another {' and '.join(changed)} checkpoint "
                            f"({', '.join(self.paths[k] for k in changed)} changed since); pass --overwrite to start over")
        np.random.set_state(state["np_random"])
        return state

    def _evaluate(self, pool: WorkerPool, params_list, seeds, train: bool, progress: str) -> np.ndarray:
        cc = self.cfg.controller
        tasks = [
            {"params": p, "seed": s, "max_steps": cc.max_steps if train else 0,
             "early_stop_steps": cc.early_stop_steps if train else 0}
            for p in params_list for s in seeds
        ]
        results = pool.map(tasks, progress=progress)
        return results

    def _training_fitness(self, pool: WorkerPool, candidates, generation: int) -> tuple[np.ndarray, dict]:
        """Fitness float (popsize,) of one generation's candidates, and the step counts for its history row."""
        cfg, cc = self.cfg, self.cfg.controller
        if cc.env == "dream":
            return self._dream_fitness(candidates, generation)
        results = self._evaluate(pool, candidates, generation_seeds(cfg, generation), True, f"gen {generation + 1}")
        returns = np.array([r["return"] for r in results]).reshape(len(candidates), -1)
        counts = {"env_steps": int(sum(r["steps"] for r in results)),
                  "early_stopped": int(sum(r["early_stopped"] for r in results))}
        return returns.mean(axis=1), counts

    def _dream_fitness(self, candidates, generation: int) -> tuple[np.ndarray, dict]:
        """All candidates x rollouts in one batched dream rollout, from the same starts per generation."""
        cfg, cc = self.cfg, self.cfg.controller
        mdnrnn, starts = self.dream
        rng = np.random.default_rng([cfg.seed, generation])
        picked = starts[rng.integers(len(starts), size=cc.rollouts_per_candidate)]
        r = cc.rollouts_per_candidate
        params = np.repeat(np.asarray(candidates, dtype=np.float32), r, axis=0)  # row c * r + j
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        returns, lengths = dream_returns(
            mdnrnn, params, np.tile(picked, (len(candidates), 1)), self.controller.low, self.controller.high,
            cc.temperature, cc.max_steps or cfg.env.max_episode_steps, generator,
        )
        return returns.reshape(len(candidates), r).mean(axis=1), {"env_steps": 0, "dream_steps": int(lengths.sum())}

    def run(self, overwrite: bool = False) -> dict:
        cfg, cc = self.cfg, self.cfg.controller
        state = self.load_or_create(overwrite)
        es = state["es"]
        budget_s = 60 * cc.max_wall_minutes
        if state["history"]:  # a run killed between its state and its checkpoint leaves them out of step
            _write_history(os.path.join(self.out_dir, "history.csv"), state["history"])
            self._save_checkpoint(state)
        if budget_s and state.get("elapsed_s", 0.0) >= budget_s:
            tqdm.write(f"[05] controller.max_wall_minutes={cc.max_wall_minutes} already used by this run "
                       f"({state['elapsed_s'] / 60:.1f} min over {state['generation']} generations); nothing to do")
        elif state["generation"] >= cc.generations:
            tqdm.write(f"[05] all {cc.generations} generations done; nothing to do")
        elif state["generation"]:
            tqdm.write(f"[05] resuming at generation {state['generation'] + 1}/{cc.generations} from {self.state_path}")
        init_args = (self.paths["vision"], self.paths["mdnrnn"], cfg.env, 1, self.controller.inputs)
        with WorkerPool(cc.workers, init_agent_worker, init_args, agent_task, cc.worker_timeout_s, cc.max_retries) as pool:
            bar = tqdm(total=cc.generations, initial=state["generation"], desc="05 CMA-ES", unit="gen", disable=None)
            while state["generation"] < cc.generations and not (budget_s and state.get("elapsed_s", 0.0) >= budget_s):
                g = state["generation"]
                start = time.perf_counter()
                candidates = es.ask()
                fitness, counts = self._training_fitness(pool, candidates, g)
                es.tell(candidates, (-fitness).tolist())
                row = {
                    "generation": g + 1, "best": float(fitness.max()), "mean": float(fitness.mean()),
                    "std": float(fitness.std()), "worst": float(fitness.min()), "sigma": float(es.sigma), **counts,
                }
                elapsed = state.get("elapsed_s", 0.0) + time.perf_counter() - start
                out_of_time = budget_s > 0 and elapsed >= budget_s
                if (g + 1) % cc.eval_every == 0 or g + 1 == cc.generations or out_of_time:
                    mean_params = np.asarray(es.mean, dtype=np.float32)
                    held = np.array([r["return"] for r in self._evaluate(pool, [mean_params], heldout_seeds(cfg), False, "held-out")])
                    row.update(heldout_mean=float(held.mean()), heldout_std=float(held.std()))
                    if state["best"] is None or held.mean() > state["best"]["heldout_mean"]:
                        state["best"] = {"params": mean_params, "generation": g + 1,
                                         "heldout_mean": float(held.mean()), "heldout_std": float(held.std())}
                row["seconds"] = round(time.perf_counter() - start, 2)
                state["elapsed_s"] = state.get("elapsed_s", 0.0) + row["seconds"]
                row["worker_restarts"] = pool.restarts
                state["history"].append(row)
                state["generation"] = g + 1
                state["np_random"] = np.random.get_state()
                _save_state(self.state_path, state)
                _write_history(os.path.join(self.out_dir, "history.csv"), state["history"])
                self._save_checkpoint(state)
                held_txt = f" held-out {row['heldout_mean']:.1f} +- {row['heldout_std']:.1f}" if "heldout_mean" in row else ""
                kind, steps = ("dream", row["dream_steps"]) if cc.env == "dream" else ("", row["env_steps"])
                tqdm.write(
                    f"[05] gen {g + 1}/{cc.generations} {kind + ' ' if kind else ''}best {row['best']:.1f} "
                    f"mean {row['mean']:.1f} +- {row['std']:.1f} sigma {row['sigma']:.3f} {kind + ' ' if kind else ''}"
                    f"steps {steps} ({steps / row['seconds']:.0f} steps/s){held_txt}"
                )
                bar.update(1)
                if out_of_time:
                    tqdm.write(f"[05] stopping: controller.max_wall_minutes={cc.max_wall_minutes} reached")
                    break
            bar.close()
        if state["history"]:
            cap = f", training episodes <= {cc.max_steps} steps" if cc.max_steps else ""
            where = f"dream, tau {cc.temperature:g}" if cc.env == "dream" else "training tracks"
            plot_learning_curve(state["history"], os.path.join(self.out_dir, "learning_curve.png"),
                                f"CMA-ES on {cfg.env.id} ({cc.popsize} x {cc.rollouts_per_candidate} rollouts{cap})", where)
        return state

    def _save_checkpoint(self, state: dict) -> None:
        best = state["best"]
        mean_params = np.asarray(state["es"].mean, dtype=np.float32)
        save_torch(
            os.path.join(self.out_dir, "controller.pt"),
            {
                "kind": "controller",
                "hparams": self.controller.hparams(),
                "params_best": best["params"] if best else mean_params,
                "params_mean": mean_params,
                "best": {k: v for k, v in best.items() if k != "params"} if best else None,
                "generation": state["generation"],
                "inputs": self.paths,
                "config": config_to_dict(self.cfg),
            },
        )
