"""The byte ledger equals what crossed the device sockets at the MQTT layer, byte for byte."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from coordinator.server import Coordinator, RoundPlan
from coordinator.store import RunStore
from devices.fleet import Fleet
from edge.manifest import ModelArtifact
from edge.mqtt import BrokerAddress
from tests.fedutil import contiguous_shards, fleet
from tests.mqtt_relay import CountingRelay


@pytest.mark.parametrize("codec", ["f32", "f16"])
def test_ledger_matches_a_counting_relay(
    codec: str, mosquitto: BrokerAddress, lenet_artifact: ModelArtifact, tmp_path: Path
) -> None:
    run = "L" + uuid.uuid4().hex[:8]
    relay = CountingRelay(mosquitto)
    store = RunStore(tmp_path / "run.db")
    devices = contiguous_shards([16, 16, 24])
    spec = fleet(run, relay.address, lenet_artifact, devices, tmp_path / "truth", workers=2)
    plan = RoundPlan(algorithm="fedavg", lr=0.05, batch_size=8, codec=codec, deadline_s=60)
    # The coordinator talks to the broker directly: only the devices' traffic crosses the relay.
    with Coordinator(run, lenet_artifact, mosquitto, store, plan) as coord, Fleet(spec):
        coord.wait_for_devices(len(devices), 60)
        results = [coord.run_round(r) for r in (1, 2, 3)]
        coord.end()
    relay.close()
    for d in devices:
        for direction, channel in (("up", "update"), ("down", "task")):
            on_wire = sum(
                b
                for (cid, dr, topic), b in relay.log.publish.items()
                if cid == d.device_id and dr == direction and f"/{channel}/" in topic
            )
            ledger = store.db.execute(
                "SELECT SUM(bytes) FROM messages WHERE run=? AND device=? AND direction=? AND kind=?",
                (run, d.device_id, direction, "update" if channel == "update" else "task"),
            ).fetchone()[0]
            assert ledger == on_wire, (d.device_id, direction)
            assert on_wire > 0
    assert sum(r.bytes_up for r in results) == store.ledger_bytes(run, direction="up")
    assert sum(r.bytes_down for r in results) == store.ledger_bytes(run, direction="down")
    # What the ledger leaves out is the MQTT control traffic (CONNECT, SUBSCRIBE, PUBACK, PING,
    # status and control messages): small next to the model updates.
    control = sum(relay.log.other.values())
    data = store.ledger_bytes(run, direction="up") + store.ledger_bytes(run, direction="down")
    assert 0 < control < 0.01 * data
