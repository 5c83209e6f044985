"""Hostile input at volume through a real broker during a real run (issue 11), shared by
``tests/test_faults.py`` and ``bench/faults.py``.

An outsider with nothing but the README's contract sends ``total`` messages while a 4-device
fleet trains: random bytes, truncated, oversize, NaN/Inf, wrong version/type/run, stale and future
rounds, replays of honest updates with their nonce and with a fresh one, impersonations of the
selected devices, floods of ``online`` statuses for thousands of phantom devices, and forged
``end`` messages. The same fleet with the same seed also runs clean, for the bit-identity check.

Also the other fault runs of ``bench/faults.py`` (device dropout, broker crash, a lossy link) and
the link lab's helpers (``rounds_in_lab``), shared with ``tests/test_netem.py``.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coordinator.server import Coordinator, RoundPlan
from coordinator.store import RoundResult, RunStore
from devices.datasets import load_dataset
from devices.fleet import Fleet, read_truth
from devices.netem import LinkShape, NetLab
from edge import wire
from edge.codec import params_sha256, read_container, write_tensors
from edge.data import save_shard
from edge.manifest import ModelArtifact
from edge.mqtt import QOS, BrokerAddress, Received, make_client, wait_until
from edgeleak.broker import _stop, _wait_listening, free_port, mosquitto_conf, mosquitto_path
from tests.fedutil import contiguous_shards, device_argv, fleet

Params = dict[str, np.ndarray]
DEVICES = 4
HEADROOM = 4096  # max_payload_bytes = the model's f32 update + this
KINDS = (
    "random", "truncated", "oversize", "nan", "inf", "version", "type", "run", "stale", "future",
    "replay", "replay_fresh_nonce", "impersonate", "phantom_online", "forged_end",
)  # fmt: skip
# Reasons the coordinator may give a hostile message: the contract's, never internal_error.
REASONS = {
    "not_schema", "not_container", "bad_header", "bad_shape", "bad_dtype", "bad_params",
    "bad_field", "bad_nonce", "missing_field", "oversize", "non_finite", "bad_version",
    "bad_type", "wrong_run", "stale_round", "future_round", "not_selected", "replayed_nonce",
    "duplicate", "bad_examples", "bad_kind", "bad_codec", "bad_scale", "bad_status",
    "too_many_devices", "bad_topic", "device_mismatch",
}  # fmt: skip


@dataclass(frozen=True)
class FloodResult:
    rounds: list[tuple[int, int, int]]  # (selected, accepted, rejected) per round
    final_sha256: str
    sent: int  # hostile messages published (PUBACKed by the broker)
    to_coordinator: int  # of them on the coordinator's topics (update, status)
    rejected_by_reason: dict[str, int]
    seconds: float
    restarts: int


def _with_meta(payload: bytes, **changes: str) -> bytes:
    tensors, meta = read_container(payload)
    return write_tensors(dict(tensors), {**meta, **changes})


class _Flood:
    """Builds hostile message ``i`` of a round from what it has seen of the run."""

    def __init__(
        self, run: str, shapes: dict[str, tuple[int, ...]], seed: int, max_payload: int
    ) -> None:
        self.run = run
        self.max_payload = max_payload
        self.rng = np.random.default_rng(seed)
        self.ones = {k: np.ones(s, np.float32) for k, s in shapes.items()}
        self.honest: list[Received] = []  # updates of the fleet seen so far

    def small_update(self, device: str, round_: int, **kw: object) -> bytes:
        """A well-formed update that costs a few hundred bytes (top-k codec)."""
        params = kw.pop("params", self.ones)
        u = wire.Update(run=self.run, round=round_, device=device, kind="gradient",
                        num_examples=8, params=params, codec="topk:0.001")  # type: ignore[arg-type]  # fmt: skip
        return _with_meta(wire.encode_update(u), **kw) if kw else wire.encode_update(u)  # type: ignore[arg-type]

    def message(self, i: int, round_: int) -> tuple[str, bytes, str]:
        """(topic, payload, kind) of hostile message ``i`` sent during ``round_``."""
        kind = KINDS[i % len(KINDS)]
        phantom = f"p{i:05d}"
        target = f"d{i % DEVICES:04d}"  # a selected device
        up = wire.update_topic(self.run, phantom)
        if kind == "random":
            return up, self.rng.bytes(int(self.rng.integers(0, 512))), kind
        if kind == "truncated":
            full = self.small_update(phantom, round_)
            return up, full[: int(self.rng.integers(0, len(full)))], kind
        if kind == "oversize":
            return up, b"\0" * (self.max_payload + 1), kind
        if kind in ("nan", "inf"):
            bad = {k: v.copy() for k, v in self.ones.items()}
            next(iter(bad.values())).flat[0] = np.nan if kind == "nan" else np.inf
            u = wire.Update(run=self.run, round=round_, device=target, kind="gradient",
                            num_examples=8, params=bad, codec="topk:0.001")  # fmt: skip
            return wire.update_topic(self.run, target), wire.encode_update(u), kind
        if kind == "version":
            return up, self.small_update(phantom, round_, edgeleak="2"), kind
        if kind == "type":
            return up, self.small_update(phantom, round_, type="task"), kind
        if kind == "run":
            return up, self.small_update(phantom, round_, run="someone-else"), kind
        if kind in ("stale", "future"):
            # never the current round, however late the coordinator reads it
            r = max(0, round_ - 1) if kind == "stale" else round_ + 1000
            return wire.update_topic(self.run, target), self.small_update(target, r), kind
        if kind in ("replay", "replay_fresh_nonce") and self.honest:
            m = self.honest[int(self.rng.integers(0, len(self.honest)))]
            payload = (
                m.payload if kind == "replay" else _with_meta(m.payload, nonce=wire.new_nonce())
            )
            return m.topic, payload, kind
        if kind in ("replay", "replay_fresh_nonce", "impersonate"):
            # A selected device's topic, its metadata, but n above what it announced.
            return (
                wire.update_topic(self.run, target),
                self.small_update(target, round_, n="9"),
                kind,
            )
        if kind == "phantom_online":
            status = {"state": "online", "runtime": "onnx", "examples": 8}
            return wire.status_topic(self.run, phantom), json.dumps(status).encode(), kind
        forged = b"end " + self.rng.bytes(wire.END_TOKEN_BYTES).hex().encode()
        return wire.control_topic(self.run), forged, kind


def flood_run(
    broker: BrokerAddress,
    artifact: ModelArtifact,
    tmp: Path,
    *,
    total: int,
    rounds: int = 3,
    seed: int = 5,
) -> FloodResult:
    """A 4-device FedSGD run of ``rounds`` rounds with ``total`` hostile messages (0: clean),
    a ``rounds``-th of them sent during each round."""
    run = "z" + uuid.uuid4().hex[:8]
    max_payload = 4 * artifact.manifest.num_parameters + HEADROOM
    plan = RoundPlan(algorithm="fedsgd", lr=0.1, batch_size=8, deadline_s=300, max_examples=8,
                     max_payload_bytes=max_payload, max_devices_online=DEVICES)  # fmt: skip
    store = RunStore(tmp / f"{run}.db")
    spec = fleet(run, broker, artifact, contiguous_shards([8] * DEVICES), tmp / f"truth-{run}")
    flood = _Flood(run, artifact.manifest.shapes(), seed, max_payload)
    inbox: queue.Queue[Received] = queue.Queue()
    ready: list[str] = []
    out = make_client("outsider-" + uuid.uuid4().hex[:8], inbox,
                      subscriptions=(f"edgeleak/{run}/update/+",), on_ready=ready)  # fmt: skip
    out.connect(broker.host, broker.port)
    out.loop_start()
    wait_until(lambda: bool(ready), 30, "the outsider's subscriptions")
    kinds: Counter[str] = Counter()
    threads: list[threading.Thread] = []

    def send(round_: int, lo: int, hi: int) -> None:
        infos = []
        for i in range(lo, hi):
            while not inbox.empty():
                m = inbox.get_nowait()
                if m.topic.split("/")[-1].startswith("d"):
                    flood.honest.append(m)
            topic, payload, kind = flood.message(i, round_)
            kinds[kind] += 1
            infos.append(out.publish(topic, payload, qos=QOS))
        for info in infos:
            info.wait_for_publish(120)

    def during(round_: int, w: Params) -> Params:
        for t in threads:
            t.join()
        lo, hi = total * (round_ - 1) // rounds, total * round_ // rounds
        if hi > lo:
            t = threading.Thread(target=send, args=(round_, lo, hi))
            threads.append(t)
            t.start()
        return w

    t0 = time.monotonic()
    coord = Coordinator(run, artifact, broker, store, plan, seed=seed, tamper=during)
    with coord, Fleet(spec) as f:
        coord.wait_for_devices(DEVICES, 120)
        results = [coord.run_round(r) for r in range(1, rounds + 1)]
        for t in threads:
            t.join()
        to_coord = total - kinds["forged_end"]
        wait_until(
            lambda: coord.poll(0.05) or sum(store.rejection_counts(run).values()) >= to_coord,
            300,
            "the coordinator to handle every hostile message",
        )
        coord.end()
        final = params_sha256({k: coord.weights[k] for k in artifact.manifest.param_names})
        restarts = f.restarts
    out.disconnect()
    out.loop_stop()
    return FloodResult(
        rounds=[(r.selected, r.accepted, r.rejected) for r in results],
        final_sha256=final,
        sent=sum(kinds.values()),
        to_coordinator=total - kinds["forged_end"],
        rejected_by_reason=store.rejection_counts(run),
        seconds=time.monotonic() - t0,
        restarts=restarts,
    )


def clean_and_flooded(
    broker: BrokerAddress, artifact: ModelArtifact, tmp: Path, *, total: int, rounds: int = 3
) -> tuple[FloodResult, FloodResult]:
    """The same seeded run without and with the flood."""
    return (
        flood_run(broker, artifact, tmp, total=0, rounds=rounds),
        flood_run(broker, artifact, tmp, total=total, rounds=rounds),
    )


class Mosquitto:
    """A mosquitto of our own with persistence saving on every change (``mosquitto_conf``),
    that can be killed with SIGKILL and started again on the same port."""

    def __init__(self, folder: Path) -> None:
        exe = mosquitto_path()
        if exe is None:
            raise RuntimeError("mosquitto is not installed: apt-get install -y mosquitto")
        self.port = free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.conf = folder / "mosquitto.conf"
        self.conf.write_text(mosquitto_conf(self.port, persistence_dir=folder))
        self.cmd = [exe, "-c", str(self.conf)]
        self.address = BrokerAddress("127.0.0.1", self.port)
        self.proc = self.start()

    def start(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _wait_listening(self.port, proc, 30, "mosquitto")
        return proc

    def kill_and_restart(self) -> float:
        """``kill -9``, then start on the same port; returns the seconds it was away."""
        t0 = time.monotonic()
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.proc = self.start()
        return time.monotonic() - t0

    def close(self) -> None:
        _stop(self.proc)


@dataclass(frozen=True)
class FaultResult:
    """One row of ``bench/faults.py``'s ``faults`` table."""

    fault: str
    rounds_completed: int
    updates_sent: int  # by the selected devices that were alive (the fleet's truth records)
    updates_accepted: int
    duplicates_aggregated: int  # accepted (device, round) pairs counted more than once
    lost: int  # sent by alive selected devices and never accepted
    recovery_seconds: float  # from the fault to the end of the round it hit
    rejected_by_reason: dict[str, int]


def _tally(
    store: RunStore, run: str, sent: set[tuple[int, str]], fault: str, recovery_seconds: float
) -> FaultResult:
    """The row for ``run``: ``sent`` are the (round, device) updates that alive selected devices
    published."""
    rows = store.db.execute(
        "SELECT round, device FROM messages WHERE run=? AND kind='update' AND direction='up'",
        (run,),
    ).fetchall()
    accepted = Counter((int(r), str(d)) for r, d in rows)
    return FaultResult(
        fault=fault,
        rounds_completed=len(store.rounds(run)),
        updates_sent=len(sent),
        updates_accepted=sum(accepted.values()),
        duplicates_aggregated=sum(n - 1 for n in accepted.values()),
        lost=len(sent - set(accepted)),
        recovery_seconds=round(recovery_seconds, 3),
        rejected_by_reason=store.rejection_counts(run),
    )


def _fleet_tally(
    store: RunStore, run: str, truth: Path, fault: str, t_fault: float, fault_round: int
) -> FaultResult:
    """``_tally`` with the fleet's truth records as what was sent, and the recovery from
    ``t_fault`` to the last update of ``fault_round``."""
    sent = {(r["round"], r["device"]) for r in read_truth(truth) if r["run"] == run}
    ends = store.db.execute(
        "SELECT MAX(t) FROM messages WHERE run=? AND round=? AND kind='update'", (run, fault_round)
    ).fetchone()[0]
    return _tally(store, run, sent, fault, max(0.0, float(ends or t_fault) - t_fault))


def broker_crash_run(
    artifact: ModelArtifact, tmp: Path, *, rounds: int = 3, crash_round: int = 2
) -> tuple[FaultResult, dict[int, Params], Path, str]:
    """A 4-device FedSGD run on a persistent mosquitto that is killed with SIGKILL as the first
    update of ``crash_round`` arrives and restarted on the same port. Returns the tally, the
    model after each round (0: initial) and the truth folder and run id."""
    broker = Mosquitto(tmp / "broker")
    run = "b" + uuid.uuid4().hex[:8]
    plan = RoundPlan(algorithm="fedsgd", lr=0.1, batch_size=8, deadline_s=180)
    store = RunStore(tmp / f"{run}.db")
    truth = tmp / f"truth-{run}"
    spec = fleet(run, broker.address, artifact, contiguous_shards([8] * DEVICES), truth)
    models: dict[int, Params] = {}
    t_fault = 0.0
    inbox: queue.Queue[Received] = queue.Queue()
    try:
        ready: list[str] = []
        watcher = make_client("watcher-" + uuid.uuid4().hex[:8], inbox,
                              subscriptions=(f"edgeleak/{run}/update/+",), on_ready=ready)  # fmt: skip
        watcher.connect(broker.address.host, broker.port)
        watcher.loop_start()
        wait_until(lambda: bool(ready), 30, "the watcher's subscriptions")
        with Coordinator(run, artifact, broker.address, store, plan) as coord, Fleet(spec) as f:
            coord.wait_for_devices(DEVICES, 120)
            models[0] = dict(coord.weights)
            for r in range(1, rounds + 1):
                if r != crash_round:
                    coord.run_round(r)
                    models[r] = dict(coord.weights)
                    continue
                while not inbox.empty():
                    inbox.get_nowait()
                done = threading.Event()

                def one_round(r: int = r, done: threading.Event = done) -> None:
                    coord.run_round(r)
                    models[r] = dict(coord.weights)
                    done.set()

                t = threading.Thread(target=one_round)
                t.start()
                inbox.get(timeout=120)  # the first update of the round is on the wire
                t_fault = time.time()
                broker.kill_and_restart()
                t.join(600)
                if not done.is_set():
                    raise RuntimeError(f"round {r} did not finish after the broker restart")
            coord.end()
            if f.restarts:
                raise RuntimeError(f"{f.restarts} fleet workers died")
        watcher.disconnect()
        watcher.loop_stop()
    finally:
        broker.close()
    return (
        _fleet_tally(store, run, truth, "broker_kill_9", t_fault, crash_round),
        models,
        truth,
        run,
    )


def dropout_run(
    artifact: ModelArtifact, broker: BrokerAddress, tmp: Path, *, rounds: int = 3
) -> FaultResult:
    """10 devices over 4 fleet workers; in round 2 the worker holding 3 of them (30%) is
    SIGKILLed after selection. The fleet restarts it; round 3 waits for its devices."""
    run = "k" + uuid.uuid4().hex[:8]
    plan = RoundPlan(algorithm="fedsgd", lr=0.1, batch_size=8, deadline_s=180)
    store = RunStore(tmp / f"{run}.db")
    truth = tmp / f"truth-{run}"
    spec = fleet(run, broker, artifact, contiguous_shards([8] * 10), truth, workers=4)
    fleets: list[Fleet] = []
    t_fault: list[float] = []

    def kill_in_round_2(round_: int, w: Params) -> Params:
        if round_ == 2:
            t_fault.append(time.time())
            os.kill(fleets[0].procs[0].pid or 0, signal.SIGKILL)
        return w

    coord = Coordinator(run, artifact, broker, store, plan, tamper=kill_in_round_2)
    with coord, Fleet(spec) as f:
        fleets.append(f)
        coord.wait_for_devices(10, 120)
        for r in range(1, rounds + 1):
            if r > 2:
                coord.wait_for_devices(10, 300)
            coord.run_round(r)
        coord.end()
    return _fleet_tally(store, run, truth, "device_sigkill_30pct", t_fault[0], 2)


REPO = Path(__file__).resolve().parents[1]
DEVICE_IN_LAB = "phone-1"


def device_in_lab(
    lab: NetLab, artifact: ModelArtifact, run: str, tmp_path: Path
) -> subprocess.Popen[str]:
    """A real ``edgeleak device`` (phone-low, 16 Fashion-MNIST examples) in namespace 0."""
    data = load_dataset("fashion-mnist")
    save_shard(tmp_path / "shard.npz", data.x_train[:16], data.y_train[:16])
    argv = device_argv(
        lab.broker_url, tmp_path / "shard.npz", artifact, run, DEVICE_IN_LAB,
        "--profile", "phone-low", "--exit-on-end",
    )  # fmt: skip
    return subprocess.Popen(
        lab.argv(0, argv), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@dataclass
class LabRun:
    """Rounds with a real device behind a shaped link, and what the lab saw."""

    results: list[RoundResult]
    output: str  # the device process's
    returncode: int | None
    retransmitted: int  # TCP segments the device resent
    dropped: list[int] | None  # packets the LossyWire dropped per direction (None: no wire)
    store: RunStore
    run: str


def rounds_in_lab(
    mosquitto: BrokerAddress,
    artifact: ModelArtifact,
    tmp_path: Path,
    link: LinkShape,
    rounds: int,
    deadline_s: float,
) -> LabRun:
    """Rounds 1..``rounds`` of LeNet FedSGD with one real device process behind ``link``."""
    run = "n" + uuid.uuid4().hex[:8]
    store = RunStore(tmp_path / "run.db")
    plan = RoundPlan(algorithm="fedsgd", lr=0.1, batch_size=8, deadline_s=deadline_s)
    with NetLab([link], mosquitto) as lab:
        proc = device_in_lab(lab, artifact, run, tmp_path)
        try:
            with Coordinator(run, artifact, mosquitto, store, plan) as coord:
                coord.wait_for_devices(1, 60)
                results = [coord.run_round(r) for r in range(1, rounds + 1)]
                coord.end()
            out, _ = proc.communicate(timeout=60)
            retransmitted = tcp_retransmitted(lab.argv(0, []))
        finally:
            proc.kill()
        dropped = lab.wires[0].dropped if lab.wired(0) else None
    return LabRun(results, out, proc.returncode, retransmitted, dropped, store, run)


def tcp_retransmitted(argv: list[str]) -> int:
    """Segments TCP retransmitted in a namespace (``/proc/net/snmp``), through ``argv`` prefix."""
    snmp = subprocess.run([*argv, "cat", "/proc/net/snmp"], capture_output=True, text=True).stdout
    names, values = (line.split() for line in snmp.splitlines() if line.startswith("Tcp:"))
    return int(values[names.index("RetransSegs")])


LOSSY = LinkShape(down_mbps=15.0, up_mbps=5.0, delay_ms=150.0, loss=0.01)
"""1% of packets lost each way, 300 ms RTT."""


def lossy_link_run(
    artifact: ModelArtifact, broker: BrokerAddress, tmp: Path, *, rounds: int = 3
) -> tuple[FaultResult, LabRun]:
    """A real device process in a namespace behind ``LOSSY`` for ``rounds`` LeNet FedSGD rounds
    (needs root). Sent: one update per round it was selected in; recovery: the slowest round."""
    lab = rounds_in_lab(broker, artifact, tmp, LOSSY, rounds, deadline_s=120)
    sent = {(i + 1, DEVICE_IN_LAB) for i, r in enumerate(lab.results) if r.selected}
    slowest = max(r.seconds for r in lab.results)
    return _tally(lab.store, lab.run, sent, "link_1pct_loss_300ms_rtt", slowest), lab
