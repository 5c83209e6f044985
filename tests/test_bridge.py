"""Site brokers bridged to the coordinator's broker (``edgeleak broker --bridge-to``)."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

import pytest

from coordinator.server import Coordinator, RoundPlan
from coordinator.store import RunStore
from devices.fleet import Fleet
from edge.manifest import ModelArtifact
from edge.mqtt import BrokerAddress
from edgeleak.broker import bridge_conf, local_broker, mosquitto_path
from edgeleak.cli import main
from edgeleak.errors import UsageError
from tests.fedutil import contiguous_shards, fleet
from tests.mqtt_relay import CountingRelay

pytestmark = pytest.mark.skipif(mosquitto_path() is None, reason="needs mosquitto")

SIZES = [8, 16, 8]


def _rounds(
    run: str, central: BrokerAddress, site: BrokerAddress, art: ModelArtifact, tmp: Path
) -> tuple[list[tuple[int, int, int]], list[str], int]:
    """Two FedAvg rounds, the coordinator on ``central``, the devices on ``site``: (selected,
    accepted, rejected) per round, each round's model hash, the uplink update bytes."""
    plan = RoundPlan(algorithm="fedavg", lr=0.05, epochs=1, batch_size=8, deadline_s=120)
    store = RunStore(tmp / f"{run}-{site.port}.db")
    spec = fleet(run, site, art, contiguous_shards(SIZES), tmp / f"truth-{site.port}")
    with Coordinator(run, art, central, store, plan, seed=3) as coord, Fleet(spec):
        coord.wait_for_devices(len(SIZES), 60)
        results = [coord.run_round(r) for r in (1, 2)]
        coord.end()
    up = store.ledger_bytes(run, direction="up", kinds=("update",))
    return (
        [(r.selected, r.accepted, r.rejected) for r in results],
        [r.model_sha256 for r in results],
        up,
    )


def test_devices_behind_a_bridged_site_broker_train_as_if_direct(
    lenet_artifact: ModelArtifact, tmp_path: Path
) -> None:
    """Devices on a site broker whose bridge carries their traffic to the coordinator's broker:
    every round complete, and the models and update bytes of the same seeded run with the
    devices on the coordinator's broker itself."""
    run = "b" + uuid.uuid4().hex[:8]
    with local_broker("mosquitto") as (central, _):
        bridge = bridge_conf("a", f"127.0.0.1:{central.port}")
        with local_broker("mosquitto", bridge=bridge) as (site, _):
            bridged = _rounds(run, central, site, lenet_artifact, tmp_path)
    with local_broker("mosquitto") as (alone, _):
        direct = _rounds(run, alone, alone, lenet_artifact, tmp_path)
    assert bridged[0] == [(3, 3, 0)] * 2
    assert bridged == direct


def test_the_ledger_books_the_bridge_hop_as_a_counting_relay_sees_it(
    lenet_artifact: ModelArtifact, tmp_path: Path
) -> None:
    """Devices that announce their site get a ``bridge`` ledger row beside each task and update:
    byte for byte what crossed the site's bridge (a counting relay between the site broker and
    the coordinator's), apart from the device-hop rows, which stay as without a bridge."""
    run = "h" + uuid.uuid4().hex[:8]
    plan = RoundPlan(algorithm="fedavg", lr=0.05, epochs=1, batch_size=8, deadline_s=120)
    store = RunStore(tmp_path / "run.db")
    with local_broker("mosquitto") as (central, _):
        relay = CountingRelay(central)
        with local_broker("mosquitto", bridge=bridge_conf("north", f"127.0.0.1:{relay.address.port}")) as (site, _):  # fmt: skip
            spec = dataclasses.replace(
                fleet(run, site, lenet_artifact, contiguous_shards(SIZES), tmp_path / "truth"),
                site="north",
            )
            with Coordinator(run, lenet_artifact, central, store, plan) as coord, Fleet(spec):
                coord.wait_for_devices(len(SIZES), 60)
                results = [coord.run_round(r) for r in (1, 2)]
                coord.end()
        relay.close()
    assert [r.accepted for r in results] == [3, 3]
    bridge = "edgeleak-site-north"
    for direction, channel in (("down", "task"), ("up", "update")):
        on_wire = sum(b for (cid, dr, topic), b in relay.log.publish.items()
                      if cid == bridge and dr == direction and f"/{channel}/" in topic)  # fmt: skip
        booked = store.db.execute(
            "SELECT SUM(bytes) FROM messages WHERE run=? AND kind='bridge' AND direction=? "
            "AND topic LIKE ?",
            (run, direction, f"%/{channel}/%"),
        ).fetchone()[0]
        assert booked == on_wire > 0, (direction, channel)
        device_hop = store.ledger_bytes(run, direction=direction, kinds=(channel,))
        assert device_hop == sum(r.bytes_up if direction == "up" else r.bytes_down for r in results)
        # the same PUBLISH without MQTT 5's properties byte, per message
        assert device_hop - on_wire == 6
    assert {d: s for _, d, s in store.db.execute("SELECT * FROM sites")} == {
        f"d{i:04d}": "north" for i in range(len(SIZES))
    }
    assert set(store.bridge_bytes(run)) == {("north", "up"), ("north", "down")}


def test_bridge_flags_are_checked(capsys: pytest.CaptureFixture[str]) -> None:
    assert "topic edgeleak/+/update/# out 1" in bridge_conf("north", "10.0.0.1:1883")
    assert "topic edgeleak/+/task/# in 1" in bridge_conf("north", "10.0.0.1:1883")
    for site, remote in (("a b", "h:1"), ("a", "nohost"), ("a", "h:0"), ("a/b", "h:1")):
        with pytest.raises(UsageError):
            bridge_conf(site, remote)
    for argv in (["broker", "--site", "a"], ["broker", "--bridge-to", "h:99999", "--site", "a"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("edgeleak broker: "), err
