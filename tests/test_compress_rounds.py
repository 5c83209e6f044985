"""Compressed updates and decoy updates over the real broker: exact aggregates, ledger bytes."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from coordinator.server import Coordinator, RoundPlan
from coordinator.store import RunStore
from devices.fleet import Fleet, FleetSpec
from edge import decoy, wire
from edge.manifest import ModelArtifact
from edge.mqtt import QOS, BrokerAddress, wait_until
from tests.fedutil import contiguous_shards, expected_round, fleet


def _run_id() -> str:
    return "t" + uuid.uuid4().hex[:8]


def _update_bytes(store: RunStore, run: str, kind: str = "update") -> list[int]:
    rows = store.db.execute(
        "SELECT bytes FROM messages WHERE run=? AND kind=? ORDER BY round, device", (run, kind)
    ).fetchall()
    return [int(b) for (b,) in rows]


def test_topk_int8_round_is_exact_and_50x_smaller(
    mosquitto: BrokerAddress, lenet_artifact: ModelArtifact, tmp_path: Path
) -> None:
    sizes = [16, 24]
    per_update: dict[str, list[int]] = {}
    for codec in ("f32", "topk:0.01+int8"):
        run = _run_id()
        plan = RoundPlan(algorithm="fedavg", lr=0.05, batch_size=8, codec=codec, deadline_s=60)
        store = RunStore(tmp_path / f"{run}.db")
        truth = tmp_path / run
        spec = fleet(run, mosquitto, lenet_artifact, contiguous_shards(sizes), truth)
        with Coordinator(run, lenet_artifact, mosquitto, store, plan) as coord, Fleet(spec):
            coord.wait_for_devices(len(sizes), 60)
            w0 = dict(coord.weights)
            res = coord.run_round(1)
            w1 = dict(coord.weights)
            res2 = coord.run_round(2)  # with the residual of round 1
            coord.end()
        assert (res.accepted, res.rejected, res2.accepted, res2.rejected) == (2, 0, 2, 0)
        want = expected_round(
            lenet_artifact, w0, truth, run, 1, algorithm="fedavg", lr=0.05, batch_size=8,
            codec=codec,
        )  # fmt: skip
        for k in w0:
            np.testing.assert_allclose(w1[k], want[k], rtol=0, atol=1e-6)
        per_update[codec] = _update_bytes(store, run)
        assert len(per_update[codec]) == 4
        if codec != "f32":
            changed = sum(int((w1[k] != w0[k]).sum()) for k in w0)
            assert 0 < changed <= 2 * 622  # at most the union of two devices' top-1% entries
    # The same message layout every round: one size per codec.
    assert len(set(per_update["f32"])) == 1 and len(set(per_update["topk:0.01+int8"])) == 1
    ratio = per_update["f32"][0] / per_update["topk:0.01+int8"][0]
    assert ratio >= 50, ratio


def test_decoys_are_dropped_and_counted(
    mosquitto: BrokerAddress, lenet_artifact: ModelArtifact, tmp_path: Path
) -> None:
    """K decoys per device under pseudonyms: the model equals an honest run's, the ledger counts
    K decoys per device and round, and every update message of a device has the same size."""
    run, k, sizes = _run_id(), 2, [8, 16, 8]
    devices = contiguous_shards(sizes)
    keys = {d.device_id: decoy.new_key() for d in devices}
    devices = tuple(
        type(d)(d.device_id, d.indices, d.runtime, d.seed, d.profile, keys[d.device_id])
        for d in devices
    )
    truth = tmp_path / "truth"
    spec = FleetSpec(
        run, mosquitto.url, str(lenet_artifact.folder), "fashion-mnist", devices, 1, str(truth),
        decoy_pool="test",
    )  # fmt: skip
    plan = RoundPlan(algorithm="fedavg", lr=0.05, batch_size=8, deadline_s=120, decoys=k)
    store = RunStore(tmp_path / "run.db")
    with Coordinator(run, lenet_artifact, mosquitto, store, plan, keys=keys) as coord, Fleet(spec):
        coord.wait_for_devices(len(sizes), 60)
        w0 = dict(coord.weights)
        res = coord.run_round(1)
        w1 = dict(coord.weights)
        res2 = coord.run_round(2)

        def decoys_in() -> bool:
            coord.poll(0.05)
            return len(_update_bytes(store, run, "decoy")) == 2 * k * len(sizes)

        wait_until(decoys_in, 120, "every decoy in the ledger")
        # An update on a pseudonym that is no device's slot is a counted rejection.
        stranger = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        stranger.connect(mosquitto.host, mosquitto.port)
        stranger.loop_start()
        topic = wire.update_topic(run, "ab" * 16)
        stranger.publish(topic, b"not an update", qos=QOS).wait_for_publish(10)
        stranger.disconnect()
        stranger.loop_stop()

        def rejected() -> bool:
            coord.poll(0.05)
            return store.rejection_counts(run) == {"unknown_pseudonym": 1}

        wait_until(rejected, 60, "the stranger's rejection")
        coord.end()
    assert (res.accepted, res.rejected, res2.accepted, res2.rejected) == (3, 0, 3, 0)
    want = expected_round(lenet_artifact, w0, truth, run, 1, algorithm="fedavg", lr=0.05,
                          batch_size=8)  # fmt: skip
    for name in w0:
        np.testing.assert_allclose(w1[name], want[name], rtol=0, atol=1e-6)
    rows = store.db.execute(
        "SELECT round, device, kind, topic, bytes FROM messages WHERE run=? "
        "AND kind IN ('update','decoy') AND topic != ?",
        (run, topic),
    ).fetchall()
    counts: dict[tuple[int, str, str], int] = {}
    for round_, device, kind, _, _ in rows:
        counts[(round_, device, kind)] = counts.get((round_, device, kind), 0) + 1
    assert counts == {
        (r, d.device_id, kind): (k if kind == "decoy" else 1)
        for r in (1, 2)
        for d in devices
        for kind in ("update", "decoy")
    }
    # On the wire: no device id in any update topic, a fresh 32-hex pseudonym per message, and
    # one message size for all of a device's messages in a round.
    segments = [topic.rsplit("/", 1)[1] for _, _, _, topic, _ in rows]
    assert len(set(segments)) == len(rows) == 2 * (k + 1) * len(sizes)
    assert all(len(s) == 32 and int(s, 16) >= 0 for s in segments)
    by_device: dict[tuple[int, str], set[int]] = {}
    for round_, device, _, _, size in rows:
        by_device.setdefault((round_, device), set()).add(size)
    assert all(len(s) == 1 for s in by_device.values()), by_device


def test_decoys_need_keys(lenet_artifact: ModelArtifact, mosquitto: BrokerAddress) -> None:
    with pytest.raises(ValueError, match="key"):
        Coordinator("r", lenet_artifact, mosquitto, RunStore(":memory:"), RoundPlan(decoys=2))


def test_coordinator_command_refuses_decoys(lenet_artifact: ModelArtifact) -> None:
    """`edgeleak coordinator` holds no device keys: decoys are a usage error, not a crash."""
    from edgeleak.config import ExperimentConfig
    from edgeleak.errors import UsageError
    from edgeleak.experiment import run_coordinator

    with pytest.raises(UsageError, match="decoys need every device's key"):
        run_coordinator(
            ExperimentConfig(decoys=1), broker_url="mqtt://127.0.0.1:1",
            model_dir=lenet_artifact.folder, say=lambda _s: None,
        )  # fmt: skip
