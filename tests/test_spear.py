"""SPEAR: exact batch recovery through the zoo MLP's ReLU first layer (small, seeded batches)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from attacks import get_attack
from attacks.base import AttackMetadata, NotApplicable
from attacks.model import FunctionalModel, InputMap, manifest_for
from attacks.spear import isolated, solve_batch, zero_sets
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


@pytest.fixture(scope="module")
def mlp() -> tuple[FunctionalModel, dict[str, np.ndarray], AttackMetadata]:
    torch.manual_seed(0)
    module = zoo.build("mlp", (1, 28, 28))
    meta = AttackMetadata(manifest_for("mlp", module, (1, 28, 28), 10), budget_s=60.0)
    weights = {k: v.detach().numpy().copy() for k, v in module.named_parameters()}
    return FunctionalModel(module, InputMap.from_metadata(meta, torch.device("cpu"))), weights, meta


def _batch(size: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    ds = load_dataset("fashion-mnist")
    sl = slice(index * size, (index + 1) * size)
    return ds.x_test[sl].astype(np.float32), ds.y_test[sl].astype(np.int64)


# (8, 6): test images 48-55, four pullovers whose mixtures once crowded a direction out.
@pytest.mark.parametrize(("size", "index"), [(4, 0), (4, 1), (8, 0), (8, 6)])
def test_spear_recovers_every_image_exactly(
    mlp: tuple[FunctionalModel, dict[str, np.ndarray], AttackMetadata], size: int, index: int
) -> None:
    client, weights, meta = mlp
    x, y = _batch(size, index)
    rec = get_attack("spear").reconstruct(simulate_update(client, weights, x, y), weights, meta)
    report = evaluate(rec, x, y)
    assert rec.count == size and not rec.budget_hit
    assert report.psnr.min() >= 100.0, report.psnr  # exact up to float32 (measured 115-180 dB)
    assert report.exact_fraction == 1.0
    # Each direction is a ReLU gradient: zero on a third to a half of the units alive for the
    # batch (a wrong direction is zero only on the B-1 sampled rows: under 0.05).
    assert np.all((rec.confidence > 0.25) & (rec.confidence < 0.65)), rec.confidence


def test_solve_batch_inverts_a_known_factorisation() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((3, 5))
    q = rng.standard_normal((3, 3))
    right = np.linalg.solve(np.linalg.inv(q), np.hstack([x, np.ones((3, 1))]))  # R = Q [X | 1]
    dirs = (q / np.linalg.norm(q, axis=0)).T * np.array([[1.0], [-1.0], [1.0]])
    got, q_got = solve_batch(dirs, right)
    np.testing.assert_allclose(got, x, atol=1e-12)
    np.testing.assert_allclose(q_got, q, atol=1e-12)


def test_spear_says_where_it_does_not_apply(
    mlp: tuple[FunctionalModel, dict[str, np.ndarray], AttackMetadata],
) -> None:
    client, weights, meta = mlp
    x, y = _batch(4, 0)
    delta = simulate_update(client, weights, x, y, algorithm="fedavg", lr=0.01)
    with pytest.raises(NotApplicable, match="gradient"):
        get_attack("spear").reconstruct(delta, weights, meta)
    big = simulate_update(client, weights, *_batch(17, 0))
    with pytest.raises(NotApplicable, match="1 to 16"):
        get_attack("spear").reconstruct(big, weights, meta)


def test_isolated_drops_a_mixture_that_one_sampled_row_pins_down() -> None:
    rng = np.random.default_rng(0)
    b, m = 4, 60
    out_grads = rng.standard_normal((b, m)) * (rng.random((b, m)) < 0.5)  # ReLU-sparse dZ
    q = rng.standard_normal((b, b))
    both_zero = (out_grads[0] == 0) & (out_grads[1] == 0)
    j = int(np.flatnonzero((out_grads[0] != 0) & (out_grads[1] != 0))[0])
    out_grads[1, j] = -out_grads[0, j]  # the mixture q_0 + q_1 is also zero on unit j
    left = out_grads.T @ np.linalg.inv(q)  # dZ^T = L Q
    genuine = q[:, 0] / np.linalg.norm(q[:, 0])
    mixture = (q[:, 0] + q[:, 1]) / np.linalg.norm(q[:, 0] + q[:, 1])
    dirs = np.stack([genuine, mixture])
    zeros = zero_sets(dirs, left, zero_tol=1e-9)
    assert zeros[1].sum() == both_zero.sum() + 1  # where both examples are zero, and unit j
    kept = isolated(dirs, zeros, left, min_gap=1e-3, max_leverage=0.99)
    assert kept.shape == (1, b)
    assert abs(kept[0] @ genuine) == pytest.approx(1.0, abs=1e-12)
