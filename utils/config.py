"""Typed experiment config: YAML blocks composed left to right, dotted overrides, strict keys.

A config holds `run_dir`, `seed` and one section per stage. A file may name other
files under `base:` (a path or a list, relative to the file); those are read
first and the file's own keys override them, as does every further `--config`
file, left to right, then every `--set section.key=value`:

    cfg = load_config(["configs/carracing_vae.yaml", "configs/blocks/dream.yaml"], ["vision.z_dim=16"])

Every key is a field of the dataclasses below. The models' hyperparameters are
the fields of their own config dataclasses in models/ (VAEConfig, NVAEConfig,
MDNRNNConfig, LinearControllerConfig), which the sections extend with training
keys, so each is listed once. Each field carries its meaning, its allowed
values (for kinds: the registries in models/) and its bounds
(models.hparams.param); `config_help()` lists them all (`--help-config` of
every stage). An unknown or misspelled key, a value of the wrong type, outside
its choices or bounds, or not finite raises `UserError` naming the file and
the dotted key.

`workers` always counts processes; `threads` counts torch threads of one process.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass
from typing import Any

import yaml

from models import CONTROLLER_KINDS, MEMORY_KINDS, VISION_KINDS
from models.actor_critic import ActorCriticConfig
from models.controller import LinearControllerConfig
from models.hparams import config_from_dict as config_from_fields
from models.hparams import config_subset, param
from models.mdnrnn import MDNRNNConfig
from models.nvae import NVAEConfig
from models.rssm import RSSMOptions
from models.tssm import TSSMOptions
from utils.errors import UserError


@dataclass
class EnvConfig:
    """The real environment and how its frames become V's input."""

    id: str = param("CarRacing-v3", "gymnasium id of the real environment (PandaReach*: panda-gym)")
    frame_size: int = param(64, "V's input: frames are resized to frame_size x frame_size RGB", minimum=1)
    crop_dashboard: bool = param(False, "drop CarRacing's bottom 12 dashboard rows before resizing")
    max_episode_steps: int = param(1000, "time limit of one episode (env steps)", minimum=1)
    render_size: int = param(84, "PandaReach: env.render() width and height in pixels (the thesis: 84)", minimum=1)
    camera_distance: float = param(0.9, "PandaReach camera: metres from the camera target", above=0)
    camera_yaw: float = param(45.0, "PandaReach camera yaw, degrees")
    camera_pitch: float = param(-40.0, "PandaReach camera pitch, degrees")
    camera_target_x: float = param(-0.1, "PandaReach camera target x (m), in the robot base frame")
    camera_target_y: float = param(0.0, "PandaReach camera target y (m)")
    camera_target_z: float = param(0.1, "PandaReach camera target z (m)")
    goal_radius: float = param(0.02, "PandaReachMarker* ids (utils/panda_tasks.py): radius (m) of the goal marker, "
                               "visual only (panda-gym draws 0.02; 0.05 equals the success threshold)", above=0)
    render_shadows: bool = param(True, "PandaReachMarker* ids: draw shadows (panda-gym always does; without is "
                                 "about twice as fast)")
    views: int = param(1, "PandaReachMarker* ids: camera views tiled side by side into one frame of render_size x "
                       "render_size, each render_size / views wide (the middle of that camera's image, at the same "
                       "scale); 2 adds the camera view2_* (same target), for depth", choices=(1, 2))
    view2_distance: float = param(0.9, "views: 2: the second camera's metres from the camera target", above=0)
    view2_yaw: float = param(-45.0, "views: 2: the second camera's yaw, degrees (-45: 90 degrees from the first)")
    view2_pitch: float = param(-40.0, "views: 2: the second camera's pitch, degrees")


ROLLOUT_POLICIES = ("brownian", "uniform", "controller")
DEVICES = ("cpu", "cuda", "auto")


@dataclass
class RolloutsConfig:
    """Stage 01: the episodes recorded for V and M."""

    episodes: int = param(1000, "episodes to record for V and M (indices already on disk are skipped)", minimum=1)
    policy: str = param("brownian", "brownian (ctallec/world-models) | uniform | controller (a trained C, "
                        "rollouts.controller)", choices=ROLLOUT_POLICIES)
    brownian_dt: float = param(0.02, "step of the brownian action walk: a += sqrt(dt) * N(0, 1)", above=0)
    controller: str = param("", "policy=controller: controller.pt of a trained run (plays with the V and M it "
                            "was trained with)")
    action_noise: float = param(0.1, "policy=controller: std of the Gaussian noise added to C's output before its "
                                "tanh bound (models.controller.perturb_in_bounds)", minimum=0)
    max_steps: int = param(0, "cap on steps per recorded episode (0: env.max_episode_steps)", minimum=0)
    workers: int = param(2, "worker processes, each with its own env", minimum=1)


@dataclass
class VisionConfig(NVAEConfig):
    """V: its hyperparameters (models/vae.py VAEConfig, models/nvae.py NVAEConfig) plus stage 02's training keys."""

    kind: str = param("vae", "vae (Ha & Schmidhuber conv VAE) | nvae (Vahdat & Kautz hierarchical VAE)",
                      choices=tuple(VISION_KINDS))
    epochs: int = param(10, "passes over the training frames", minimum=1)
    batch_size: int = param(64, "frames per update", minimum=1)
    lr: float = param(1.0e-3, "Adam learning rate", above=0)
    grad_clip: float = param(100.0, "max global gradient norm", above=0)
    holdout_fraction: float = param(0.1, "fraction of episodes held out (by episode: each side fixed by file name "
                                    "and seed)",
                                    minimum=0, below=1)
    val_frames: int = param(2048, "held-out frames used for the per-epoch validation ELBO", minimum=1)
    chunk_episodes: int = param(32, "episodes held in memory at once while shuffling frames", minimum=1)
    threads: int = param(2, "torch threads of stages 02 and 03", minimum=1)
    device: str = param("cpu", "where stages 02 and 03 run V: cpu | cuda | auto (cuda when available)",
                        choices=DEVICES)

    def model_config(self):
        """The config dataclass of V's kind (VAEConfig or NVAEConfig), read from this section."""
        return config_subset(VISION_KINDS[self.kind].config_class, self)


@dataclass
class LatentsConfig:
    """Stage 03."""

    batch_size: int = param(500, "frames encoded per forward pass", minimum=1)


@dataclass
class MemoryConfig(MDNRNNConfig):
    """M: its hyperparameters (models/mdnrnn.py MDNRNNConfig, models/rssm.py RSSMConfig) plus stage 04's
    training keys."""

    kind: str = param("mdnrnn", "mdnrnn (Ha & Schmidhuber's MDN-RNN) | rssm (recurrent state-space model, "
                      "Hafner et al.) | tssm (causal transformer, TransDreamer-style)", choices=tuple(MEMORY_KINDS))
    rssm: RSSMOptions = param(RSSMOptions(), "kind rssm: the stochastic state and its KL")
    tssm: TSSMOptions = param(TSSMOptions(), "kind tssm: layers, heads and the attended context")
    ensemble: int = param(1, "K > 1 trains K independently initialised Ms of this kind together and serves each "
                          "dream rollout from one of them (models/ensemble.py; Model-Ensemble TRPO, Kurutach et al. "
                          "2018), so that C cannot exploit one M's errors", minimum=1)
    seq_len: int = param(32, "training subsequence length (steps)", minimum=1)
    batch_size: int = param(32, "subsequences per update", minimum=1)
    epochs: int = param(20, "passes over the training windows", minimum=1)
    lr: float = param(1.0e-3, "Adam learning rate", above=0)
    grad_clip: float = param(1.0, "max global gradient norm", above=0)
    reward_weight: float = param(1.0, "weight of the reward MSE in the loss", minimum=0)
    reward_smoothing: float = param(0.0, "sigma in steps of the Gaussian kernel that smooths each episode's rewards "
                                    "into the reward head's target (DreamSmooth, Lee et al. 2024; the return is "
                                    "conserved); 0 = the raw rewards", minimum=0)
    done_weight: float = param(1.0, "weight of the done BCE in the loss", minimum=0)
    open_loop_horizon: int = param(0, "mdnrnn: k in 2 .. seq_len - 1 adds M's losses on its own dream to the loss: "
                                   "from states every k/2 steps of a window (the first after k/2), M reads its own sampled z (tau 1) with the real "
                                   "actions for k steps and is scored on the real z, reward and done "
                                   "(models.mdnrnn.open_loop_terms; PlaNet's overshooting); 0: off", minimum=0)
    open_loop_weight: float = param(1.0, "weight of the open-loop losses (open_loop_horizon)", minimum=0)
    holdout_fraction: float = param(0.1, "fraction of episodes held out", minimum=0, below=1)
    init_from: str = param("", "an M checkpoint (best.pt) of the same kind and sizes whose weights start training "
                           "instead of a random init (fine-tuning, e.g. iterative training); latest.pt resumes first")
    threads: int = param(2, "torch threads of stage 04", minimum=1)
    device: str = param("cpu", "where stage 04 trains M: cpu | cuda | auto (cuda when available)",
                        choices=DEVICES)

    def model_config(self):
        """The config dataclass of M's kind (MDNRNNConfig, RSSMConfig or TSSMConfig), read from this section."""
        return config_subset(MEMORY_KINDS[self.kind].config_class, self)


@dataclass
class ControllerConfig(LinearControllerConfig):
    """C: its hyperparameters (models/controller.py LinearControllerConfig, models/actor_critic.py
    ActorCriticConfig) plus stage 05's keys (CMA-ES for the linear C, imagination updates for the actor-critic)."""

    kind: str = param("linear", "linear (W [features] + b, trained by CMA-ES) | actor_critic (MLP actor and critic "
                      "trained only in M's imagination, Dreamer-style)", choices=tuple(CONTROLLER_KINDS))
    actor_critic: ActorCriticConfig = param(ActorCriticConfig(), "kind actor_critic: networks, horizon, returns")
    updates: int = param(2000, "actor_critic: imagination updates (eval_every counts updates for it)", minimum=1)
    batch_windows: int = param(16, "actor_critic: real latent windows (memory.seq_len steps) whose filtered states "
                               "start one update's imagination", minimum=1)
    env: str = param("real", "where C trains: real (the env itself) | dream (inside M; the held-out "
                     "re-evaluations stay real)", choices=("real", "dream"))
    temperature: float = param(1.0, "tau of M's sampling in the dream (Ha & Schmidhuber section 4.5): CMA-ES's dream "
                               "episodes and the actor-critic's imagination", above=0)
    dream_starts: str = param("reset", "env dream (CMA-ES): where dream episodes start: reset (M after the first "
                              "frame of a real episode, Ha & Schmidhuber) | anywhere (M after a real window of "
                              "memory.seq_len steps ending anywhere in an episode: pair it with a short max_steps)",
                              choices=("reset", "anywhere"))
    ensemble_fitness: str = param("mean", "env dream with an ensemble M (memory.ensemble K >= 2): a candidate's "
                                  "fitness is the mean return over all its rollouts (mean) | the lowest of the K "
                                  "world members' mean returns (min: EPOpt's worst case, Rajeswaran et al. 2017; "
                                  "rollouts_per_candidate must be a multiple of K)", choices=("mean", "min"))
    disagreement_penalty: float = param(0.0, "env dream with an ensemble M: lambda of MOPO's penalised reward "
                                        "r - lambda u (Yu et al. 2020), u the standard deviation of the K members' "
                                        "predicted rewards for the step; every member then filters every rollout "
                                        "(K member steps per dream step instead of 2); 0: off", minimum=0)
    init_from: str = param("", "a controller.pt of this C's kind whose C (the one evaluate.params names) starts "
                           "training: linear, CMA-ES's initial mean; actor_critic, the actor, critic and return scale "
                           "(fresh optimizers); empty: zeros / fresh networks")
    seed: int | None = param(None, "seed of C's training alone (CMA-ES's draws, its training and held-out "
                             "episodes, the initial weights; M's episode split and 06's goals keep the run seed): "
                             "several C seeds on one V and M; null: the run's seed", minimum=0)
    popsize: int = param(16, "CMA-ES population (cma needs at least 2)", minimum=2)
    rollouts_per_candidate: int = param(2, "fitness = mean return over this many episodes", minimum=1)
    generations: int = param(100, "CMA-ES generations", minimum=1)
    sigma0: float = param(0.1, "initial CMA-ES step size", above=0)
    max_steps: int = param(0, "cap on steps of a training episode (0: env.max_episode_steps)", minimum=0)
    early_stop_steps: int = param(0, "end a training episode after k steps without a new best return (0: off)",
                                  minimum=0)
    eval_every: int = param(10, "re-evaluate C on held-out seeds (and write a history row) every this many CMA-ES "
                            "generations, or actor_critic updates",
                            minimum=1)
    eval_episodes: int = param(8, "held-out episodes per re-evaluation", minimum=1)
    workers: int = param(2, "worker processes, each holding an env plus V and M", minimum=1)
    threads: int = param(2, "torch threads of the batched dream (controller.env: dream)", minimum=1)
    device: str = param("cpu", "where the batched dream runs M (controller.env: dream): cpu | cuda | auto; the "
                        "real-env workers stay on CPU", choices=DEVICES)
    worker_timeout_s: float = param(0.0, "a task running longer is a hung worker, killed and re-run; 0: derived "
                                    "from the episode length and the slowest episode so far", minimum=0)
    max_retries: int = param(2, "re-runs of a task whose worker crashed or hung", minimum=0)
    max_wall_minutes: float = param(0.0, "stop after the generation that passes this wall time (0: no limit)",
                                    minimum=0)

    def model_config(self):
        """The config dataclass of C's kind (LinearControllerConfig or ActorCriticConfig), read from this section."""
        return self.actor_critic if self.kind == "actor_critic" else config_subset(LinearControllerConfig, self)


@dataclass
class EvaluateConfig:
    """Stage 06."""

    episodes: int = param(100, "evaluation episodes, on seeds disjoint from every training seed", minimum=1)
    params: str = param("best", "the C that 06 plays and stage 01's rollouts.policy=controller records: best (the "
                        "CMA-ES mean with the best held-out real-env re-evaluation) | mean (the final CMA-ES mean or "
                        "actor; a dream-trained C then never used the real env but for logging)",
                        choices=("best", "mean"))
    max_steps: int = param(0, "cap on steps of an evaluation episode (0: env.max_episode_steps)", minimum=0)
    workers: int = param(2, "worker processes", minimum=1)
    gif_every: int = param(2, "keep every n-th frame in the GIF", minimum=1)
    gif_max_frames: int = param(300, "frames at most in a GIF", minimum=1)
    recon_frames: int = param(16, "held-out frames in the reconstruction grid", minimum=0)
    fid_frames: int = param(1000, "N held-out frames for FID (reconstructions and prior samples); 0: no FID",
                            minimum=0)


@dataclass
class IterativeConfig:
    """Iterative training (Ha & Schmidhuber section 5; utils/iterative.py): rounds of real episodes with the
    current agent, M refitted on all data so far, C trained in M only."""

    rounds: int = param(3, "rounds; round 0 records rollouts.episodes episodes with rollouts.policy", minimum=1)
    episodes: int = param(30, "real episodes each later round records with the previous round's agent plus "
                          "rollouts.action_noise", minimum=1)
    refit_vision: bool = param(False, "retrain V from scratch on all frames each round (false: round 0's V is kept)")
    memory_init: str = param("previous", "M in later rounds: previous (fine-tune the previous round's M for "
                             "memory_epochs) | scratch (train anew for memory.epochs)", choices=("previous", "scratch"))
    memory_epochs: int = param(5, "memory_init previous: epochs of fine-tuning per later round", minimum=1)
    controller_init: str = param("scratch", "C in later rounds: scratch (CMA-ES from zeros, a fresh actor-critic) | "
                                 "previous (the previous round's C, via controller.init_from, where both rounds "
                                 "train the same C kind: CMA-ES's mean, or the actor-critic continued)",
                                 choices=("scratch", "previous"))
    eval_episodes: int = param(20, "held-out real episodes of each round's stage 06 (the last round plays "
                               "evaluate.episodes)", minimum=1)
    bootstrap_generations: int = param(0, "round 0's C: 0 trains it in the dream like every round; N > 0 trains the "
                                       "linear C (whatever controller.kind) N CMA-ES generations in the real env "
                                       "(its episodes counted as real-env steps), so round 1 records a C that "
                                       "already drives somewhat", minimum=0)
    bootstrap_popsize: int = param(16, "bootstrap_generations > 0: CMA-ES population of round 0's real-env C",
                                   minimum=2)
    bootstrap_max_steps: int = param(600, "bootstrap_generations > 0: step limit of each real training episode",
                                     minimum=1)
    bootstrap_early_stop_steps: int = param(60, "bootstrap_generations > 0: end a real training episode after this "
                                            "many steps without reward (CarRacing: no new tile); 0 = never",
                                            minimum=0)
    final_round_sets: tuple[str, ...] = param((), "--set overrides (section.key=value) of the last round's stages "
                                              "on top of every round's, e.g. [controller.kind=actor_critic, "
                                              "controller.updates=300]: CMA-ES in M's dream makes the data of the "
                                              "earlier rounds, and another C learns in the final M; not run_dir, "
                                              "seed or iterative.*")


BACKENDS = ("local", "ray")


@dataclass
class BackendConfig:
    """Where stages 01, 05 and 06 play the real env (utils.parallel.make_pool)."""

    kind: str = param("local", "where the real-env episodes of stages 01, 05 and 06 run: local (worker processes "
                      "on this machine, the stages' workers keys) | ray (long-lived actors on a Ray cluster)",
                      choices=BACKENDS)
    address: str | None = param(None, "ray: null starts a local Ray on this machine; auto, host:port or "
                                "ray://host:port joins a running cluster (ray start --head)")
    actors: int = param(0, "ray: episode actors, one CPU each (0: one per CPU of the cluster)", minimum=0)


@dataclass
class Config:
    """One experiment: its folder, its seed and a section per stage."""

    run_dir: str = param("", "every artifact of the experiment goes under this folder (required)")
    seed: int = param(0, "run seed; every episode seed derives from it (utils/seeding.py)", minimum=0)
    env: EnvConfig = param(EnvConfig(), "the real environment")
    rollouts: RolloutsConfig = param(RolloutsConfig(), "stage 01")
    vision: VisionConfig = param(VisionConfig(), "V, stage 02 (and 03)")
    latents: LatentsConfig = param(LatentsConfig(), "stage 03")
    memory: MemoryConfig = param(MemoryConfig(), "M, stage 04")
    controller: ControllerConfig = param(ControllerConfig(), "C, stage 05")
    evaluate: EvaluateConfig = param(EvaluateConfig(), "stage 06")
    backend: BackendConfig = param(BackendConfig(), "where stages 01, 05 and 06 play the real env")
    iterative: IterativeConfig = param(IterativeConfig(), "python -m utils.iterative: rounds of 01-06")

    @property
    def controller_seed(self) -> int:
        """The seed of C's training (stage 05): controller.seed, or the run's seed where that is null."""
        return self.seed if self.controller.seed is None else self.controller.seed


# Keys that were renamed: a config that still uses the old name gets told the new one.
RENAMED = {
    "vision.workers": "vision.threads (workers counts processes; V trains in one process)",
    "mdnrnn": "memory (M's section; memory.kind: mdnrnn | rssm | tssm picks the model)",
    "memory.workers": "memory.threads (workers counts processes; M trains in one process)",
}


def _coerce(value: Any, typ: Any, dotted: str) -> Any:
    """Check a YAML value against the annotation `typ`; ints (and YAML's string '1e-3') are accepted for floats.

    Raises:
        ValueError: a value of another type.
    """
    optional = typing.get_origin(typ) in (typing.Union, types.UnionType) and type(None) in typing.get_args(typ)
    if optional:
        if value is None:
            return None
        typ = next(t for t in typing.get_args(typ) if t is not type(None))
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if typ in (int, float, str, bool):
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise ValueError(f"key '{dotted}': expected {typ.__name__}, got {value!r}")
        return value
    if typ == tuple[str, ...]:  # a YAML list of strings (a tuple keeps the config's defaults immutable)
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"key '{dotted}': expected a list of strings, got {value!r}")
        return tuple(value)
    raise TypeError(f"unsupported annotation {typ} at {dotted}")  # a bug in the schema


def _set_dotted(data: dict, dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"{source}: '{part}' in '{dotted}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, Any]]:
    """Parse `section.key=value` strings; values are read as YAML scalars (3, 0.1, true, vae)."""
    parsed = []
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"--set: expected section.key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        parsed.append((key.strip(), value))
    return parsed


def merge(base: dict, over: dict) -> dict:
    """Deep merge: the keys of `over` replace those of `base`; sections merge key by key."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def config_from_dict(data: dict, source: str = "<dict>", overrides: list[str] | None = None) -> Config:
    """Build a validated Config from a plain dict plus dotted overrides.

    Raises:
        UserError: an unknown key, a wrong type, a value outside its choices or bounds, or no run_dir,
            naming `source` and the dotted key.
    """
    data = dict(data or {})
    for key, value in parse_overrides(overrides):
        _set_dotted(data, key, value, f"{source} (--set {key})")
    try:
        cfg = config_from_fields(Config, data, coerce=_coerce, renamed=RENAMED)
    except ValueError as exc:
        raise UserError(f"{source}: {exc}") from None
    if not cfg.run_dir:
        raise UserError(f"{source}: key 'run_dir' is required (the folder every artifact of the run goes under)")
    return cfg


def read_config_file(path: str, _seen: tuple[str, ...] = ()) -> dict:
    """The YAML mapping of `path` with its `base:` files (relative to `path`) merged in below it.

    Raises:
        UserError: the file is missing, empty, not valid YAML or not a mapping; a `base:` cycle.
    """
    real = os.path.realpath(path)
    if real in _seen:
        raise UserError(f"{path}: 'base' includes itself ({' -> '.join(_seen + (real,))})")
    if not os.path.isfile(path):
        raise UserError(f"{path}: config file not found")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        raise UserError(f"{path}: the config file is empty (expected run_dir, seed and a section per stage)")
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of sections at the top, got {type(data).__name__}")
    bases = data.pop("base", [])
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise UserError(f"{path}: key 'base' must be a file path or a list of them, got {bases!r}")
    merged: dict = {}
    for base in bases:
        merged = merge(merged, read_config_file(os.path.join(os.path.dirname(path), base), _seen + (real,)))
    return merge(merged, data)


def load_config(paths: str | list[str], overrides: list[str] | None = None) -> Config:
    """Load the YAML file(s) `paths`, merged left to right (each with its `base:` files first), then apply
    `overrides`.

    Raises:
        UserError: a file is missing, empty or not valid YAML, or any key error of `config_from_dict`.
    """
    paths = [paths] if isinstance(paths, str) else list(paths)
    data: dict = {}
    for path in paths:
        data = merge(data, read_config_file(path))
    return config_from_dict(data, " + ".join(paths), overrides)


def config_to_dict(cfg: Config) -> dict:
    """The resolved config as plain dicts (written beside every artifact)."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def config_help(cls: type = Config, prefix: str = "") -> str:
    """Every key of the config: dotted name, type, default, allowed values or bounds, and meaning."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta, name = f.metadata, f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            lines += ["", f"{name}:  {meta.get('help', '')}"] if not prefix else [f"{name}:  {meta.get('help', '')}"]
            lines.append(config_help(hints[f.name], f"{name}."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        allowed = ""
        if meta.get("choices"):
            allowed = " | ".join(map(str, meta["choices"]))
        else:
            bounds = [f">= {meta['minimum']:g}" if meta.get("minimum") is not None else "",
                      f"<= {meta['maximum']:g}" if meta.get("maximum") is not None else "",
                      f"> {meta['above']:g}" if meta.get("above") is not None else "",
                      f"< {meta['below']:g}" if meta.get("below") is not None else ""]
            allowed = ", ".join(b for b in bounds if b)
        typ = hints[f.name]
        type_name = getattr(typ, "__name__", None) or str(typ).replace("NoneType", "None")
        if typ == tuple[str, ...]:  # written and read as a YAML list
            type_name, default = "list[str]", list(default)
        lines.append(f"  {name}: {type_name} = {default!r}" + (f"  [{allowed}]" if allowed else ""))
        lines.append(f"      {meta.get('help', '')}")
    return "\n".join(lines).lstrip("\n")
