"""Back-door experiments: poisoning devices (edge.poison) and the defences over the real broker."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

import numpy as np
import pytest

from coordinator import robust
from coordinator.server import Coordinator, RoundPlan
from coordinator.store import RunStore
from devices.datasets import load_dataset
from devices.fleet import Fleet, read_truth
from edge.backends import load_backend
from edge.manifest import ModelArtifact
from edge.mqtt import BrokerAddress
from edge.poison import (
    Poison,
    choose_malicious,
    parse_poison,
    poison_data,
    poison_update,
    replacement_boost,
    stamp_trigger,
)
from edge.train import sgd_step
from edgeleak.config import ConfigError, ExperimentConfig
from edgeleak.experiment import poison_specs
from tests.fedutil import contiguous_shards, fleet

Params = dict[str, np.ndarray]


def test_trigger_is_a_white_3x3_patch_one_pixel_in_from_the_corner() -> None:
    x = np.zeros((2, 1, 28, 28), np.float32)
    t = stamp_trigger(x)
    assert x.sum() == 0  # a copy
    assert t.sum() == 2 * 9
    np.testing.assert_array_equal(t[:, 0, 24:27, 24:27], 1.0)
    assert t[:, 0, 27, :].sum() == 0 and t[:, 0, :, 27].sum() == 0


def test_backdoor_data_poisons_exactly_the_fraction_and_flip_every_label() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((10, 1, 28, 28)).astype(np.float32)
    y = np.arange(10) % 10
    px, py = poison_data(x, y, Poison("backdoor", target=3, fraction=0.4), num_classes=10, rng=rng)
    changed = np.flatnonzero((px != x).reshape(10, -1).any(1))
    assert len(changed) == 4
    np.testing.assert_array_equal(py[changed], 3)
    keep = np.setdiff1d(np.arange(10), changed)
    np.testing.assert_array_equal(py[keep], y[keep])
    np.testing.assert_array_equal(px[changed], stamp_trigger(x[changed]))
    fx, fy = poison_data(x, y, Poison("flip"), num_classes=10, rng=rng)
    assert fx is x
    np.testing.assert_array_equal(fy, 9 - y)
    sx, sy = poison_data(x, y, Poison("scale"), num_classes=10, rng=rng)
    assert sx is x and sy is y
    with pytest.raises(ValueError, match="target 10 >= 10 classes"):
        poison_data(x, y, Poison("backdoor", target=10), num_classes=10, rng=rng)


def test_update_poisons_scale_by_boost() -> None:
    u = {"w": np.array([1.0, -2.0], np.float32)}
    np.testing.assert_array_equal(poison_update(u, Poison("scale", boost=4))["w"], [4, -8])
    np.testing.assert_array_equal(poison_update(u, Poison("signflip", boost=4))["w"], [-4, 8])
    np.testing.assert_array_equal(poison_update(u, Poison("replace", boost=20))["w"], [20, -40])
    assert poison_update(u, Poison("backdoor")) is u
    assert poison_update(u, Poison("flip")) is u
    assert replacement_boost(20, 0.5) == 40.0


def test_poison_specs_round_trip_and_errors() -> None:
    p = Poison("replace", target=1, boost=20.0, fraction=0.25)
    assert parse_poison(p.spec()) == p
    assert parse_poison("flip") == Poison("flip")
    for spec, msg in {
        "poison": "expected one of backdoor, replace, flip, scale, signflip",
        "scale:boost=0": "boost=0.0: expected a number > 0",
        "backdoor:size=3": "keys target, boost, fraction",
        "backdoor:target=x": "target='x' is not a number",
        "backdoor:fraction=2": r"expected a number in \(0, 1\]",
    }.items():
        with pytest.raises(ValueError, match=msg):
            parse_poison(spec)


def test_malicious_devices_are_a_function_of_the_seed() -> None:
    ids = [f"d{i:04d}" for i in range(20)]
    a = choose_malicious(ids, 0.1, seed=0)
    assert len(a) == 2
    assert a == choose_malicious(ids, 0.1, seed=0)
    assert a != choose_malicious(ids, 0.1, seed=1)
    assert choose_malicious(ids, 0.0, seed=0) == []
    assert len(choose_malicious(ids[:3], 0.1, seed=0)) == 1  # at least one when > 0
    cfg = ExperimentConfig(devices=20, malicious_devices=0.1, poison="replace", server_lr=1.0)
    specs = poison_specs(cfg)
    assert sorted(specs) == a
    assert {parse_poison(s) for s in specs.values()} == {Poison("replace", boost=20.0)}


def test_config_checks_poison_and_defence_fields() -> None:
    assert ExperimentConfig(aggregator="multikrum:f=2").aggregator == "multikrum:f=2"
    for kw, msg in (
        ({"malicious_devices": 1.0}, r"expected a fraction in \[0, 1\)"),
        ({"poison": "trojan"}, "poison='trojan': expected one of backdoor"),
        ({"poison_boost": -1.0}, "expected a number >= 0"),
        ({"backdoor_target": -1}, "expected an integer >= 0"),
        ({"aggregator": "flame:eps=1"}, "flame takes key=value with noise"),
    ):
        with pytest.raises(ConfigError, match=msg):
            ExperimentConfig(**kw)  # type: ignore[arg-type]


def test_a_malicious_device_trains_on_poisoned_data_drawn_from_its_seed(
    lenet_artifact: ModelArtifact,
) -> None:
    from edge.device import Device

    data = load_dataset("fashion-mnist")
    x, y = data.x_train[:40], data.y_train[:40]
    backend = load_backend("onnx", lenet_artifact)

    def make(seed: int) -> Device:
        return Device("d0007", "r", lenet_artifact, backend, x, y, seed=seed,
                      poison=Poison("backdoor", target=2, fraction=0.25))  # fmt: skip

    a, b, c = make(0), make(0), make(1)
    changed = np.flatnonzero((a.x != x).reshape(40, -1).any(1))
    assert len(changed) == 10
    np.testing.assert_array_equal(a.y[changed], 2)
    np.testing.assert_array_equal(a.x, b.x)  # same seed, same poisoned examples
    assert not np.array_equal(a.x, c.x)
    honest = Device("d0007", "r", lenet_artifact, backend, x, y)
    np.testing.assert_array_equal(honest.x, x)


# -- over the real broker -------------------------------------------------------------------------


def _honest_updates(
    artifact: ModelArtifact, w0: Params, truth: Path, run: str, *, lr: float, batch_size: int
) -> dict[str, Params]:
    """Each device's round-1 FedAvg delta recomputed from the fleet's truth records."""
    data = load_dataset("fashion-mnist")
    backend = load_backend("onnx", artifact)
    out: dict[str, Params] = {}
    for rec in read_truth(truth):
        if rec["run"] != run or rec["round"] != 1:
            continue
        idx = np.array(rec["examples"])
        w = dict(w0)
        for i in range(0, len(idx), batch_size):
            b = idx[i : i + batch_size]
            w = sgd_step(w, backend.loss_and_grad(w, data.x_train[b], data.y_train[b]).grads, lr)
        out[rec["device"]] = {k: w[k] - w0[k] for k in w0}
    return out


@pytest.mark.parametrize(
    "poison, aggregator",
    [("signflip:boost=10", "multikrum:f=1"), ("scale:boost=10", "norm_bound")],
)
def test_poisoned_update_is_scored_and_defended(
    poison: str,
    aggregator: str,
    mosquitto: BrokerAddress,
    lenet_artifact: ModelArtifact,
    tmp_path: Path,
) -> None:
    """Five devices, d0004 malicious: its update is the outlier in the anomaly table, and the
    defence excludes (multikrum) or bounds (norm_bound) it; the new model is the reference
    defence applied to the recomputed updates."""
    run = "t" + uuid.uuid4().hex[:8]
    plan = RoundPlan(lr=0.05, batch_size=8, deadline_s=60, aggregator=aggregator)
    store = RunStore(tmp_path / "run.db")
    shards = contiguous_shards([16] * 5)
    devices = (*shards[:4], dataclasses.replace(shards[4], poison=poison))
    spec = fleet(run, mosquitto, lenet_artifact, devices, tmp_path / "truth")
    with Coordinator(run, lenet_artifact, mosquitto, store, plan) as coord, Fleet(spec):
        coord.wait_for_devices(5, 60)
        w0 = dict(coord.weights)
        res = coord.run_round(1)
        w1 = dict(coord.weights)
        coord.end()
    assert (res.selected, res.accepted) == (5, 5)
    ups = _honest_updates(lenet_artifact, w0, tmp_path / "truth", run, lr=0.05, batch_size=8)
    ups["d0004"] = poison_update(ups["d0004"], parse_poison(poison))
    order = sorted(ups)
    weighted = [(ups[d], 16) for d in order]
    want = robust.get_defence(aggregator)(weighted, np.random.default_rng(0))
    for k in w0:
        np.testing.assert_allclose(w1[k], w0[k] + want.params[k], rtol=0, atol=1e-6)
    rows = {r["device"]: r for r in store.anomaly(run)}
    assert sorted(rows) == order
    flat = robust.flatten(weighted)
    np.testing.assert_allclose(
        [rows[d]["norm"] for d in order], np.linalg.norm(flat, axis=1), rtol=1e-5
    )
    np.testing.assert_allclose(
        [rows[d]["score"] for d in order], robust.anomaly_scores(flat), atol=1e-5
    )
    assert max(order, key=lambda d: rows[d]["score"]) == "d0004"
    assert {rows[d]["defence"] for d in order} == {aggregator}
    if aggregator.startswith("multikrum"):
        assert [rows[d]["kept"] for d in order] == [1, 1, 1, 1, 0]
        assert [rows[d]["clip"] for d in order] == [1.0] * 5
    else:
        assert [rows[d]["kept"] for d in order] == [1] * 5
        norms = np.linalg.norm(flat, axis=1)
        median = float(np.median(norms))
        np.testing.assert_allclose(
            [rows[d]["clip"] for d in order], np.minimum(1, median / norms), rtol=1e-5
        )
        assert rows["d0004"]["clip"] < 0.2  # ten times an honest update, cut to the median
