"""Batch label counts from class-wise embeddings and posteriors (after iLRG, Ma et al., ICLR 2023).

The classifier ``z = W h + b`` of a batch of B examples has, with mean cross-entropy,
``B dW = (P - Y)^T H`` and ``B db = (P - Y)^T 1`` (``P``: softmax outputs [B, C], ``Y``: one-hot
labels, ``H``: the classifier's inputs [B, d]). iLRG groups the batch by class: with
``S_c = sum_{i in c} h_i`` (class-wise embedding sum), ``n_c`` the class count and ``p_c`` the
posterior at the class-wise mean embedding ``S_c / n_c``,

    B dW ~ (P_cls - I)^T S,        B db ~ (P_cls - I)^T n,        1^T n = B.

Given ``P_cls`` the counts are the least-squares (Moore-Penrose) solution of the last two; the
class sums follow from the first up to ``pi v^T`` (``pi``: the stationary vector of ``P_cls``),
fixed by the batch's mean embedding, which the attacker estimates on random inputs at the global
weights. Posteriors and counts are refined in turns. The single-posterior estimate
(``attacks.labels``) is the first step of this iteration.
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
    last_layer,
)
from attacks.labels import counts_to_labels, round_counts
from edge.manifest import Manifest


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64."""
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def solve_counts(posteriors: np.ndarray, bias_grad_sum: np.ndarray, total: int) -> np.ndarray:
    """Least-squares counts n [C] of ``(P_cls - I)^T n = B db`` and ``1^T n = B``."""
    c = len(posteriors)
    a = np.vstack([posteriors.T - np.eye(c), np.ones((1, c))])
    return np.linalg.pinv(a) @ np.append(bias_grad_sum, float(total))


def class_sums(
    posteriors: np.ndarray, weight_grad_sum: np.ndarray, mean_embedding: np.ndarray, total: int
) -> np.ndarray:
    """Class-wise embedding sums S [C, d] of ``(P_cls - I)^T S = B dW`` whose sum over classes is
    ``total * mean_embedding`` (the component the gradient does not fix)."""
    c = len(posteriors)
    a = posteriors.T - np.eye(c)
    s0 = np.linalg.pinv(a) @ weight_grad_sum
    # The stationary vector pi of P_cls spans the null space of (P_cls - I)^T.
    _, _, vt = np.linalg.svd(a)
    pi = vt[-1] / vt[-1].sum()
    return s0 + np.outer(pi, total * mean_embedding - s0.sum(axis=0))


def ilrg_counts(
    weight_grad: np.ndarray,
    bias_grad: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    mean_embedding: np.ndarray,
    total: int,
    *,
    iterations: int = 10,
) -> np.ndarray:
    """Real-valued class counts [C] of a batch of ``total`` from the classifier's mean gradients
    and weights, starting from one posterior at ``mean_embedding`` for every class."""
    w, b = weight.astype(np.float64), bias.astype(np.float64)
    g_w, g_b = total * weight_grad.astype(np.float64), total * bias_grad.astype(np.float64)
    m = mean_embedding.astype(np.float64)
    post = np.tile(softmax(w @ m + b), (len(b), 1))
    counts = solve_counts(post, g_b, total)
    for _ in range(iterations):
        sums = class_sums(post, g_w, m, total)
        present = counts > 0.5
        means = np.where(present[:, None], sums / np.maximum(counts, 0.5)[:, None], m[None, :])
        post = softmax(means @ w.T + b)
        counts = solve_counts(post, g_b, total)
    return counts


@dataclass(frozen=True)
class ILRGConfig:
    """``samples`` random images (drawn with ``seed``) estimate the mean embedding;
    ``iterations`` refinements of posteriors and counts."""

    samples: int = 64
    seed: int = 0
    iterations: int = 10


class ILRG(BaseAttack):
    """Label counts of a FedSGD batch from class-wise embeddings and posteriors."""

    name: ClassVar[str] = "ilrg"
    kinds: ClassVar[tuple[UpdateKind, ...]] = ("gradient",)

    def __init__(self, config: ILRGConfig | None = None) -> None:
        self.config = config or ILRGConfig()

    def needs(self, update: AttackUpdate, manifest: Manifest) -> None:
        if last_layer(manifest)[1] is None:
            raise NotApplicable(f"{manifest.model!r} has no classifier bias: ilrg needs one")

    def run(
        self,
        update: AttackUpdate,
        global_model: Mapping[str, np.ndarray],
        metadata: AttackMetadata,
        deadline: Deadline,
    ) -> Recovered:
        w_name, b_name = last_layer(metadata.manifest)
        assert b_name is not None
        c = self.config
        m = mean_embedding(global_model, metadata, samples=c.samples, seed=c.seed)
        raw = ilrg_counts(
            update.params[w_name],
            update.params[b_name],
            global_model[w_name],
            global_model[b_name],
            m,
            update.num_examples,
            iterations=c.iterations,
        )
        counts = round_counts(raw, update.num_examples)
        labels = counts_to_labels(counts)
        closeness = 1.0 - 2.0 * np.abs(raw - np.round(raw)).clip(0, 0.5)
        return Recovered(None, labels, closeness[labels].astype(np.float32))


def mean_embedding(
    global_model: Mapping[str, np.ndarray], metadata: AttackMetadata, *, samples: int, seed: int
) -> np.ndarray:
    """The mean input of the classifier over uniform random images at the global weights."""
    import torch

    from attacks.model import FunctionalModel, select_device, to_weights

    device = select_device(metadata.device, metadata.threads)
    model = FunctionalModel.from_metadata(metadata, device)
    w_name, _ = last_layer(metadata.manifest)
    classifier = [m for m in model.module.modules() if isinstance(m, torch.nn.Linear)][-1]
    seen: list[torch.Tensor] = []
    hook = classifier.register_forward_hook(lambda _m, inp, _o: seen.append(inp[0].detach()))
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((samples, *metadata.manifest.input_shape), generator=gen).to(device)
    try:
        with torch.no_grad():
            model.logits(to_weights(global_model, device), x)
    finally:
        hook.remove()
    del w_name
    return seen[0].mean(0).double().cpu().numpy()
