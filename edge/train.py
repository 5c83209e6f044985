"""Local training on a device: FedSGD (one batch gradient) and FedAvg (E epochs of SGD, delta)."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edge.backends.base import Backend, Params, StepResult

# One local step's gradient on a batch (default: the backend's mean gradient).
StepFn = Callable[[Params, np.ndarray, np.ndarray], StepResult]
# The batches of one epoch: (number of examples, rng) -> index arrays.
Sampler = Callable[[int, np.random.Generator], list[np.ndarray]]


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
    *,
    step_fn: StepFn | None = None,
    sampler: Sampler | None = None,
) -> LocalResult:
    """The mean gradient of one batch of ``batch_size`` examples (all of them for 0);
    ``step_fn``/``sampler`` replace the backend's step and the shuffled batches (protections)."""
    step_fn = step_fn or backend.loss_and_grad
    idx = (sampler or (lambda n, r: minibatches(n, batch_size, r)))(len(x), rng)[0]
    step = step_fn(weights, x[idx], y[idx])
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
    step_fn: StepFn | None = None,
    sampler: Sampler | None = None,
) -> LocalResult:
    """``epochs`` epochs of minibatch SGD at ``lr``; the update is w_local - w_global.
    ``step_fn``/``sampler`` replace the backend's step and the shuffled batches (protections)."""
    step_fn = step_fn or backend.loss_and_grad
    sampler = sampler or (lambda n, r: minibatches(n, batch_size, r))
    w = dict(weights)
    losses: list[float] = []
    used: list[np.ndarray] = []
    for _ in range(epochs):
        for idx in sampler(len(x), rng):
            step = step_fn(w, x[idx], y[idx])
            w = sgd_step(w, step.grads, lr)
            losses.append(step.loss)
            used.append(idx)
    delta = {k: (w[k] - weights[k]).astype(np.float32) for k in weights}
    finite = [v for v in losses if np.isfinite(v)]  # an empty Poisson batch has no loss
    loss = float(np.mean(finite)) if finite else float("nan")
    return LocalResult(delta, "delta", len(x), loss, np.concatenate(used))


def examples_processed(algorithm: str, *, epochs: int, reported: int) -> int:
    """Examples a device ran forward + backward: FedAvg ``epochs * n``, FedSGD ``n`` (one batch)."""
    return reported * epochs if algorithm == "fedavg" else reported
