"""Federated rounds over the real broker: exact aggregation, stragglers, counted rejections."""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from coordinator.server import Coordinator, RoundPlan
from coordinator.store import RunStore
from devices.fleet import Fleet
from edge import wire
from edge.codec import read_container, write_tensors
from edge.manifest import ModelArtifact
from edge.mqtt import QOS, BrokerAddress, wait_until
from tests.fedutil import contiguous_shards, expected_round, fleet


def _run_id() -> str:
    return "t" + uuid.uuid4().hex[:8]


@pytest.mark.parametrize("algorithm, sizes", [("fedsgd", [8, 8, 8]), ("fedavg", [16, 24])])
def test_round_aggregate_equals_reference(
    algorithm: str,
    sizes: list[int],
    mosquitto: BrokerAddress,
    lenet_artifact: ModelArtifact,
    tmp_path: Path,
) -> None:
    run = _run_id()
    plan = RoundPlan(algorithm=algorithm, lr=0.05, epochs=2, batch_size=8, deadline_s=60)
    store = RunStore(tmp_path / "run.db")
    spec = fleet(run, mosquitto, lenet_artifact, contiguous_shards(sizes), tmp_path / "truth")
    with Coordinator(run, lenet_artifact, mosquitto, store, plan) as coord, Fleet(spec):
        coord.wait_for_devices(len(sizes), 60)
        w0 = dict(coord.weights)
        res = coord.run_round(1)
        w1 = dict(coord.weights)
        res2 = coord.run_round(2)
        coord.end()
    assert (res.selected, res.accepted, res.rejected) == (len(sizes), len(sizes), 0)
    assert res2.accepted == len(sizes)
    want = expected_round(
        lenet_artifact,
        w0,
        tmp_path / "truth",
        run,
        1,
        algorithm=algorithm,
        lr=plan.lr,
        batch_size=plan.batch_size,
    )
    for k in w0:
        np.testing.assert_allclose(w1[k], want[k], rtol=0, atol=1e-6)
    assert any(np.abs(w1[k] - w0[k]).max() > 1e-4 for k in w0)
    # The ledger has one row per task and per update, and the round totals agree with it.
    rows = store.db.execute(
        "SELECT kind, direction, COUNT(*), SUM(bytes) FROM messages WHERE run=? AND round=1 "
        "AND kind IN ('task','update') GROUP BY kind, direction",
        (run,),
    ).fetchall()
    assert {(k, d, n) for k, d, n, _ in rows} == {
        ("task", "down", len(sizes)),
        ("update", "up", len(sizes)),
    }
    assert {k: b for k, _, _, b in rows} == {"task": res.bytes_down, "update": res.bytes_up}
    n_params = lenet_artifact.manifest.num_parameters
    assert res.bytes_up > len(sizes) * 4 * n_params  # every update carries all float32 parameters


class Rogue:
    """A client that plays a phantom device and injects malformed updates through the broker."""

    def __init__(
        self, broker: BrokerAddress, run: str, manifest_names: list[str], phantom: str = "d9999"
    ) -> None:
        self.run = run
        self.phantom = phantom
        self.tasks: list[bytes] = []
        self.honest: list[bytes] = []
        self.c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"rogue-{run}", protocol=mqtt.MQTTv5
        )
        self.c.on_message = self._on_message
        self.c.connect(broker.host, broker.port)
        self.c.loop_start()
        self.c.subscribe(
            [(wire.task_topic(run, phantom), QOS), (wire.update_topic(run, "d0000"), QOS)]
        )
        time.sleep(0.3)

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        (self.tasks if "/task/" in msg.topic else self.honest).append(bytes(msg.payload))

    def status(self, state: str) -> None:
        self.c.publish(
            wire.status_topic(self.run, self.phantom),
            json.dumps({"state": state}).encode(),
            qos=QOS,
            retain=True,
        ).wait_for_publish(5)

    def send(self, device: str, payload: bytes) -> None:
        self.c.publish(wire.update_topic(self.run, device), payload, qos=QOS).wait_for_publish(5)

    def close(self) -> None:
        self.c.publish(
            wire.status_topic(self.run, self.phantom), b"", qos=QOS, retain=True
        ).wait_for_publish(5)
        self.c.disconnect()
        self.c.loop_stop()


def _update(
    run: str, device: str, round_: int, params: dict[str, np.ndarray], **kw: object
) -> bytes:
    return wire.encode_update(
        wire.Update(
            run=run,
            round=round_,
            device=device,
            kind=str(kw.pop("kind", "gradient")),
            num_examples=8,
            params=params,
            **kw,
        )
    )  # type: ignore[arg-type]


def test_paced_rounds_send_a_task_only_when_a_slot_frees_and_aggregate_the_same(
    mosquitto: BrokerAddress, lenet_artifact: ModelArtifact, tmp_path: Path
) -> None:
    """``max_concurrent=1``: each task goes out only after the previous device's update was
    accepted (the ledger's order), and the aggregate is the reference's."""
    run = _run_id()
    plan = RoundPlan(algorithm="fedsgd", lr=0.1, batch_size=8, deadline_s=600, max_concurrent=1)
    store = RunStore(tmp_path / "run.db")
    spec = fleet(run, mosquitto, lenet_artifact, contiguous_shards([8, 8, 8]), tmp_path / "truth")
    with Coordinator(run, lenet_artifact, mosquitto, store, plan) as coord, Fleet(spec):
        coord.wait_for_devices(3, 60)
        w0 = dict(coord.weights)
        res = coord.run_round(1)
        coord.end()
    assert (res.selected, res.accepted, res.rejected) == (3, 3, 0)
    want = expected_round(
        lenet_artifact, w0, tmp_path / "truth", run, 1, algorithm="fedsgd", lr=0.1, batch_size=8
    )
    for k in w0:
        np.testing.assert_allclose(coord.weights[k], want[k], rtol=0, atol=1e-6)
    rows = store.db.execute(
        "SELECT kind, device FROM messages WHERE run=? AND round=1 AND kind IN ('task','update') "
        "ORDER BY rowid",
        (run,),
    ).fetchall()
    assert rows == [(k, f"d000{i}") for i in range(3) for k in ("task", "update")]


def test_a_forged_offline_before_its_turn_does_not_cost_a_device_its_task(
    mosquitto: BrokerAddress, lenet_artifact: ModelArtifact, tmp_path: Path
) -> None:
    """Anyone on the broker can forge an ``offline``: a device that has one before its turn
    still gets its task (without holding a slot), as it would without pace steering."""
    run = _run_id()
    plan = RoundPlan(algorithm="fedsgd", lr=0.1, batch_size=8, deadline_s=600, max_concurrent=1)
    store = RunStore(tmp_path / "run.db")
    spec = fleet(run, mosquitto, lenet_artifact, contiguous_shards([8, 8]), tmp_path / "truth")
    rogue = Rogue(mosquitto, run, lenet_artifact.manifest.param_names)

    def forge(round_: int, w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # acknowledged by the broker before the first task goes out: read before any update
        offline = wire.encode_status("offline")
        rogue.c.publish(wire.status_topic(run, "d0001"), offline, qos=QOS).wait_for_publish(5)
        return w

    with Coordinator(run, lenet_artifact, mosquitto, store, plan, tamper=forge) as coord:
        with Fleet(spec):
            coord.wait_for_devices(2, 60)
            res = coord.run_round(1)
            coord.end()
    rogue.close()
    tasks = store.db.execute(
        "SELECT device FROM messages WHERE run=? AND round=1 AND kind='task' ORDER BY rowid",
        (run,),
    ).fetchall()
    assert tasks == [("d0000",), ("d0001",)]
    assert res.selected == 2 and res.accepted >= 1  # d0001's answer may come after the round


def test_a_silent_device_holding_the_only_slot_leaves_the_rest_not_sent(
    mosquitto: BrokerAddress, lenet_artifact: ModelArtifact, tmp_path: Path
) -> None:
    """A selected device that never answers keeps its slot until the deadline: with
    ``max_concurrent=1`` the devices after it never get their task (dropout ``not_sent``), and
    an update on such a device's topic is refused as ``no_task``."""
    run = _run_id()
    plan = RoundPlan(algorithm="fedsgd", lr=0.1, batch_size=8, deadline_s=3, max_concurrent=1)
    store = RunStore(tmp_path / "run.db")
    spec = fleet(run, mosquitto, lenet_artifact, contiguous_shards([8, 8]), tmp_path / "truth")
    rogue = Rogue(mosquitto, run, lenet_artifact.manifest.param_names, phantom="a0000")
    names = lenet_artifact.manifest.param_names

    def forge(round_: int, w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rogue.send("d0001", _update(run, "d0001", round_, {k: w[k] for k in names}))
        return w

    with Coordinator(run, lenet_artifact, mosquitto, store, plan, tamper=forge) as coord:
        rogue.status("online")  # live, after the coordinator subscribed
        with Fleet(spec):
            coord.wait_for_devices(3, 60)
            w0 = dict(coord.weights)
            res = coord.run_round(1)
            eligible = coord.eligible()
            coord.end()
    rogue.close()
    assert (res.selected, res.accepted) == (3, 0)
    assert eligible == ["d0000", "d0001"]  # never asked, so not silent; the phantom is
    assert store.dropouts(run) == [
        (1, "a0000", "no_answer"), (1, "d0000", "not_sent"), (1, "d0001", "not_sent")
    ]  # fmt: skip
    assert store.rejection_counts(run) == {"no_task": 1}
    assert len(rogue.tasks) == 1  # the phantom's, the only task sent
    for k in w0:
        assert np.array_equal(coord.weights[k], w0[k])


def test_forged_nan_on_an_honest_devices_topic_costs_it_nothing(
    mosquitto: BrokerAddress, lenet_artifact: ModelArtifact, tmp_path: Path
) -> None:
    """Unsigned, a NaN update on a selected device's topic may come from anyone: it is refused
    and counted, and the round still waits for the device's own update, which is aggregated
    (were NaN final here, both devices would be dropped before they even got their tasks)."""
    run = _run_id()
    plan = RoundPlan(algorithm="fedsgd", lr=0.1, batch_size=8, deadline_s=600)
    store = RunStore(tmp_path / "run.db")
    spec = fleet(run, mosquitto, lenet_artifact, contiguous_shards([8, 8]), tmp_path / "truth")
    rogue = Rogue(mosquitto, run, lenet_artifact.manifest.param_names)
    names = lenet_artifact.manifest.param_names

    def forge(round_: int, w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # before the tasks go out, so the coordinator reads them before the devices' updates
        for d in ("d0000", "d0001"):
            rogue.send(d, _update(run, d, round_, {k: w[k] * np.nan for k in names}))
        return w

    with Coordinator(run, lenet_artifact, mosquitto, store, plan, tamper=forge) as coord:
        with Fleet(spec):
            coord.wait_for_devices(2, 60)
            w0 = dict(coord.weights)
            res = coord.run_round(1)
            coord.end()
    rogue.close()
    assert (res.selected, res.accepted, res.rejected) == (2, 2, 2)
    assert store.rejection_counts(run) == {"non_finite": 2}
    want = expected_round(
        lenet_artifact, w0, tmp_path / "truth", run, 1, algorithm="fedsgd", lr=0.1, batch_size=8
    )
    for k in w0:
        np.testing.assert_allclose(coord.weights[k], want[k], rtol=0, atol=1e-6)


def test_malformed_updates_are_counted_and_never_reach_the_model(
    mosquitto: BrokerAddress, lenet_artifact: ModelArtifact, tmp_path: Path
) -> None:
    run = _run_id()
    # Unsigned, the phantom's NaN update does not end its wait (anyone could have sent it); its
    # ``offline`` after it does, long before the deadline (or the round outlasts the join below).
    plan = RoundPlan(algorithm="fedsgd", lr=0.1, batch_size=8, deadline_s=600)
    store = RunStore(tmp_path / "run.db")
    spec = fleet(run, mosquitto, lenet_artifact, contiguous_shards([8, 8]), tmp_path / "truth")
    rogue = Rogue(mosquitto, run, lenet_artifact.manifest.param_names)
    with Coordinator(run, lenet_artifact, mosquitto, store, plan) as coord, Fleet(spec):
        rogue.status("online")  # live: a retained status from before is never selected
        coord.wait_for_devices(3, 60)
        w0 = dict(coord.weights)
        result: list[object] = []
        t = threading.Thread(target=lambda: result.append(coord.run_round(1)))
        t.start()
        wait_until(
            lambda: rogue.tasks and rogue.honest, 30, "the phantom's task and an honest update"
        )
        g = {k: np.ones_like(v) for k, v in w0.items()}
        good = _update(run, "d9999", 1, g)
        tensors, meta = read_container(good)
        rogue.send("d9999", b"\x00garbage")  # not_schema
        rogue.send("d9999", write_tensors(dict(tensors), {**meta, "edgeleak": "2"}))  # bad_version
        first = lenet_artifact.manifest.param_names[0]
        rogue.send("d9999", _update(run, "d9999", 1, {**g, first: g[first][:1]}))  # bad_shape
        rogue.send(
            "d9999", write_tensors({k: v.astype(np.float64) for k, v in tensors.items()}, meta)
        )  # bad_dtype
        rogue.send("d5555", _update(run, "d5555", 1, g))  # not_selected
        rogue.send("d9999", _update(run, "d9999", 0, g))  # stale_round
        rogue.send("d9999", _update(run, "d0000", 1, g))  # device_mismatch
        rogue.send("d9999", _update("other", "d9999", 1, g))  # wrong_run
        rogue.send("d9999", _update(run, "d9999", 1, g, kind="delta"))  # bad_kind
        rogue.send("d0000", rogue.honest[0])  # replayed_nonce
        rogue.send("d0000", _update(run, "d0000", 1, g))  # duplicate
        nan = (  # one tensor NaN is enough
            {**g, "fc.2.bias": np.full(10, np.nan, np.float32)}
            if "fc.2.bias" in g
            else {k: v * np.nan for k, v in g.items()}
        )
        rogue.send("d9999", _update(run, "d9999", 1, nan))  # non_finite
        rogue.status("offline")  # the round ends
        t.join(300)
        assert result, "the round kept waiting for a device that went offline"
        res = result[0]
        wait_until(
            lambda: coord.poll() or "d9999" not in coord.online, 10, "the phantom going offline"
        )
        res2 = coord.run_round(2)
        coord.end()
    rogue.close()
    expected = {
        "not_schema",
        "bad_version",
        "non_finite",
        "bad_shape",
        "bad_dtype",
        "not_selected",
        "stale_round",
        "device_mismatch",
        "wrong_run",
        "bad_kind",
        "replayed_nonce",
        "duplicate",
    }
    assert store.rejection_counts(run) == {r: 1 for r in expected}
    assert (res.selected, res.accepted, res.rejected) == (3, 2, len(expected))  # type: ignore[attr-defined]
    assert (res2.selected, res2.accepted, res2.rejected) == (2, 2, 0)
    # The model moved exactly as the honest gradients say, in both rounds.
    w1 = expected_round(
        lenet_artifact, w0, tmp_path / "truth", run, 1, algorithm="fedsgd", lr=0.1, batch_size=8
    )
    w2 = expected_round(
        lenet_artifact, w1, tmp_path / "truth", run, 2, algorithm="fedsgd", lr=0.1, batch_size=8
    )
    for k in w0:
        np.testing.assert_allclose(coord.weights[k], w2[k], rtol=0, atol=1e-6)
