"""An outsider on the broker, using only the README's contract, stops nothing (issue 7).

Each hostile message is a few lines of paho + numpy sent through a real mosquitto; the run store
must count it under its contract reason (never ``internal_error``), the coordinator, a standalone
device process and a fleet worker must carry on, and the model must move as the honest updates say.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import struct
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.server import Coordinator, RoundPlan
from coordinator.store import RoundResult, RunStore
from devices.datasets import load_dataset
from devices.fleet import Fleet
from edge import wire
from edge.codec import read_container, write_tensors
from edge.data import save_shard
from edge.manifest import ModelArtifact
from edge.mqtt import QOS, BrokerAddress, Received, make_client, publish_packet_bytes, wait_until
from tests.fedutil import contiguous_shards, device_argv, expected_round, fleet

Params = dict[str, np.ndarray]


class Outsider:
    """A plain paho client on the broker: no credentials, only the README's contract."""

    def __init__(self, broker: BrokerAddress, subscriptions: tuple[str, ...]) -> None:
        self.inbox: queue.Queue[Received] = queue.Queue()
        self.seen: list[Received] = []
        ready: list[str] = []
        self.c = make_client(
            "outsider-" + uuid.uuid4().hex[:8],
            self.inbox,
            subscriptions=subscriptions,
            on_ready=ready,
        )
        self.c.connect(broker.host, broker.port)
        self.c.loop_start()
        wait_until(lambda: bool(ready), 10, "the outsider's subscriptions")

    def wait(self, match: Callable[[Received], bool], n: int, timeout: float) -> list[Received]:
        """The first ``n`` messages seen that ``match``, waiting for them if need be."""

        def enough() -> bool:
            while not self.inbox.empty():
                self.seen.append(self.inbox.get_nowait())
            return sum(map(match, self.seen)) >= n

        wait_until(enough, timeout, f"{n} messages")
        return [m for m in self.seen if match(m)][:n]

    def send(self, topic: str, payload: bytes, *, retain: bool = False) -> int:
        """Publish and wait for the PUBACK; returns the PUBLISH packet's bytes."""
        self.c.publish(topic, payload, qos=QOS, retain=retain).wait_for_publish(30)
        return publish_packet_bytes(topic, len(payload))

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def reheader(payload: bytes, edit: Callable[[dict[str, Any]], None]) -> bytes:
    """``payload`` with its JSON header edited in place (tensor data untouched)."""
    (hlen,) = struct.unpack_from("<Q", payload)
    header = json.loads(payload[8 : 8 + hlen])
    edit(header)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + payload[8 + hlen :]


def with_meta(payload: bytes, **changes: str) -> bytes:
    tensors, meta = read_container(payload)
    return write_tensors(dict(tensors), {**meta, **changes})


def with_shape(payload: bytes, name: str, shape: list[Any]) -> bytes:
    def edit(h: dict[str, Any]) -> None:
        h[name]["shape"] = shape

    return reheader(payload, edit)


def deep_header(levels: int = 100_000) -> bytes:
    h = b'{"a":' + b"[" * levels + b"]" * levels + b"}"
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h


def hostile_tasks(run: str, device: str, artifact: ModelArtifact) -> tuple[list[bytes], dict]:
    """Tasks an outsider sends a device, and the reasons the device must refuse them for."""

    def task(**kw: Any) -> bytes:
        base: dict[str, Any] = dict(
            run=run, round=1, device=device, algorithm="fedavg", lr=0.05, epochs=1,
            batch_size=8, model_hash=artifact.manifest.sha256,
            weights=artifact.initial_params(), deadline_s=60.0,
        )  # fmt: skip
        base.update(kw)
        return wire.encode_task(wire.Task(**base))

    first = artifact.manifest.param_names[0]
    tasks = [
        with_shape(task(), first, [2**62, 4]),  # bad_shape
        with_shape(task(), first, [True]),  # bad_shape
        deep_header(),  # bad_header
        task(epochs=20),  # over_limit: 20 epochs > max_epochs 10
        task(batch_size=100_000),  # over_limit: > max_batch_size 1024
        with_meta(task(), lr="inf"),  # bad_field
        with_meta(task(), epochs="1" + "0" * 400),  # bad_field
        with_meta(task(), nonce="abc"),  # bad_nonce
    ]
    reasons = {"bad_shape": 2, "bad_header": 1, "over_limit": 2, "bad_field": 2, "bad_nonce": 1}
    return tasks, reasons


def replays(task: Received) -> list[bytes]:
    """The same task again (replayed_nonce), and a copy with a fresh nonce (duplicate)."""
    return [task.payload, with_meta(task.payload, nonce=wire.new_nonce())]


def in_thread(fn: Callable[[], RoundResult]) -> tuple[threading.Thread, list[RoundResult]]:
    out: list[RoundResult] = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    return t, out


def test_hostile_updates_are_counted_and_never_reach_the_model(
    mosquitto: BrokerAddress, lenet_artifact: ModelArtifact, tmp_path: Path
) -> None:
    run = "h" + uuid.uuid4().hex[:8]
    plan = RoundPlan(algorithm="fedsgd", lr=0.1, batch_size=8, deadline_s=120, max_examples=20)
    store = RunStore(tmp_path / "run.db")
    spec = fleet(run, mosquitto, lenet_artifact, contiguous_shards([8, 8]), tmp_path / "truth")
    ghost = wire.update_topic(run, "g0")
    out = Outsider(mosquitto, (wire.task_topic(run, "g0"), f"edgeleak/{run}/update/+"))
    with Coordinator(run, lenet_artifact, mosquitto, store, plan) as coord, Fleet(spec):
        # The outsider announces a device with 50 examples, so it is selected and waited for.
        status = {"state": "online", "runtime": "onnx", "examples": 50}
        out.send(wire.status_topic(run, "g0"), json.dumps(status).encode(), retain=True)
        coord.wait_for_devices(3, 60)
        w0 = dict(coord.weights)
        t, result = in_thread(lambda: coord.run_round(1))
        honest = out.wait(lambda m: "/update/d" in m.topic, 2, 60)
        out.wait(lambda m: m.topic.endswith("/task/g0"), 1, 60)

        g = {k: np.ones_like(v) for k, v in w0.items()}

        def update(n: int = 8) -> bytes:
            u = wire.Update(run=run, round=1, device="g0", kind="gradient", num_examples=n,
                            params=g)  # fmt: skip
            return wire.encode_update(u)

        first = lenet_artifact.manifest.param_names[0]
        hostile = [
            (ghost, with_meta(update(), n="1" + "0" * 400)),  # bad_field (was OverflowError)
            (ghost, update(n=10**12)),  # bad_examples: > the 50 it announced
            (ghost, update(n=30)),  # bad_examples: > max_examples 20
            (ghost, with_shape(update(), first, [2**62, 4])),  # bad_shape
            (ghost, with_shape(update(), first, [True])),  # bad_shape
            (ghost, deep_header()),  # bad_header
            (ghost, with_meta(update(), nonce="a" * 12_000_000)),  # oversize (header cap)
            (ghost, with_meta(update(), nonce="b" * 12_000_000)),  # oversize
            (ghost, with_meta(update(), nonce="zz" * 12)),  # bad_nonce
            (ghost, with_meta(update(), nonce="a" * 25)),  # bad_nonce
            (honest[0].topic, honest[0].payload),  # replayed_nonce
            (wire.status_topic(run, "g1"), b'{"state": "' + b"x" * 1_000_000 + b'"}'),  # bad_status
            (wire.status_topic(run, "g1"), b"[" * 4000 + b"]" * 4000),  # bad_status
        ]
        rejected_bytes = sum(out.send(topic, payload) for topic, payload in hostile)
        # The phantom leaves: the round stops waiting for it.
        out.send(wire.status_topic(run, "g0"), b'{"state": "offline"}', retain=True)
        t.join(120)
        res = result[0]
        nonces = dict(coord.nonces)
        coord.end()
    out.close()
    want = {"bad_field": 1, "bad_examples": 2, "bad_shape": 2, "bad_header": 1, "oversize": 2,
            "bad_nonce": 2, "replayed_nonce": 1, "bad_status": 2}  # fmt: skip
    assert store.rejection_counts(run) == want
    assert (res.selected, res.accepted, res.rejected) == (3, 2, sum(want.values()))
    # Only the accepted updates' nonces are remembered: no 12 MB nonce is kept.
    assert nonces == {1: {read_container(m.payload)[1]["nonce"] for m in honest}}
    # Device traffic and rejected traffic are apart in the ledger and in the round.
    honest_bytes = sum(publish_packet_bytes(m.topic, len(m.payload)) for m in honest)
    assert res.bytes_up == honest_bytes == store.ledger_bytes(run, direction="up", round_=1)
    assert res.bytes_rejected == rejected_bytes
    assert store.ledger_bytes(run, direction="up", kinds=("rejected",)) == rejected_bytes
    assert res.bytes_rejected > 24_000_000  # the two 12 MB nonces, none of it in bytes_up
    w1 = expected_round(
        lenet_artifact, w0, tmp_path / "truth", run, 1, algorithm="fedsgd", lr=0.1, batch_size=8
    )
    for k in w0:
        np.testing.assert_allclose(coord.weights[k], w1[k], rtol=0, atol=1e-6)


def test_device_process_refuses_hostile_tasks_and_carries_on(
    mosquitto: BrokerAddress, lenet_artifact: ModelArtifact, tmp_path: Path
) -> None:
    run = "h" + uuid.uuid4().hex[:8]
    data = load_dataset("fashion-mnist")
    save_shard(tmp_path / "shard.npz", data.x_train[:40], data.y_train[:40])
    proc = subprocess.Popen(
        device_argv(
            mosquitto.url, tmp_path / "shard.npz", lenet_artifact, run, "phone-1", "--exit-on-end"
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    store = RunStore(tmp_path / "run.db")
    plan = RoundPlan(algorithm="fedavg", lr=0.05, batch_size=8, deadline_s=120)
    topic = wire.task_topic(run, "phone-1")
    out = Outsider(mosquitto, (topic,))
    try:
        with Coordinator(run, lenet_artifact, mosquitto, store, plan) as coord:
            coord.wait_for_devices(1, 60)
            tasks, reasons = hostile_tasks(run, "phone-1", lenet_artifact)
            for payload in tasks:
                out.send(topic, payload)
            res = coord.run_round(1)
            (task,) = out.wait(lambda m: m.topic == topic and not m.retain, len(tasks) + 1, 30)[-1:]
            for payload in replays(task):
                out.send(topic, payload)
            coord.end()
        stdout, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, stdout
    refused = {**reasons, "replayed_nonce": 1, "duplicate": 1}
    line = ", ".join(f"{k} {v}" for k, v in sorted(refused.items()))
    assert f"stopped after 1 updates; refused tasks: {line}" in stdout, stdout
    assert "device phone-1 rejected a task: over_limit: epochs 20 > max 10" in stdout
    assert (res.selected, res.accepted, res.rejected) == (1, 1, 0)
    assert store.rejection_counts(run) == {}
    out.close()
    # Its retained status says it left.
    late = Outsider(mosquitto, (wire.status_topic(run, "phone-1"),))
    (retained,) = late.wait(lambda m: m.retain, 1, 10)
    late.close()
    assert json.loads(retained.payload)["state"] == "offline"


def test_fleet_worker_survives_hostile_tasks_and_a_kill(
    mosquitto: BrokerAddress, lenet_artifact: ModelArtifact, tmp_path: Path
) -> None:
    run = "h" + uuid.uuid4().hex[:8]
    plan = RoundPlan(algorithm="fedsgd", lr=0.1, batch_size=8, deadline_s=120)
    store = RunStore(tmp_path / "run.db")
    spec = fleet(run, mosquitto, lenet_artifact, contiguous_shards([8, 8]), tmp_path / "truth")
    topic = wire.task_topic(run, "d0000")
    out = Outsider(mosquitto, (topic,))
    killed: list[int] = []
    fleets: list[Fleet] = []

    def kill_in_round_2(round_: int, w: Params) -> Params:
        if round_ == 2:  # the worker dies after selection, before its devices get the task
            killed.append(fleets[0].procs[0].pid or 0)
            os.kill(killed[0], signal.SIGKILL)
        return w

    coord = Coordinator(run, lenet_artifact, mosquitto, store, plan, tamper=kill_in_round_2)
    with coord, Fleet(spec) as f:
        fleets.append(f)
        coord.wait_for_devices(2, 60)
        pid = f.procs[0].pid
        tasks, _ = hostile_tasks(run, "d0000", lenet_artifact)
        for payload in tasks:
            out.send(topic, payload)
        w0 = dict(coord.weights)
        res1 = coord.run_round(1)
        (task,) = out.wait(lambda m: not m.retain, len(tasks) + 1, 30)[-1:]
        for payload in replays(task):
            out.send(topic, payload)
        assert (f.procs[0].pid, f.restarts) == (pid, 0)  # the worker survived every task
        w1 = dict(coord.weights)
        res2 = coord.run_round(2)  # its devices are lost for this round only
        wait_until(
            lambda: coord.poll() or (f.restarts == 1 and len(coord.online) == 2),
            120,
            "the restarted worker's devices",
        )
        res3 = coord.run_round(3)
        coord.end()
    out.close()
    assert killed == [pid] and f.procs[0].pid != pid
    assert [(r.selected, r.accepted, r.rejected) for r in (res1, res2, res3)] == [
        (2, 2, 0),
        (2, 0, 0),
        (2, 2, 0),
    ]
    assert store.rejection_counts(run) == {}
    truth = tmp_path / "truth"
    want1 = expected_round(
        lenet_artifact, w0, truth, run, 1, algorithm="fedsgd", lr=0.1, batch_size=8
    )
    want3 = expected_round(
        lenet_artifact, w1, truth, run, 3, algorithm="fedsgd", lr=0.1, batch_size=8
    )
    for k in w0:
        np.testing.assert_allclose(w1[k], want1[k], rtol=0, atol=1e-6)
        np.testing.assert_allclose(coord.weights[k], want3[k], rtol=0, atol=1e-6)


def _children(pid: int) -> dict[int, str]:
    """Live (non-zombie) child processes of ``pid``: pid -> command line."""
    out: dict[int, str] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out[int(d.name)] = cmd
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_kill_9_of_the_demo_leaves_no_orphans(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeleak.cli", "demo", "--devices", "2", "--workers", "2",
         "--rounds", "1000", "--model", "mlp", "--out", str(tmp_path / "demo")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        kids: dict[int, str] = {}

        def workers_up() -> bool:
            kids.update(_children(proc.pid))
            assert proc.poll() is None, "the demo exited early"
            return sum("spawn_main" in c for c in kids.values()) >= 2

        wait_until(workers_up, 300, "the demo's fleet workers", poll=0.2)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    watched = {p for p, c in kids.items() if "spawn_main" in c or "mosquitto" in c}
    assert len(watched) == 3, kids  # two fleet workers and the broker
    wait_until(lambda: not any(_alive(p) for p in watched), 60, "the demo's children to exit")
