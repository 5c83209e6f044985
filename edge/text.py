"""Text for the keyboard model: tokeniser, vocabulary and next-word windows (numpy only).

A keyboard device turns what its user typed into examples the way this module does: lower-case
words (letters and inner apostrophes), ids from the vocabulary shipped in the model folder
(``vocab.json``; unknown words are ``<unk>``), and one example per word: the ``context`` words
before it (padded with ``<s>``) as float32 ids, the word itself as the int64 label. The end of
a text is the label ``<s>``, so the model also learns where texts end.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

UNK = "<unk>"
BOS = "<s>"
SPECIALS = (UNK, BOS)
VOCAB_FILE = "vocab.json"
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)*")
_OVERSTRIKE = re.compile(r".\x08")


def tokenize(text: str) -> list[str]:
    """Lower-case words of ``text``; digits, punctuation and terminal overstriking are dropped."""
    return _WORD.findall(_OVERSTRIKE.sub("", text).lower())


def build_vocab(texts: Iterable[Sequence[str]], size: int) -> tuple[str, ...]:
    """``<unk>``, ``<s>``, then the ``size - 2`` most frequent words (ties alphabetical)."""
    if size <= len(SPECIALS):
        raise ValueError(f"vocabulary size {size}: need more than {len(SPECIALS)} (the specials)")
    counts = Counter(w for t in texts for w in t)
    ranked = sorted(counts.items(), key=lambda wc: (-wc[1], wc[0]))
    return SPECIALS + tuple(w for w, _ in ranked[: size - len(SPECIALS)])


def word_index(vocab: Sequence[str]) -> dict[str, int]:
    """Id of each word of ``vocab`` (build once, pass to ``encode``)."""
    return {w: i for i, w in enumerate(vocab)}


def encode(tokens: Sequence[str], vocab: Sequence[str] | Mapping[str, int]) -> np.ndarray:
    """Token ids (int64) of ``tokens``; words outside ``vocab`` become ``<unk>`` (id 0).
    ``vocab``: the word list, or its ``word_index`` (faster over many texts)."""
    index = vocab if isinstance(vocab, Mapping) else word_index(vocab)
    return np.array([index.get(t, 0) for t in tokens], dtype=np.int64)


def decode(ids: Iterable[int], vocab: Sequence[str]) -> list[str]:
    """Words of token ``ids``."""
    return [vocab[int(i)] for i in ids]


def windows(ids: np.ndarray, context: int) -> tuple[np.ndarray, np.ndarray]:
    """Next-word examples of one text: x float32 [len+1, context] (ids), y int64 [len+1].

    Example ``i`` has the ``context`` ids before position ``i`` (``<s>``-padded) and label
    ``ids[i]``; the last example's label is ``<s>`` (end of text).
    """
    bos = SPECIALS.index(BOS)
    seq = np.concatenate([np.full(context, bos), np.asarray(ids, dtype=np.int64), [bos]])
    n = len(seq) - context
    x = np.lib.stride_tricks.sliding_window_view(seq[:-1], context)[:n]
    return x.astype(np.float32), seq[context:].astype(np.int64)


def save_vocab(path: str | Path, vocab: Sequence[str]) -> None:
    """Write ``vocab`` as a JSON list (id = position)."""
    Path(path).write_text(json.dumps(list(vocab), ensure_ascii=False))


def load_vocab(path: str | Path) -> tuple[str, ...]:
    """Read a vocabulary written by ``save_vocab``; ``ValueError`` naming what is wrong."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, list) or not all(isinstance(w, str) for w in data):
        raise ValueError(f"{path}: expected a JSON list of words")
    if tuple(data[: len(SPECIALS)]) != SPECIALS:
        raise ValueError(f"{path}: a vocabulary starts with {list(SPECIALS)}")
    return tuple(data)
