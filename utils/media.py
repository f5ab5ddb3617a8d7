"""Media of stage 06: GIFs and image grids of frames, reconstructions and dreams, written atomically.

Frames are uint8 (H, W, 3) (V-ready, as the env wrapper gives them); V's
images come back through models.likelihood.to_uint8.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from models.likelihood import frames_to_tensor, to_uint8
from utils.io import atomic_path


def write_gif(path: str, images: list[np.ndarray], duration_ms: int, scale: int = 2) -> int:
    """Animated GIF of uint8 (H, W, 3) images, each scaled up `scale` times; returns the frame count."""
    size = (images[0].shape[1] * scale, images[0].shape[0] * scale)
    frames = [Image.fromarray(image).resize(size, Image.NEAREST) for image in images]
    with atomic_path(path) as tmp:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=duration_ms, loop=0)
    return len(frames)


@torch.inference_mode()
def save_episode_gif(path: str, vision, frames: list[np.ndarray], every: int, max_frames: int, scale: int = 2) -> int:
    """GIF of [frame | decode(encode(frame))] for every `every`-th frame; returns the frame count."""
    picked = np.stack(frames[::every][:max_frames])
    recon = to_uint8(vision.reconstruct(frames_to_tensor(picked)))
    return write_gif(path, list(np.concatenate([picked, recon], axis=2)), 40 * every, scale)


def save_side_by_side_gif(path: str, left: list[np.ndarray], right: list[np.ndarray], every: int, max_frames: int,
                          scale: int = 2) -> int:
    """GIF of [left | right] for every `every`-th step (the shorter episode holds its last frame)."""
    n = max(len(left), len(right))
    pick = list(range(0, n, every))[:max_frames]
    pairs = [np.concatenate([left[min(i, len(left) - 1)], right[min(i, len(right) - 1)]], axis=1) for i in pick]
    return write_gif(path, pairs, 40 * every, scale)


@torch.inference_mode()
def save_world_model_gif(path: str, vision, frames: list[np.ndarray], dream: list[np.ndarray], every: int,
                         max_frames: int, scale: int = 2) -> int:
    """GIF of [real frame | V's reconstruction | M's dream] for every `every`-th step: what the agent sees, what
    V keeps of it, and what M imagines from the first frame on with the same C (the shorter sequence holds its
    last frame). Returns the frame count."""
    n = max(len(frames), len(dream))
    pick = list(range(0, n, every))[:max_frames]
    real = np.stack([frames[min(i, len(frames) - 1)] for i in pick])
    recon = to_uint8(vision.reconstruct(frames_to_tensor(real)))
    imagined = np.stack([dream[min(i, len(dream) - 1)] for i in pick])
    return write_gif(path, list(np.concatenate([real, recon, imagined], axis=2)), 40 * every, scale)


@torch.inference_mode()
def save_reconstruction_grid(path: str, vision, frames: np.ndarray, scale: int = 2) -> None:
    """PNG: frames uint8 (N, S, S, 3) in the top row over decode(encode(frame)) in the bottom row."""
    recon = to_uint8(vision.reconstruct(frames_to_tensor(frames)))
    grid = np.concatenate([np.concatenate(list(frames), axis=1), np.concatenate(list(recon), axis=1)], axis=0)
    image = Image.fromarray(grid)
    image = image.resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
