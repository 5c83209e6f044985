"""Real devices need a real coordinator: broker and coordinator as services, devices that wait
for the broker and stay up between runs, forged ends, phantom statuses, broker credentials."""

from __future__ import annotations

import dataclasses
import json
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from coordinator import policy
from coordinator.server import Coordinator, RoundPlan, new_run_id
from coordinator.store import RunStore
from devices.datasets import load_dataset
from devices.fleet import Fleet
from edge import wire
from edge.backends import load_backend
from edge.data import save_shard
from edge.device import Device, run_device
from edge.manifest import ModelArtifact
from edge.mqtt import QOS, BrokerAddress, connect, parse_broker_url, wait_until
from edgeleak.broker import free_port, local_broker
from tests.fedutil import contiguous_shards, fleet

CLI = [sys.executable, "-m", "edgeleak.cli"]


class Proc:
    """A child process whose output lines are read on a thread (and kept)."""

    def __init__(self, argv: list[str]) -> None:
        self.p = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        self.lines: list[str] = []
        self._new: queue.Queue[str] = queue.Queue()
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self.lines.append(line.rstrip("\n"))
            self._new.put(line)

    def wait_line(self, needle: str, timeout: float = 300) -> str:
        """The first line (seen so far or next) containing ``needle``."""
        wait_until(lambda: any(needle in ln for ln in self.lines), timeout, repr(needle))
        return next(ln for ln in self.lines if needle in ln)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.p.poll() is None:
            self.p.send_signal(sig)
        rc = self.p.wait(timeout)
        self._t.join(10)
        return rc

    def output(self) -> str:
        return "\n".join(self.lines)


def _publisher(broker: BrokerAddress, name: str) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
    connect(c, broker)
    c.loop_start()
    wait_until(c.is_connected, 10, f"{name} connected")
    return c


def _publish(c: mqtt.Client, topic: str, payload: bytes, *, retain: bool = False) -> None:
    c.publish(topic, payload, qos=QOS, retain=retain).wait_for_publish(10)


# -- the "Real devices" recipe of the README, with real processes ----------------------------------


def test_real_devices_recipe(lenet_artifact: ModelArtifact, tmp_path: Path) -> None:
    port = free_port()
    url = f"mqtt://127.0.0.1:{port}"
    shards = tmp_path / "shards"
    made = subprocess.run(
        [*CLI, "shards", "--dataset", "mnist-digits", "--devices", "3", "--out", str(shards)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    sizes = [len(np.load(shards / f"shard-{i:04d}.npz")["y"]) for i in range(3)]
    assert sum(sizes) == 4000
    # Devices first: the broker is not there yet, so they back off and retry.
    devices = [
        Proc([*CLI, "device", "--broker", url, "--data", str(shards / f"shard-{i:04d}.npz"),
              "--model", str(lenet_artifact.folder), "--id", f"pi-{i}", "--max-backoff-s", "2"])
        for i in range(3)
    ]  # fmt: skip
    broker: Proc | None = None
    try:
        for d in devices:
            line = d.wait_line("not reachable")
            assert line.startswith(f"broker {url} not reachable (") and "retrying in" in line
            assert "Traceback" not in d.output()
        serve = [*CLI, "broker", "--port", str(port), "--data", str(tmp_path / "broker")]
        broker = Proc(serve)
        broker.wait_line("broker: mosquitto on")
        runs = []
        for k in (1, 2):
            if k == 2:  # the broker restarts between the runs: the devices reconnect by themselves
                assert broker.stop(signal.SIGINT) == 0, broker.output()
                broker = Proc(serve)
                broker.wait_line("broker: mosquitto on")
            out = tmp_path / f"run{k}"
            coord = subprocess.run(
                [*CLI, "coordinator", "--broker", url, "--model", str(lenet_artifact.folder),
                 "--rounds", "2", "--min-devices", "3", "--dataset", "mnist-digits",
                 "--out", str(out), "--wait-s", "300"],
                capture_output=True, text=True, timeout=600,
            )  # fmt: skip
            assert coord.returncode == 0, coord.stdout + coord.stderr
            first = coord.stdout.splitlines()[0]
            run = first.split()[1].rstrip(":")
            assert first == f"run {run}: coordinator on {url}, waiting for 3 device(s)"
            assert [ln.split(":")[0] for ln in coord.stdout.splitlines()[1:3]] == [
                "round 1",
                "round 2",
            ]
            s = json.loads((out / "summary.json").read_text())
            assert s["run"] == run and s["devices"] == 3
            assert [(r["selected"], r["accepted"], r["rejected"]) for r in s["rounds"]] == [
                (3, 3, 0),
                (3, 3, 0),
            ]
            db = sqlite3.connect(out / "run.db")
            assert db.execute("SELECT COUNT(*) FROM rounds WHERE run=?", (run,)).fetchone() == (2,)
            assert (out / "rounds.png").is_file()
            runs.append(run)
            for i, d in enumerate(devices):
                d.wait_line(f"device pi-{i}: run {run} ended after 2 updates")
                assert d.p.poll() is None  # still up for the next run
                for r in (1, 2):
                    assert f"device pi-{i}: run {run} round {r}: {sizes[i]} examples, loss " in (
                        d.output()
                    )
        assert runs[0] != runs[1]
        for i, d in enumerate(devices):
            assert f"pi-{i}: lost the broker (" in d.output()
            assert d.stop() == 0, d.output()
            assert d.lines[-1] == f"device pi-{i}: stopped after 4 updates; refused tasks: none"
        assert broker.stop(signal.SIGINT) == 0, broker.output()
        assert broker.lines[-1] == "broker stopped"
        assert (tmp_path / "broker" / "mosquitto.conf").is_file()
    finally:
        for d in devices:
            d.p.kill()
        if broker is not None:
            broker.p.kill()


def test_coordinator_rejects_a_bad_run_id(lenet_artifact: ModelArtifact) -> None:
    proc = subprocess.run(
        [*CLI, "coordinator", "--broker", "mqtt://127.0.0.1:1", "--model",
         str(lenet_artifact.folder), "--run", "a/b"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "edgeleak coordinator: --run 'a/b': expected an id without '/', '+', '#', other than 'any'"
    )


def test_run_ids_are_unpredictable() -> None:
    a, b = new_run_id(), new_run_id()
    assert a != b and a.startswith("run-") and len(a.split("-")[-1]) == 8


# -- forged end ------------------------------------------------------------------------------------


def test_end_commitments_accept_only_the_revealed_token() -> None:
    token = wire.new_end_token()
    ends = wire.EndCommitments()
    assert not ends.accepts("r1", wire.end_payload(token))  # no task yet: nothing to match
    ends.add("r1", wire.end_commitment(token))
    assert not ends.accepts("r1", b"end")
    assert not ends.accepts("r1", wire.end_payload(wire.new_end_token()))
    assert not ends.accepts("r1", b"end " + b"zz" * 32)
    assert not ends.accepts("r2", wire.end_payload(token))
    assert ends.accepts("r1", wire.end_payload(token))


def test_forged_end_is_ignored_by_devices_and_fleet_workers(
    mosquitto: BrokerAddress, lenet_artifact: ModelArtifact, tmp_path: Path
) -> None:
    run = "e" + uuid.uuid4().hex[:8]
    data = load_dataset("fashion-mnist")
    phone = Device(
        "phone-e", run, lenet_artifact, load_backend("onnx", lenet_artifact),
        data.x_train[100:124], data.y_train[100:124],
    )  # fmt: skip
    stop = threading.Event()
    lines: list[str] = []
    t = threading.Thread(
        target=run_device,
        args=(phone, mosquitto),
        kwargs={"stop": stop, "exit_on_end": True, "say": lines.append},
        daemon=True,
    )
    spec = fleet(run, mosquitto, lenet_artifact, contiguous_shards([16, 16]), tmp_path / "truth")
    plan = RoundPlan(algorithm="fedavg", lr=0.05, batch_size=8, deadline_s=120)
    outsider = _publisher(mosquitto, "outsider-" + run)
    try:
        with Coordinator(run, lenet_artifact, mosquitto, RunStore(tmp_path / "run.db"), plan) as c:
            t.start()
            with Fleet(spec) as workers:
                c.wait_for_devices(3, 120)
                r1 = c.run_round(1)
                for forged in (b"end", wire.end_payload(wire.new_end_token()), b"end " + b"0" * 64):
                    _publish(outsider, wire.control_topic(run), forged)
                r2 = c.run_round(2)
                assert workers.alive() and t.is_alive()
                c.end()
                t.join(60)
        assert not t.is_alive()  # the genuine end stops the pinned device (exit_on_end)
    finally:
        stop.set()
        outsider.disconnect()
        outsider.loop_stop()
    assert (r1.selected, r1.accepted) == (3, 3)
    assert (r2.selected, r2.accepted) == (3, 3)
    assert lines[-1] == f"device phone-e: run {run} ended after 2 updates"


# -- phantom statuses ------------------------------------------------------------------------------


def test_policy_caps_unproven_devices_and_keeps_proven_ones() -> None:
    pool = sorted([f"fake-{i:02d}" for i in range(50)] + ["a", "b", "c"])
    chosen = policy.choose(
        pool, {"a", "b", "c"}, fraction=1.0, cap=policy.unproven_cap(3, 3),
        rng=np.random.default_rng(0),
    )  # fmt: skip
    assert {"a", "b", "c"} <= set(chosen) and len(chosen) == 6
    assert policy.unproven_cap(0, 10) is None
    standing = {
        "live": policy.Standing(live=True),
        "retained": policy.on_status(None, online=True, retained=True),
    }
    assert policy.eligible(standing) == ["live"]
    silent = policy.after_round(standing, ["live"], heard=set())
    assert policy.eligible(silent) == []
    back = policy.on_status(silent["live"], online=True, retained=False)
    assert back == policy.Standing(live=True, silent=False)
    assert policy.on_status(back, online=False, retained=False) is None
    over = dict(deadline_s=100.0, waiting={"x"}, quiet_s=5.0)
    assert not policy.round_over(elapsed=6, proven={"x"}, since_last_answer=6, **over)  # type: ignore[arg-type]
    assert policy.round_over(elapsed=6, proven=set(), since_last_answer=6, **over)  # type: ignore[arg-type]
    assert not policy.round_over(elapsed=6, proven=set(), since_last_answer=4, **over)  # type: ignore[arg-type]
    assert policy.round_over(elapsed=100, proven={"x"}, since_last_answer=0, **over)  # type: ignore[arg-type]


def test_phantom_statuses_cannot_stall_rounds_or_keep_devices_out(
    mosquitto: BrokerAddress, lenet_artifact: ModelArtifact, tmp_path: Path
) -> None:
    run = "f" + uuid.uuid4().hex[:8]
    outsider = _publisher(mosquitto, "outsider-" + run)
    online = json.dumps({"state": "online", "runtime": "onnx", "examples": 60000}).encode()
    offline = json.dumps({"state": "offline"}).encode()
    phantoms = [f"ph{i:02d}" for i in range(50)]
    for p in phantoms:  # planted before the coordinator starts: retained, nobody behind them
        _publish(outsider, wire.status_topic(run, p), online, retain=True)
    spec = fleet(run, mosquitto, lenet_artifact, contiguous_shards([16, 16]), tmp_path / "truth")
    plan = RoundPlan(
        algorithm="fedavg", lr=0.05, batch_size=8, deadline_s=300, max_unproven=7,
        unproven_quiet_s=3.0,
    )  # fmt: skip
    store = RunStore(tmp_path / "run.db")
    try:
        with Coordinator(run, lenet_artifact, mosquitto, store, plan) as c, Fleet(spec):
            c.wait_for_devices(2, 120)
            assert set(phantoms) <= set(c.online)  # heard of, but not selectable
            r1 = c.run_round(1)
            # five phantoms announced live by a connected outsider that never answers a task
            live = [f"lv{i}" for i in range(5)]
            for p in live:
                _publish(outsider, wire.status_topic(run, p), online)
            wait_until(lambda: c.poll() or len(c.eligible()) == 7, 30, "live phantoms")
            r2 = c.run_round(2)  # 2 proven + at most max(7, 2) unproven; waits 3 s for them
            r3 = c.run_round(3)  # the silent phantoms are not selected again
            # a forged offline, live and retained, for a real device: it answers with online
            seen = "SELECT COUNT(*) FROM messages WHERE device='d0001' AND kind='status'"
            (before,) = store.db.execute(seen).fetchone()
            _publish(outsider, wire.status_topic(run, "d0001"), offline, retain=True)
            wait_until(
                lambda: c.poll() or store.db.execute(seen).fetchone()[0] >= before + 2,
                60,
                "the forged offline and d0001's answer",
            )
            assert "d0001" in c.eligible()
            r4 = c.run_round(4)
            c.end()
    finally:
        for p in phantoms:
            _publish(outsider, wire.status_topic(run, p), b"", retain=True)
        outsider.disconnect()
        outsider.loop_stop()
    assert (r1.selected, r1.accepted, r1.rejected) == (2, 2, 0)
    assert (r2.selected, r2.accepted) == (7, 2)
    assert r2.seconds < plan.deadline_s / 2  # ended on the quiet rule, not the deadline
    assert (r3.selected, r3.accepted) == (2, 2)
    assert (r4.selected, r4.accepted) == (2, 2)
    tasks = store.db.execute(
        "SELECT round, COUNT(*) FROM messages WHERE run=? AND kind='task' GROUP BY round", (run,)
    ).fetchall()
    assert tasks == [(1, 2), (2, 7), (3, 2), (4, 2)]  # no task ever went to a retained phantom


# -- credentials -----------------------------------------------------------------------------------


def test_credentials_in_the_broker_url_are_used_and_never_printed(
    lenet_artifact: ModelArtifact, tmp_path: Path
) -> None:
    from attacks.intercept import CaptureStore, Eavesdropper

    secret = "s3cret-pw"
    pw = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pw), "lab", secret], check=True)
    run = "c" + uuid.uuid4().hex[:8]
    data = load_dataset("fashion-mnist")
    save_shard(tmp_path / "shard.npz", data.x_train[:24], data.y_train[:24])
    with local_broker("mosquitto", password_file=pw) as (anon, _):
        broker = dataclasses.replace(anon, username="lab", password=secret)
        assert secret not in repr(broker) and secret not in broker.url
        assert broker.url == f"mqtt://lab:***@127.0.0.1:{anon.port}"
        assert parse_broker_url(broker.secret_url) == broker
        refused = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        with pytest.raises(TimeoutError):  # no login: the broker turns the client away
            connect(refused, anon)
            refused.loop_start()
            wait_until(refused.is_connected, 2, "an anonymous connection")
        refused.loop_stop()
        device = Proc([*CLI, "device", "--broker", broker.secret_url, "--data",
                       str(tmp_path / "shard.npz"), "--model", str(lenet_artifact.folder),
                       "--id", "phone-c"])  # fmt: skip
        spec = fleet(run, broker, lenet_artifact, contiguous_shards([16]), tmp_path / "truth")
        spec = dataclasses.replace(spec, broker_url=broker.secret_url)
        plan = RoundPlan(algorithm="fedavg", lr=0.05, batch_size=8, deadline_s=120)
        capture = CaptureStore(tmp_path / "capture")
        try:
            with (
                Eavesdropper(broker, run, capture) as spy,
                Coordinator(run, lenet_artifact, broker, RunStore(tmp_path / "r.db"), plan) as c,
                Fleet(spec),
            ):
                c.wait_for_devices(2, 120)
                res = c.run_round(1)
                c.end()
                wait_until(spy.ended.is_set, 30, "the eavesdropper seeing the end")
            device.wait_line(f"device phone-c: run {run} ended after 1 updates")
            assert device.stop() == 0
        finally:
            device.p.kill()
    assert (res.selected, res.accepted) == (2, 2)
    assert capture.count("update") == 2
    assert f"broker mqtt://lab:***@127.0.0.1:{anon.port}" in device.output()
    assert secret not in device.output()
