"""Aggregation rules as pure functions over ``(arrays, num_examples)`` pairs.

Every rule returns one array per parameter name: the aggregated gradient (FedSGD) or delta
(FedAvg). ``apply_update`` turns it into the next global model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from edge.aggregator import weighted_mean
from edge.protect import clip_l2
from edge.wire import UPDATE_KINDS, Params

Weighted = tuple[Params, int]


def _names(updates: Sequence[Weighted]) -> list[str]:
    if not updates:
        raise ValueError("no updates to aggregate")
    return list(updates[0][0])


def coordinate_median(updates: Sequence[Weighted]) -> Params:
    """Coordinate-wise median, unweighted (Yin et al. 2018)."""
    return {
        k: np.median(np.stack([p[k] for p, _ in updates]), axis=0).astype(np.float32)
        for k in _names(updates)
    }


def trimmed_mean(updates: Sequence[Weighted], *, trim: float = 0.1) -> Params:
    """Coordinate-wise mean after dropping the ``trim`` fraction at each end (Yin et al. 2018)."""
    if not 0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim}")
    cut = int(trim * len(updates))
    out: Params = {}
    for k in _names(updates):
        s = np.sort(np.stack([p[k] for p, _ in updates]), axis=0)
        out[k] = s[cut : len(updates) - cut].mean(axis=0).astype(np.float32)
    return out


def krum(updates: Sequence[Weighted], *, num_byzantine: int = 0) -> Params:
    """The update closest to its n - f - 2 nearest neighbours (Blanchard et al. 2017)."""
    names = _names(updates)
    flat = np.stack([np.concatenate([p[k].ravel() for k in names]) for p, _ in updates]).astype(
        np.float64
    )
    d = ((flat[:, None, :] - flat[None, :, :]) ** 2).sum(-1)
    m = max(1, len(updates) - num_byzantine - 2)
    scores = [np.sort(np.delete(d[i], i))[:m].sum() for i in range(len(updates))]
    return dict(updates[int(np.argmin(scores))][0])


def central_dp_mean(
    updates: Sequence[Params], *, clip: float, noise: Params, denominator: int
) -> Params:
    """DP-FedAvg (McMahan et al. 2018) with a fixed denominator: (Σₖ clip(uₖ, C) + noise) / K.

    Every update is clipped again to L2 norm ``clip`` (a no-op for honest devices, so the bound
    does not rest on them); ``noise`` is N(0, σ²C²) drawn by the caller; ``denominator`` is the
    number of devices selected (known before any update arrives), so a dropped device pulls the
    mean towards zero instead of revealing how many answered. Unweighted: one vote per device.
    """
    if not updates:
        raise ValueError("no updates to aggregate")
    if denominator < 1:
        raise ValueError(f"denominator must be >= 1, got {denominator}")
    out: Params = {}
    clipped = [clip_l2(u, clip) for u in updates]
    for k in updates[0]:
        acc = np.zeros_like(updates[0][k], dtype=np.float64)
        for c in clipped:
            acc += c[k]
        out[k] = ((acc + noise[k]) / denominator).astype(np.float32)
    return out


AGGREGATORS: dict[str, Callable[[Sequence[Weighted]], Params]] = {
    "mean": weighted_mean,
    "median": coordinate_median,
    "trimmed_mean": trimmed_mean,
    "krum": krum,
}


def get_aggregator(name: str) -> Callable[[Sequence[Weighted]], Params]:
    if name not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {name!r}; expected one of {', '.join(AGGREGATORS)}")
    return AGGREGATORS[name]


def apply_update(weights: Params, aggregate: Params, *, kind: str, server_lr: float) -> Params:
    """Next global model: ``w - server_lr * g`` for gradients (FedSGD), ``w + server_lr * d`` for deltas."""
    if kind not in UPDATE_KINDS:
        raise ValueError(f"kind must be 'gradient' or 'delta', got {kind!r}")
    sign = -1.0 if kind == "gradient" else 1.0
    step = np.float32(sign * server_lr)
    return {k: (w + step * aggregate[k]).astype(np.float32) for k, w in weights.items()}
