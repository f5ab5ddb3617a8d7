"""Training loops of V (stage 02) and M (stage 04): resumable, logged, NaN-safe.

Both loops keep two checkpoints in their stage folder, `latest.pt` (written
after every epoch, with the optimizer, to resume) and `best.pt` (lowest
held-out loss), plus `train_log.jsonl` with one line per epoch. Rerunning the
stage resumes from `latest.pt` until the configured number of epochs is done.
An update whose loss or gradient norm is not finite is skipped and counted
(as in VDVAE); weights that are not finite are never saved
(utils.checkpoints.save_model), and an epoch whose held-out loss is not
finite stops the stage with one line, so NaN never reaches a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from models import build
from models.hparams import config_from_dict
from models.likelihood import frames_to_tensor
from utils.checkpoints import has_position_heads, read_checkpoint, save_model
from utils.config import Config, config_to_dict
from utils.data import (KINEMATICS_KEY, POSITION_KEYS, LatentWindows, iterate_step_batches, sample_steps,
                        stack_positions)
from utils.errors import UserError
from utils.io import save_text


def guarded_step(loss: torch.Tensor, params, optimizer: torch.optim.Optimizer, grad_clip: float) -> bool:
    """Backward, clip and step; return False (and skip the update) when loss or grad norm is not finite."""
    optimizer.zero_grad(set_to_none=True)
    if not torch.isfinite(loss):
        return False
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    if not torch.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        return False
    optimizer.step()
    return True


def make_adam(model: torch.nn.Module, lr: float) -> torch.optim.Adam:
    """Adam with the fused kernel (CPU and CUDA): the same update as the per-tensor loop, to float
    rounding, 3x faster than foreach and 6x faster than the loop on the MDN-RNN's parameters here."""
    return torch.optim.Adam(model.parameters(), lr=lr, fused=True)


def _accumulate(sums: dict[str, float], terms: dict[str, torch.Tensor], weight: float = 1.0) -> None:
    """sums[name] += weight * term, for every scalar loss term."""
    for k, v in terms.items():
        sums[k] = sums.get(k, 0.0) + v.item() * weight


def _write_log(path: str, history: list[dict]) -> None:
    save_text(path, "".join(json.dumps(row) + "\n" for row in history))


def build_model(family: str, kind: str, config, **sizes):
    """models.build, with an architecture that cannot take the config's sizes reported as a UserError."""
    try:
        return build(family, kind, config, **sizes)
    except ValueError as exc:
        raise UserError(f"{family} kind {kind}: {exc}") from None


def _saved_model(ckpt: dict, model: torch.nn.Module) -> tuple:
    """(kind, config, sizes) of a checkpoint, its config completed with today's defaults for keys added since it
    was written (a V saved before vision.position_heads existed is the same V as one saved with it off)."""
    config = ckpt.get("config")
    try:
        config = dataclasses.asdict(config_from_dict(type(model.config), config))
    except (ValueError, TypeError):
        pass  # not this model's config: left as saved, so that it differs
    return ckpt.get("kind"), config, ckpt.get("sizes")


def check_init_from(path: str, model: torch.nn.Module) -> dict:
    """The checkpoint at `path` (memory.init_from) when it holds weights for `model`: same kind, config and sizes.

    Raises:
        UserError: unreadable, or saved for another kind, config or sizes.
    """
    ckpt = read_checkpoint(path)
    saved = _saved_model(ckpt, model)
    wanted = (model.kind, dataclasses.asdict(model.config), model.sizes())
    if saved != wanted:
        raise UserError(f"memory.init_from: {path} holds {saved[0]} {saved[1]} {saved[2]}, this run builds "
                        f"{wanted[0]} {wanted[1]} {wanted[2]}")
    return ckpt


def _resume(latest: str, model: torch.nn.Module, optimizer) -> tuple[int, list[dict], float]:
    """Restore model and optimizer from `latest`; return (next epoch, history, best held-out loss).

    Raises:
        UserError: latest.pt of another kind, config or sizes than this run's model.
    """
    if not os.path.exists(latest):
        return 0, [], math.inf
    ckpt = read_checkpoint(latest)
    saved = _saved_model(ckpt, model)
    wanted = (model.kind, dataclasses.asdict(model.config), model.sizes())
    if saved != wanted:
        raise UserError(
            f"{latest}: saved for {saved[0]} {saved[1]} {saved[2]}, the config asks for {wanted[0]} {wanted[1]} "
            f"{wanted[2]}; use another run_dir or delete the folder to start over"
        )
    model.load_state_dict(ckpt["state_dict"])
    optimizer.load_state_dict(ckpt["optimizer"])
    history = ckpt["history"]
    best = min((row["val_loss"] for row in history), default=math.inf)
    return ckpt["epoch"], history, best


def _epoch_loop(
    name: str,
    epochs: int,
    start_epoch: int,
    history: list[dict],
    best: float,
    run_epoch: Callable[[int], dict],
    evaluate: Callable[[], dict],
    save: Callable[[str, int, list[dict]], None],
    out_dir: str,
) -> list[dict]:
    """The epoch loop both trainers share: train, evaluate, log, checkpoint (latest and best)."""
    if start_epoch >= epochs:
        tqdm.write(f"[{name}] already trained for {start_epoch} epochs (config: {epochs}); nothing to do")
    elif start_epoch:
        tqdm.write(f"[{name}] resuming at epoch {start_epoch + 1}/{epochs} from {out_dir}/latest.pt")
    for epoch in range(start_epoch, epochs):
        start = time.perf_counter()
        row = {"epoch": epoch + 1, **run_epoch(epoch)}
        row.update({f"val_{k}": v for k, v in evaluate().items()})
        row["seconds"] = round(time.perf_counter() - start, 2)
        if not math.isfinite(row["val_loss"]):
            raise UserError(f"{out_dir}: epoch {epoch + 1} gave a non-finite held-out loss ({row['val_loss']}) after "
                            f"{row.get('skipped_updates', 0)} skipped updates; nothing of it was saved (lower the "
                            "learning rate, or check the inputs)")
        history.append(row)
        improved = row["val_loss"] < best
        if improved:
            best = row["val_loss"]
            save(os.path.join(out_dir, "best.pt"), epoch + 1, history)
        save(os.path.join(out_dir, "latest.pt"), epoch + 1, history)
        _write_log(os.path.join(out_dir, "train_log.jsonl"), history)
        shown = {k: v for k, v in row.items() if k not in ("epoch", "seconds")}
        tqdm.write(
            f"[{name}] epoch {epoch + 1}/{epochs} "
            + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())
            + f" ({row['seconds']:.0f} s){' *best' if improved else ''}"
        )
    return history


# ---------------------------------------------------------------- V


def resolve_device(name: str, key: str = "vision.device") -> torch.device:
    """The value of a device key (cpu | cuda | auto) -> a torch.device.

    Raises:
        UserError: cuda asked for on a machine where torch sees no CUDA device (naming `key`).
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{key}=cuda but torch sees no CUDA device here; use cpu or auto")
    return torch.device(name)


@torch.no_grad()
def evaluate_vision(model, frames: np.ndarray, batch_size: int = 256, positions: np.ndarray | None = None,
                    proprio: np.ndarray | None = None) -> dict:
    """Mean loss terms (nats/image) and MSE of decode(mu) over uint8 frames (N, S, S, 3),
    computed on the model's device; with positions float32 (N, 2, 3) (m) and a V with position heads, also
    their NLL and error in cm (`goal_cm`, `gripper_cm`: models.vae.position_terms); with proprio float32 (N, 7)
    (rad) and a V with joint kinematics, its NLL and error (`kinematics`, `kinematics_cm`)."""
    model.eval()
    device = next(model.parameters()).device
    sums: dict[str, float] = {}
    rows = lambda a, b: None if a is None else torch.from_numpy(a[b : b + batch_size]).to(device)  # noqa: E731
    for b in range(0, len(frames), batch_size):
        x = frames_to_tensor(frames[b : b + batch_size]).to(device)
        terms = model.loss(x, positions=rows(positions, b), proprio=rows(proprio, b))
        terms["mse"] = (model.reconstruct(x) - x).pow(2).mean()  # from the flat z alone
        if hasattr(model, "reconstruct_full"):  # hierarchical V: every group from the posterior
            terms["mse_full"] = (model.reconstruct_full(x) - x).pow(2).mean()
        _accumulate(sums, terms, len(x))
    return {k: v / len(frames) for k, v in sums.items()}


def vision_update(model, optimizer, frames: np.ndarray, progress: float, grad_clip: float,
                  positions: np.ndarray | None = None, proprio: np.ndarray | None = None) -> dict | None:
    """One training step of V (stage 02): uint8 frames (B, S, S, 3) (and, for position heads, the goal and
    gripper positions float32 (B, 2, 3), m; for joint kinematics, the joint angles float32 (B, 7), rad) -> the
    loss terms (scalar tensors), or None when the update was skipped for a non-finite loss or gradient.
    `progress` in [0, 1] drives the NVAE's KL warm-up."""
    device = next(model.parameters()).device
    x = frames_to_tensor(frames).to(device)
    p = None if positions is None else torch.from_numpy(positions).to(device)
    q = None if proprio is None else torch.from_numpy(np.asarray(proprio, dtype=np.float32)).to(device)
    terms = model.objective(x, progress, p, q)
    return terms if guarded_step(terms["loss"], model.parameters(), optimizer, grad_clip) else None


def train_vision(cfg: Config, model: torch.nn.Module, train_files: list[str], train_lengths: list[int],
                 val_files: list[str], out_dir: str) -> list[dict]:
    """Train the fresh V `model` (built from cfg.vision, already on its device) on the frames of `train_files`
    (`train_lengths` frames each, checked by utils.data.check_rollouts), and its position heads on their goal
    and gripper positions (utils.data.POSITION_KEYS, checked by the stage); see the module docstring."""
    vc = cfg.vision
    torch.set_num_threads(vc.threads)
    optimizer = make_adam(model, vc.lr)
    start_epoch, history, best = _resume(os.path.join(out_dir, "latest.pt"), model, optimizer)
    heads = has_position_heads(model)
    kinematics = getattr(model, "joint_kinematics", None) is not None
    keys = ("obs",) + (POSITION_KEYS if heads else ()) + ((KINEMATICS_KEY,) if kinematics else ())
    val = sample_steps(val_files, vc.val_frames, cfg.seed, keys)
    val_positions = stack_positions(val) if heads else None
    val_proprio = val[KINEMATICS_KEY].astype(np.float32) if kinematics else None
    split = {"train": [os.path.basename(f) for f in train_files], "held_out": [os.path.basename(f) for f in val_files]}
    n_train_frames = sum(train_lengths)

    def run_epoch(epoch: int) -> dict:
        model.train()
        rng = np.random.default_rng([cfg.seed, epoch])
        sums, n_batches, skipped, images = {}, 0, 0, 0
        start = time.perf_counter()
        bar = tqdm(desc=f"02 epoch {epoch + 1}", unit="img", leave=False, disable=None)
        for batch in iterate_step_batches(train_files, keys, vc.batch_size, vc.chunk_episodes, rng):
            frames = batch["obs"]
            progress = (epoch + images / n_train_frames) / vc.epochs
            positions = stack_positions(batch) if heads else None
            terms = vision_update(model, optimizer, frames, progress, vc.grad_clip, positions,
                                  batch[KINEMATICS_KEY] if kinematics else None)
            if terms is None:
                skipped += 1
                continue
            _accumulate(sums, terms)
            n_batches += 1
            images += len(frames)
            bar.update(len(frames))
            bar.set_postfix(loss=f"{terms['loss'].item():.1f}")
        bar.close()
        row = {k: v / max(1, n_batches) for k, v in sums.items()}
        row.update(skipped_updates=skipped, images_per_s=round(images / (time.perf_counter() - start), 1))
        return row

    def save(path: str, epoch: int, hist: list[dict]) -> None:
        save_model(path, model, run_config=config_to_dict(cfg), optimizer=optimizer.state_dict(), epoch=epoch,
                   metrics=hist[-1], history=hist, split=split)

    evaluate = lambda: evaluate_vision(model, val["obs"], positions=val_positions, proprio=val_proprio)  # noqa: E731
    return _epoch_loop("02", vc.epochs, start_epoch, history, best, run_epoch, evaluate, save, out_dir)


# ---------------------------------------------------------------- M


def _latent_batch_loss(model, data: LatentWindows, pairs, cfg: Config, gen: torch.Generator) -> dict:
    """Sample z from the stored posteriors (mu, logvar) and compute the masked loss on windows `pairs`."""
    b = {k: torch.from_numpy(v) for k, v in data.batch(pairs).items()}
    z = b["mu"] + torch.randn(b["mu"].shape, generator=gen) * (0.5 * b["logvar"]).exp()  # drawn on the CPU
    device = next(model.parameters()).device
    z, b = z.to(device), {k: v.to(device) for k, v in b.items()}
    mc = cfg.memory
    open_loop = {"open_loop_horizon": mc.open_loop_horizon, "open_loop_weight": mc.open_loop_weight} \
        if mc.open_loop_horizon else {}
    return model.loss(z, b["actions"], b["rewards"], b["done"], b["next_valid"], b["step_valid"], mc.reward_weight,
                      mc.done_weight, **open_loop)


def check_memory_options(cfg: Config) -> None:
    """Stage 04's keys that no single field check can judge, checked before anything is written.

    Raises:
        UserError: a TSSM context longer than memory.seq_len; memory.open_loop_horizon for another kind than
            the MDN-RNN, or outside 2 .. memory.seq_len - 1.
    """
    mc = cfg.memory
    if mc.kind == "tssm" and mc.tssm.context > mc.seq_len:
        raise UserError(f"memory.tssm.context ({mc.tssm.context}) exceeds memory.seq_len ({mc.seq_len}): in play the "
                        "TSSM would attend over spans no training window showed it; lower the context or lengthen "
                        "the windows")
    if mc.open_loop_horizon and mc.kind != "mdnrnn":
        raise UserError(f"memory.open_loop_horizon: the open-loop loss is the MDN-RNN's (memory.kind is {mc.kind}; "
                        "the RSSM's KL already trains its prior on its own states); set it to 0")
    if mc.open_loop_horizon and not 2 <= mc.open_loop_horizon < mc.seq_len:
        raise UserError(f"memory.open_loop_horizon: expected 0 (off) or 2 .. memory.seq_len - 1 "
                        f"({mc.seq_len - 1}) steps, got {mc.open_loop_horizon}")


@torch.no_grad()
def memory_terms(model, data: LatentWindows, cfg: Config) -> dict[str, float]:
    """M's loss terms (floats; `nll` in nats per latent dim per step) averaged over every window of `data`,
    with z drawn from the stored posteriors by a generator seeded with the run seed: stage 04's held-out
    evaluation, and any later check of an M on other episodes."""
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    pairs = data.windows(None)
    sums, n = {}, 0
    for b in range(0, len(pairs), cfg.memory.batch_size):
        chunk = pairs[b : b + cfg.memory.batch_size]
        _accumulate(sums, _latent_batch_loss(model, data, chunk, cfg, gen), len(chunk))
        n += len(chunk)
    return {k: v / max(1, n) for k, v in sums.items()}


def memory_update(model, optimizer, data: LatentWindows, pairs, cfg: Config, gen: torch.Generator) -> dict | None:
    """One training step of M (stage 04) on the windows `pairs` of `data`: the loss terms (scalar tensors),
    or None when the update was skipped for a non-finite loss or gradient."""
    terms = _latent_batch_loss(model, data, pairs, cfg, gen)
    return terms if guarded_step(terms["loss"], model.parameters(), optimizer, cfg.memory.grad_clip) else None


def train_memory(cfg: Config, train_files: list[str], val_files: list[str], z_dim: int, action_dim: int,
                 out_dir: str) -> list[dict]:
    """Train M of kind memory.kind on windows of z sampled from the latents of `train_files`; see the module
    docstring."""
    mc = cfg.memory
    torch.set_num_threads(mc.threads)
    model = build_model("memory", mc.kind, mc.model_config(), z_dim=z_dim, action_dim=action_dim,
                        members=mc.ensemble)
    model.to(resolve_device(mc.device, "memory.device"))  # before the optimizer: a resumed Adam state follows
    optimizer = make_adam(model, mc.lr)
    start_epoch, history, best = _resume(os.path.join(out_dir, "latest.pt"), model, optimizer)
    if not start_epoch and mc.init_from:  # fine-tuning: the weights only, with a fresh optimizer
        model.load_state_dict(check_init_from(mc.init_from, model)["state_dict"])
    train_data = LatentWindows(train_files, mc.seq_len, mc.reward_smoothing)
    val_data = LatentWindows(val_files, mc.seq_len, mc.reward_smoothing)

    def run_epoch(epoch: int) -> dict:
        model.train()
        rng = np.random.default_rng([cfg.seed, epoch])
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        torch.manual_seed(cfg.seed * 1000 + epoch)  # M's own sampling (the RSSM's posterior): an epoch resumes alike
        pairs = train_data.windows(rng)
        order = rng.permutation(len(pairs))
        sums, n_batches, skipped = {}, 0, 0
        for b in tqdm(range(0, len(order), mc.batch_size), desc=f"04 epoch {epoch + 1}", leave=False, disable=None):
            terms = memory_update(model, optimizer, train_data, [pairs[i] for i in order[b : b + mc.batch_size]], cfg, gen)
            if terms is None:
                skipped += 1
                continue
            _accumulate(sums, terms)
            n_batches += 1
        row = {k: v / max(1, n_batches) for k, v in sums.items()}
        row["skipped_updates"] = skipped
        return row

    def evaluate() -> dict:
        return memory_terms(model, val_data, cfg)

    def save(path: str, epoch: int, hist: list[dict]) -> None:
        save_model(path, model, run_config=config_to_dict(cfg), optimizer=optimizer.state_dict(), epoch=epoch,
                   metrics=hist[-1], history=hist)

    return _epoch_loop("04", mc.epochs, start_epoch, history, best, run_epoch, evaluate, save, out_dir)
