"""Text leakage from the keyboard model's updates: which words a user typed, and in what order.

The attack (``KeyboardLeak.reconstruct``) sees the update, the global weights and the manifest:

- **Words.** The embedding's gradient is a scatter-add into the rows of the words in the batch's
  context windows, every other row is exactly zero; with plain local SGD a FedAvg delta has the
  same support (the union over the local steps). The next words (labels) are the entries of the
  output-bias gradient that are negative (``mean(p) - share``; positive for a FedAvg delta).
- **Order (FedSGD).** DAGER's exact span check (Petrov et al., NeurIPS 2024) on the first hidden
  layer: its weight gradient is ``sum_b delta_b h_b^T`` with ``h_b`` the concatenated embeddings of
  window ``b``, so a window prefix of ``k`` words is in the batch only if its concatenated
  embeddings lie in the row space of the first ``k * dim`` columns. Exact while the batch is
  smaller than the embedding width (32); a depth-first search over positions builds the windows.
  Each window's next word then follows from the output layer's gradient by least squares
  (``dW2 = (P - Y)^T A / B`` with the windows' activations ``A`` and probabilities ``P``).

Registered as ``words``. It returns a ``TextReconstruction`` (word ids, windows and their next
words); scoring against the typed text lives behind the truth boundary, ``attacks.truth.text``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from attacks.base import (
    AttackMetadata,
    AttackUpdate,
    BaseAttack,
    Deadline,
    NotApplicable,
    Reconstruction,
    Recovered,
    UpdateKind,
)
from edge.manifest import Manifest

EMBEDDING = "features.0.weight"
HIDDEN_W, HIDDEN_B = "classifier.0.weight", "classifier.0.bias"
OUT_W, OUT_B = "classifier.2.weight", "classifier.2.bias"
RANK_TOL = 1e-4  # singular values below this fraction of the largest are noise
SPAN_TOL = 1e-2  # relative distance to the row space below which a vector lies in it
MAX_PREFIXES = 4096  # search cap per position


def _no_ids(width: int = 0) -> np.ndarray:
    return np.zeros((0, width) if width else 0, dtype=np.int64)


@dataclass(frozen=True)
class TextReconstruction(Reconstruction):
    """What the text attack recovered: ``words`` (the batch's word ids, sorted, specials
    included) and, where the order was recoverable, ``windows`` int64 [n, context] with their
    next words in ``labels`` [n] (empty when only the words were recoverable)."""

    words: np.ndarray = field(default_factory=_no_ids, repr=False)
    windows: np.ndarray = field(default_factory=_no_ids, repr=False)

    @property
    def next_words(self) -> np.ndarray:
        """The next word of each recovered window, int64 [n]."""
        return self.labels if self.labels is not None else _no_ids()


@dataclass(frozen=True)
class TextRecovered(Recovered):
    """What ``KeyboardLeak.run`` found, before the name and time are added."""

    words: np.ndarray = field(default_factory=_no_ids)
    windows: np.ndarray = field(default_factory=_no_ids)


@dataclass(frozen=True)
class WordsConfig:
    """``order``: under FedSGD also recover the windows and their next words (span check)."""

    order: bool = True


def check_keyboard(manifest: Manifest) -> None:
    """``NotApplicable`` unless ``manifest`` has the keyboard model's layout."""
    want = {EMBEDDING, HIDDEN_W, HIDDEN_B, OUT_W, OUT_B}
    if manifest.model != "keyboard" or set(manifest.param_names) != want:
        raise NotApplicable(
            f"the text attack needs the zoo's keyboard model ({sorted(want)}); "
            f"got {manifest.model!r}"
        )


def nonzero_rows(matrix: np.ndarray) -> np.ndarray:
    """Indices of the rows of ``matrix`` with any non-zero entry."""
    return np.flatnonzero(np.any(matrix != 0, axis=1))


def row_space(matrix: np.ndarray, *, tol: float = RANK_TOL) -> np.ndarray:
    """Orthonormal basis [r, n] of the row space of ``matrix`` (float64 SVD, relative ``tol``)."""
    _, s, vt = np.linalg.svd(matrix.astype(np.float64), full_matrices=False)
    if not len(s) or s[0] == 0:
        return np.zeros((0, matrix.shape[1]))
    return vt[s > tol * s[0]]


def span_distance(basis: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Relative distance of each row of ``vectors`` to the span of ``basis``'s rows."""
    v = vectors.astype(np.float64)
    residual = v - (v @ basis.T) @ basis
    return np.linalg.norm(residual, axis=1) / np.maximum(np.linalg.norm(v, axis=1), 1e-30)


def windows_in_span(
    grad_hidden: np.ndarray, embedding: np.ndarray, candidates: np.ndarray, context: int
) -> np.ndarray:
    """Windows [n, context] of ``candidates`` whose every prefix passes the span check."""
    dim = embedding.shape[1]
    prefixes = np.zeros((1, 0), dtype=np.int64)
    for k in range(1, context + 1):
        basis = row_space(grad_hidden[:, : k * dim])
        grown = np.concatenate(
            [
                np.repeat(prefixes, len(candidates), axis=0),
                np.tile(candidates, len(prefixes))[:, None],
            ],
            axis=1,
        )
        vectors = embedding[grown].reshape(len(grown), k * dim)
        prefixes = grown[span_distance(basis, vectors) < SPAN_TOL][:MAX_PREFIXES]
        if not len(prefixes):
            break
    return prefixes if prefixes.shape[1] == context else np.zeros((0, context), dtype=np.int64)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def next_words(
    windows: np.ndarray, weights: Mapping[str, np.ndarray], grad_out: np.ndarray, batch: int
) -> np.ndarray:
    """The next word of each window: ``Y = P - B (dW2 A^+)^T``, argmax per row."""
    w = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
    h = w[EMBEDDING][windows].reshape(len(windows), -1)
    a = np.maximum(h @ w[HIDDEN_W].T + w[HIDDEN_B], 0.0)
    p = _softmax(a @ w[OUT_W].T + w[OUT_B])
    y = p - batch * (grad_out.astype(np.float64) @ np.linalg.pinv(a)).T
    return y.argmax(axis=1).astype(np.int64)


class KeyboardLeak(BaseAttack):
    """Words (FedSGD and FedAvg) and ordered windows (FedSGD) from a keyboard model's update."""

    name: ClassVar[str] = "words"
    kinds: ClassVar[tuple[UpdateKind, ...]] = ("gradient", "delta")

    def __init__(self, config: WordsConfig | None = None) -> None:
        self.config = config or WordsConfig()

    def needs(self, update: AttackUpdate, manifest: Manifest) -> None:
        check_keyboard(manifest)

    def run(
        self,
        update: AttackUpdate,
        global_model: Mapping[str, np.ndarray],
        metadata: AttackMetadata,
        deadline: Deadline,
    ) -> TextRecovered:
        """Recover the words, and under FedSGD the windows and their next words."""
        g = update.params
        context = metadata.manifest.input_shape[0]
        seen = nonzero_rows(np.asarray(g[EMBEDDING]))
        bias = np.asarray(g[OUT_B])
        said = np.flatnonzero(bias < 0 if update.kind == "gradient" else bias > 0)
        words = np.union1d(seen, said).astype(np.int64)
        windows, labels = _no_ids(context), _no_ids()
        if self.config.order and update.kind == "gradient" and len(seen):
            emb = np.asarray(global_model[EMBEDDING], dtype=np.float64)
            windows = windows_in_span(np.asarray(g[HIDDEN_W]), emb, seen, context)
            if len(windows):
                labels = next_words(windows, global_model, np.asarray(g[OUT_W]), len(windows))
        return TextRecovered(
            None, labels, np.ones(len(labels), np.float32), words=words, windows=windows
        )

    def result(self, found: Recovered, seconds: float) -> TextReconstruction:
        """A ``TextReconstruction`` carrying the words and windows."""
        assert isinstance(found, TextRecovered)
        return TextReconstruction(
            None, found.labels, found.confidence, seconds, self.name,
            words=found.words, windows=found.windows,
        )  # fmt: skip
