"""SPEAR: exact batch recovery through a ReLU fully connected first layer (Dimitrov et al.,
NeurIPS 2024).

A first layer ``z = W x + b`` followed by a ReLU has, over a batch of B examples, the gradient
``[dW | db] = dZ^T [X | 1]`` (``dZ``: [B, m] per-example output gradients, ``X``: [B, n]), of
rank at most B. Take a rank-B factorisation ``[dW | db] = L R`` (SVD, ``L``: [m, B]). Then
``dZ^T = L Q`` and ``[X | 1] = Q^-1 R`` for one unknown invertible ``Q`` whose column ``q_i``
gives example i's output gradient ``L q_i``. The ReLU makes that gradient sparse: it is zero on
every unit example i left inactive (about half of them for an untrained layer). So:

1. sample B-1 rows of ``L``; when all of them are zero for one example, the null vector of that
   [B-1, B] submatrix is that example's ``q_i`` (probability ~ B / 2^(B-1) per sample);
2. keep a candidate only when ``L q`` is as sparse as a real ReLU gradient (a wrong direction is
   zero only on the B-1 sampled rows) and its zeros pin it down (``isolated``: a mixture of
   examples is zero where all of them are, plus a sampled row or two that are each
   indispensable), re-solve it from all its zeros, and merge candidates pointing the same way;
3. with B directions, the scales follow from the last column of ``[X | 1]`` (all ones):
   ``R[:, -1] = Q 1``; then ``X = Q^-1 R[:, :-1]``, exact up to float32 rounding;
4. a solved batch is accepted only when its ReLU pattern (``W x + b > 0``) matches the zeros of
   its output gradients; otherwise the attack returns no images rather than a wrong batch.

Mixtures matter for examples of one class: on an untrained model their ReLU patterns agree on
up to 90% of the units, so a mixture of two is zero almost as often as either one, and without
the leverage test such mixtures crowded a genuine direction out of the candidates (Fashion-MNIST
test images 48-55, four pullovers: no batch found in 400,000 samples; with it: 2 s).

Labels for the recovered examples are not part of SPEAR; the attack returns images only.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from attacks.base import (
    AttackMetadata,
    AttackUpdate,
    BaseAttack,
    Deadline,
    NotApplicable,
    Recovered,
    UpdateKind,
    first_linear,
    inputs_to_images,
)
from edge.manifest import Manifest

MAX_BATCH = 16
ALIVE_TOL = 1e-6  # a unit whose gradient row is below this fraction of the largest is dead


def low_rank(gradient: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """``(L [m, rank], R [rank, n])`` with ``gradient ~ L R`` (the SVD's leading part)."""
    u, s, vt = np.linalg.svd(gradient, full_matrices=False)
    return u[:, :rank] * s[:rank], vt[:rank]


def null_directions(blocks: np.ndarray, *, rank_tol: float = 1e-5) -> np.ndarray:
    """Unit null vectors [N, B] of N submatrices [N, B-1, B]; rows of NaN where a submatrix has
    rank below B-1 (its null space is not one direction)."""
    _, s, vt = np.linalg.svd(blocks, full_matrices=True)
    out = vt[:, -1, :].copy()
    degenerate = s[:, -1] <= rank_tol * s[:, 0]
    out[degenerate] = np.nan
    return out


def zero_sets(directions: np.ndarray, left: np.ndarray, *, zero_tol: float) -> np.ndarray:
    """Per direction q (rows [N, B]), where ``left @ q`` is zero: entries at most ``zero_tol``
    of its largest magnitude, bool [N, m]."""
    v = np.abs(left @ directions.T)  # [m, N]
    return (v <= zero_tol * v.max(axis=0, keepdims=True)).T


def distinct_sparse(
    directions: np.ndarray,
    left: np.ndarray,
    *,
    zero_tol: float,
    min_sparsity: float,
    min_gap: float,
    max_leverage: float,
) -> tuple[np.ndarray, np.ndarray]:
    """One direction per distinct zero set with at least ``min_sparsity`` zeros, minus mixtures
    (a mix of two examples' gradients is zero only where both are: its zero set lies inside
    either one's, and does not pin it down: ``isolated``); returns (directions [k, B], zero sets
    [k, m]), the sparsest first."""
    zeros = zero_sets(directions, left, zero_tol=zero_tol)
    keep = zeros.mean(axis=1) >= min_sparsity
    directions, zeros = directions[keep], zeros[keep]
    directions = isolated(directions, zeros, left, min_gap=min_gap, max_leverage=max_leverage)
    zeros = zero_sets(directions, left, zero_tol=zero_tol)
    _, first = np.unique(np.packbits(zeros, axis=1), axis=0, return_index=True)
    directions, zeros = directions[first], zeros[first]
    z = zeros.astype(np.float64)
    size = z.sum(axis=1)
    inside = ((z @ z.T) >= size[:, None]) & (size[None, :] > size[:, None])
    keep = ~inside.any(axis=1)
    order = np.argsort(-size[keep], kind="stable")
    return directions[keep][order], zeros[keep][order]


def isolated(
    directions: np.ndarray,
    zeros: np.ndarray,
    left: np.ndarray,
    *,
    min_gap: float,
    max_leverage: float,
) -> np.ndarray:
    """The directions [N, B] that their zero sets [N, m] pin down, each re-solved as the null
    vector of all the rows of ``left`` in its set: [k, B].

    An example's zero set is about half the units, and no one row of it is needed to fix its
    direction: the largest leverage of a row (within the other B-1 dimensions) is 0.3 to 0.5 on
    batches of 8 similar Fashion-MNIST images, and the second-smallest singular value is 2e-2
    to 7e-2 of the largest. A mixture of examples is zero where all of them are, rows whose null
    space holds every one of their directions, plus the sampled rows that happened to cut that
    space down to one direction: its second singular value is zero, or those rows have leverage
    1. Kept: second singular value above ``min_gap`` of the largest, leverage at most
    ``max_leverage``."""
    b = left.shape[1]
    if b == 1 or len(directions) == 0:
        return directions
    z = zeros.astype(np.float64)
    gram = np.einsum("nm,mb,mc->nbc", z, left, left)  # L_Z^T L_Z per zero set
    values, vectors = np.linalg.eigh(gram)  # ascending; vectors in columns
    pinned = values[:, 1] > min_gap**2 * values[:, -1]
    values, vectors, z = values[pinned], vectors[pinned], z[pinned]
    # Leverage of each row in the span of the other B-1 eigenvectors: |row . v_k|^2 / lambda_k.
    whitened = vectors[:, :, 1:] / np.sqrt(values[:, None, 1:])
    leverage = (np.einsum("mb,nbk->nmk", left, whitened) ** 2).sum(axis=2) * z
    spread = leverage.max(axis=1) <= max_leverage
    return np.asarray(vectors[spread, :, 0])


def solve_batch(directions: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(X [B, n], Q [B, B])`` from B directions (rows [B, B]) and ``R`` [B, n + 1] whose last
    column belongs to the bias: each direction is scaled so that ``[X | 1] = Q^-1 R`` has a
    column of ones."""
    q_hat = directions.T  # columns are directions
    scales = np.linalg.solve(q_hat, right[:, -1])
    q = q_hat * scales[None, :]
    return np.linalg.solve(q, right[:, :-1]), q


def relu_agreement(
    inputs: np.ndarray,
    out_grads: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    *,
    zero_tol: float,
) -> float:
    """Share of (example, unit) pairs where the unit is active (``W x + b > 0``) exactly when its
    output gradient [B, m] is non-zero: 1 for the true batch, well below for a wrong one."""
    active = inputs @ weight.T.astype(np.float64) + bias.astype(np.float64) > 0
    mag = np.abs(out_grads)
    nonzero = mag > zero_tol * mag.max(axis=1, keepdims=True)
    return float((active == nonzero).mean())


def consistent_batch(
    candidates: np.ndarray,
    left: np.ndarray,
    right: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    *,
    zero_tol: float,
    min_agreement: float,
    max_subsets: int,
) -> tuple[np.ndarray, np.ndarray] | None:
    """The first B-subset of ``candidates`` (rows, sparsest first) whose solved batch agrees with
    the ReLU pattern (``relu_agreement`` >= ``min_agreement``): ``(X, chosen rows)``, or None."""
    b = candidates.shape[1]
    top = min(len(candidates), b + 4)
    for subset in itertools.islice(itertools.combinations(range(top), b), max_subsets):
        dirs = candidates[list(subset)]
        try:
            x, q = solve_batch(dirs, right)
        except np.linalg.LinAlgError:
            continue
        out_grads = (left @ q).T
        if relu_agreement(x, out_grads, weight, bias, zero_tol=zero_tol) >= min_agreement:
            return x, np.array(subset)
    return None


def sparse_directions(
    left: np.ndarray,
    *,
    samples: int,
    chunk: int,
    min_sparsity: float,
    zero_tol: float,
    min_gap: float,
    max_leverage: float,
    seed: int,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Sample [B-1, B] submatrices of ``left`` [m, B] (rows of units alive for some example),
    ``chunk`` at a time, ``samples`` in all; after each chunk yield the distinct sparse
    directions found so far (``distinct_sparse``) and their sparsity over the alive units."""
    batch = left.shape[1]
    rng = np.random.default_rng(seed)
    norms = np.linalg.norm(left, axis=1)
    rows = np.flatnonzero(norms > ALIVE_TOL * norms.max())
    left = left[rows]  # units inactive for the whole batch are zero for every direction
    rows = np.arange(len(rows))
    if len(rows) < batch:
        raise NotApplicable(f"only {len(rows)} first-layer units carry gradient; need {batch}")
    found = np.zeros((0, batch))
    for start in range(0, samples, chunk):
        n = min(chunk, samples - start)
        picks = np.argsort(rng.random((n, len(rows))), axis=1)[:, : batch - 1]
        dirs = null_directions(left[rows[picks]])
        pool = np.vstack([found, dirs[np.isfinite(dirs).all(axis=1)]])
        found, zeros = distinct_sparse(
            pool,
            left,
            zero_tol=zero_tol,
            min_sparsity=min_sparsity,
            min_gap=min_gap,
            max_leverage=max_leverage,
        )
        yield found, zeros.mean(axis=1)


@dataclass(frozen=True)
class SpearConfig:
    """``samples``: most submatrices tried (in chunks of ``chunk``); ``min_sparsity``: the
    fraction of zeros (over units alive for some example) that makes a direction a ReLU
    gradient (a wrong one is zero only on the B-1 sampled rows); ``zero_tol``: what counts as zero,
    relative to the largest entry; ``min_gap``: how far (relative singular value) a zero set's
    rows must be from a second null direction, and ``max_leverage``: the most any one row may
    matter, for them to pin their direction down (``isolated``); ``min_agreement``: the ReLU
    pattern agreement that accepts a solved batch, trying up to ``max_subsets`` B-subsets of the
    candidates; ``seed`` draws the submatrices."""

    samples: int = 400_000
    chunk: int = 4096
    min_sparsity: float = 0.1
    zero_tol: float = 1e-5
    min_gap: float = 1e-3
    max_leverage: float = 0.99
    min_agreement: float = 0.99
    max_subsets: int = 200
    seed: int = 0


class Spear(BaseAttack):
    """SPEAR on a FedSGD gradient of a model that starts with Linear -> ReLU (the zoo's mlp)."""

    name: ClassVar[str] = "spear"
    kinds: ClassVar[tuple[UpdateKind, ...]] = ("gradient",)

    def __init__(self, config: SpearConfig | None = None) -> None:
        self.config = config or SpearConfig()

    def needs(self, update: AttackUpdate, manifest: Manifest) -> None:
        w_name, _ = first_linear(manifest)
        units = manifest.shapes()[w_name][0]
        if not 1 <= update.num_examples <= min(MAX_BATCH, units):
            raise NotApplicable(
                f"spear recovers batches of 1 to {min(MAX_BATCH, units)} examples; "
                f"got {update.num_examples}"
            )

    def run(
        self,
        update: AttackUpdate,
        global_model: Mapping[str, np.ndarray],
        metadata: AttackMetadata,
        deadline: Deadline,
    ) -> Recovered:
        c = self.config
        w_name, b_name = first_linear(metadata.manifest)
        b = update.num_examples
        stacked = np.hstack(
            [update.params[w_name].astype(np.float64), update.params[b_name][:, None]]
        )
        left, right = low_rank(stacked, b)
        weight, bias = global_model[w_name], global_model[b_name]
        empty = np.zeros((0, *metadata.manifest.input_shape), np.float32)
        hit = False
        for dirs, scores in sparse_directions(
            left,
            samples=c.samples,
            chunk=c.chunk,
            min_sparsity=c.min_sparsity if b > 1 else 0.0,
            zero_tol=c.zero_tol,
            min_gap=c.min_gap,
            max_leverage=c.max_leverage,
            seed=c.seed,
        ):
            if len(dirs) >= b:
                done = consistent_batch(
                    dirs,
                    left,
                    right,
                    weight,
                    bias,
                    zero_tol=c.zero_tol,
                    min_agreement=c.min_agreement,
                    max_subsets=c.max_subsets,
                )
                if done is not None:
                    inputs, chosen = done
                    shape = (b, *metadata.manifest.input_shape)
                    images = inputs_to_images(inputs.reshape(shape), metadata)
                    return Recovered(images, None, scores[chosen].astype(np.float32))
            if deadline.expired():
                hit = True
                break
        # No consistent set of B directions: nothing is returned rather than a wrong batch.
        return Recovered(empty, None, np.zeros(0, np.float32), budget_hit=hit)
