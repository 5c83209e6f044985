"""Aggregation rules: exact values on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.aggregate import (
    apply_update,
    coordinate_median,
    get_aggregator,
    krum,
    trimmed_mean,
    weighted_mean,
)


def p(*v: float) -> dict[str, np.ndarray]:
    return {"w": np.array(v, dtype=np.float32)}


def test_weighted_mean_exact() -> None:
    out = weighted_mean([(p(1, 2), 1), (p(4, 8), 3)])
    np.testing.assert_array_equal(out["w"], np.array([3.25, 6.5], np.float32))


def test_weighted_mean_matches_reference_on_random_data() -> None:
    rng = np.random.default_rng(0)
    ups = [
        ({"w": rng.standard_normal((5, 3)).astype(np.float32)}, int(n))
        for n in rng.integers(1, 50, 7)
    ]
    ref = sum(u["w"].astype(np.float64) * n for u, n in ups) / sum(n for _, n in ups)
    np.testing.assert_allclose(weighted_mean(ups)["w"], ref, rtol=1e-6)


def test_median_and_trimmed_mean_ignore_an_outlier() -> None:
    ups = [(p(1), 1), (p(2), 1), (p(3), 1), (p(1000), 1), (p(4), 1)]
    assert coordinate_median(ups)["w"][0] == 3
    assert trimmed_mean(ups, trim=0.2)["w"][0] == 3  # drops 1 and 1000, mean of 2,3,4


def test_krum_picks_a_central_update() -> None:
    ups = [(p(0, 0), 1), (p(0.1, 0), 1), (p(0, 0.1), 1), (p(50, 50), 1)]
    np.testing.assert_array_equal(krum(ups, num_byzantine=1)["w"], p(0, 0)["w"])


def test_apply_update_signs() -> None:
    w = p(1, 1)
    np.testing.assert_array_equal(
        apply_update(w, p(1, 2), kind="gradient", server_lr=0.5)["w"], [0.5, 0.0]
    )
    np.testing.assert_array_equal(
        apply_update(w, p(1, 2), kind="delta", server_lr=1.0)["w"], [2.0, 3.0]
    )


def test_registry_errors_list_names() -> None:
    with pytest.raises(ValueError, match="mean, median, trimmed_mean, krum"):
        get_aggregator("avg")
    with pytest.raises(ValueError, match="no updates"):
        weighted_mean([])


def test_order_statistics_and_krum_ignore_input_order() -> None:
    """The coordinator sorts updates by device id; these rules need no order at all."""
    rng = np.random.default_rng(1)
    ups = [({"w": rng.standard_normal(7).astype(np.float32)}, int(n)) for n in (3, 5, 2, 8, 4)]
    for rule in (coordinate_median, trimmed_mean, krum):
        want = rule(ups)["w"]
        for perm in ([4, 3, 2, 1, 0], [2, 0, 4, 1, 3]):
            np.testing.assert_array_equal(rule([ups[i] for i in perm])["w"], want)
