"""Datasets over episode files: frames for V (stage 02), latent windows for M (stage 04).

Splits are by episode, never by frame (frames of one episode are nearly
duplicates): each episode's side is fixed by its file name and the run seed
(`split_episodes`), so it does not depend on the listing order and does not
change when more episodes are added.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from typing import Iterator

import numpy as np

from models.mdnrnn import smoothed_rewards
from utils.errors import UserError
from utils.io import load_episode


def holdout_draw(name: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by an episode's file name and the run seed."""
    return float(np.random.default_rng([seed, zlib.crc32(name.encode())]).random())


def split_episodes(files: list[str], holdout_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, held_out) lists of files, each sorted: an episode is held out when holdout_draw(its file name,
    seed) < holdout_fraction. So its side never changes when more episodes are added (iterative training's
    rounds), rollouts and latents of one episode fall on the same side, and about that fraction is held out.
    At least one episode each when there are two or more (the lowest draw is held out, the highest trained on)."""
    files = sorted(files)
    draws = [holdout_draw(os.path.basename(f), seed) for f in files]
    held_mask = [d < holdout_fraction for d in draws]
    if holdout_fraction > 0 and len(files) >= 2:
        if not any(held_mask):
            held_mask[int(np.argmin(draws))] = True
        if all(held_mask):
            held_mask[int(np.argmax(draws))] = False
    held = [f for f, h in zip(files, held_mask) if h]
    train = [f for f, h in zip(files, held_mask) if not h]
    return train, held


POSITION_KEYS = ("desired_goal", "achieved_goal")  # rollout arrays (T, 3), m: the labels of V's position heads
KINEMATICS_KEY = "proprio"  # rollout array (T, 7), rad: the input of V's joint kinematics


def iterate_step_batches(
    files: list[str], keys: tuple[str, ...], batch_size: int, chunk_episodes: int, rng: np.random.Generator
) -> Iterator[dict[str, np.ndarray]]:
    """Yield shuffled batches {key: array (B, ...)} of the per-step arrays `keys` covering every step of `files`
    once (the rows of one batch are the same steps in every key).

    Episodes are visited in random order, `chunk_episodes` at a time held in
    memory, and steps are shuffled within a chunk, so memory stays bounded
    however many rollouts there are. The last, smaller batch of a chunk is kept.
    """
    order = rng.permutation(len(files))
    for start in range(0, len(files), chunk_episodes):
        episodes = [load_episode(files[i], keys) for i in order[start : start + chunk_episodes]]
        arrays = {k: np.concatenate([e[k] for e in episodes]) for k in keys}
        perm = rng.permutation(len(arrays[keys[0]]))
        for b in range(0, len(perm), batch_size):
            rows = perm[b : b + batch_size]
            yield {k: v[rows] for k, v in arrays.items()}


def iterate_frame_batches(
    files: list[str], batch_size: int, chunk_episodes: int, rng: np.random.Generator
) -> Iterator[np.ndarray]:
    """Yield shuffled uint8 (B, S, S, 3) batches covering every frame of `files` once (`iterate_step_batches`
    of obs alone)."""
    for batch in iterate_step_batches(files, ("obs",), batch_size, chunk_episodes, rng):
        yield batch["obs"]


def sample_steps(files: list[str], n: int, seed: int, keys: tuple[str, ...] = ("obs",)) -> dict[str, np.ndarray]:
    """n steps spread evenly over `files`, deterministic for a seed: {key: array (n, ...)} of the per-step arrays
    `keys` (the same steps in every key)."""
    rng = np.random.default_rng(seed)
    per_file = max(1, int(np.ceil(n / max(1, len(files)))))
    parts = []
    for f in files:
        episode = load_episode(f, keys)
        length = len(episode[keys[0]])
        idx = np.sort(rng.choice(length, size=min(per_file, length), replace=False))
        parts.append({k: v[idx] for k, v in episode.items()})
    arrays = {k: np.concatenate([p[k] for p in parts]) for k in keys}
    rows = np.sort(rng.choice(len(arrays[keys[0]]), size=min(n, len(arrays[keys[0]])), replace=False))
    return {k: v[rows] for k, v in arrays.items()}


def sample_frames(files: list[str], n: int, seed: int) -> np.ndarray:
    """n frames (uint8 (n, S, S, 3)) spread evenly over `files`, deterministic for a seed."""
    return sample_steps(files, n, seed)["obs"]


def stack_positions(steps: dict[str, np.ndarray]) -> np.ndarray:
    """The labels of V's position heads from per-step arrays holding POSITION_KEYS: float32 (N, 2, 3), the goal
    and the gripper (models.vae.POSITION_NAMES), m."""
    return np.stack([steps[k] for k in POSITION_KEYS], axis=1).astype(np.float32)


def check_position_labels(files: list[str], joint_kinematics: bool = False) -> None:
    """Every rollout holds the position heads' labels (POSITION_KEYS, float (T, 3), finite) and, for V's joint
    kinematics, the joint angles (KINEMATICS_KEY, float (T, 7), finite).

    Raises:
        UserError: naming the first file without them (rollouts of another task, or recorded before 01 saved
            achieved_goal).
    """
    for path in files:
        if joint_kinematics:
            header = _npz_header(path)
            shape = header.get(KINEMATICS_KEY, ((),))[0]
            if len(shape) != 2 or shape[1] != 7:
                raise UserError(f"{path}: vision.joint_kinematics needs the per-step {KINEMATICS_KEY} float (T, 7) "
                                f"(PandaReach rollouts), found {'none' if KINEMATICS_KEY not in header else shape}")
            if not np.isfinite(load_episode(path, (KINEMATICS_KEY,))[KINEMATICS_KEY]).all():
                raise UserError(f"{path}: {KINEMATICS_KEY} holds non-finite values")
        steps = load_episode(path, POSITION_KEYS) if set(POSITION_KEYS) <= set(_npz_header(path)) else None
        if steps is None:
            raise UserError(f"{path}: vision.position_heads needs the per-step {' and '.join(POSITION_KEYS)} "
                            "(PandaReach rollouts recorded by 01 with this version); record the rollouts again")
        for key, value in steps.items():
            if value.ndim != 2 or value.shape[1] != 3 or not np.isfinite(value).all():
                raise UserError(f"{path}: {key} is {value.dtype} {value.shape}, expected finite float (T, 3)")


LATENT_KEYS = ("mu", "logvar", "actions", "rewards", "terminated")


class LatentWindows:
    """Fixed-length training windows over encoded episodes, for the MDN-RNN.

    Each episode of length T gives mu, logvar padded to T+1 (the last frame has
    no successor) and windows of `seq_len` steps starting every `seq_len` steps
    from a random phase per epoch, plus one window ending at the episode's last
    step, so every terminal step is trained on. Episodes shorter than `seq_len`
    are padded and masked. With `reward_sigma` > 0 the rewards are each
    episode's, smoothed (models.mdnrnn.smoothed_rewards: the reward head's
    target under memory.reward_smoothing).
    """

    def __init__(self, files: list[str], seq_len: int, reward_sigma: float = 0.0):
        self.seq_len = seq_len
        self.reward_sigma = reward_sigma
        self.episodes = [self._load(f) for f in files]

    def _load(self, path: str) -> dict[str, np.ndarray]:
        e = load_episode(path, LATENT_KEYS)
        T, L = len(e["actions"]), self.seq_len
        lengths = {k: len(v) for k, v in e.items()}
        if T < 1 or len(set(lengths.values())) != 1:
            raise UserError(f"{path}: expected arrays of one length >= 1, got {lengths}")
        length = max(T, L)
        out = {
            "mu": np.zeros((length + 1, e["mu"].shape[1]), np.float32),
            "logvar": np.zeros((length + 1, e["mu"].shape[1]), np.float32),
            "actions": np.zeros((length, e["actions"].shape[1]), np.float32),
            "rewards": np.zeros(length, np.float32),
            "done": np.zeros(length, np.float32),
            "next_valid": np.zeros(length, np.float32),
            "step_valid": np.zeros(length, np.float32),
        }
        out["mu"][:T] = e["mu"][:T]
        out["logvar"][:T] = e["logvar"][:T]
        out["actions"][:T] = e["actions"]
        out["rewards"][:T] = smoothed_rewards(e["rewards"], self.reward_sigma)
        out["done"][:T] = e["terminated"]
        out["next_valid"][: T - 1] = 1.0
        out["step_valid"][:T] = 1.0
        out["name"] = os.path.basename(path)
        return out

    def windows(self, rng: np.random.Generator | None) -> list[tuple[int, int]]:
        """(episode, start) pairs for one epoch; rng None gives the fixed phase 0 (validation)."""
        L, pairs = self.seq_len, []
        for i, e in enumerate(self.episodes):
            n = len(e["actions"])
            phase = int(rng.integers(L)) if rng is not None else 0
            starts = list(range(phase, n - L + 1, L)) or [0]
            if starts[-1] != n - L:
                starts.append(n - L)
            pairs += [(i, s) for s in starts]
        return pairs

    def batch(self, pairs: list[tuple[int, int]]) -> dict[str, np.ndarray]:
        """Stack windows: mu, logvar (B, L+1, D); actions (B, L, A); the rest (B, L)."""
        L = self.seq_len
        out = {}
        for key in ("mu", "logvar"):
            out[key] = np.stack([self.episodes[i][key][s : s + L + 1] for i, s in pairs])
        for key in ("actions", "rewards", "done", "next_valid", "step_valid"):
            out[key] = np.stack([self.episodes[i][key][s : s + L] for i, s in pairs])
        return out


ROLLOUT_STEP_KEYS = ("actions", "rewards", "terminated", "truncated")  # one entry per step, beside obs


def _npz_header(path: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{array name: (shape, dtype)} of an npz, read from the .npy headers without decompressing the data."""
    out = {}
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            with archive.open(name) as f:
                major, _ = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                shape, _, dtype = read_header(f)
            out[name[:-4] if name.endswith(".npy") else name] = (shape, dtype)
    return out


def check_rollouts(files: list[str], frame_size: int) -> list[int]:
    """Check every rollout episode before a stage reads frames from them; return their lengths T.

    Each file must hold obs uint8 (T, frame_size, frame_size, 3) with T >= 1, and actions float (T, A) with one
    A for all files, rewards (T,), terminated and truncated (T,), the actions and rewards finite.

    Raises:
        UserError: naming the file and what was expected.
    """
    lengths, action_dim = [], None
    for path in files:
        try:
            header = _npz_header(path)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError, zlib.error) as exc:
            raise UserError(f"{path}: corrupt or unreadable npz ({type(exc).__name__}: {exc})") from None
        missing = [k for k in ("obs",) + ROLLOUT_STEP_KEYS if k not in header]
        if missing:
            raise UserError(f"{path}: missing arrays {missing} (found {sorted(header)})")
        shape, dtype = header["obs"]
        if dtype != np.uint8 or len(shape) != 4 or shape[1:] != (frame_size, frame_size, 3) or shape[0] < 1:
            raise UserError(f"{path}: obs is {dtype} {shape}, expected uint8 (T >= 1, {frame_size}, {frame_size}, 3) "
                            "for env.frame_size")
        steps = load_episode(path, ROLLOUT_STEP_KEYS)
        lengths_here = {k: len(v) for k, v in steps.items()}
        if set(lengths_here.values()) != {shape[0]}:
            raise UserError(f"{path}: {shape[0]} frames but per-step arrays of lengths {lengths_here}")
        actions = steps["actions"]
        if actions.ndim != 2 or (action_dim is not None and actions.shape[1] != action_dim):
            raise UserError(f"{path}: actions of shape {actions.shape}, expected (T, {action_dim or 'A'}) as in "
                            f"{files[0]}")
        action_dim = actions.shape[1]
        for key in ("actions", "rewards"):
            if not np.isfinite(steps[key]).all():
                raise UserError(f"{path}: {key} hold NaN or inf")
        lengths.append(int(shape[0]))
    return lengths


def check_latents(files: list[str]) -> list[int]:
    """Check every encoded episode before M trains on it; return their lengths T.

    Raises:
        UserError: a missing array, arrays of different lengths, or mu, logvar, actions or rewards that are not
            finite, naming the file.
    """
    lengths = []
    for path in files:
        e = load_episode(path, LATENT_KEYS)
        sizes = {k: len(v) for k, v in e.items()}
        if len(set(sizes.values())) != 1 or sizes["mu"] < 1:
            raise UserError(f"{path}: expected arrays of one length >= 1, got {sizes}")
        for key in ("mu", "logvar", "actions", "rewards"):
            if not np.isfinite(e[key]).all():
                raise UserError(f"{path}: {key} hold NaN or inf (re-encode with a V whose weights are finite)")
        lengths.append(sizes["mu"])
    return lengths


def start_latents(latent_files: list[str]) -> np.ndarray:
    """mu of the first frame of each episode in stage 03's npz files -> float32 (N, z_dim): where dreams start."""
    return np.stack([load_episode(path, ("mu",))["mu"][0] for path in latent_files]).astype(np.float32)
