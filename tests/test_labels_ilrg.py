"""iLRG-style label counts: the class-wise equations, and exact counts at B=24 with repeats."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from attacks import get_attack
from attacks.base import AttackMetadata
from attacks.ilrg import ilrg_counts, softmax
from attacks.model import FunctionalModel, InputMap, manifest_for
from attacks.truth.leakage import evaluate
from attacks.truth.victim import simulate_update
from devices.datasets import load_dataset
from export import zoo


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_counts_are_exact_when_each_class_shares_one_embedding() -> None:
    # B dW = (P_cls - I)^T S and B db = (P_cls - I)^T n hold exactly here: the iteration must
    # land on the true counts from the batch's mean embedding alone.
    rng = np.random.default_rng(0)
    classes, dim = 5, 12
    weight, bias = 0.3 * rng.standard_normal((classes, dim)), 0.1 * rng.standard_normal(classes)
    counts = np.array([3, 0, 7, 1, 1])
    means = rng.random((classes, dim))
    labels = np.repeat(np.arange(classes), counts)
    h = means[labels]
    p = softmax(h @ weight.T + bias)
    onehot = np.eye(classes)[labels]
    total = len(labels)
    dw, db = (p - onehot).T @ h / total, (p - onehot).sum(axis=0) / total
    raw = ilrg_counts(dw, db, weight, bias, h.mean(axis=0), total, iterations=30)
    np.testing.assert_allclose(raw, counts, atol=1e-6)


@pytest.mark.parametrize("model", ["mlp", "lenet"])
def test_ilrg_counts_a_batch_of_24_exactly(model: str) -> None:
    torch.manual_seed(0)
    module = zoo.build(model, (1, 28, 28))
    meta = AttackMetadata(manifest_for(model, module, (1, 28, 28), 10), budget_s=30.0)
    weights = {k: v.detach().numpy().copy() for k, v in module.named_parameters()}
    client = FunctionalModel(module, InputMap.from_metadata(meta, torch.device("cpu")))
    ds = load_dataset("fashion-mnist")
    for start in (0, 24, 48):
        x = ds.x_test[start : start + 24].astype(np.float32)
        y = ds.y_test[start : start + 24].astype(np.int64)
        assert np.bincount(y).max() >= 3  # repeated labels
        rec = get_attack("ilrg").reconstruct(simulate_update(client, weights, x, y), weights, meta)
        assert rec.labels is not None
        assert np.array_equal(np.sort(rec.labels), np.sort(y))
        assert evaluate(rec, x, y).label_count_accuracy == 1.0
