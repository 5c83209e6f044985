"""Scoring of the text attack against the typed batch: the truth side of ``attacks.text``.

Word-set precision and recall (over real words, not ``<unk>``/``<s>``), the exact fraction of
examples (window and next word), ROUGE-1/2 F1 of each typed example against its best-matched
recovery (Hungarian), a unigram baseline (the most frequent training words) on the same batch,
and the side-by-side text table of typed and recovered examples.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from attacks.text import TextReconstruction
from edge.text import SPECIALS


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
    truth_words = real_words(np.concatenate([np.ravel(x), np.ravel(y)]).astype(np.int64))
    precision, recall = _precision_recall(real_words(rec.words), truth_words)
    order = list(range(len(SPECIALS), len(vocab)))
    top = set(order[: len(truth_words)])
    b_precision, b_recall = _precision_recall(top, truth_words)

    typed = [sentence(w.astype(np.int64), int(lab)) for w, lab in zip(x, y, strict=True)]
    got = [sentence(w, int(lab)) for w, lab in zip(rec.windows, rec.next_words, strict=True)]
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
