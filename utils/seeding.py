"""One seeding function, and disjoint env-seed streams.

Every episode seed is `stream * 10**9 + (run_seed % 1000) * 10**6 + index`
(index < 10**6), so the streams below never share a seed: the tracks used to
record rollouts, to train the controller, to re-evaluate it during training and
to evaluate it at the end are all different CarRacing tracks.
"""

from __future__ import annotations

import random

import numpy as np

STREAMS = {"rollouts": 0, "controller_train": 1, "controller_holdout": 2, "evaluate": 3}


def env_seed(run_seed: int, stream: str, index: int) -> int:
    """Seed of episode `index` in `stream` (a key of STREAMS); fits in uint32."""
    if not 0 <= index < 10**6:
        raise ValueError(f"episode index {index} outside [0, 1e6)")
    return STREAMS[stream] * 10**9 + (run_seed % 1000) * 10**6 + index


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (the one place where global RNGs are seeded)."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
