"""Typed experiment config: one YAML file per experiment, dotted overrides, strict keys.

A config file holds `run_dir`, `seed` and one section per stage. Every key is a
field of the dataclasses below; an unknown or misspelled key, or a value of the
wrong type, raises `UserError` naming the file and the dotted key.

    cfg = load_config("configs/smoke.yaml", ["vision.z_dim=16", "seed=3"])
    cfg.vision.z_dim  # 16

The field comments are the documentation of each key.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from utils.errors import UserError


@dataclass
class EnvConfig:
    id: str = "CarRacing-v3"  # gymnasium id of the real environment
    frame_size: int = 64  # V's input is frame_size x frame_size RGB
    crop_dashboard: bool = False  # drop CarRacing's bottom 12 dashboard rows before resizing
    max_episode_steps: int = 1000  # time limit of one episode (env steps)
    # PandaReach only (panda-gym): the frame is env.render() from this camera, render_size x render_size RGB,
    # then resized to frame_size. The defaults show the goal marker on 1-17 px at 84x84 (docs/notes/panda_gym.md).
    render_size: int = 84  # env.render() width and height in pixels (the thesis: 84)
    camera_distance: float = 0.9  # metres from the camera target
    camera_yaw: float = 45.0  # degrees
    camera_pitch: float = -40.0  # degrees
    camera_target_x: float = -0.1  # camera target (m), in the robot base frame
    camera_target_y: float = 0.0
    camera_target_z: float = 0.1


@dataclass
class RolloutsConfig:
    episodes: int = 1000  # episodes to record for V and M (indices already on disk are skipped)
    policy: str = "brownian"  # brownian (ctallec/world-models) | uniform | controller (a trained C, below)
    brownian_dt: float = 0.02  # step of the brownian action walk: a += sqrt(dt) * N(0, 1)
    controller: str = ""  # policy=controller: controller.pt of a trained run (plays with the V and M it was trained with)
    action_noise: float = 0.1  # policy=controller: std of the Gaussian noise added to C's action (then clipped)
    max_steps: int = 0  # cap on steps per recorded episode (0: env.max_episode_steps)
    workers: int = 2  # parallel worker processes


@dataclass
class NVAEConfig:
    channels: int = 8  # channels at full resolution; doubled at every halving
    preprocess_blocks: int = 2  # stride-2 encoder cells before the first latent scale (mirrored in the decoder)
    latent_scales: int = 3  # scales with latent groups; the top one is frame_size / 2^(preprocess_blocks + latent_scales - 1)
    groups_per_scale: int = 2
    latent_channels: int = 2  # channels of each latent group; z_dim = latent_channels * top_size^2
    cells_per_group: int = 1  # residual cells per group, in the encoder and in the decoder
    num_flows: int = 0  # IAF steps in the posterior of every group below the top (thesis Table 4: 2)
    kl_warmup_fraction: float = 0.3  # KL weight rises linearly from 1e-4 to 1 over this fraction of updates
    kl_balance: bool = True  # balance the KL of the groups during warm-up
    spectral_lambda: float = 0.1  # weight of the spectral + BatchNorm regulariser


@dataclass
class VisionConfig:
    kind: str = "vae"  # vae (Ha & Schmidhuber conv VAE) | nvae (Vahdat & Kautz hierarchical VAE)
    z_dim: int = 32  # size of the flat latent z that M and C see
    likelihood: str = "gaussian"  # gaussian (fixed obs_std) | bernoulli | logistic_mixture (discretized, PixelCNN++)
    mixtures: int = 10  # components of the logistic_mixture likelihood
    obs_std: float = 0.7071  # std of the gaussian likelihood; sqrt(1/2) makes -log p = sum sq. error + const
    kl_tolerance: float = 0.5  # free nats per dim of z (Ha & Schmidhuber; the NVAE's top group); 0: plain ELBO
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1.0e-3
    grad_clip: float = 100.0  # max global grad norm
    holdout_fraction: float = 0.1  # fraction of episodes held out (split by episode, sorted then seeded)
    val_frames: int = 2048  # held-out frames used for the per-epoch validation ELBO
    chunk_episodes: int = 32  # episodes held in memory at once while shuffling frames
    workers: int = 2  # torch threads
    device: str = "cpu"  # where stages 02 and 03 run V: cpu | cuda | auto (cuda when available)
    nvae: NVAEConfig = field(default_factory=NVAEConfig)  # used when kind is nvae


@dataclass
class LatentsConfig:
    batch_size: int = 500  # frames encoded per forward pass


@dataclass
class MDNRNNConfig:
    hidden: int = 256  # LSTM units
    gaussians: int = 5  # mixture components per latent dimension
    seq_len: int = 32  # training subsequence length
    batch_size: int = 32
    epochs: int = 20
    lr: float = 1.0e-3
    grad_clip: float = 1.0
    min_log_sigma: float = -5.0  # sigma of each mixture component is bounded to
    max_log_sigma: float = 2.0  # [exp(min_log_sigma), exp(max_log_sigma)]
    reward_weight: float = 1.0  # weight of the reward MSE in the loss
    done_weight: float = 1.0  # weight of the done BCE in the loss
    holdout_fraction: float = 0.1
    workers: int = 2  # torch threads


@dataclass
class ControllerConfig:
    env: str = "real"  # real: the env itself | dream: inside M (held-out re-evaluations stay real)
    inputs: str = "z_h"  # what C sees: z_h ([z, h], pixels only) | z_h_proprio (+ the joint angles; real env, PandaReach)
    # | z_h_proprio_goal (+ joint angles and the goal position from the state: an upper bound, not from pixels)
    temperature: float = 1.0  # tau of M's sampling in the dream (Ha & Schmidhuber section 4.5)
    popsize: int = 16  # CMA-ES population
    rollouts_per_candidate: int = 2  # fitness = mean return over this many episodes
    generations: int = 100
    sigma0: float = 0.1  # initial CMA-ES step size
    max_steps: int = 0  # cap on steps of a training episode (0: env.max_episode_steps)
    early_stop_steps: int = 0  # end a training episode after k steps without a new best return (0: off)
    eval_every: int = 10  # re-evaluate the CMA-ES mean on held-out seeds every this many generations
    eval_episodes: int = 8  # held-out episodes per re-evaluation
    workers: int = 2  # worker processes, each holding an env plus V and M
    worker_timeout_s: float = 600.0  # a task running longer is treated as a hung worker and re-run
    max_retries: int = 2  # re-runs of a task whose worker crashed or hung
    max_wall_minutes: float = 0.0  # stop after the generation that passes this wall time (0: no limit)


@dataclass
class EvaluateConfig:
    episodes: int = 100  # evaluation episodes, on seeds disjoint from every training seed
    params: str = "best"  # best (best held-out re-evaluation) | mean (final CMA-ES mean)
    max_steps: int = 0  # 0: env.max_episode_steps
    workers: int = 2
    gif_every: int = 2  # keep every n-th frame in the GIF
    gif_max_frames: int = 300
    recon_frames: int = 16  # held-out frames in the reconstruction grid
    fid_frames: int = 1000  # N held-out frames for FID (reconstructions and prior samples); 0: no FID


@dataclass
class Config:
    run_dir: str = "runs/default"  # every artifact of the experiment goes under this folder
    seed: int = 0  # run seed; every episode seed derives from it (utils/seeding.py)
    env: EnvConfig = field(default_factory=EnvConfig)
    rollouts: RolloutsConfig = field(default_factory=RolloutsConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    latents: LatentsConfig = field(default_factory=LatentsConfig)
    mdnrnn: MDNRNNConfig = field(default_factory=MDNRNNConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)


# Allowed values of string keys: a typo here is as bad as a typo in a key name.
CHOICES = {
    "rollouts.policy": ("brownian", "uniform", "controller"),
    "vision.kind": ("vae", "nvae"),
    "vision.likelihood": ("gaussian", "bernoulli", "logistic_mixture"),
    "vision.device": ("cpu", "cuda", "auto"),
    "controller.env": ("real", "dream"),
    "controller.inputs": ("z_h", "z_h_proprio", "z_h_proprio_goal"),
    "evaluate.params": ("best", "mean"),
}


# Keys that must be positive (> 0) or non-negative (>= 0); a zero epoch count or batch
# size would otherwise fail deep inside a stage.
POSITIVE = (
    "env.frame_size", "env.max_episode_steps", "env.render_size", "env.camera_distance", "rollouts.episodes", "rollouts.workers", "vision.z_dim",
    "vision.mixtures", "vision.epochs", "vision.batch_size", "vision.lr", "vision.obs_std", "vision.val_frames",
    "vision.chunk_episodes", "vision.workers", "vision.nvae.channels", "vision.nvae.latent_scales",
    "vision.nvae.groups_per_scale", "vision.nvae.latent_channels", "vision.nvae.cells_per_group",
    "latents.batch_size", "mdnrnn.hidden", "mdnrnn.gaussians", "mdnrnn.seq_len", "mdnrnn.batch_size",
    "mdnrnn.epochs", "mdnrnn.lr", "mdnrnn.workers", "controller.popsize", "controller.rollouts_per_candidate",
    "controller.generations", "controller.temperature", "controller.sigma0", "controller.eval_every", "controller.eval_episodes",
    "controller.workers", "controller.worker_timeout_s", "evaluate.episodes", "evaluate.workers",
    "evaluate.gif_every", "evaluate.gif_max_frames",
)
NON_NEGATIVE = (
    "seed", "rollouts.max_steps", "rollouts.action_noise", "vision.kl_tolerance", "vision.nvae.preprocess_blocks", "vision.nvae.num_flows",
    "vision.nvae.kl_warmup_fraction", "vision.nvae.spectral_lambda", "controller.max_steps",
    "controller.early_stop_steps", "controller.max_retries", "controller.max_wall_minutes",
    "evaluate.max_steps", "evaluate.recon_frames", "evaluate.fid_frames",
)
FRACTIONS = ("vision.holdout_fraction", "mdnrnn.holdout_fraction")


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Check `value` against the annotation `typ`; ints (and YAML's string '1e-3') are accepted for floats."""
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if typ in (int, float, str, bool):
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise UserError(f"{where}: expected {typ.__name__}, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {typ} at {where}")  # a bug in the schema


def _build(cls: type, data: Any, source: str, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise UserError(f"{source}: '{prefix.rstrip('.') or '<top>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise UserError(
                f"{source}: unknown key '{prefix}{key}' (expected one of: {', '.join(sorted(names))})"
            )
    kwargs = {}
    for key, value in data.items():
        typ = hints[key]
        where = f"{source}: key '{prefix}{key}'"
        if dataclasses.is_dataclass(typ):
            kwargs[key] = _build(typ, value, source, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, typ, where)
            dotted, v = f"{prefix}{key}", kwargs[key]
            allowed = CHOICES.get(dotted)
            if allowed and v not in allowed:
                raise UserError(f"{where}: expected one of {allowed}, got {value!r}")
            if dotted in POSITIVE and not v > 0:
                raise UserError(f"{where}: expected a value > 0, got {value!r}")
            if dotted in NON_NEGATIVE and not v >= 0:
                raise UserError(f"{where}: expected a value >= 0, got {value!r}")
            if dotted in FRACTIONS and not 0 <= v < 1:
                raise UserError(f"{where}: expected a fraction in [0, 1), got {value!r}")
    return cls(**kwargs)


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


def config_from_dict(data: dict, source: str = "<dict>", overrides: list[str] | None = None) -> Config:
    """Build a validated Config from a plain dict plus dotted overrides.

    Raises:
        UserError: an unknown key, a wrong type or a value outside CHOICES, naming
            `source` and the dotted key.
    """
    data = dict(data or {})
    for key, value in parse_overrides(overrides):
        _set_dotted(data, key, value, f"{source} (--set {key})")
    return _build(Config, data, source, "")


def load_config(path: str, overrides: list[str] | None = None) -> Config:
    """Load and validate the YAML file `path`, then apply `overrides`.

    Raises:
        UserError: the file is missing or not valid YAML, or any key error of
            `config_from_dict`.
    """
    if not os.path.isfile(path):
        raise UserError(f"{path}: config file not found")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is not None and not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of sections at the top, got {type(data).__name__}")
    return config_from_dict(data or {}, path, overrides)


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
