"""Splitting a dataset over devices: IID, Dirichlet(alpha) label skew, or by source; seeded."""

from __future__ import annotations

import numpy as np


def iid(num_examples: int, num_devices: int, *, seed: int) -> list[np.ndarray]:
    """Shuffle, then cut into ``num_devices`` near-equal shards."""
    if not 0 < num_devices <= num_examples:
        raise ValueError(
            f"need 1..{num_examples} devices for {num_examples} examples, got {num_devices}"
        )
    order = np.random.default_rng(seed).permutation(num_examples)
    return [np.sort(s) for s in np.array_split(order, num_devices)]


def dirichlet(
    labels: np.ndarray, num_devices: int, *, alpha: float, seed: int, min_size: int = 1
) -> list[np.ndarray]:
    """Per class, split its examples over devices in proportions drawn from Dirichlet(alpha).

    Redraws until every device has at least ``min_size`` examples (small alpha = strong skew).
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if num_devices * min_size > len(labels):
        raise ValueError(
            f"{num_devices} devices × {min_size} examples exceed {len(labels)} examples"
        )
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(1000):
        shards: list[list[np.ndarray]] = [[] for _ in range(num_devices)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            p = rng.dirichlet(np.full(num_devices, alpha))
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
            for d, part in enumerate(np.split(idx, cuts)):
                shards[d].append(part)
        out = [np.sort(np.concatenate(s)) for s in shards]
        if min(len(s) for s in out) >= min_size:
            return out
    raise RuntimeError(
        f"no Dirichlet({alpha}) split gives every device {min_size} examples; raise alpha"
    )


def by_source(
    groups: np.ndarray, num_devices: int, *, seed: int, min_size: int = 1
) -> list[np.ndarray]:
    """Non-IID by author: the examples sorted by source (sources in a seeded order, each kept
    in its own order), cut into ``num_devices`` contiguous near-equal shards, so a device
    holds the text of one source, or of two or three neighbouring ones."""
    if num_devices * min_size > len(groups):
        raise ValueError(
            f"{num_devices} devices × {min_size} examples exceed {len(groups)} examples"
        )
    rank = np.random.default_rng(seed).permutation(int(groups.max()) + 1)
    order = np.argsort(rank[groups], kind="stable")
    return list(np.array_split(order, num_devices))


SCHEMES = ("iid", "dirichlet", "source")


def partition(
    labels: np.ndarray,
    num_devices: int,
    *,
    scheme: str,
    seed: int,
    alpha: float = 0.5,
    min_size: int = 1,
    groups: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Split example indices over devices by ``scheme`` (see ``SCHEMES``); ``source`` needs
    ``groups``, each example's source (a text dataset's ``Dataset.groups``)."""
    if scheme == "iid":
        return iid(len(labels), num_devices, seed=seed)
    if scheme == "dirichlet":
        return dirichlet(labels, num_devices, alpha=alpha, seed=seed, min_size=min_size)
    if scheme == "source":
        if groups is None:
            raise ValueError("partition 'source' needs a dataset with sources (fortunes)")
        return by_source(groups, num_devices, seed=seed, min_size=min_size)
    raise ValueError(f"unknown partition {scheme!r}; expected one of {', '.join(SCHEMES)}")
