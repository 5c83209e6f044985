"""A device's private data on disk: one ``.npz`` with x (float32 N×C×H×W in [0, 1], or N×words
word ids for the keyboard model) and y (int64 N)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from edge.manifest import Manifest


def save_shard(path: str | Path, x: np.ndarray, y: np.ndarray) -> None:
    """Write one device's examples for ``edgeleak device --data``."""
    np.savez(path, x=x.astype(np.float32), y=y.astype(np.int64))


def load_shard(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a shard written by ``save_shard``; names what is wrong otherwise (a missing file is
    ``FileNotFoundError``, anything else ``ValueError``)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file; expected a shard .npz (`edgeleak shards`)")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not an .npz file (a zip archive of x and y arrays)")
    try:
        with np.load(path, allow_pickle=False) as z:
            if not hasattr(z, "files") or "x" not in z or "y" not in z:
                found = sorted(z.files) if hasattr(z, "files") else "one bare array"
                raise ValueError(f"{path}: expected an .npz with arrays 'x' and 'y', found {found}")
            x, y = z["x"].astype(np.float32), z["y"].astype(np.int64)
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable .npz shard ({e})") from None
    if x.ndim not in (2, 4) or len(x) != len(y):
        raise ValueError(
            f"{path}: expected x of shape (N, C, H, W) (images) or (N, words) (word ids) and N "
            f"labels, got {x.shape}, {y.shape}"
        )
    return x, y


def check_fits(x: np.ndarray, y: np.ndarray, manifest: Manifest, *, where: str = "data") -> None:
    """Raise ``ValueError`` unless ``x`` has the model's input shape and ``y`` its classes."""
    if tuple(x.shape[1:]) != tuple(manifest.input_shape):
        raise ValueError(
            f"{where}: examples of shape {tuple(x.shape[1:])}, but model {manifest.model!r} "
            f"expects {tuple(manifest.input_shape)}"
        )
    if len(y) == 0:
        raise ValueError(f"{where}: the shard has no examples")
    if y.min() < 0 or y.max() >= manifest.num_classes:
        raise ValueError(
            f"{where}: labels in [{y.min()}, {y.max()}], but model {manifest.model!r} has "
            f"{manifest.num_classes} classes"
        )
