"""Aggregation rules: exact values on hand-computed cases."""

from __future__ import annotations

from pathlib import Path

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


# -- robust defences (coordinator.robust) ---------------------------------------------------------


def test_norm_bound_clips_to_the_median_norm_exactly() -> None:
    from coordinator.robust import norm_bound

    # norms 5, 1, 2: median 2; the first is scaled by 2/5, the others pass unchanged
    ups = [(p(3, 4), 1), (p(1, 0), 1), (p(0, 2), 2)]
    out = norm_bound(ups)
    assert out.clip == (0.4, 1.0, 1.0)
    assert out.kept == (True, True, True)
    # (1.2, 1.6) + (1, 0) + 2·(0, 2) over 4 examples
    np.testing.assert_allclose(out.params["w"], [0.55, 1.4], rtol=1e-7)
    fixed = norm_bound(ups, bound=1.0)
    assert fixed.clip == (0.2, 1.0, 0.5)
    np.testing.assert_allclose(fixed.params["w"], [(0.6 + 1) / 4, (0.8 + 2) / 4], rtol=1e-7)


def test_multi_krum_drops_f_outliers_and_averages_the_rest() -> None:
    from coordinator.robust import krum_scores, multi_krum

    ups = [(p(0, 0), 1), (p(1, 0), 3), (p(0, 1), 1), (p(9, 9), 1), (p(-9, 9), 1)]
    flat = np.array([u["w"] for u, _ in ups], dtype=np.float64)
    # f=2: each score sums the squared distances to its n - f - 2 = 1 nearest neighbour
    np.testing.assert_array_equal(krum_scores(flat, 2), [1, 1, 1, 145, 145])
    out = multi_krum(ups, f=2)
    assert out.kept == (True, True, True, False, False)
    np.testing.assert_array_equal(out.params["w"], np.array([0.6, 0.2], np.float32))
    one = multi_krum(ups, f=2, m=1)  # Krum: the first of the tied best
    assert one.kept == (True, False, False, False, False)
    np.testing.assert_array_equal(one.params["w"], [0, 0])
    assert multi_krum(ups, f=0).kept == (True,) * 5  # m = n - f = 5
    # f=1: two neighbours each; (9, 9) scores 145 + 145, (-9, 9) 145 + 162: the latter goes
    assert multi_krum(ups, f=1).kept == (True, True, True, True, False)
    assert multi_krum(ups, f=1, m=2).kept == (True, True, False, False, False)


def test_krum_through_the_registry_equals_the_reference_krum() -> None:
    from coordinator.robust import get_defence

    rng = np.random.default_rng(3)
    ups = [({"w": rng.standard_normal(6).astype(np.float32)}, 1) for _ in range(6)]
    got = get_defence("krum:f=1")(ups, rng)
    np.testing.assert_array_equal(got.params["w"], krum(ups, num_byzantine=1)["w"])
    assert sum(got.kept) == 1


def test_flame_excludes_the_odd_direction_and_clips_to_the_median_norm() -> None:
    from coordinator.robust import flame

    honest = [(p(1, 0.1 * i), 1) for i in range(4)]  # norms 1, 1.005, 1.02, 1.044
    attacker = (p(-30, 40), 1)  # norm 50, opposite direction
    out = flame([*honest, attacker], np.random.default_rng(0))
    # HDBSCAN's single cluster holds its core (1..3); (1, 0) at its edge and the attacker are out
    assert out.kept == (False, True, True, True, False)
    s = float(np.hypot(1, 0.2))  # the median norm
    want = np.mean(
        [np.array([1, 0.1 * i]) * min(1, s / np.hypot(1, 0.1 * i)) for i in (1, 2, 3)], 0
    )
    np.testing.assert_allclose(out.params["w"], want, rtol=1e-6)
    assert out.clip[4] == pytest.approx(s / 50)
    noisy = flame([*honest, attacker], np.random.default_rng(0), noise=0.01)
    delta = noisy.params["w"] - out.params["w"]
    np.testing.assert_allclose(delta, np.random.default_rng(0).normal(0, 0.01 * s, 2), atol=1e-7)


@pytest.mark.parametrize("count", [1, 2, 3, 4, 999, 1000])
def test_row_medians_are_numpys_medians_bit_for_bit(count: int) -> None:
    """One partition instead of numpy's two for an even count, the same float64 bits; ties and
    repeated values included."""
    from coordinator.robust import row_medians

    rng = np.random.default_rng(count)
    normal = rng.normal(size=(50, count))
    ties = rng.integers(-3, 3, size=(50, count)).astype(np.float64)
    for t in (normal, ties, np.float32(normal).astype(np.float64)):
        assert row_medians(t).tobytes() == np.median(t, axis=1).tobytes()


def test_anomaly_score_is_cosine_distance_plus_log_norm_ratio() -> None:
    from coordinator.robust import anomaly_scores

    flat = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [4.0, 0.0]])
    # coordinate median (1, 0): cos = 1, 1, 0, -1, 1; norms 1, 1, 1, 1, 4 (median 1)
    np.testing.assert_allclose(anomaly_scores(flat), [0, 0, 1, 2, np.log(4)], atol=1e-12)


def test_anomaly_scores_over_spooled_row_chunks_equal_those_of_the_whole_matrix(
    tmp_path: Path,
) -> None:
    """The coordinator scores 10,000 updates chunk by chunk from its spool: any chunk size
    gives the norms and scores of the flattened matrix (pairwise cosine distances to its median
    row), in the order asked for, whatever the order the updates were spooled in."""
    from coordinator.robust import cosine_distances, flatten, median_update, norms_and_scores
    from coordinator.spool import UpdateSpool

    rng = np.random.default_rng(0)
    f32 = np.float32
    ups = [({"a": rng.normal(size=(3, 5)).astype(f32), "b": rng.normal(size=7).astype(f32)}, 1)
           for _ in range(9)]  # fmt: skip
    ups[0] = ({k: -10 * v for k, v in ups[0][0].items()}, 1)  # flipped and boosted
    ups[1] = ({k: np.zeros_like(v) for k, v in ups[1][0].items()}, 1)
    flat = flatten(ups)
    norms = np.linalg.norm(flat, axis=1)
    direction = cosine_distances(np.vstack([np.median(flat, axis=0), flat]))[0, 1:]
    want = direction + np.abs(np.log(np.maximum(norms, 1e-300) / np.median(norms)))
    spool = UpdateSpool({"a": (3, 5), "b": (7,)}, tmp_path)
    devices = [f"d{i}" for i in range(len(ups))]
    for i in reversed(range(len(ups))):  # arrival order is not the device order
        spool.put(devices[i], ups[i][0])
    for size, block, width in ((1, 1, 1), (4, 5, 3), (100, 4096, 512)):
        median = median_update(spool.column_blocks(devices, block), width)
        got_norms, got = norms_and_scores(median, spool.row_chunks(devices, size))
        np.testing.assert_allclose(got_norms, norms, rtol=1e-12)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    # the zero update (ln of the smallest float64) and the flipped, boosted one stand out
    assert sorted(np.argsort(got)[-2:]) == [0, 1] and got[0] > 2


def test_fedavg_of_spooled_updates_is_bit_identical_and_reads_each_once(tmp_path: Path) -> None:
    """The coordinator's FedAvg mean over its disk spool equals the in-memory mean bit for bit,
    reading every update once; the spool is empty again after ``clear``, and the next round's
    rows overwrite the last's without growing its file."""
    from coordinator.spool import UpdateSpool

    rng = np.random.default_rng(1)
    shapes = {"w": (4, 3), "b": (3,)}
    ups = [({k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}, int(n))
           for n in rng.integers(1, 50, size=6)]  # fmt: skip
    spool = UpdateSpool(shapes, tmp_path)
    devices = [f"d{i}" for i in range(len(ups))]
    for d, (p, _) in zip(devices, ups, strict=True):
        spool.put(d, p)
    lazy = spool.updates(devices, [n for _, n in ups])
    reads: list[str] = []
    read = spool.params
    spool.params = lambda d: reads.append(d) or read(d)  # type: ignore[method-assign]
    got, want = weighted_mean(lazy), weighted_mean(ups)
    assert reads == devices
    for k in shapes:
        assert got[k].tobytes() == want[k].tobytes()
        assert np.array_equal(read("d3")[k], ups[3][0][k])
    size = spool.file_bytes()
    spool.clear()
    assert len(spool) == 0 and "d0" not in spool
    spool.put("e", ups[5][0])  # the next round's first row: in place of d0's, the file as big
    assert len(spool) == 1 and spool.file_bytes() == size
    assert all(np.array_equal(spool.params("e")[k], ups[5][0][k]) for k in shapes)


def test_defence_specs_parse_and_name_what_is_valid() -> None:
    from coordinator.robust import get_defence, parse_defence

    assert parse_defence("multikrum:f=2") == ("multikrum", {"f": 2.0, "m": 0.0})
    assert parse_defence("trimmed_mean") == ("trimmed_mean", {"beta": 0.1})
    rng = np.random.default_rng(0)
    ups = [(p(1), 1), (p(2), 1), (p(3), 1), (p(1000), 1), (p(4), 1)]
    assert get_defence("trimmed_mean:beta=0.2")(ups, rng).params["w"][0] == 3
    assert get_defence("median")(ups, rng).params["w"][0] == 3
    assert get_defence("mean")(ups, rng).params["w"][0] == 202
    bad = {
        "avg": "expected one of mean, median, trimmed_mean, krum, multikrum, norm_bound, flame",
        "multikrum:g=1": "multikrum takes key=value with f, m",
        "krum:f=1.5": "f must be a whole number",
        "trimmed_mean:beta=0.5": r"beta must be in \[0, 0.5\)",
        "norm_bound:bound=x": "is not a number",
        "median:f=1": "median takes key=value with none",
    }
    for spec, msg in bad.items():
        with pytest.raises(ValueError, match=msg):
            parse_defence(spec)
