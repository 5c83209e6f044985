"""Edge aggregators over the real broker: hierarchical FedAvg equals the flat run, the
coordinator sees only the groups' updates, and the ledger tells group bytes apart."""

from __future__ import annotations

import contextlib
import queue
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from coordinator.server import Coordinator, RoundPlan
from coordinator.store import RunStore
from devices.fleet import DeviceSpec, Fleet
from edge import wire
from edge.aggregator import EdgeAggregator, GroupInfo, group_run, parse_group, run_aggregator
from edge.manifest import ModelArtifact
from edge.mqtt import BrokerAddress, Received, make_client, running, wait_until
from tests.fedutil import contiguous_shards, fleet

Params = dict[str, np.ndarray]
PLAN = RoundPlan(algorithm="fedavg", lr=0.05, epochs=1, batch_size=4, deadline_s=120)


@contextlib.contextmanager
def _aggregators(
    broker: BrokerAddress, artifact: ModelArtifact, run: str, groups: list[list[DeviceSpec]]
) -> Iterator[list[EdgeAggregator]]:
    """One aggregator thread per group, until the run's end (or the block's)."""
    aggs = [
        EdgeAggregator(f"agg-g{i}", run, f"g{i}", [d.device_id for d in g], artifact)
        for i, g in enumerate(groups)
    ]
    stop = threading.Event()
    threads = [
        threading.Thread(target=run_aggregator, args=(a, broker), kwargs={"stop": stop})
        for a in aggs
    ]
    for t in threads:
        t.start()
    try:
        yield aggs
    finally:
        for t in threads:
            t.join(30)  # they exit on the relayed end
        stop.set()
        for t in threads:
            t.join(10)


def _flat(broker: BrokerAddress, artifact: ModelArtifact, tmp: Path) -> Params:
    run = "t" + uuid.uuid4().hex[:8]
    store = RunStore(tmp / "flat.db")
    spec = fleet(run, broker, artifact, contiguous_shards([8, 12, 8, 4]), tmp / "flat-truth")
    with Coordinator(run, artifact, broker, store, PLAN) as coord, Fleet(spec):
        coord.wait_for_devices(4, 60)
        res = coord.run_round(1)
        coord.end()
    assert res.accepted == 4
    return dict(coord.weights)


class _Tap:
    """A wire listener on the groups' update topics: counts their packet bytes."""

    def __init__(self, broker: BrokerAddress, subs: list[str]) -> None:
        self.inbox: queue.Queue[Received] = queue.Queue()
        self.ready: list[str] = []
        self.client = make_client(
            "tap-" + uuid.uuid4().hex[:6],
            self.inbox,
            protocol=broker.protocol,
            subscriptions=tuple(f"{wire.TOPIC_PREFIX}/{s}/update/+" for s in subs),
            on_ready=self.ready,
        )

    def bytes(self) -> int:
        total = 0
        while not self.inbox.empty():
            total += self.inbox.get_nowait().packet_bytes
        return total


def _hierarchical(
    broker: BrokerAddress, artifact: ModelArtifact, tmp: Path, split: list[int]
) -> tuple[Params, RunStore, str, list[EdgeAggregator], int]:
    run = "t" + uuid.uuid4().hex[:8]
    store = RunStore(tmp / f"hier{len(split)}.db")
    devices = contiguous_shards([8, 12, 8, 4])
    groups, at = [], 0
    for k in split:
        groups.append(list(devices[at : at + k]))
        at += k
    tap = _Tap(broker, [group_run(run, f"g{i}") for i in range(len(groups))])
    with running(tap.client, broker), contextlib.ExitStack() as stack:
        wait_until(lambda: bool(tap.ready), 10, "the tap's subscription")
        coord = stack.enter_context(Coordinator(run, artifact, broker, store, PLAN))
        aggs = stack.enter_context(_aggregators(broker, artifact, run, groups))
        for i, g in enumerate(groups):
            sub = group_run(run, f"g{i}")
            stack.enter_context(Fleet(fleet(sub, broker, artifact, tuple(g), tmp / f"t{i}")))
        coord.wait_for_devices(len(groups), 60)
        res = coord.run_round(1)
        coord.end()
        wait_until(lambda: all(a.ended for a in aggs), 30, "the aggregators' end")
    assert (res.selected, res.accepted, res.rejected) == (len(groups), len(groups), 0)
    return dict(coord.weights), store, run, aggs, tap.bytes()


def test_hierarchical_equals_flat(
    mosquitto: BrokerAddress, lenet_artifact: ModelArtifact, tmp_path: Path
) -> None:
    flat = _flat(mosquitto, lenet_artifact, tmp_path)
    w0 = lenet_artifact.initial_params()
    assert any(np.abs(flat[k] - w0[k]).max() > 1e-4 for k in w0)  # the round did something
    # One group of all devices sums in the flat run's order, in float64: bit-identical.
    one, *_ = _hierarchical(mosquitto, lenet_artifact, tmp_path, [4])
    for k in flat:
        np.testing.assert_array_equal(one[k], flat[k])
    # Two groups of unequal examples (20 and 12): equal within float32 rounding.
    two, store, run, aggs, tapped = _hierarchical(mosquitto, lenet_artifact, tmp_path, [2, 2])
    for k in flat:
        np.testing.assert_allclose(two[k], flat[k], rtol=0, atol=1e-6)
    assert [a.rounds_done for a in aggs] == [1, 1]
    assert all(not a.rejected for a in aggs)
    # The coordinator received no device update, only the aggregates; the ledger has the
    # group's bytes apart, equal to what a listener on the group topics counted.
    rows = store.db.execute(
        "SELECT kind, direction, COUNT(*), SUM(bytes) FROM messages WHERE run=? AND round=1 "
        "AND kind IN ('update', 'aggregate', 'group_up', 'group_down', 'task') "
        "GROUP BY kind, direction",
        (run,),
    ).fetchall()
    by_kind = {k: (d, n, b) for k, d, n, b in rows}
    assert set(by_kind) == {"task", "aggregate", "group_up", "group_down"}
    assert by_kind["aggregate"][:2] == ("up", 2)
    assert by_kind["group_up"][:2] == ("up", 2)
    assert by_kind["group_up"][2] == tapped
    n_params = lenet_artifact.manifest.num_parameters
    assert 4 * 4 * n_params < tapped < 4 * 4 * n_params + 4 * 2048
    assert 2 * 4 * n_params < by_kind["aggregate"][2] < 2 * 4 * n_params + 2 * 2048
    # the group relayed each device one task as large as the coordinator's
    assert by_kind["group_down"][2] == pytest.approx(2 * by_kind["task"][2], rel=0.01)


def test_group_field_is_validated() -> None:
    assert parse_group("") is None
    assert parse_group(GroupInfo(3, 10, 20).to_json()) == GroupInfo(3, 10, 20)
    for bad in ('{"devices": 0, "up": 1, "down": 1}', "[1,2,3]", '{"devices": 2}', "x" * 300,
                '{"devices": 2, "up": -1, "down": 1}', '{"devices": 2, "up": 1.5, "down": 1}'):  # fmt: skip
        with pytest.raises(wire.WireError) as e:
            parse_group(bad)
        assert e.value.reason == "bad_group"
    with pytest.raises(ValueError, match="free of"):
        group_run("run", "a.b")


def test_aggregator_cli_bad_input(tmp_path: Path) -> None:
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "edge", "aggregate", "--broker", "mqtt://127.0.0.1:1",
         "--run", "r", "--group", "g", "--devices", "d0", "--model", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2
    assert "manifest.json does not exist" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_config_fields_for_server_side_protections() -> None:
    from edgeleak.config import ConfigError, ExperimentConfig
    from edgeleak.hierarchy import groups

    assert ExperimentConfig.from_dict({"aggregators": 4, "he": False}).aggregators == 4
    assert ExperimentConfig.from_dict({"he": True}).he is True
    for bad, match in (
        ({"he": 1}, "expected type bool"),
        ({"aggregators": -1}, "aggregators=-1"),
        ({"aggregators": 2, "he": True}, "not with decoys, a clock or he"),
        ({"aggregators": 2, "decoys": 1}, "not with decoys, a clock or he"),
        ({"he": True, "aggregator": "median"}, "aggregator 'mean'"),
    ):
        with pytest.raises(ConfigError, match=match):
            ExperimentConfig.from_dict(bad)
    assert [list(g) for g in groups(5, 2)] == [[0, 1], [2, 3], [4]]
