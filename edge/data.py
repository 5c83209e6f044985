"""A device's private data on disk: one ``.npz`` with x (float32 N×C×H×W in [0, 1]) and y (int64 N)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def save_shard(path: str | Path, x: np.ndarray, y: np.ndarray) -> None:
    """Write one device's examples for ``edgeleak device --data``."""
    np.savez(path, x=x.astype(np.float32), y=y.astype(np.int64))


def load_shard(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a shard written by ``save_shard``; names what is wrong otherwise."""
    with np.load(path) as z:
        if "x" not in z or "y" not in z:
            raise ValueError(f"{path}: expected an .npz with arrays 'x' and 'y', found {sorted(z)}")
        x, y = z["x"].astype(np.float32), z["y"].astype(np.int64)
    if x.ndim != 4 or len(x) != len(y):
        raise ValueError(
            f"{path}: expected x of shape (N, C, H, W) and N labels, got {x.shape}, {y.shape}"
        )
    return x, y
