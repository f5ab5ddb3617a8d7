"""CMA-ES training of the linear controller, in the real env or in the dream (stage 05).

Each generation: `es.ask()` gives `popsize` parameter vectors; its fitness is
the mean return over `rollouts_per_candidate` episodes, and `es.tell` gets
minus that (cma minimises).

- controller.env=real: every candidate plays the same tracks (common random
  numbers, so the ranking compares drivers, not tracks) in the worker pool.
- controller.env=dream: every candidate starts from the same real-episode
  starts, drawn per generation (first frames, or with controller.dream_starts
  anywhere M's state after a real window), and the whole population x rollouts
  is stepped as one torch batch inside M at temperature tau (models/dream.py).
  With an ensemble M, controller.ensemble_fitness min scores a candidate by its
  worst world member, and controller.disagreement_penalty > 0 steps it in
  MOPO's penalised dream (models.ensemble.PenalisedEnsemble).

CMA-ES starts at zeros, or at the C of controller.init_from (iterative
training's controller_init previous).

Every `eval_every` generations, and after the last, the CMA-ES mean is
re-evaluated on fixed held-out tracks of the real env (in the dream too: that
is the transfer measurement); the mean with the best held-out score is kept as
`best`.

Files in the stage folder: cmaes_state.npz (rewritten atomically every
generation so a killed run resumes where it stopped), history.csv (one row
per generation), controller.pt (the checkpoint 06 reads), learning_curve.png.

The resume state is data only (arrays and a JSON string, read with
allow_pickle=False): the initial mean, the fitness values told to CMA-ES each generation, the
run's history and best parameters. `ResumableCMAES` restores the search by
replaying those generations through a fresh `cma.CMAEvolutionStrategy` with
the same seed (ask is deterministic for a seed, tell gets the stored
fitness), and checks the replayed mean and step size against the stored
ones, so a resumed run produces exactly the next generation an uninterrupted
run would.
"""

from __future__ import annotations

import json
import os
import time
import zipfile

import numpy as np
import torch
from tqdm import tqdm

from models.controller import LinearController
from models.dream import burn_in, dream_returns
from models.ensemble import PenalisedEnsemble
from utils.checkpoints import read_checkpoint, save_model
from utils.config import Config, config_to_dict
from utils.episodes import agent_task, expected_episode_s, init_agent_worker
from utils.errors import UserError
from utils.io import atomic_path, file_sha256, save_csv, save_npz
from utils.parallel import make_pool
from utils.seeding import env_seed

HISTORY_FIELDS = [
    "generation", "best", "mean", "std", "worst", "heldout_mean", "heldout_std",
    "sigma", "env_steps", "dream_steps", "heldout_steps", "early_stopped", "seconds", "worker_restarts",
]


def heldout_seeds(cfg: Config) -> list[int]:
    """The fixed tracks on which the CMA-ES mean is re-evaluated during training."""
    return [env_seed(cfg.controller_seed, "controller_holdout", i) for i in range(cfg.controller.eval_episodes)]


def generation_seeds(cfg: Config, generation: int) -> list[int]:
    """The tracks every candidate of `generation` (0-based) plays: new ones each generation."""
    r = cfg.controller.rollouts_per_candidate
    return [env_seed(cfg.controller_seed, "controller_train", generation * r + j) for j in range(r)]


def candidate_fitness(returns: np.ndarray, members: int = 1) -> np.ndarray:
    """CMA-ES fitness of each candidate from its dream returns.

    Args:
        returns: float (candidates, rollouts): candidate c's rollout j is row c * rollouts + j of the batched
            dream, whose world is an ensemble's member j % members (models/ensemble.py).
        members: 1, the mean over all rollouts; K >= 2, the lowest of the K members' mean returns (the worst
            case over the models of EPOpt, Rajeswaran et al. 2017, with its epsilon -> 0): a C scores only as
            well as the member that rates it worst, so an error most members share but one does not is caught.

    Returns:
        float (candidates,).

    Raises:
        ValueError: rollouts not a multiple of members (a member would get no rollout of some candidate).
    """
    candidates, rollouts = returns.shape
    if rollouts % members:
        raise ValueError(f"controller.rollouts_per_candidate ({rollouts}) must be a multiple of the ensemble's "
                         f"{members} members for controller.ensemble_fitness=min")
    per_member = returns.reshape(candidates, rollouts // members, members).mean(axis=1)
    return per_member.min(axis=1)


def _write_history(path: str, history: list[dict]) -> None:
    save_csv(path, history, HISTORY_FIELDS)


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


class ResumableCMAES:
    """cma's CMAEvolutionStrategy (minimising) with a data-only state that restores the search exactly.

    Args:
        num_params: n, the size of a candidate; sigma0: initial step size (> 0); popsize: >= 2; seed: cma's
            seed (it seeds numpy's global generator, which cma's ask draws from); x0: the initial mean, float (n,)
            (None: zeros).
    """

    def __init__(self, num_params: int, sigma0: float, popsize: int, seed: int, x0: np.ndarray | None = None):
        import cma

        self.num_params, self.sigma0, self.popsize, self.seed = num_params, sigma0, popsize, seed
        self.x0 = np.zeros(num_params) if x0 is None else np.asarray(x0, dtype=np.float64).reshape(num_params)
        self.es = cma.CMAEvolutionStrategy(self.x0.copy(), sigma0,
                                           {"popsize": popsize, "seed": seed, "verbose": -9})
        self.told: list[list[float]] = []  # the values told, one list per generation

    def ask(self) -> list[np.ndarray]:
        """popsize candidates float64 (num_params,)."""
        return self.es.ask()

    def tell(self, candidates: list[np.ndarray], values: list[float]) -> None:
        """The values (lower is better) of the candidates of the last `ask`."""
        self.es.tell(candidates, values)
        self.told.append([float(v) for v in values])

    @property
    def mean(self) -> np.ndarray:
        """The CMA-ES mean, float64 (num_params,)."""
        return np.asarray(self.es.mean, dtype=np.float64)

    @property
    def sigma(self) -> float:
        """The CMA-ES step size."""
        return float(self.es.sigma)

    def arrays(self) -> dict[str, np.ndarray]:
        """The data-only state: the initial mean x0 float64 (n,), told float64 (G, popsize), the mean float64 (n,)
        and sigma after them."""
        told = np.asarray(self.told, dtype=np.float64).reshape(len(self.told), self.popsize)
        return {"x0": self.x0, "told": told, "mean": self.mean, "sigma": np.float64(self.sigma)}

    @classmethod
    def restore(cls, num_params: int, sigma0: float, popsize: int, seed: int, arrays: dict) -> "ResumableCMAES":
        """Replay the generations of `arrays` (from `arrays()`); the global numpy generator ends where the
        original run left it.

        Raises:
            ValueError: the replay does not reach the stored mean and sigma (another cma version, or a state
                that was edited).
        """
        search = cls(num_params, sigma0, popsize, seed, arrays.get("x0"))  # states before x0 was saved: zeros
        for values in np.asarray(arrays["told"], dtype=np.float64):
            search.tell(search.ask(), values.tolist())
        if not (np.array_equal(search.mean, arrays["mean"]) and search.sigma == float(arrays["sigma"])):
            raise ValueError("replaying the stored generations does not reproduce the stored CMA-ES mean and step "
                             "size (another cma version, or an edited file)")
        return search


KEYS_BEFORE_SAVED = {"ensemble_fitness": "mean", "disagreement_penalty": 0.0}  # what an older state's run had
STATE_ARRAYS = ("told", "mean", "sigma", "best_params", "meta")
OPTIONAL_STATE_ARRAYS = ("x0",)  # absent from states written before controller.init_from existed


def save_search_state(path: str, search: ResumableCMAES, meta: dict, best_params: np.ndarray | None) -> None:
    """Write the resume state atomically: the search's arrays, the best parameters and `meta` (plain JSON)."""
    best = np.zeros(0, np.float32) if best_params is None else np.asarray(best_params, np.float32)
    save_npz(path, **search.arrays(), best_params=best, meta=np.str_(json.dumps(meta)))


def load_search_state(path: str) -> tuple[dict, dict]:
    """(arrays, meta) of a state written by `save_search_state`, read without unpickling anything.

    Raises:
        UserError: unreadable, not an npz of those arrays, or holding objects (pickled data is refused).
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in STATE_ARRAYS if k not in data.files]
            if missing:
                raise UserError(f"{path}: not a CMA-ES state of this project (missing {missing}); pass --overwrite "
                                "to start over")
            arrays = {k: data[k] for k in STATE_ARRAYS + OPTIONAL_STATE_ARRAYS if k in data.files}
        meta = json.loads(str(arrays.pop("meta")))
    except UserError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        why = "it holds pickled objects, which are never loaded" if "pickle" in str(exc) else type(exc).__name__
        raise UserError(f"{path}: refused, not a readable CMA-ES state ({why}); pass --overwrite to start over") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path}: not a CMA-ES state of this project; pass --overwrite to start over")
    return arrays, meta


class ControllerTrainer:
    """Runs (or resumes) CMA-ES for `cfg.controller.generations` generations.

    With controller.env=dream, `dream` = (M, start z float32 (N, z_dim), windows) is required; windows (a
    utils.data.LatentWindows over the same episodes) gives the starts of controller.dream_starts anywhere, else
    None. `initial` = (path, params float (num_params,)) of controller.init_from starts CMA-ES there (None:
    zeros); a resumed run must have the same file.
    """

    def __init__(self, cfg: Config, vision_path: str, mdnrnn_path: str, controller: LinearController,
                 out_dir: str, dream: tuple | None = None, initial: tuple | None = None):
        self.cfg, self.out_dir = cfg, out_dir
        if cfg.controller.env == "dream" and dream is None:
            raise ValueError("controller.env=dream needs M and the start latents")
        if dream is not None and cfg.controller.dream_starts == "anywhere" and dream[2] is None:
            raise ValueError("controller.dream_starts=anywhere needs the latent windows")
        self.dream = dream
        self.paths = {"vision": os.path.abspath(vision_path), "mdnrnn": os.path.abspath(mdnrnn_path)}
        checked = {**self.paths, **({"init_from": os.path.abspath(initial[0])} if initial else {})}
        self.input_sha256 = {k: file_sha256(p) for k, p in checked.items()}
        self.checked_paths = checked
        self.x0 = None if initial is None else np.asarray(initial[1], dtype=np.float64)
        self.controller = controller
        self.state_path = os.path.join(out_dir, "cmaes_state.npz")

    def _search(self, arrays: dict | None = None) -> ResumableCMAES:
        cc = self.cfg.controller
        args = (self.controller.num_params, cc.sigma0, cc.popsize, self.cfg.controller_seed + 1)
        return ResumableCMAES(*args, self.x0) if arrays is None else ResumableCMAES.restore(*args, arrays)

    def _new_state(self) -> dict:
        return {"search": self._search(), "generation": 0, "history": [], "best": None, "elapsed_s": 0.0}

    def load_or_create(self, overwrite: bool) -> dict:
        """The run so far (resumed from cmaes_state.npz) or a new one.

        Raises:
            UserError: a state that cannot be read, or one saved for other inputs or settings.
        """
        if overwrite or not os.path.exists(self.state_path):
            return self._new_state()
        arrays, meta = load_search_state(self.state_path)
        cc = self.cfg.controller
        expected = {"num_params": self.controller.num_params, "env": cc.env, "popsize": cc.popsize,
                    "sigma0": cc.sigma0, "seed": self.cfg.controller_seed, "ensemble_fitness": cc.ensemble_fitness,
                    "disagreement_penalty": cc.disagreement_penalty}
        for key, value in expected.items():
            saved = meta.get(key, KEYS_BEFORE_SAVED.get(key))  # states from before a key hold its default
            if saved != value:
                raise UserError(f"{self.state_path}: saved with {key}={saved}, this run has {value}; "
                                "pass --overwrite to start over")
        if meta.get("input_sha256") != self.input_sha256:
            changed = [k for k in self.input_sha256 if (meta.get("input_sha256") or {}).get(k) != self.input_sha256[k]]
            raise UserError(f"{self.state_path}: saved for another {' and '.join(changed)} checkpoint "
                            f"({', '.join(self.checked_paths.get(k, 'none') for k in changed)} changed since); pass "
                            "--overwrite to start over")
        try:
            search = self._search(arrays)
        except ValueError as exc:
            raise UserError(f"{self.state_path}: {exc}; pass --overwrite to start over") from None
        best = meta["best"]
        if best is not None:
            best = {**best, "params": arrays["best_params"]}
        return {"search": search, "generation": meta["generation"], "history": meta["history"], "best": best,
                "elapsed_s": meta["elapsed_s"]}

    def _save_state(self, state: dict) -> None:
        cc, best = self.cfg.controller, state["best"]
        meta = {"num_params": self.controller.num_params, "env": cc.env, "popsize": cc.popsize, "sigma0": cc.sigma0,
                "seed": self.cfg.controller_seed, "ensemble_fitness": cc.ensemble_fitness,
                "disagreement_penalty": cc.disagreement_penalty,
                "input_sha256": self.input_sha256, "inputs": self.paths,
                "generation": state["generation"], "history": state["history"], "elapsed_s": state["elapsed_s"],
                "best": None if best is None else {k: v for k, v in best.items() if k != "params"}}
        save_search_state(self.state_path, state["search"], meta, None if best is None else best["params"])

    def _evaluate(self, pool, params_list, seeds, train: bool, progress: str) -> np.ndarray:
        cc = self.cfg.controller
        tasks = [
            {"params": p, "seed": s, "max_steps": cc.max_steps if train else 0,
             "early_stop_steps": cc.early_stop_steps if train else 0}
            for p in params_list for s in seeds
        ]
        results = pool.map(tasks, progress=progress)
        return results

    def _training_fitness(self, pool, candidates, generation: int) -> tuple[np.ndarray, dict]:
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
        mdnrnn, start_z, windows = self.dream
        # MOPO's penalised reward: the fitness counts the members' disagreement; 05's dream score does not
        world = PenalisedEnsemble(mdnrnn, cc.disagreement_penalty) if cc.disagreement_penalty else mdnrnn
        rng = np.random.default_rng([cfg.controller_seed, generation])
        r = cc.rollouts_per_candidate
        if cc.dream_starts == "anywhere":  # M's state after a real window ending anywhere in an episode
            pairs = windows.windows(rng)
            picked = windows.batch([pairs[i] for i in rng.integers(len(pairs), size=r)])
            device = next(mdnrnn.parameters()).device
            tiled = {k: torch.from_numpy(np.tile(picked[k], (len(candidates), 1, 1))).to(device) for k in ("mu", "actions")}
            # row c * r + j: window j, filtered by the M that dreams on from it (an ensemble's member (c*r + j) % K)
            starts = burn_in(world, tiled["mu"], tiled["actions"])
        else:  # M after the first frame of a real episode (Ha & Schmidhuber)
            starts = np.tile(start_z[rng.integers(len(start_z), size=r)], (len(candidates), 1))
        params = np.repeat(np.asarray(candidates, dtype=np.float32), r, axis=0)  # row c * r + j
        generator = torch.Generator(next(mdnrnn.parameters()).device).manual_seed(int(rng.integers(2**62)))
        returns, lengths = dream_returns(
            world, params, starts, self.controller.low, self.controller.high,
            cc.temperature, cc.max_steps or cfg.env.max_episode_steps, generator,
        )
        members = len(mdnrnn.members) if cc.ensemble_fitness == "min" else 1
        fitness = candidate_fitness(returns.reshape(len(candidates), r), members)
        return fitness, {"env_steps": 0, "dream_steps": int(lengths.sum())}

    def run(self, state: dict) -> dict:
        """Train from `state` (load_or_create) to the last generation or the wall-time budget; returns the state."""
        cfg, cc = self.cfg, self.cfg.controller
        search: ResumableCMAES = state["search"]
        budget_s = 60 * cc.max_wall_minutes
        if state["history"]:  # a run killed between its state and its checkpoint leaves them out of step
            _write_history(os.path.join(self.out_dir, "history.csv"), state["history"])
            self._save_checkpoint(state)
        if budget_s and state["elapsed_s"] >= budget_s:
            tqdm.write(f"[05] controller.max_wall_minutes={cc.max_wall_minutes} already used by this run "
                       f"({state['elapsed_s'] / 60:.1f} min over {state['generation']} generations); nothing to do")
        elif state["generation"] >= cc.generations:
            tqdm.write(f"[05] all {cc.generations} generations done; nothing to do")
        elif state["generation"]:
            tqdm.write(f"[05] resuming at generation {state['generation'] + 1}/{cc.generations} from {self.state_path}")
        init_args = (read_checkpoint(self.paths["vision"]), read_checkpoint(self.paths["mdnrnn"]), cfg.env,
                     self.controller.config)
        episode_steps = cfg.env.max_episode_steps  # the held-out re-evaluations play full episodes
        with make_pool(cfg.backend, cc.workers, init_agent_worker, init_args, agent_task,
                       timeout_s=cc.worker_timeout_s, max_retries=cc.max_retries,
                       first_timeout_s=expected_episode_s(cfg.env), task_steps=episode_steps) as pool:
            bar = tqdm(total=cc.generations, initial=state["generation"], desc="05 CMA-ES", unit="gen", disable=None)
            while state["generation"] < cc.generations and not (budget_s and state["elapsed_s"] >= budget_s):
                g = state["generation"]
                start = time.perf_counter()
                candidates = search.ask()
                fitness, counts = self._training_fitness(pool, candidates, g)
                if not np.isfinite(fitness).all():
                    raise UserError(f"{self.state_path}: generation {g + 1} gave non-finite returns ({fitness.tolist()}); "
                                    "nothing of it was saved (is M diverged?)")
                search.tell(candidates, (-fitness).tolist())
                row = {
                    "generation": g + 1, "best": float(fitness.max()), "mean": float(fitness.mean()),
                    "std": float(fitness.std()), "worst": float(fitness.min()), "sigma": search.sigma, **counts,
                }
                elapsed = state["elapsed_s"] + time.perf_counter() - start
                out_of_time = budget_s > 0 and elapsed >= budget_s
                if (g + 1) % cc.eval_every == 0 or g + 1 == cc.generations or out_of_time:
                    mean_params = search.mean.astype(np.float32)
                    played = self._evaluate(pool, [mean_params], heldout_seeds(cfg), False, "held-out")
                    held = np.array([r["return"] for r in played])
                    row.update(heldout_mean=float(held.mean()), heldout_std=float(held.std()),
                               heldout_steps=int(sum(r["steps"] for r in played)))  # real steps, for logging only
                    if state["best"] is None or held.mean() > state["best"]["heldout_mean"]:
                        state["best"] = {"params": mean_params, "generation": g + 1,
                                         "heldout_mean": float(held.mean()), "heldout_std": float(held.std())}
                row["seconds"] = round(time.perf_counter() - start, 2)
                state["elapsed_s"] = state["elapsed_s"] + row["seconds"]
                row["worker_restarts"] = pool.restarts
                state["history"].append(row)
                state["generation"] = g + 1
                self._save_state(state)
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
        """controller.pt: C with the best held-out parameters (the CMA-ES mean until a re-evaluation), the
        final mean beside them, and where they came from."""
        best = state["best"]
        mean_params = state["search"].mean.astype(np.float32)
        self.controller.set_params(best["params"] if best else mean_params)
        save_model(
            os.path.join(self.out_dir, "controller.pt"), self.controller,
            params_mean=torch.from_numpy(mean_params),
            best={k: v for k, v in best.items() if k != "params"} if best else None,
            generation=state["generation"], inputs=self.paths, run_config=config_to_dict(self.cfg),
        )
