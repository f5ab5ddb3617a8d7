"""Seeds, splits, datasets and atomic io."""

import os

import numpy as np
import pytest

from models.mdnrnn import smoothed_rewards
from utils.data import LatentWindows, iterate_frame_batches, split_episodes
from utils.errors import UserError
from utils.io import atomic_path, check_episodes, list_episodes, load_episode, save_npz
from utils.seeding import STREAMS, env_seed


def test_seed_streams_are_disjoint():
    seen = {}
    for stream in STREAMS:
        for run_seed in (0, 1, 999):
            for i in (0, 1, 999_999):
                s = env_seed(run_seed, stream, i)
                assert 0 <= s < 2**32
                assert s not in seen, (stream, run_seed, i, seen.get(s))
                seen[s] = (stream, run_seed, i)


def test_split_is_by_episode_seeded_and_stable_as_episodes_are_added():
    files = [f"run/latents/episode_{i:05d}.npz" for i in range(400)]
    shuffled = list(np.random.default_rng(1).permutation(files))
    train, held = split_episodes(shuffled, 0.25, seed=3)
    assert (train, held) == split_episodes(files, 0.25, seed=3)  # listing order does not matter
    assert not set(train) & set(held) and sorted(train + held) == files
    assert 0.2 < len(held) / len(files) < 0.3  # each episode is held out with probability 0.25
    assert split_episodes(files, 0.25, seed=4)[1] != held
    # an episode keeps its side when more are added (iterative training), and in every folder of the run
    fewer_train, fewer_held = split_episodes(files[:100], 0.25, seed=3)
    assert set(fewer_held) <= set(held) and set(fewer_train) <= set(train)
    rollouts = [f.replace("latents", "rollouts") for f in files]
    assert split_episodes(rollouts, 0.25, seed=3)[1] == [f.replace("latents", "rollouts") for f in held]
    assert len(split_episodes(files[:2], 0.01, 0)[1]) == 1 and len(split_episodes(files[:2], 0.99, 0)[0]) == 1


def write_episode(folder, index, T, rng):
    save_npz(
        os.path.join(folder, f"episode_{index:05d}.npz"),
        obs=rng.integers(0, 255, (T, 64, 64, 3), dtype=np.uint8),
        mu=rng.normal(size=(T, 4)).astype(np.float32),
        logvar=np.zeros((T, 4), np.float32),
        actions=rng.normal(size=(T, 3)).astype(np.float32),
        rewards=np.arange(T, dtype=np.float32),
        terminated=np.eye(1, T, T - 1, dtype=bool)[0],
    )


def test_frame_batches_cover_every_frame_once(tmp_path):
    rng = np.random.default_rng(0)
    for i, T in enumerate((5, 9, 3)):
        write_episode(tmp_path, i, T, rng)
    files = list_episodes(str(tmp_path))
    batches = list(iterate_frame_batches(files, batch_size=4, chunk_episodes=2, rng=np.random.default_rng(0)))
    frames = np.concatenate(batches)
    assert len(frames) == 17 and all(len(b) <= 4 for b in batches)
    everything = np.concatenate([load_episode(f, ("obs",))["obs"] for f in files])
    assert sorted(map(bytes, frames)) == sorted(map(bytes, everything))


def test_latent_windows_train_on_the_terminal_step(tmp_path):
    rng = np.random.default_rng(0)
    write_episode(tmp_path, 0, 21, rng)
    write_episode(tmp_path, 1, 3, rng)  # shorter than a window: padded and masked
    data = LatentWindows(list_episodes(str(tmp_path)), seq_len=8)
    pairs = data.windows(np.random.default_rng(0))
    batch = data.batch(pairs)
    assert batch["mu"].shape == (len(pairs), 9, 4) and batch["actions"].shape == (len(pairs), 8, 3)
    assert batch["done"].sum() == 2  # each episode's last step appears
    short = [k for k, (i, _) in enumerate(pairs) if i == 1][0]
    assert batch["step_valid"][short].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert batch["next_valid"][short].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]


def test_latent_windows_train_the_reward_head_on_the_smoothed_rewards(tmp_path):
    rng = np.random.default_rng(0)
    write_episode(tmp_path, 0, 40, rng)
    files = list_episodes(str(tmp_path))
    raw, smooth = LatentWindows(files, seq_len=40), LatentWindows(files, seq_len=40, reward_sigma=2.0)
    real = load_episode(files[0], ("rewards",))["rewards"]
    assert np.allclose(raw.batch([(0, 0)])["rewards"][0], real)
    assert np.allclose(smooth.batch([(0, 0)])["rewards"][0], smoothed_rewards(real, 2.0))
    assert not np.allclose(smooth.batch([(0, 0)])["rewards"][0], real)
    assert np.array_equal(smooth.batch([(0, 0)])["mu"], raw.batch([(0, 0)])["mu"])


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(str(target)) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]


def test_corrupt_and_missing_episodes_are_named(tmp_path):
    with pytest.raises(UserError, match="folder not found"):
        list_episodes(str(tmp_path / "none"))
    with pytest.raises(UserError, match="no episode_"):
        list_episodes(str(tmp_path))
    write_episode(tmp_path, 0, 4, np.random.default_rng(0))
    (tmp_path / "episode_00001.npz").write_bytes(b"not a zip at all")
    files = list_episodes(str(tmp_path))
    with pytest.raises(UserError, match="episode_00001.npz: corrupt"):
        check_episodes(files, ("actions",))
