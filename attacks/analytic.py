"""Analytic inversion of a fully connected first layer (Phong et al. 2017; Geiping et al. 2020).

For one example, a linear layer ``z = W x + b`` has ``dL/dW_i = (dL/dz_i) x`` and
``dL/db_i = dL/dz_i``, so every row with a non-zero bias gradient gives ``x = dL/dW_i / dL/db_i``
exactly up to float32 rounding. When the layer is the model's first (the zoo's ``mlp``), ``x``
is the model input, and undoing the input normalisation gives the image.

For a batch, row i's ratio is the ``dL/dz_i``-weighted mix of the examples that activated unit
i. A unit that only one example activated gives that example exactly, and so does every other
unit that only it activated: their ratios agree to float rounding, while mixes of two or more
examples differ from row to row (Boenisch et al. 2023, "When the Curious Abandon Honesty"). The
attack returns up to B inputs: the ratios on which most rows agree first; a ratio no other row
repeats (a single-example row or a mix) comes last, with low confidence.
"""

from __future__ import annotations

from collections.abc import Mapping
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
from attacks.labels import recover_labels
from edge.manifest import Manifest


def signal_rows(bias_grad: np.ndarray, rel_tol: float) -> tuple[np.ndarray, np.ndarray]:
    """(indices of the rows whose ``|db_i|`` is at least ``rel_tol`` of the largest, largest
    first; ``db`` as float64). ``NotApplicable`` when every bias gradient is zero."""
    db = bias_grad.astype(np.float64)
    scale = np.abs(db).max()
    if not scale > 0:
        raise NotApplicable("all bias gradients are zero: the layer saw no signal")
    rows = np.flatnonzero(np.abs(db) >= rel_tol * scale)
    return rows[np.argsort(-np.abs(db[rows]), kind="stable")], db


def linear_input(
    weight_grad: np.ndarray, bias_grad: np.ndarray, *, rel_tol: float = 1e-3
) -> np.ndarray:
    """The input of a linear layer from its gradients: rows weighted by their bias gradient.

    The least-squares fit of ``dW_i = db_i x`` over the rows with ``|db_i|`` above ``rel_tol``
    of the largest: ``x = sum_i db_i dW_i / sum_i db_i^2``.
    """
    rows, db = signal_rows(bias_grad, rel_tol)
    dw = weight_grad[rows].astype(np.float64)
    return (db[rows] @ dw) / (db[rows] @ db[rows])


def classifier_inputs(
    weight_grad: np.ndarray,
    bias_grad: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    labels: np.ndarray,
    *,
    iterations: int = 100,
    tol: float = 1e-5,
) -> np.ndarray | None:
    """Each example's input ``a_b`` to a softmax classifier ``z = W a + c`` from the batch's mean
    cross-entropy gradient and the labels, or ``None`` where it is not determined.

    ``dW = (P - Y)^T A / B`` with ``P`` the examples' probabilities, which depend on ``A``: a
    fixed point, starting from ``P = softmax(c)``, of solving for ``A`` given ``P`` (least
    squares) and recomputing ``P = softmax(A W^T + c)``. Taken as determined when B is at most
    the classes and the bias gradient ``mean(P - Y)`` is reproduced within ``tol`` (relative).
    Repeated labels are told apart only by their probabilities, which costs accuracy: within
    1e-3 relative on an untrained LeNetZhu, B=8 with a label three times (distinct: ~1e-8)."""
    n = len(labels)
    if n > weight.shape[0]:
        return None
    dw, db = weight_grad.astype(np.float64), bias_grad.astype(np.float64)
    w, c = weight.astype(np.float64), bias.astype(np.float64)
    y = np.eye(w.shape[0])[labels]
    p = np.tile(np.exp(c - c.max()) / np.exp(c - c.max()).sum(), (n, 1))
    for _ in range(iterations):
        a = n * np.linalg.lstsq((p - y).T, dw, rcond=None)[0]
        z = a @ w.T + c
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
    residual = float(np.linalg.norm((p - y).mean(axis=0) - db)) / max(
        float(np.linalg.norm(db)), 1e-30
    )
    return a if residual <= tol else None


def row_inputs(
    weight_grad: np.ndarray, bias_grad: np.ndarray, *, rel_tol: float = 1e-3
) -> np.ndarray:
    """``dW_i / db_i`` [k, D] of the rows with ``|db_i|`` above ``rel_tol`` of the largest,
    largest ``|db_i|`` first."""
    rows, db = signal_rows(bias_grad, rel_tol)
    return weight_grad[rows].astype(np.float64) / db[rows, None]


def agreeing_inputs(candidates: np.ndarray, *, agree: float) -> tuple[np.ndarray, list[int]]:
    """Greedy grouping of row inputs [k, D]: a row joins the first group whose first row is
    within ``agree`` relative L2 distance. (One input per group [g, D], rows per group),
    largest groups first (ties: the order of first appearance)."""
    heads = np.empty_like(candidates)
    sizes: list[int] = []
    for c in candidates:
        far = np.linalg.norm(heads[: len(sizes)] - c, axis=1) > agree * (np.linalg.norm(c) or 1.0)
        if far.all():
            heads[len(sizes)] = c
            sizes.append(1)
        else:
            sizes[int(np.argmin(far))] += 1  # the first group within reach
    order = sorted(range(len(sizes)), key=lambda g: -sizes[g])
    return heads[order], [sizes[g] for g in order]


@dataclass(frozen=True)
class AnalyticConfig:
    """``rel_tol``: rows with a bias gradient below this fraction of the largest are ignored.
    ``agree``: the relative L2 distance within which two rows' inputs count as one example's
    (float32 rounding gives about 1e-6; two different examples differ by far more)."""

    rel_tol: float = 1e-3
    agree: float = 1e-4


class AnalyticAttack(BaseAttack):
    """Recover the input of a first linear layer exactly: one example's from its gradient, or
    from a batch's gradient the examples some unit saw alone."""

    name: ClassVar[str] = "analytic"
    kinds: ClassVar[tuple[UpdateKind, ...]] = ("gradient",)

    def __init__(self, config: AnalyticConfig | None = None) -> None:
        self.config = config or AnalyticConfig()

    def needs(self, update: AttackUpdate, manifest: Manifest) -> None:
        first_linear(manifest)

    def run(
        self,
        update: AttackUpdate,
        global_model: Mapping[str, np.ndarray],
        metadata: AttackMetadata,
        deadline: Deadline,
    ) -> Recovered:
        w_name, b_name = first_linear(metadata.manifest)
        dw, db = update.params[w_name], update.params[b_name]
        shape = metadata.manifest.input_shape
        batch = update.num_examples
        if batch == 1:
            x = linear_input(dw, db, rel_tol=self.config.rel_tol)
            image = inputs_to_images(x.reshape(shape), metadata)
            labels = recover_labels(update, global_model, metadata)[0][:1]
            return Recovered(image[None], labels, np.array([1.0], dtype=np.float32))
        inputs, rows = agreeing_inputs(
            row_inputs(dw, db, rel_tol=self.config.rel_tol), agree=self.config.agree
        )
        inputs, rows = inputs[:batch], rows[:batch]
        images = inputs_to_images(inputs.reshape(len(inputs), *shape), metadata)
        # a group of agreeing rows is one example exactly; a lone row may be a mix
        conf = np.array([1.0 if n > 1 else 1.0 / batch for n in rows], dtype=np.float32)
        return Recovered(images, None, conf)
