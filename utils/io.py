"""Artifact io: atomic writes, episode npz files, checkpoints and stage manifests.

Every file is written to a temporary name in its own folder and renamed into
place (`os.replace` is atomic on POSIX), so a killed stage never leaves a
half-written artifact that the next stage would trust.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import io
import json
import os
import platform
import subprocess
import tempfile
import time
import zipfile
import zlib
from typing import Any, Iterator

import numpy as np

from utils.errors import UserError

EPISODE_GLOB = "episode_*.npz"


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path beside `path`; rename it to `path` only if the block succeeds."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=os.path.basename(path), dir=folder)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; artifacts are meant to be shared
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_npz(path: str, **arrays: Any) -> None:
    """Write a compressed npz atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)


def npz_bytes(**arrays: Any) -> bytes:
    """The bytes of a compressed npz of `arrays` (what save_npz writes), to send from a worker to the writer."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def save_bytes(path: str, data: bytes) -> None:
    """Write `data` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def save_json(path: str, obj: Any) -> None:
    """Write `obj` as indented JSON atomically (numpy scalars and arrays become numbers and lists)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, default=_json_default)
            f.write("\n")


def save_text(path: str, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def save_csv(path: str, rows: list[dict], fields: list[str]) -> None:
    """Write `rows` as CSV with the columns `fields` atomically (a missing value is an empty cell)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in fields})
    save_text(path, buf.getvalue())


def save_torch(path: str, obj: Any) -> None:
    """torch.save `obj` (a checkpoint dict) atomically."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj)}")


def episode_path(folder: str, index: int) -> str:
    """folder/episode_NNNNN.npz for episode `index` (zero-padded to 5 digits, so names sort in order)."""
    return os.path.join(folder, f"episode_{index:05d}.npz")


def list_episodes(folder: str, what: str = "rollouts") -> list[str]:
    """Sorted episode files of `folder`.

    Raises:
        UserError: the folder does not exist or holds no episode_*.npz file.
    """
    if not os.path.isdir(folder):
        raise UserError(f"{folder}: {what} folder not found (run the stage that writes it first)")
    files = sorted(glob.glob(os.path.join(folder, EPISODE_GLOB)))
    if not files:
        raise UserError(f"{folder}: no {EPISODE_GLOB} files in the {what} folder")
    return files


def load_episode(path: str, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Read `keys` from one episode npz.

    Raises:
        UserError: the file is unreadable, corrupt, or lacks one of `keys`.
    """
    try:
        with np.load(path) as data:
            missing = [k for k in keys if k not in data.files]
            if missing:
                raise UserError(f"{path}: missing arrays {missing} (found {data.files})")
            return {k: data[k] for k in keys}
    except UserError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError, zlib.error) as exc:
        raise UserError(f"{path}: corrupt or unreadable npz ({type(exc).__name__}: {exc})") from None


def check_episodes(files: list[str], keys: tuple[str, ...]) -> list[int]:
    """Open every file and read its small `keys` (not the frames); return their lengths.

    Catches corrupt files before a long stage starts, with the file named.
    """
    return [len(load_episode(f, keys)[keys[0]]) for f in files]


def file_sha256(path: str) -> str:
    """Hex sha256 of a file's bytes: identifies the exact checkpoint an artifact was made from."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def git_commit() -> str:
    """HEAD commit of the project checkout, or "unknown" outside git."""
    try:
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def library_versions() -> dict[str, str]:
    """Versions of python and the libraries whose behaviour shapes the results."""
    versions = {"python": platform.python_version()}
    for name in ("numpy", "torch", "gymnasium", "cma"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a missing optional library is just not listed
            pass
    return versions


def write_manifest(
    stage_dir: str, stage: str, cfg_dict: dict, inputs: dict, wall_s: float, metrics: dict
) -> None:
    """Write `manifest.json` (and the resolved `config.yaml`) describing a finished stage.

    cpu_s is the CPU time (user + system, s) of this process and of its finished worker processes so
    far: one stage per process, so it is the stage's cost in CPU-seconds (of this invocation).
    """
    import resource

    import yaml

    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]

    save_text(os.path.join(stage_dir, "config.yaml"), yaml.safe_dump(cfg_dict, sort_keys=False))
    save_json(
        os.path.join(stage_dir, "manifest.json"),
        {
            "stage": stage,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "wall_s": round(wall_s, 2),
            "cpu_s": round(sum(u.ru_utime + u.ru_stime for u in usage), 2),
            "git_commit": git_commit(),
            "versions": library_versions(),
            "inputs": inputs,
            "metrics": metrics,
            "config": cfg_dict,
        },
    )


def read_manifest(stage_dir: str) -> dict:
    """The manifest.json of a finished stage.

    Raises:
        UserError: missing or unreadable manifest (the stage has not finished).
    """
    path = os.path.join(stage_dir, "manifest.json")
    if not os.path.isfile(path):
        raise UserError(f"{path}: manifest not found (the stage that writes {stage_dir} has not finished)")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable manifest ({type(exc).__name__})") from None
