"""Frechet Inception Distance of V's images, through pytorch-fid (an optional extra).

FID (Heusel et al. 2017) = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)),
over the 2048-d pool3 features of InceptionV3 for two image sets. pytorch-fid
needs torchvision, which the core never imports: everything here imports it
lazily, and `fid_unavailable()` says, in one line, why FID cannot run (the
extra is not installed, or the Inception weights file is not in TORCH_HOME:
nothing is downloaded at run time).

    .venv/bin/pip install -r requirements-fid.txt
    # and put pt_inception-2015-12-05-6726825d.pth in $TORCH_HOME/hub/checkpoints/

FIDs are comparable only at the same image count N (the estimate is biased
upwards at small N; below 2048 images the covariance is not full rank).
"""

from __future__ import annotations

import os

import numpy as np
import torch

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILE}"


def weights_path() -> str:
    """Where pytorch-fid looks for the Inception weights: $TORCH_HOME/hub/checkpoints/<file>."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_FILE)


def fid_unavailable() -> str | None:
    """None when FID can run; otherwise one line saying what to install or where to put which file."""
    try:
        import pytorch_fid.fid_score  # noqa: F401  (imports torchvision)
        import pytorch_fid.inception  # noqa: F401
    except Exception as e:  # noqa: BLE001 - a torchvision built for another torch fails with OSError/RuntimeError too
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        return (f"FID skipped: pytorch-fid does not import ({reason}); install the extra with "
                f".venv/bin/pip install -r requirements-fid.txt")
    if not os.path.isfile(weights_path()):
        return (f"FID skipped: Inception weights not found at {weights_path()}; download {WEIGHTS_URL} "
                f"to that path (or set TORCH_HOME to a folder whose hub/checkpoints/ holds it)")
    return None


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two feature sets float (N, D), through pytorch_fid.fid_score.calculate_frechet_distance."""
    from pytorch_fid.fid_score import calculate_frechet_distance

    mu_a, mu_b = features_a.mean(axis=0), features_b.mean(axis=0)
    cov_a, cov_b = np.cov(features_a, rowvar=False), np.cov(features_b, rowvar=False)
    return float(calculate_frechet_distance(mu_a, cov_a, mu_b, cov_b))


class InceptionFeatures:
    """pool3 features of InceptionV3 (pytorch-fid's FID weights), float64 (N, 2048).

    Call with images float (N, 3, H, W) in [0, 1] (resized to 299 x 299 inside).

    Raises:
        RuntimeError: FID cannot run here (the message of `fid_unavailable()`).
    """

    def __init__(self, batch_size: int = 50, device: str = "cpu"):
        reason = fid_unavailable()
        if reason:
            raise RuntimeError(reason)
        from pytorch_fid.inception import InceptionV3

        self.model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval().to(device)
        self.batch_size, self.device = batch_size, device

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        out = []
        for i in range(0, len(images), self.batch_size):
            pooled = self.model(images[i : i + self.batch_size].to(self.device))[0]  # (B, 2048, 1, 1)
            out.append(pooled.flatten(1).double().cpu().numpy())
        return np.concatenate(out)


@torch.inference_mode()
def vision_fid(vision, frames: torch.Tensor, seed: int, batch_size: int = 50) -> dict:
    """FID of V's reconstructions of `frames`, and of as many prior samples (tau 1), against `frames`.

    frames: float (N, 3, S, S) in [0, 1], held-out real frames. Returns {"frames": N, "recon": float,
    "prior": float}. Raises RuntimeError where FID cannot run (see `fid_unavailable`).
    """
    features = InceptionFeatures(batch_size)
    device = next(vision.parameters()).device
    real = features(frames)
    recon = torch.cat([vision.reconstruct(frames[i : i + batch_size].to(device)).cpu()
                       for i in range(0, len(frames), batch_size)])
    torch.manual_seed(seed)
    prior = torch.cat([vision.sample_prior(min(batch_size, len(frames) - i)).cpu()
                       for i in range(0, len(frames), batch_size)])
    return {"frames": len(frames), "recon": frechet_distance(features(recon.clamp(0, 1)), real),
            "prior": frechet_distance(features(prior.clamp(0, 1)), real)}
