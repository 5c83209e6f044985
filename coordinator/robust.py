"""Robust aggregation against poisoned updates (back-door defences), as pure functions.

Each defence takes the round's ``(update, num_examples)`` pairs (in the coordinator's canonical
order) and a generator (for noise), and returns a ``Defended``: the aggregate, which updates went
into it and the factor each was scaled by. A defence is chosen by a spec string
``name[:key=value,...]`` (``DEFENCES``; e.g. ``multikrum:f=2``, ``flame:noise=0.001``)::

    mean                     FedAvg, no defence
    median                   coordinate-wise median (Yin et al. 2018)
    trimmed_mean:beta=B      coordinate-wise mean without the B fraction at each end (Yin et al.)
    krum:f=F                 the one update closest to its n-F-2 neighbours (Blanchard et al. 2017)
    multikrum:f=F,m=M        mean of the M (0: n-F) updates with the best Krum scores
    norm_bound:bound=C       every update clipped to L2 norm C (0: the round's median norm),
                             then FedAvg (Sun et al. 2019)
    flame:noise=L            FLAME (Nguyen et al. 2022): HDBSCAN on pairwise cosine distances
                             (min cluster size n/2+1) keeps the majority cluster, each kept update
                             is clipped to the median norm S of all updates, FedAvg, plus
                             N(0, (L·S)²) noise per coordinate (L=0: none)

Every update also gets an anomaly score (``anomaly_scores``: cosine distance to the
coordinate-wise median update plus the absolute log of its norm over the median norm), the same
whatever the defence, stored per device and round (run store table ``anomaly``). Above
``MEDIAN_SAMPLE`` updates, the median update is that of an evenly spaced sample of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from coordinator.aggregate import Params, Weighted, coordinate_median, trimmed_mean, weighted_mean

DEFENCES = ("mean", "median", "trimmed_mean", "krum", "multikrum", "norm_bound", "flame")
# Each defence's parameters and their defaults (all numbers; ints where the name says count).
DEFAULTS: dict[str, dict[str, float]] = {
    "mean": {},
    "median": {},
    "trimmed_mean": {"beta": 0.1},
    "krum": {"f": 0},
    "multikrum": {"f": 0, "m": 0},
    "norm_bound": {"bound": 0.0},
    "flame": {"noise": 0.0},
}
COUNTS = ("f", "m")


@dataclass(frozen=True)
class Defended:
    """A defence's result: the aggregate; per update (input order) whether it was kept and
    the factor it was scaled by before aggregation (1.0: untouched)."""

    params: Params
    kept: tuple[bool, ...]
    clip: tuple[float, ...]


Defence = Callable[[Sequence[Weighted], np.random.Generator], Defended]


def flatten(updates: Sequence[Weighted]) -> np.ndarray:
    """The updates as rows of one float64 matrix, parameters in the first update's order."""
    if not updates:
        raise ValueError("no updates to aggregate")
    names = list(updates[0][0])
    return np.stack([np.concatenate([p[k].ravel() for k in names]) for p, _ in updates]).astype(
        np.float64
    )


def cosine_distances(flat: np.ndarray) -> np.ndarray:
    """Pairwise 1 - cos(u_i, u_j) (a zero update is at distance 1 from everything but itself)."""
    norms = np.linalg.norm(flat, axis=1)
    unit = flat / np.where(norms > 0, norms, 1.0)[:, None]
    d = 1.0 - unit @ unit.T
    np.fill_diagonal(d, 0.0)
    return np.clip(d, 0.0, 2.0)


def anomaly_scores(flat: np.ndarray) -> np.ndarray:
    """Each update's cosine distance to the coordinate-wise median update (direction, in
    [0, 2]) plus |ln(‖u‖ / median norm)| (magnitude): 0 for an update like the median; a
    sign-flipped or boosted update scores high either way. A zero update's log term is ln of
    the smallest positive float64."""
    return norms_and_scores(median_update([flat[:: median_step(len(flat))]]), [flat])[1]


# Above this many updates, the median update is taken over this many of them, evenly spaced in
# the coordinator's order (the median of 10,000 LeNet updates alone took 20 s on 2 cores).
MEDIAN_SAMPLE = 1024


def median_step(n: int) -> int:
    """Every how many of ``n`` updates one is in the median's sample (``MEDIAN_SAMPLE``)."""
    return max(1, -(-n // MEDIAN_SAMPLE))


def median_update(blocks: Iterable[np.ndarray], width: int = 512) -> np.ndarray:
    """The coordinate-wise median in float64 of a sample of updates whose columns come in
    ``blocks`` (each k × w, left to right), ``width`` columns at a time (memory of one float64
    slice, not of the sample)."""
    return np.concatenate(  # transposed: each column's values contiguous (1.6x faster)
        [row_medians(np.ascontiguousarray(block[:, lo : lo + width].T, np.float64))
         for block in blocks for lo in range(0, block.shape[1], width)]
    )  # fmt: skip


def row_medians(t: np.ndarray) -> np.ndarray:
    """``np.median(t, axis=1)`` bit for bit (finite values), with one partition: for an even
    count numpy partitions at both middle ranks, which took 5x as long here."""
    half = t.shape[1] // 2
    p = np.partition(t, half, axis=1)
    if t.shape[1] % 2:
        return p[:, half]
    return (p[:, :half].max(axis=1) + p[:, half]) / 2


def norms_and_scores(
    median: np.ndarray, chunks: Iterable[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """(‖u_i‖, ``anomaly_scores``) of the updates whose flattened rows come in ``chunks`` (each
    k × d, in order), against the ``median`` update (``median_update``): one pass, memory of
    one chunk, not of the n × d matrix."""
    sq: list[np.ndarray] = []
    dots: list[np.ndarray] = []
    for chunk in chunks:
        b = chunk.astype(np.float64)
        sq.append(np.einsum("ij,ij->i", b, b))
        dots.append(b @ median)
    if not sq:
        raise ValueError("no updates to score")
    norms = np.sqrt(np.concatenate(sq))
    med_norm_2 = float(median @ median)
    denom = np.where(norms > 0, norms, 1.0) * (np.sqrt(med_norm_2) if med_norm_2 > 0 else 1.0)
    cos = np.clip(1.0 - np.concatenate(dots) / denom, 0.0, 2.0)
    med_norm = max(float(np.median(norms)), 1e-300)
    return norms, cos + np.abs(np.log(np.maximum(norms, 1e-300) / med_norm))


def median_norm_factors(flat: np.ndarray, bound: float) -> np.ndarray:
    """min(1, C / ‖u_i‖) for each update, C = ``bound`` or (0) the median of the norms."""
    norms = np.linalg.norm(flat, axis=1)
    c = bound if bound > 0 else float(np.median(norms))
    return np.minimum(1.0, c / np.maximum(norms, 1e-300))


def _scaled_mean(updates: Sequence[Weighted], kept: Sequence[bool], clip: np.ndarray) -> Params:
    chosen = [
        ({k: v.astype(np.float64) * c for k, v in p.items()}, n)
        for (p, n), keep, c in zip(updates, kept, clip, strict=True)
        if keep
    ]
    return weighted_mean(chosen)


def krum_scores(flat: np.ndarray, f: int) -> np.ndarray:
    """Krum score of each update: the sum of squared distances to its n - f - 2 nearest
    neighbours (at least 1)."""
    n = len(flat)
    sq = (flat * flat).sum(1)
    d = np.maximum(sq[:, None] + sq[None, :] - 2.0 * flat @ flat.T, 0.0)
    m = max(1, n - f - 2)
    return np.array([np.sort(np.delete(d[i], i))[:m].sum() for i in range(n)])


def multi_krum(updates: Sequence[Weighted], *, f: int, m: int = 0) -> Defended:
    """FedAvg of the ``m`` updates (0: n - f, at least 1) with the lowest Krum scores (El Mhamdi
    et al. 2018); ``m`` = 1 is Krum. Ties go to the earlier update."""
    if f < 0 or m < 0:
        raise ValueError(f"multikrum needs f >= 0 and m >= 0, got f={f}, m={m}")
    n = len(updates)
    scores = krum_scores(flatten(updates), f)
    take = min(n, m) if m else max(1, n - f)
    chosen = set(np.argsort(scores, kind="stable")[:take].tolist())
    kept = tuple(i in chosen for i in range(n))
    return Defended(_scaled_mean(updates, kept, np.ones(n)), kept, (1.0,) * n)


def norm_bound(updates: Sequence[Weighted], *, bound: float = 0.0) -> Defended:
    """Every update scaled to L2 norm at most ``bound`` (0: the round's median norm), then FedAvg."""
    if bound < 0:
        raise ValueError(f"norm_bound needs bound >= 0, got {bound}")
    clip = median_norm_factors(flatten(updates), bound)
    kept = (True,) * len(updates)
    return Defended(_scaled_mean(updates, kept, clip), kept, tuple(clip.tolist()))


def majority_cluster(dist: np.ndarray) -> np.ndarray:
    """FLAME's admission: HDBSCAN (scikit-learn) on the precomputed cosine distances with
    min_cluster_size n/2+1, min_samples 1 and a single cluster allowed; True for members of the
    largest cluster. As in FLAME, a single cluster admits its core only: honest updates at its
    edge are left out too. Fewer than 3 updates, or no cluster found: all admitted."""
    n = len(dist)
    if n < 3:
        return np.ones(n, dtype=bool)
    from sklearn.cluster import HDBSCAN

    labels = HDBSCAN(
        min_cluster_size=n // 2 + 1,
        min_samples=1,
        metric="precomputed",
        allow_single_cluster=True,
        copy=True,
    ).fit_predict(dist)
    found = labels[labels >= 0]
    if len(found) == 0:
        return np.ones(n, dtype=bool)
    return np.asarray(labels == np.bincount(found).argmax())


def flame(updates: Sequence[Weighted], rng: np.random.Generator, *, noise: float = 0.0) -> Defended:
    """FLAME (Nguyen et al. 2022, USENIX Security): cluster, clip to the median norm, add noise."""
    if noise < 0:
        raise ValueError(f"flame needs noise >= 0, got {noise}")
    flat = flatten(updates)
    admitted = majority_cluster(cosine_distances(flat))
    norms = np.linalg.norm(flat, axis=1)
    s = float(np.median(norms))
    clip = median_norm_factors(flat, s) if s > 0 else np.ones(len(flat))
    kept = tuple(bool(a) for a in admitted)
    out = _scaled_mean(updates, kept, clip)
    if noise > 0:
        out = {
            k: (v.astype(np.float64) + rng.normal(0.0, noise * s, v.shape)).astype(np.float32)
            for k, v in out.items()
        }
    return Defended(out, kept, tuple(float(c) for c in clip))


def _all_kept(params: Params, n: int) -> Defended:
    return Defended(params, (True,) * n, (1.0,) * n)


def parse_defence(spec: str) -> tuple[str, dict[str, float]]:
    """``name[:key=value,...]`` -> (name, every parameter with its default filled in);
    ``ValueError`` naming the valid names or keys."""
    name, _, rest = spec.strip().partition(":")
    if name not in DEFAULTS:
        raise ValueError(f"aggregator {spec!r}: expected one of {', '.join(DEFENCES)}")
    args = dict(DEFAULTS[name])
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key not in args:
            keys = ", ".join(DEFAULTS[name]) or "none"
            raise ValueError(f"aggregator {spec!r}: {item!r}; {name} takes key=value with {keys}")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"aggregator {spec!r}: {key}={value!r} is not a number") from None
        if key in COUNTS and (number != int(number) or number < 0):
            raise ValueError(f"aggregator {spec!r}: {key} must be a whole number >= 0")
        args[key] = number
    if name == "trimmed_mean" and not 0 <= args["beta"] < 0.5:
        raise ValueError(f"aggregator {spec!r}: beta must be in [0, 0.5)")
    if name in ("norm_bound", "flame") and min(args.values()) < 0:
        raise ValueError(f"aggregator {spec!r}: parameters must be >= 0")
    return name, args


def get_defence(spec: str) -> Defence:
    """The defence a spec names, with its parameters bound."""
    name, a = parse_defence(spec)
    if name == "mean":
        return lambda u, _rng: _all_kept(weighted_mean(u), len(u))
    if name == "median":
        return lambda u, _rng: _all_kept(coordinate_median(u), len(u))
    if name == "trimmed_mean":
        return lambda u, _rng: _all_kept(trimmed_mean(u, trim=a["beta"]), len(u))
    if name == "krum":
        return lambda u, _rng: multi_krum(u, f=int(a["f"]), m=1)
    if name == "multikrum":
        return lambda u, _rng: multi_krum(u, f=int(a["f"]), m=int(a["m"]))
    if name == "norm_bound":
        return lambda u, _rng: norm_bound(u, bound=a["bound"])
    return lambda u, rng: flame(u, rng, noise=a["noise"])


def defence_seed(seed: int, round_: int) -> list[int]:
    """The seed of a defence's noise in ``round_`` (reproducible runs)."""
    return [seed, round_, 3]
