"""Evaluation of a global model on held-out data."""

from __future__ import annotations

import numpy as np

from edge.backends.base import Backend, Params
from edge.poison import stamp_trigger


def cross_entropy(logits: np.ndarray, y: np.ndarray) -> float:
    """Mean cross-entropy of integer labels under softmax(logits), numerically stable."""
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean())


def predict(
    backend: Backend, weights: Params, x: np.ndarray, *, batch_size: int = 1000
) -> np.ndarray:
    """Logits of ``weights`` on ``x``, in batches."""
    return np.concatenate(
        [backend.logits(weights, x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    )


def top_k_accuracy(logits: np.ndarray, y: np.ndarray, k: int) -> float:
    """Fraction of rows whose label is among the ``k`` largest logits (ties: lower index)."""
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return float((top == y[:, None]).any(axis=1).mean())


def evaluate(
    backend: Backend, weights: Params, x: np.ndarray, y: np.ndarray, *, batch_size: int = 1000
) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``weights`` on ``(x, y)``."""
    logits = predict(backend, weights, x, batch_size=batch_size)
    return float((logits.argmax(1) == y).mean()), cross_entropy(logits, y)


def backdoor_success(
    backend: Backend, weights: Params, x: np.ndarray, y: np.ndarray, *, target: int
) -> float:
    """Backdoor success rate: the fraction of the test images not of class ``target`` that the
    model classifies as ``target`` once the trigger (``edge.poison.stamp_trigger``) is stamped."""
    keep = y != target
    triggered = stamp_trigger(x[keep])
    return evaluate(backend, weights, triggered, np.full(len(triggered), target))[0]
