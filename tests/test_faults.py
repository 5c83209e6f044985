"""Faults with the real broker and real processes (issue 11): devices killed and cut mid-round,
a QoS 1 redelivery, mosquitto killed with ``kill -9`` and restarted, a coordinator killed and
resumed from its run folder."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest

from coordinator.resume import model_path, resume_point
from coordinator.server import Coordinator, RoundPlan
from coordinator.store import RunStore
from devices.datasets import load_dataset
from devices.fleet import Fleet
from edge import wire
from edge.backends import load_backend
from edge.codec import params_sha256
from edge.data import save_shard
from edge.device import Device, SpillFile
from edge.manifest import ModelArtifact
from edge.mqtt import BrokerAddress, Received, publish_packet_bytes, varint_len, wait_until
from tests.faultlab import broker_crash_run
from tests.fedutil import contiguous_shards, device_argv, expected_round, fleet
from tests.test_hostile import Outsider, in_thread

Params = dict[str, np.ndarray]
REPO = Path(__file__).resolve().parents[1]


# -- helpers --------------------------------------------------------------------------------------


def _utf8(s: str) -> bytes:
    b = s.encode()
    return struct.pack(">H", len(b)) + b


def _packet(first: int, body: bytes) -> bytes:
    n = len(body)
    out = bytearray([first])
    while True:  # MQTT variable byte integer
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            break
    assert len(out) - 1 == varint_len(len(body))
    return bytes(out) + body


class RawPublisher:
    """A minimal MQTT 5 client on a plain socket: it can send the same QoS 1 PUBLISH twice,
    the second time with the DUP flag and the same packet id, exactly as a client redelivers a
    message whose PUBACK it did not see."""

    def __init__(self, broker: BrokerAddress, client_id: str) -> None:
        self.sock = socket.create_connection((broker.host, broker.port), timeout=30)
        body = _utf8("MQTT") + bytes([5, 0x02]) + struct.pack(">H", 60) + b"\x00"
        self.sock.sendall(_packet(0x10, body + _utf8(client_id)))
        assert self._read()[0] >> 4 == 2  # CONNACK

    def _read(self) -> bytes:
        head = self.sock.recv(1)
        mult, n = 1, 0
        while True:
            b = self.sock.recv(1)[0]
            n += (b & 0x7F) * mult
            mult *= 128
            if not b & 0x80:
                break
        body = b""
        while len(body) < n:
            body += self.sock.recv(n - len(body))
        return head + body

    def publish_twice(self, topic: str, payload: bytes, packet_id: int = 7) -> None:
        """PUBLISH (QoS 1), then the same packet again with DUP set; waits for both PUBACKs."""
        body = _utf8(topic) + struct.pack(">H", packet_id) + b"\x00" + payload
        self.sock.sendall(_packet(0x32, body) + _packet(0x3A, body))
        acks = [self._read(), self._read()]
        assert [a[0] >> 4 for a in acks] == [4, 4]  # two PUBACKs

    def close(self) -> None:
        self.sock.sendall(b"\xe0\x00")  # DISCONNECT
        self.sock.close()


def _shard_processes(
    broker: BrokerAddress, artifact: ModelArtifact, run: str, ids: list[str], tmp: Path
) -> list[subprocess.Popen[str]]:
    """One real ``edgeleak device`` process per id, 8 examples each."""
    data = load_dataset("fashion-mnist")
    procs = []
    for i, device in enumerate(ids):
        shard = tmp / f"{device}.npz"
        lo = 200 + 8 * i
        save_shard(shard, data.x_train[lo : lo + 8], data.y_train[lo : lo + 8])
        procs.append(
            subprocess.Popen(
                device_argv(broker.url, shard, artifact, run, device),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                text=True,
            )
        )
    return procs


class CuttableRelay:
    """A TCP relay that can cut its connections silently: after ``cut()`` nothing is forwarded
    and nothing is closed (no FIN, no RST), as when a link goes dead."""

    def __init__(self, upstream: BrokerAddress) -> None:
        self.upstream = upstream
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.dead = threading.Event()
        self.socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                a, _ = self.server.accept()
            except OSError:
                return
            b = socket.create_connection((self.upstream.host, self.upstream.port))
            self.socks += [a, b]
            for src, dst in ((a, b), (b, a)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                return
            if not data:
                return
            if self.dead.is_set():
                continue  # swallowed: the link is dead
            try:
                dst.sendall(data)
            except OSError:
                return

    def cut(self) -> None:
        self.dead.set()

    def close(self) -> None:
        self.server.close()
        for s in self.socks:
            s.close()


# -- device dropout -------------------------------------------------------------------------------


def test_killed_and_cut_devices_drop_out_and_rounds_finish_at_their_deadline(
    mosquitto: BrokerAddress, lenet_artifact: ModelArtifact, tmp_path: Path
) -> None:
    """10 selected devices: 3 (30%) SIGKILLed in round 2 and one behind a link cut silently.
    Round 2 ends at its deadline with the 6 others; the run store says who dropped and why."""
    run = "f" + uuid.uuid4().hex[:8]
    deadline = 20.0
    plan = RoundPlan(algorithm="fedsgd", lr=0.1, batch_size=8, deadline_s=deadline)
    store = RunStore(tmp_path / "run.db")
    spec = fleet(run, mosquitto, lenet_artifact, contiguous_shards([8] * 6), tmp_path / "truth")
    killed_ids = ["k1", "k2", "k3"]
    relay = CuttableRelay(mosquitto)
    procs = _shard_processes(mosquitto, lenet_artifact, run, killed_ids, tmp_path)
    data = load_dataset("fashion-mnist")
    save_shard(tmp_path / "cut.npz", data.x_train[300:308], data.y_train[300:308])
    cut = subprocess.Popen(
        device_argv(relay.url, tmp_path / "cut.npz", lenet_artifact, run, "cut"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def fault_in_round_2(round_: int, w: Params) -> Params:
        if round_ == 2:  # selected already; the tasks go out next
            for p in procs:
                os.kill(p.pid, signal.SIGKILL)
            relay.cut()
        return w

    try:
        coord = Coordinator(run, lenet_artifact, mosquitto, store, plan, tamper=fault_in_round_2)
        with coord, Fleet(spec):
            coord.wait_for_devices(10, 120)
            res1 = coord.run_round(1)
            res2 = coord.run_round(2)
            res3 = coord.run_round(3)
            coord.end()
    finally:
        for p in (*procs, cut):
            p.kill()
            p.wait(30)
        relay.close()
    assert [(r.selected, r.accepted) for r in (res1, res2, res3)] == [(10, 10), (10, 6), (6, 6)]
    # The killed devices' last wills end the wait for them; the cut one is waited for until the
    # deadline (its broker connection looks alive until the keepalive runs out).
    assert deadline <= res2.seconds < deadline + 15
    assert store.dropouts(run) == [
        (2, "cut", "no_answer"), (2, "k1", "offline"), (2, "k2", "offline"), (2, "k3", "offline"),
    ]  # fmt: skip
    assert store.rejection_counts(run) == {}


# -- QoS 1 redelivery -----------------------------------------------------------------------------


def test_a_qos1_redelivery_is_aggregated_once(
    mosquitto: BrokerAddress, lenet_artifact: ModelArtifact, tmp_path: Path
) -> None:
    """A device sends its update, then the same PUBLISH again with DUP and the same packet id.
    The broker delivers both; the coordinator aggregates one (dedupe by device, round, nonce)."""
    run = "f" + uuid.uuid4().hex[:8]
    plan = RoundPlan(algorithm="fedsgd", lr=0.1, batch_size=8, deadline_s=120, max_examples=20)
    store = RunStore(tmp_path / "run.db")
    spec = fleet(run, mosquitto, lenet_artifact, contiguous_shards([8]), tmp_path / "truth")
    out = Outsider(mosquitto, (wire.task_topic(run, "g0"), wire.update_topic(run, "g0")))
    raw = RawPublisher(mosquitto, "g0-" + uuid.uuid4().hex[:6])
    with Coordinator(run, lenet_artifact, mosquitto, store, plan) as coord, Fleet(spec):
        coord.wait_for_devices(1, 60)
        status = {"state": "online", "runtime": "onnx", "examples": 8}
        out.send(wire.status_topic(run, "g0"), json.dumps(status).encode())
        coord.wait_for_devices(2, 60)
        w0 = dict(coord.weights)
        t, result = in_thread(lambda: coord.run_round(1))
        out.wait(lambda m: m.topic.endswith("/task/g0"), 1, 60)
        ones = {k: np.ones_like(v) for k, v in w0.items()}
        update = wire.encode_update(
            wire.Update(run=run, round=1, device="g0", kind="gradient", num_examples=8, params=ones)
        )
        raw.publish_twice(wire.update_topic(run, "g0"), update)
        delivered = out.wait(lambda m: m.topic.endswith("/update/g0"), 2, 60)
        t.join(120)
        coord.end()
    raw.close()
    out.close()
    res = result[0]
    assert [m.payload for m in delivered] == [update, update]  # the broker delivered it twice
    assert (res.selected, res.accepted, res.rejected) == (2, 2, 1)
    assert store.rejection_counts(run) == {"replayed_nonce": 1}
    size = publish_packet_bytes(wire.update_topic(run, "g0"), len(update))
    assert store.ledger_bytes(run, direction="up", kinds=("rejected",)) == size
    fleet_only = expected_round(
        lenet_artifact, w0, tmp_path / "truth", run, 1, algorithm="fedsgd", lr=0.1, batch_size=8
    )
    for k in w0:
        g = (w0[k] - fleet_only[k]) / np.float32(0.1)  # d0000's gradient
        want = w0[k] - np.float32(0.1) * (g * 8 + ones[k] * 8) / 16  # g0 counted once
        np.testing.assert_allclose(coord.weights[k], want, rtol=0, atol=1e-5)


# -- broker crash ---------------------------------------------------------------------------------


def test_broker_kill_9_mid_round_loses_and_doubles_nothing(
    lenet_artifact: ModelArtifact, tmp_path: Path
) -> None:
    """mosquitto with persistence on every change, persistent MQTT 5 sessions: kill -9 the
    broker as the first update of round 2 arrives, restart it on the same port. Every round
    completes, no update is aggregated twice, and (when none was lost) the model is the one
    the updates give."""
    res, models, truth, run = broker_crash_run(lenet_artifact, tmp_path)
    assert res.rounds_completed == 3
    assert res.duplicates_aggregated == 0
    # An update the broker acknowledged and then lost is sent again when the reconnected
    # coordinator says hello; the copies that did arrive are refused as such.
    assert (res.lost, res.updates_accepted) == (0, res.updates_sent)
    assert set(res.rejected_by_reason) <= {"replayed_nonce", "duplicate", "stale_round"}
    want2 = expected_round(lenet_artifact, models[1], truth, run, 2, algorithm="fedsgd",
                           lr=0.1, batch_size=8)  # fmt: skip
    for k in want2:
        np.testing.assert_allclose(models[2][k], want2[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("spilled", [False, True], ids=["in_memory", "spill_file"])
def test_hello_gets_the_last_update_once_more_and_only_once(
    spilled: bool, lenet_artifact: ModelArtifact, tmp_path: Path
) -> None:
    """Kept in memory or in a fleet worker's spill file, the update sent again is the same."""
    data = load_dataset("fashion-mnist")
    spill = SpillFile(str(tmp_path)) if spilled else None
    dev = Device("d1", None, lenet_artifact, load_backend("onnx", lenet_artifact),
                 data.x_train[:8], data.y_train[:8], spill=spill)  # fmt: skip
    if spill is not None:  # another device's slot before and after it
        spill.put("d0", [b"x" * 10])
    assert dev.handle(Received(wire.control_topic("r1"), wire.HELLO, False, 0))[0].kind == "status"
    task = wire.Task(
        run="r1", round=1, device="d1", algorithm="fedsgd", lr=0.1, epochs=1, batch_size=8,
        model_hash=lenet_artifact.manifest.sha256, weights=lenet_artifact.initial_params(),
    )  # fmt: skip
    (update,) = dev.handle(Received(wire.task_topic("r1", "d1"), wire.encode_task(task), False, 0))
    if spill is not None:
        spill.put("d2", [b"y" * 7, b"z"])
        assert dev.unconfirmed[1][0].payload == b""  # on disk, not in memory
        assert spill.take("d2") == [b"y" * 7, b"z"] and spill.take("d0") == [b"x" * 10]
    hello = Received(wire.control_topic("r1"), wire.HELLO, False, 0)
    online, again = dev.handle(hello)
    assert (online.kind, again.kind) == ("status", "resend")
    assert (again.topic, again.payload) == (update.topic, update.payload)  # the same nonce
    assert [o.kind for o in dev.handle(hello)] == ["status"]  # forged hellos get no more
    assert [
        o.kind for o in dev.handle(Received(wire.control_topic("r2"), wire.HELLO, False, 0))
    ] == ["status"]


# -- coordinator crash ------------------------------------------------------------------------------


def _coordinator_argv(broker: BrokerAddress, artifact: ModelArtifact, *extra: str) -> list[str]:
    return [sys.executable, "-m", "edgeleak.cli", "coordinator", "--broker", broker.url,
            "--model", str(artifact.folder), "--min-devices", "4", *extra]  # fmt: skip


def test_coordinator_kill_9_then_resume_ends_with_the_uninterrupted_model(
    mosquitto: BrokerAddress, lenet_artifact: ModelArtifact, tmp_path: Path
) -> None:
    """``edgeleak coordinator`` killed with SIGKILL after round 2; ``--resume RUN_DIR`` continues
    at round 3 from the stored model (hash-checked) and ends with the same model as a run that
    was never interrupted (same seed, deterministic fleet)."""
    rounds = 4
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"algorithm": "fedavg", "lr": 0.05, "epochs": 1,
                                  "batch_size": 8, "rounds": rounds, "seed": 3}))  # fmt: skip
    devices = contiguous_shards([16, 8, 16, 8])

    def run_with_fleet(run: str, argvs: list[list[str]], kill_after: int | None) -> Path:
        out = tmp_path / run
        spec = fleet(run, mosquitto, lenet_artifact, devices, tmp_path / f"truth-{run}")
        with Fleet(spec):
            for argv in argvs:
                proc = subprocess.Popen(
                    argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
                )
                if kill_after is not None and "--resume" not in argv:
                    wait_until(
                        lambda p=proc: (
                            model_path(out, kill_after).is_file() or p.poll() is not None
                        ),
                        300,
                        f"round {kill_after} of {run}",
                        poll=0.05,
                    )
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(30)
                    continue
                text, _ = proc.communicate(timeout=400)
                assert proc.returncode == 0, text
        return out

    crashed = "c" + uuid.uuid4().hex[:8]
    first = _coordinator_argv(mosquitto, lenet_artifact, "--run", crashed, "--config", str(config),
                              "--out", str(tmp_path / crashed))  # fmt: skip
    again = _coordinator_argv(mosquitto, lenet_artifact, "--resume", str(tmp_path / crashed))
    out = run_with_fleet(crashed, [first], kill_after=2)
    point = resume_point(out)
    assert 2 <= point.round < rounds  # the store and the model agree on the last round
    assert point.weights is not None and params_sha256(point.weights) == point.model_sha256
    run_with_fleet(crashed, [again], kill_after=None)
    clean = "u" + uuid.uuid4().hex[:8]
    whole = _coordinator_argv(mosquitto, lenet_artifact, "--run", clean, "--config", str(config),
                              "--out", str(tmp_path / clean))  # fmt: skip
    run_with_fleet(clean, [whole], kill_after=None)
    resumed = RunStore(out / "run.db").rounds(crashed)
    uninterrupted = RunStore(tmp_path / clean / "run.db").rounds(clean)
    assert [r["round"] for r in resumed] == list(range(1, rounds + 1))
    assert [r["model_sha256"] for r in resumed] == [r["model_sha256"] for r in uninterrupted]
    summary = json.loads((out / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == list(range(1, rounds + 1))


# -- hostile input at volume ---------------------------------------------------------------------


def test_10000_hostile_messages_change_nothing(
    mosquitto: BrokerAddress, lenet_artifact: ModelArtifact, tmp_path: Path
) -> None:
    """10,000 hostile messages through the real broker during a real 3-round run: no crash,
    every round complete, each message on the coordinator's topics rejected with a contract
    reason (forged ``end`` messages are ignored by the devices, which keep answering), and the
    final model bit-identical to the clean run with the same seed."""
    from tests.faultlab import KINDS, REASONS, clean_and_flooded

    clean, hostile = clean_and_flooded(mosquitto, lenet_artifact, tmp_path, total=10_000)
    assert clean.rounds == [(4, 4, 0)] * 3
    assert [(s, a) for s, a, _ in hostile.rounds] == [(4, 4)] * 3
    assert hostile.sent == 10_000 and hostile.restarts == 0
    forged_ends = sum(1 for i in range(10_000) if KINDS[i % len(KINDS)] == "forged_end")
    assert hostile.to_coordinator == 10_000 - forged_ends
    assert sum(hostile.rejected_by_reason.values()) == hostile.to_coordinator
    assert set(hostile.rejected_by_reason) <= REASONS, hostile.rejected_by_reason
    assert hostile.rejected_by_reason["too_many_devices"] == 10_000 // len(KINDS)
    assert hostile.rejected_by_reason["oversize"] >= 10_000 // len(KINDS)
    assert hostile.final_sha256 == clean.final_sha256
