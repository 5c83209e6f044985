"""Site brokers bridged to the coordinator's broker (``edgeleak broker --bridge-to``)."""

from __future__ import annotations

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
