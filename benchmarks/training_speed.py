#!/usr/bin/env python
"""Training speed of stage 02 (V) and stage 04 (M), beside ctallec/world-models when a checkout of it is given.

    python benchmarks/training_speed.py [--reference DIR] [--threads 1 2] [--episodes 3] [--blocks 7]

DIR is a work tree of https://github.com/ctallec/world-models (`git clone` it anywhere): its models/vae.py and
models/mdrnn.py are loaded from there at run time (they import only torch); nothing of it is in this repository.
Its training scripts need torchvision, which cannot load beside our torch wheel, so its losses and optimizers are
restated here from trainvae.py and trainmdrnn.py.

Data: `--episodes` CarRacing-v3 episodes of stage 01's brownian random policy, recorded by stage 01's task into a
temporary folder, and their latents (a conv VAE's mu and logvar, stage 03's format). Every row trains on the same
frames and latents. Sizes are the reference's: conv VAE z 32, batch 32; MDN-RNN z 32, LSTM 256, 5 Gaussians,
batch 16 windows x 32 steps.

Rows (median ms per training step over `--blocks` interleaved blocks of `--steps` steps, in one process, for
each torch thread count of `--threads`):

- 02 update:  ours = utils.training.vision_update (uint8 batch -> float, ELBO, backward, NaN guard, gradient
  clipping, fused Adam); reference = its VAE, summed MSE + KL, Adam, on the same uint8 batch / 255.
- 02 step:    ours = the next batch from utils.data.iterate_frame_batches (npz loading, shuffling) + the update;
  the reference's DataLoader needs torchvision, so it has no row.
- 02 NVAE:    ours only, the NVAE of configs/carracing_nvae.yaml at the same batch (the reference has none).
- 04 update:  ours = utils.training.memory_update (windows of stored latents batched, z sampled from mu and
  logvar, per-dimension mixture NLL + reward MSE + done BCE, masks, NaN guard, clipping, fused Adam);
  reference = its MDRNN + gmm_loss + BCE + MSE, RMSprop(lr 1e-3, alpha 0.9), on the same z windows.
- 04 step:    what one training step of each stage 04 costs as written: ours is the update above (stage 03
  encoded the frames once); the reference's trainmdrnn.py encodes the window's 2 x 16 x 32 frames through its
  VAE at every step (to_latent), timed here with the update on the same frames.

Prints each row's ms per step, images or windows per second, and ours / reference as a speed ratio (target >= 1.0).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.likelihood import frames_to_tensor  # noqa: E402
from utils.config import RolloutsConfig, load_config  # noqa: E402
from utils.data import LatentWindows, iterate_frame_batches  # noqa: E402
from utils.episodes import init_recorder, record_task  # noqa: E402
from utils.io import episode_path, load_episode, save_bytes, save_npz  # noqa: E402
from utils.training import build_model, make_adam, memory_update, train_vision, vision_update  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V_BATCH, M_BATCH, SEQ_LEN, Z_DIM, HIDDEN, GAUSSIANS = 32, 16, 32, 32, 256, 5


def load_reference(root: str) -> dict:
    """The reference's VAE class, MDRNN class and gmm_loss, loaded from its files under unique module names
    (its package is also called `models`)."""
    found = {}
    for name in ("vae", "mdrnn"):
        path = os.path.join(root, "models", f"{name}.py")
        if not os.path.exists(path):
            sys.exit(f"--reference {root}: no models/{name}.py there; pass a clone of ctallec/world-models")
        spec = importlib.util.spec_from_file_location(f"reference_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        found[name] = module
    return {"VAE": found["vae"].VAE, "MDRNN": found["mdrnn"].MDRNN, "gmm_loss": found["mdrnn"].gmm_loss}


def record_data(folder: str, episodes: int, max_steps: int = 0) -> tuple[list[str], list[str]]:
    """Record `episodes` brownian random-policy episodes (stage 01's task; max_steps 0: the env's 1000) and
    encode them with a conv VAE (stage 03's latent format). Returns (rollout files, latent files)."""
    cfg = load_config(os.path.join(ROOT, "configs", "carracing_vae.yaml"))
    state = init_recorder(cfg.env, RolloutsConfig(policy="brownian", max_steps=max_steps))
    vision = build_model("vision", "vae", cfg.vision.model_config(), frame_size=cfg.env.frame_size).eval()
    rollouts, latents = [], []
    for i in range(episodes):
        rollouts.append(episode_path(os.path.join(folder, "rollouts"), i))
        save_bytes(rollouts[-1], record_task(state, (i, 50_000 + i))["npz"])
        ep = load_episode(rollouts[-1], ("obs", "actions", "rewards", "terminated", "truncated"))
        with torch.no_grad():
            mu, logvar = vision.encode(frames_to_tensor(ep["obs"]))
        latents.append(episode_path(os.path.join(folder, "latents"), i))
        save_npz(latents[-1], mu=mu.numpy(), logvar=logvar.numpy(), **{k: v for k, v in ep.items() if k != "obs"})
    state["env"].close()
    return rollouts, latents


def cycle(make: Callable[[], object]):
    """An endless iterator over the iterables `make()` returns (a new epoch each time one ends)."""
    while True:
        yield from make()


def time_rows(rows: dict[str, Callable[[], None]], blocks: int, steps: int) -> dict[str, float]:
    """Median ms per call of each row: `blocks` rounds, each timing `steps` calls of every row in turn."""
    for fn in rows.values():
        for _ in range(3):
            fn()  # warm-up: allocator, first-call kernels
    times = {name: [] for name in rows}
    for _ in range(blocks):
        for name, fn in rows.items():
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            times[name].append(1000 * (time.perf_counter() - start) / steps)
    return {name: statistics.median(t) for name, t in times.items()}


def vision_rows(rollouts: list[str], reference: dict | None) -> dict[str, Callable[[], None]]:
    """Stage 02's rows: one training step each."""
    cfg = load_config(os.path.join(ROOT, "configs", "carracing_vae.yaml"))
    nvae_cfg = load_config(os.path.join(ROOT, "configs", "carracing_nvae.yaml"))
    torch.manual_seed(0)
    ours = build_model("vision", "vae", cfg.vision.model_config(), frame_size=64).train()
    nvae = build_model("vision", "nvae", nvae_cfg.vision.model_config(), frame_size=64).train()
    opt, nvae_opt = make_adam(ours, cfg.vision.lr), make_adam(nvae, nvae_cfg.vision.lr)
    rng = np.random.default_rng(0)
    batches = cycle(lambda: iterate_frame_batches(rollouts, V_BATCH, cfg.vision.chunk_episodes, rng))
    fixed = next(batches)
    rows = {
        "02 update": lambda: vision_update(ours, opt, fixed, 0.5, cfg.vision.grad_clip),
        "02 step": lambda: vision_update(ours, opt, next(batches), 0.5, cfg.vision.grad_clip),
        "02 NVAE update": lambda: vision_update(nvae, nvae_opt, fixed, 0.5, nvae_cfg.vision.grad_clip),
    }
    if reference:
        theirs = reference["VAE"](3, Z_DIM).train()
        their_opt = torch.optim.Adam(theirs.parameters())

        def reference_update() -> None:  # trainvae.py's train(): MSE summed over pixels + KL, Adam defaults
            x = torch.from_numpy(fixed).permute(0, 3, 1, 2).contiguous().float() / 255  # as ToTensor gives it
            their_opt.zero_grad()
            recon, mu, logsigma = theirs(x)
            kl = -0.5 * torch.sum(1 + 2 * logsigma - mu.pow(2) - (2 * logsigma).exp())
            loss = F.mse_loss(recon, x, reduction="sum") + kl
            loss.backward()
            loss.item()
            their_opt.step()

        rows["02 update (reference)"] = reference_update
    return rows


def memory_rows(rollouts: list[str], latents: list[str], reference: dict | None) -> dict[str, Callable[[], None]]:
    """Stage 04's rows: one training step each."""
    cfg = load_config(os.path.join(ROOT, "configs", "carracing_vae.yaml"))
    data = LatentWindows(latents, SEQ_LEN)
    action_dim = data.episodes[0]["actions"].shape[1]
    torch.manual_seed(0)
    ours = build_model("memory", "mdnrnn", cfg.memory.model_config(), z_dim=Z_DIM, action_dim=action_dim).train()
    opt = make_adam(ours, cfg.memory.lr)
    gen, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)

    def epoch_batches():
        pairs = data.windows(rng)
        order = rng.permutation(len(pairs))
        return [[pairs[i] for i in order[b : b + M_BATCH]] for b in range(0, max(1, len(order) - M_BATCH + 1), M_BATCH)]

    batches = cycle(epoch_batches)
    rows = {"04 update": lambda: memory_update(ours, opt, data, next(batches), cfg, gen)}  # also our 04 step
    if reference:
        theirs = reference["MDRNN"](Z_DIM, action_dim, HIDDEN, GAUSSIANS).train()
        their_opt = torch.optim.RMSprop(theirs.parameters(), lr=1e-3, alpha=0.9)
        their_vae = reference["VAE"](3, Z_DIM).eval()
        frames = {}  # each episode's frames, the last repeated once: the window ending there has T + 1 frames
        for i, f in enumerate(rollouts):
            obs = load_episode(f, ("obs",))["obs"]
            frames[i] = np.concatenate([obs, obs[-1:]])

        def window_batch() -> tuple[dict, list]:
            pairs = next(batches)
            b = {k: torch.from_numpy(v) for k, v in data.batch(pairs).items()}
            z = b["mu"] + torch.randn(b["mu"].shape, generator=gen) * (0.5 * b["logvar"]).exp()
            return {"z": z, **b}, pairs

        def reference_update(b: dict) -> None:  # trainmdrnn.py's get_loss and step, time-major, reward included
            seq = [t.transpose(1, 0) for t in (b["z"][:, :-1], b["actions"], b["rewards"], b["done"], b["z"][:, 1:])]
            latent, action, reward, terminal, latent_next = seq
            mus, sigmas, logpi, rs, ds = theirs(action, latent)
            gmm = reference["gmm_loss"](latent_next, mus, sigmas, logpi)
            loss = (gmm + F.binary_cross_entropy_with_logits(ds, terminal) + F.mse_loss(rs, reward)) / (Z_DIM + 2)
            their_opt.zero_grad()
            loss.backward()
            their_opt.step()
            loss.item()

        def reference_step() -> None:  # + to_latent: obs and next_obs of every window through the VAE, no grad
            b, pairs = window_batch()
            obs = np.stack([frames[i][s : s + SEQ_LEN + 1] for i, s in pairs])  # (16, 33, 64, 64, 3)
            with torch.no_grad():
                for x in (obs[:, :-1], obs[:, 1:]):
                    x = torch.from_numpy(np.ascontiguousarray(x)).reshape(-1, 64, 64, 3).permute(0, 3, 1, 2).contiguous().float() / 255
                    x = F.interpolate(x, size=64, mode="bilinear", align_corners=True)
                    _, mu, logsigma = their_vae(x)
                    latent = mu + logsigma.exp() * torch.randn_like(mu)  # noqa: F841  (timed, not used)
            reference_update(b)

        rows["04 update (reference)"] = lambda: reference_update(window_batch()[0])
        rows["04 step (reference)"] = reference_step
    return rows


def vision_epoch(rollouts: list[str], folder: str) -> dict:
    """One whole epoch of stage 02's loop (utils.training.train_vision) on all but the last episode, the last
    held out: data loading, updates, held-out evaluation and checkpoints. Returns its log row."""
    cfg = load_config(os.path.join(ROOT, "configs", "carracing_vae.yaml"),
                      [f"run_dir={folder}", "vision.epochs=1", f"vision.batch_size={V_BATCH}"])
    torch.manual_seed(0)
    model = build_model("vision", "vae", cfg.vision.model_config(), frame_size=64)
    lengths = [len(load_episode(f, ("actions",))["actions"]) for f in rollouts[:-1]]
    cfg.vision.threads = torch.get_num_threads()  # train_vision sets torch's threads from the config
    out_dir = os.path.join(folder, f"vision_{cfg.vision.threads}")
    os.makedirs(out_dir)
    row = train_vision(cfg, model, rollouts[:-1], lengths, rollouts[-1:], out_dir)[-1]
    held_out = len(load_episode(rollouts[-1], ("actions",))["actions"])
    return {**row, "images": sum(lengths), "held_out": min(held_out, cfg.vision.val_frames)}


def report(threads: int, ms: dict[str, float], blocks: int, steps: int) -> None:
    """Print one thread count's table."""
    print(f"\ntorch threads {threads} (median of {blocks} blocks of {steps} steps; load average "
          f"{os.getloadavg()[0]:.2f})")
    print(f"{'row':16s}{'ours ms':>10s}{'per s':>10s}{'ref ms':>10s}{'per s':>10s}{'ours/ref':>10s}")
    ms = {"04 step": ms["04 update"], **ms}  # our stage 04 step is the update: 03 encoded the frames once
    for name in ("02 update", "02 step", "02 NVAE update", "04 update", "04 step"):
        per_step = V_BATCH if name.startswith("02") else M_BATCH
        unit = "img" if name.startswith("02") else "win"
        line = f"{name:16s}{ms[name]:10.1f}{1000 * per_step / ms[name]:7.0f} {unit}"
        ref = ms.get(f"{name} (reference)")
        if ref:
            line += f"{ref:10.1f}{1000 * per_step / ref:7.0f} {unit}{ref / ms[name]:9.2f}x"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", help="a clone of ctallec/world-models (omit: our rows only)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--episodes", type=int, default=3, help="random-policy episodes recorded as the data")
    parser.add_argument("--max-steps", type=int, default=0, help="steps per recorded episode (0: 1000)")
    parser.add_argument("--blocks", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="training steps per timed block")
    args = parser.parse_args()
    reference = load_reference(args.reference) if args.reference else None
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        rollouts, latents = record_data(tmp, args.episodes, args.max_steps)
        frames = sum(len(load_episode(f, ("actions",))["actions"]) for f in rollouts)
        print(f"data: {args.episodes} CarRacing-v3 episodes, {frames} frames, recorded and encoded in "
              f"{time.perf_counter() - start:.0f} s")
        for threads in args.threads:
            torch.set_num_threads(threads)
            rows = {**vision_rows(rollouts, reference), **memory_rows(rollouts, latents, reference)}
            report(threads, time_rows(rows, args.blocks, args.steps), args.blocks, args.steps)
            if len(rollouts) > 1:
                row = vision_epoch(rollouts, tmp)
                print(f"02 epoch (stage 02's loop, {row['images']} images, held-out evaluation on "
                      f"{row['held_out']} frames, checkpoints): {row['seconds']:.1f} s, "
                      f"{row['images'] / row['seconds']:.0f} img/s over the whole epoch, "
                      f"{row['images_per_s']:.0f} img/s in its updates")


if __name__ == "__main__":
    main()
