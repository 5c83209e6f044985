"""Local training on a device: FedSGD (one batch gradient) and FedAvg (E epochs of SGD, delta)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from edge.backends.base import Backend, Params


@dataclass(frozen=True)
class LocalResult:
    """What local training produced: the update arrays, their kind and the examples used."""

    params: Params
    kind: str  # "gradient" | "delta"
    num_examples: int
    train_loss: float
    used: np.ndarray  # indices into the device's data, in the order they were used


def device_rng(seed: int, device: str, round_: int) -> np.random.Generator:
    """The generator of ``device`` in round ``round_``: a function of (seed, CRC-32 of the id,
    round) only, so it does not depend on fleet order, worker count or the Python process."""
    return np.random.default_rng([seed, zlib.crc32(device.encode()), round_])


def sgd_step(params: Params, grads: Params, lr: float) -> Params:
    """Plain SGD: w - lr * g, float32."""
    return {k: (w - np.float32(lr) * grads[k]).astype(np.float32) for k, w in params.items()}


def minibatches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A shuffled epoch of index batches (``batch_size`` 0 means one batch of everything)."""
    order = rng.permutation(n)
    b = n if batch_size <= 0 else batch_size
    return [order[i : i + b] for i in range(0, n, b)]


def fedsgd(
    backend: Backend,
    weights: Params,
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    rng: np.random.Generator,
) -> LocalResult:
    """The mean gradient of one batch of ``batch_size`` examples (all of them for 0)."""
    idx = minibatches(len(x), batch_size, rng)[0]
    step = backend.loss_and_grad(weights, x[idx], y[idx])
    return LocalResult(step.grads, "gradient", len(idx), step.loss, idx)


def fedavg(
    backend: Backend,
    weights: Params,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    rng: np.random.Generator,
) -> LocalResult:
    """``epochs`` epochs of minibatch SGD at ``lr``; the update is w_local - w_global."""
    w = dict(weights)
    losses: list[float] = []
    used: list[np.ndarray] = []
    for _ in range(epochs):
        for idx in minibatches(len(x), batch_size, rng):
            step = backend.loss_and_grad(w, x[idx], y[idx])
            w = sgd_step(w, step.grads, lr)
            losses.append(step.loss)
            used.append(idx)
    delta = {k: (w[k] - weights[k]).astype(np.float32) for k in weights}
    return LocalResult(delta, "delta", len(x), float(np.mean(losses)), np.concatenate(used))
