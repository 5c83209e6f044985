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

Scoring (``score``) is the only function here that sees the typed text: word-set precision and
recall (over real words, not ``<unk>``/``<s>``), the exact fraction of examples (window and next
word), ROUGE-1/2 F1 of each typed example against its best-matched recovery (Hungarian), and a
unigram baseline (the most frequent training words) measured on the same batch.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from threadpoolctl import threadpool_limits

from attacks.base import AttackUpdate
from edge.manifest import Manifest
from edge.text import SPECIALS

EMBEDDING = "features.0.weight"
HIDDEN_W, HIDDEN_B = "classifier.0.weight", "classifier.0.bias"
OUT_W, OUT_B = "classifier.2.weight", "classifier.2.bias"
RANK_TOL = 1e-4  # singular values below this fraction of the largest are noise
SPAN_TOL = 1e-2  # relative distance to the row space below which a vector lies in it
MAX_PREFIXES = 4096  # search cap per position


@dataclass(frozen=True)
class TextReconstruction:
    """What the text attack recovered: the batch's word ids (sorted, specials included), and,
    where the order was recoverable, ``windows`` int64 [n, context] with their next ``labels``."""

    words: np.ndarray
    windows: np.ndarray = field(repr=False)
    labels: np.ndarray
    seconds: float
    attack: str = "keyboard_leak"


def check_keyboard(manifest: Manifest) -> None:
    """``ValueError`` unless ``manifest`` has the keyboard model's layout."""
    want = {EMBEDDING, HIDDEN_W, HIDDEN_B, OUT_W, OUT_B}
    if manifest.model != "keyboard" or set(manifest.param_names) != want:
        raise ValueError(
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


class KeyboardLeak:
    """Words (FedSGD and FedAvg) and ordered windows (FedSGD) from a keyboard model's update."""

    name = "keyboard_leak"

    def reconstruct(
        self, update: AttackUpdate, global_model: Mapping[str, np.ndarray], manifest: Manifest
    ) -> TextReconstruction:
        """Recover the words, and under FedSGD the windows and their next words."""
        t0 = time.perf_counter()
        check_keyboard(manifest)
        # One BLAS thread, like every attack's one torch thread: on 2 busy cores two threads
        # made the SVDs here 14x slower.
        with threadpool_limits(limits=1):
            windows, labels, words = self._recover(update, global_model, manifest)
        return TextReconstruction(words, windows, labels, time.perf_counter() - t0)

    def _recover(
        self, update: AttackUpdate, global_model: Mapping[str, np.ndarray], manifest: Manifest
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        g = update.params
        context = manifest.input_shape[0]
        seen = nonzero_rows(np.asarray(g[EMBEDDING]))
        bias = np.asarray(g[OUT_B])
        said = np.flatnonzero(bias < 0 if update.kind == "gradient" else bias > 0)
        words = np.union1d(seen, said).astype(np.int64)
        windows = np.zeros((0, context), dtype=np.int64)
        labels = np.zeros(0, dtype=np.int64)
        if update.kind == "gradient" and len(seen):
            emb = np.asarray(global_model[EMBEDDING], dtype=np.float64)
            windows = windows_in_span(np.asarray(g[HIDDEN_W]), emb, seen, context)
            if len(windows):
                labels = next_words(windows, global_model, np.asarray(g[OUT_W]), len(windows))
        return windows, labels, words


# -- scoring: the only place that sees the typed text ---------------------------------------------


def real_words(ids: np.ndarray) -> set[int]:
    """The ids of ``ids`` that are words (not ``<unk>`` or ``<s>``)."""
    return {int(i) for i in np.ravel(ids) if int(i) >= len(SPECIALS)}


def sentence(window: np.ndarray, label: int) -> list[int]:
    """The typed words of one example: its window without the ``<s>`` padding, then its label."""
    ids = [int(i) for i in window if int(i) != SPECIALS.index("<s>")]
    return ids + ([int(label)] if int(label) != SPECIALS.index("<s>") else [])


def rouge_n(candidate: Sequence[int], reference: Sequence[int], n: int) -> float:
    """ROUGE-n F1 (Lin 2004) of two token sequences (clipped n-gram overlap); two sequences
    both shorter than ``n`` score 1 when equal, else 0."""

    def grams(s: Sequence[int]) -> Counter[tuple[int, ...]]:
        return Counter(tuple(s[i : i + n]) for i in range(len(s) - n + 1))

    c, r = grams(candidate), grams(reference)
    if not c and not r:  # both shorter than n: equal or not
        return float(list(candidate) == list(reference))
    overlap = sum((c & r).values())
    if not overlap:
        return 0.0
    precision, recall = overlap / sum(c.values()), overlap / sum(r.values())
    return 2 * precision * recall / (precision + recall)


@dataclass(frozen=True)
class TextLeakage:
    """Scores of one reconstruction against the typed batch."""

    word_precision: float
    word_recall: float
    exact_fraction: float
    rouge1: float
    rouge2: float
    baseline_precision: float
    baseline_recall: float
    baseline_rouge1: float
    pairs: tuple[tuple[str, str], ...]  # (typed, recovered) per example, for the text table


def _precision_recall(guess: set[int], truth: set[int]) -> tuple[float, float]:
    hit = len(guess & truth)
    # Nothing claimed is nothing wrong; nothing to find is nothing missed.
    return (hit / len(guess) if guess else 1.0), (hit / len(truth) if truth else 1.0)


def score(
    rec: TextReconstruction,
    x: np.ndarray,
    y: np.ndarray,
    vocab: Sequence[str],
) -> TextLeakage:
    """Score ``rec`` against the typed batch ``(x, y)``. The unigram baseline guesses the most
    frequent words (ids 2, 3, ...: ``edge.text.build_vocab`` ranks by training frequency), as
    many as the batch has distinct words, and types them in that order."""
    from scipy.optimize import linear_sum_assignment

    truth_words = real_words(np.concatenate([np.ravel(x), np.ravel(y)]).astype(np.int64))
    precision, recall = _precision_recall(real_words(rec.words), truth_words)
    order = list(range(len(SPECIALS), len(vocab)))
    top = set(order[: len(truth_words)])
    b_precision, b_recall = _precision_recall(top, truth_words)

    typed = [sentence(w.astype(np.int64), int(lab)) for w, lab in zip(x, y, strict=True)]
    got = [sentence(w, int(lab)) for w, lab in zip(rec.windows, rec.labels, strict=True)]
    r1 = np.zeros(len(typed))
    r2 = np.zeros(len(typed))
    exact = np.zeros(len(typed), dtype=bool)
    matched: list[list[int]] = [[] for _ in typed]
    if got:
        f1 = np.array([[rouge_n(g, t, 1) for g in got] for t in typed])
        rows, cols = linear_sum_assignment(-f1)
        for i, j in zip(rows, cols, strict=True):
            r1[i], r2[i] = f1[i, j], rouge_n(got[j], typed[i], 2)
            exact[i] = got[j] == typed[i] and rec.windows[j].tolist() == x[i].astype(int).tolist()
            matched[i] = got[j]
    b_r1 = float(np.mean([rouge_n(order[: len(t)], t, 1) for t in typed]))

    def words(ids: Sequence[int]) -> str:
        return " ".join(vocab[i] for i in ids)

    return TextLeakage(
        word_precision=precision,
        word_recall=recall,
        exact_fraction=float(exact.mean()),
        rouge1=float(r1.mean()),
        rouge2=float(r2.mean()),
        baseline_precision=b_precision,
        baseline_recall=b_recall,
        baseline_rouge1=b_r1,
        pairs=tuple((words(t), words(m)) for t, m in zip(typed, matched, strict=True)),
    )


def text_table(pairs: Sequence[tuple[str, str]], *, width: int = 60) -> str:
    """The leakage grid for text: typed and recovered side by side, one example per line."""

    def cut(s: str) -> str:
        return s if len(s) <= width else s[: width - 1] + "…"

    lines = [f"{'typed':<{width}} | recovered", f"{'-' * width}-+-{'-' * width}"]
    lines += [f"{cut(t):<{width}} | {cut(r) or '—'}" for t, r in pairs]
    return "\n".join(lines)
