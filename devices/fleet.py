"""Fleet emulation: N devices on this machine, each with its own MQTT connection.

Devices are sharded over worker processes; inside a worker one selector loop drives all its
paho clients (``socket()``, ``loop_read()``, ``loop_write()``, ``loop_misc()``), since paho's own
loops use ``select()`` and stall past ~333 clients per process. Each worker opens the model once
per runtime: the gradient graph takes the parameters as inputs, so one session serves every device.

Real-time mode (``FleetSpec.realtime``): each device holds its update back until its profile's
round time (compute + link + RTT, ``devices.clock.hold_seconds``) has passed in wall time since
its task arrived; the selector loop schedules the publish and never sleeps on it.
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import multiprocessing as mp
import os
import queue
import resource
import selectors
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import paho.mqtt.client as mqtt

from devices.orphans import die_with_parent
from edge.backends import Backend, load_backend
from edge.codec import keep_message_buffers
from edge.device import Device, Outgoing, SpillFile, TaskLimits, TrainingRecord
from edge.manifest import ModelArtifact
from edge.mqtt import QOS, BrokerAddress, Received, connect, parse_broker_url
from edge.poison import parse_poison
from edge.wire import EndCommitments

if TYPE_CHECKING:
    from edge.sign import Credentials

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceSpec:
    """One emulated device: its id, its examples (indices into the training set), its runtime."""

    device_id: str
    indices: np.ndarray = field(repr=False)
    runtime: str = "onnx"
    seed: int = 0
    profile: str = ""
    key: bytes | None = field(default=None, repr=False)  # secret for decoys (edge.decoy)
    poison: str = ""  # a malicious device's edge.poison spec ("" honest)


@dataclass(frozen=True)
class FleetSpec:
    run: str
    broker_url: str = field(repr=False)  # may hold the broker password (BrokerAddress.secret_url)
    model_dir: str
    dataset: str
    devices: tuple[DeviceSpec, ...]
    workers: int = 2
    truth_dir: str | None = None  # where each worker writes which examples every update used
    realtime: bool = False  # hold each update for its device profile's round time
    flops_per_example: float = 0.0  # the model's training cost (real-time mode)
    speed_scale: float = 1.0  # profile speeds relative to as cited (devices.clock)
    limits: TaskLimits = field(default_factory=TaskLimits)  # what a task may ask of a device
    max_restarts: int = 3  # a worker that dies is started again this many times at most
    # Public examples decoy updates train on: "" none, "test" the dataset's test split (a
    # stand-in for public data of the same domain).
    decoy_pool: str = ""
    verify_model: bool = False  # devices train only on the model announced to the run
    site: str = ""  # the site broker the devices connect to, bridged to the coordinator's


class StopFlag(Protocol):
    """``threading.Event`` or ``SharedFlag``."""

    def is_set(self) -> bool: ...


class SharedFlag:
    """A stop flag shared with worker processes through one byte of shared memory, without a
    lock. A ``multiprocessing.Event`` takes a semaphore on every ``is_set``: a worker killed
    (SIGKILL) while holding it would leave ``set`` blocked forever in the parent."""

    def __init__(self) -> None:
        self._byte = mp.get_context("spawn").RawValue("b", 0)

    def set(self) -> None:
        self._byte.value = 1

    def is_set(self) -> bool:
        return bool(self._byte.value)


# Seconds after a task's arrival before the device's update may be published.
HoldFn = Callable[[Device, Received, Outgoing], float]


class SelectorLoop:
    """Drives many paho clients from one selector, in the calling thread."""

    RECONNECT_S = 1.0  # how often clients whose socket closed try again
    # How often every client's keepalive is checked: devices keep alive for 120 s (the broker
    # waits 1.5 times that); a check of 5,000 clients takes tens of ms.
    KEEPALIVE_SWEEP_S = 10.0

    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self.clients: set[mqtt.Client] = set()
        self.lost: set[mqtt.Client] = set()  # socket closed: reconnect on the next ``misc``
        self._last_misc = self._last_sweep = time.monotonic()

    def add(self, client: mqtt.Client) -> None:
        def opened(c: mqtt.Client, _u: Any, sock: Any) -> None:
            self.sel.register(sock, selectors.EVENT_READ, c)

        def closed(c: mqtt.Client, _u: Any, sock: Any) -> None:
            self.lost.add(c)
            try:
                self.sel.unregister(sock)
            except (KeyError, ValueError):
                pass

        def want_write(c: mqtt.Client, _u: Any, sock: Any) -> None:
            self.sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, c)

        def done_write(c: mqtt.Client, _u: Any, sock: Any) -> None:
            try:
                self.sel.modify(sock, selectors.EVENT_READ, c)
            except (KeyError, ValueError, OSError):  # the socket or the selector is closed
                pass

        client.on_socket_open = opened
        client.on_socket_close = closed
        client.on_socket_register_write = want_write
        client.on_socket_unregister_write = done_write
        self.clients.add(client)

    def drop(self, client: mqtt.Client) -> None:
        """Stop keeping ``client`` alive and connected (it leaves on purpose)."""
        self.clients.discard(client)

    def poll(self, timeout: float) -> None:
        """Serve every ready socket once."""
        for key, mask in self.sel.select(timeout):
            c: mqtt.Client = key.data
            if mask & selectors.EVENT_READ:
                c.loop_read()
            if mask & selectors.EVENT_WRITE and c.want_write():
                c.loop_write()

    def misc(self) -> None:
        """When due: reconnect the clients whose socket closed (every ``RECONNECT_S``), and
        check every client's keepalive, a ping where one is due (every ``KEEPALIVE_SWEEP_S``)."""
        now = time.monotonic()
        if now - self._last_misc < self.RECONNECT_S:
            return
        sweep = now - self._last_sweep >= self.KEEPALIVE_SWEEP_S
        clients = list(self.clients if sweep else self.lost & self.clients)
        self.lost = set()
        self._last_misc, self._last_sweep = now, (now if sweep else self._last_sweep)
        for c in clients:
            if c.loop_misc() == mqtt.MQTT_ERR_NO_CONN:
                try:
                    c.reconnect()
                except OSError as e:
                    log.warning("reconnect failed: %s", e)
                    self.lost.add(c)


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run_devices(
    devices: list[Device],
    broker: BrokerAddress,
    *,
    idle_exit_s: float | None = None,
    stop: StopFlag | None = None,
    connect_batch: int = 50,
    hold: HoldFn | None = None,
) -> None:
    """Run ``devices`` on one selector loop until one of them accepts a genuine ``end`` (its
    token matches a task's commitment: ``Device.ended``; forged ends are ignored) or ``stop``
    is set (a worker none of whose devices got a task holds no commitment).

    With ``hold``, an update is published ``hold(device, task, update)`` seconds after its task
    arrived (at once if training took longer); updates still held at ``end`` are dropped.
    """
    _raise_fd_limit()
    inbox: queue.Queue[Received] = queue.Queue()
    loop = SelectorLoop()
    clients: dict[str, mqtt.Client] = {}
    by_id = {d.device_id: d for d in devices}
    for d in devices:
        c = d.client(inbox, broker.protocol)
        loop.add(c)
        clients[d.device_id] = c
    for i, (device_id, c) in enumerate(clients.items()):
        connect(c, broker, keepalive=120, identity=device_id)
        if i % connect_batch == connect_batch - 1:
            loop.poll(0)  # let CONNACKs flow while the rest connect
    ended = False
    held: list[tuple[float, int, str, Outgoing]] = []  # (due, order, device, update): a heap
    order = itertools.count()
    last_msg = time.monotonic()
    while not ended and not (stop is not None and stop.is_set()):
        wait = 0.05 if not held else min(0.05, max(0.0, held[0][0] - time.monotonic()))
        loop.poll(0 if not inbox.empty() else wait)
        now = time.monotonic()
        while held and held[0][0] <= now:
            _, _, device_id, due_out = heapq.heappop(held)
            clients[device_id].publish(due_out.topic, due_out.payload, qos=QOS)
        loop.misc()
        try:
            msg = inbox.get_nowait()
        except queue.Empty:
            if idle_exit_s is not None and not held and now - last_msg > idle_exit_s:
                break
            continue
        last_msg = now
        device = by_id.get(msg.client)
        if device is None:
            continue
        if device.ended(msg) is not None:
            ended = True
            continue
        for out in device.handle_safely(msg):
            if hold is None or out.kind in ("status", "resend"):
                clients[device.device_id].publish(
                    out.topic, out.payload, qos=QOS, retain=out.retain
                )
            else:  # updates and decoys alike, so that timing does not tell them apart
                due = msg.t + hold(device, msg, out)
                heapq.heappush(held, (due, next(order), device.device_id, out))
    for d in devices:
        clients[d.device_id].publish(d.status_topic, d.status("offline"), qos=QOS, retain=True)
    _flush(loop, list(clients.values()), timeout=30)
    for c in clients.values():
        c.disconnect()
    _flush(loop, list(clients.values()), timeout=5)


def _flush(loop: SelectorLoop, clients: list[mqtt.Client], timeout: float) -> None:
    end = time.monotonic() + timeout
    while any(c.want_write() for c in clients) and time.monotonic() < end:
        loop.poll(0.02)


# -- worker processes -----------------------------------------------------------------------------


def _worker(
    spec: FleetSpec,
    shard: list[DeviceSpec],
    worker_id: int,
    parent_pid: int,
    stop: StopFlag | None = None,
) -> None:
    die_with_parent(parent_pid)
    # Ctrl-C in a terminal reaches the whole process group: the parent ends the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING)
    keep_message_buffers()
    serve_shard(spec, shard, worker_id, stop)


def shards(spec: FleetSpec) -> list[list[DeviceSpec]]:
    """The devices of each worker: device i goes to worker i mod ``spec.workers``."""
    n = max(1, min(spec.workers, len(spec.devices)))
    return [list(spec.devices[w::n]) for w in range(n)]


def serve_shard(
    spec: FleetSpec, shard: list[DeviceSpec], worker_id: int, stop: StopFlag | None = None
) -> None:
    """One worker's devices, each with its data and one runtime session per runtime, on one
    selector loop until the run ends or ``stop`` is set (a process of ``Fleet`` or a Ray actor
    of ``devices.ray_fleet``)."""
    from devices.datasets import load_dataset

    data = load_dataset(spec.dataset)
    artifact = ModelArtifact.load(spec.model_dir)
    backends: dict[str, Backend] = {}
    truth = None
    if spec.truth_dir:
        Path(spec.truth_dir).mkdir(parents=True, exist_ok=True)
        truth = open(Path(spec.truth_dir) / f"worker-{worker_id}.jsonl", "a")  # noqa: SIM115

    pool = (data.x_test, data.y_test) if spec.decoy_pool == "test" else None
    broker = parse_broker_url(spec.broker_url)
    credentials = _credentials(broker.pki, [ds.device_id for ds in shard])
    devices = []
    ends = EndCommitments()  # one for the worker: its devices serve one run
    spill = SpillFile()  # the devices' last updates, kept on disk (one file per worker)
    for ds in shard:
        if ds.runtime not in backends:
            backends[ds.runtime] = load_backend(ds.runtime, artifact)
        on_trained = None
        if truth is not None:
            on_trained = _truth_writer(truth, ds.indices)
        devices.append(
            Device(
                ds.device_id,
                spec.run,
                artifact,
                backends[ds.runtime],
                data.x_train[ds.indices],
                data.y_train[ds.indices],
                seed=ds.seed,
                profile=ds.profile,
                on_trained=on_trained,
                limits=spec.limits,
                ends=ends,
                public=(data.x_test, data.y_test),  # held out from every device's data
                key=ds.key,
                decoy_data=pool,
                credentials=credentials.get(ds.device_id),
                poison=parse_poison(ds.poison) if ds.poison else None,
                verify_model=spec.verify_model,
                spill=spill,
                site=spec.site,
            )
        )
    try:
        run_devices(devices, broker, hold=_realtime_hold(spec, shard), stop=stop)
    finally:
        spill.close()
        if truth is not None:
            truth.close()


def _credentials(pki: str | None, ids: list[str]) -> dict[str, Credentials]:
    """Secure mode (a PKI folder): each device's signer, one verifier for all of them."""
    if pki is None:
        return {}
    from edge.sign import Credentials, Signer, Verifier

    verifier = Verifier(pki)
    return {d: Credentials(Signer.load(pki, d), verifier) for d in ids}


def _realtime_hold(spec: FleetSpec, shard: list[DeviceSpec]) -> HoldFn | None:
    """In real-time mode, each device's hold from its profile; ``None`` otherwise."""
    if not spec.realtime:
        return None
    from devices.clock import hold_seconds
    from devices.profiles import load_profile

    profiles = {ds.device_id: load_profile(ds.profile) for ds in shard}

    def hold(device: Device, task: Received, out: Outgoing) -> float:
        return hold_seconds(
            profiles[device.device_id],
            task,
            out.topic,
            out.payload,
            flops_per_example=spec.flops_per_example,
            speed_scale=spec.speed_scale,
        )

    return hold


def _truth_writer(f: Any, indices: np.ndarray) -> Any:
    def write(rec: TrainingRecord) -> None:
        f.write(
            json.dumps(
                {
                    "run": rec.run,
                    "round": rec.round,
                    "device": rec.device,
                    "examples": indices[rec.used].tolist(),
                    "seconds": rec.seconds,
                }
            )
            + "\n"
        )
        f.flush()

    return write


def read_truth(truth_dir: str | Path) -> list[dict[str, Any]]:
    """Every training record the fleet wrote (ground truth for the leakage evaluator only)."""
    out: list[dict[str, Any]] = []
    for p in sorted(Path(truth_dir).glob("worker-*.jsonl")):
        out.extend(json.loads(line) for line in p.read_text().splitlines() if line)
    return out


class Fleet:
    """Start the fleet's worker processes for the block; they exit on the run's ``end``, and at
    the latest when the block ends.

    A worker that dies (crash, kill) is started again with the same devices, up to
    ``spec.max_restarts`` times: its devices miss the round they were in, then come back online.
    Workers die with this process, even when it is killed with SIGKILL.
    """

    def __init__(self, spec: FleetSpec) -> None:
        if not spec.devices:
            raise ValueError("a fleet needs at least one device")
        if spec.realtime and (missing := [d.device_id for d in spec.devices if not d.profile]):
            raise ValueError(
                f"real-time mode needs a profile per device; none for {missing[:5]} "
                f"(set DeviceSpec(profile=...), e.g. rpi4)"
            )
        if spec.decoy_pool not in ("", "test"):
            raise ValueError(f"decoy_pool={spec.decoy_pool!r}: expected '' or 'test'")
        self.spec = spec
        self.procs: list[mp.process.BaseProcess] = []
        self.restarts = 0  # workers started again after dying
        self._restarts: list[int] = []
        self._stopping = threading.Event()  # no more restarts
        self._lock = threading.Lock()  # a restart and the stop do not interleave
        self._done = threading.Event()  # every worker joined: the watcher may end
        self._watcher: threading.Thread | None = None
        self._stop = SharedFlag()  # tells the workers the block is over

    def _start(self, w: int) -> mp.process.BaseProcess:
        shard = shards(self.spec)[w]
        p = mp.get_context("spawn").Process(
            target=_worker,
            args=(self.spec, shard, w, os.getpid(), self._stop),
            name=f"fleet-{w}",
            daemon=True,
        )
        p.start()
        return p

    def __enter__(self) -> Fleet:
        n = len(shards(self.spec))
        self.procs = [self._start(w) for w in range(n)]
        self._restarts = [0] * n
        # The watcher starts the restarted workers, so it lives until they are joined
        # (a Linux parent-death signal follows the thread that started the child).
        self._watcher = threading.Thread(target=self._watch, name="fleet-watch", daemon=True)
        self._watcher.start()
        return self

    def _watch(self) -> None:
        while not self._done.wait(0.2):
            for w, p in enumerate(self.procs):
                if p.exitcode in (None, 0) or self._restarts[w] >= self.spec.max_restarts:
                    continue
                with self._lock:
                    if self._stopping.is_set():
                        break
                    self._restarts[w] += 1
                    self.restarts += 1
                    log.warning(
                        "fleet worker %d exited with %s; starting it again (%d of %d)",
                        w, p.exitcode, self._restarts[w], self.spec.max_restarts,
                    )  # fmt: skip
                    self.procs[w] = self._start(w)

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def __exit__(self, exc_type: object, *exc: object) -> None:
        with self._lock:
            self._stopping.set()
        self._stop.set()  # the run is over for this fleet, whether or not its end arrived
        if exc_type is None:
            for p in list(self.procs):
                p.join(timeout=30)
        for p in list(self.procs):
            if p.is_alive():
                p.terminate()
                p.join(5)
        self._done.set()
        if self._watcher is not None:
            self._watcher.join(5)
