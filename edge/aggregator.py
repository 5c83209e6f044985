"""The edge aggregator: one group of K devices (a household, a cell) answers as one client.

Torch-free (base install), so it runs on a Raspberry Pi beside its devices. Toward the
coordinator it is a device of the run (``edgeleak/<run>/task/<id>``, ``update/<id>``,
``status/<id>``); toward its devices it is the coordinator of the group's own run,
``<run>.<group>`` (``group_run``), to which the devices are pinned (``--run <run>.<group>``),
so that the coordinator never sees their individual updates::

    edgeleak/<run>.<group>/task/<device>    aggregator -> device   the coordinator's task, relayed
    edgeleak/<run>.<group>/update/<device>  device -> aggregator   the device's update
    edgeleak/<run>.<group>/status/<device>  device -> aggregator   the device's status (examples)
    edgeleak/<run>.<group>/control          aggregator -> devices  hello; the run's ``end``, relayed
    edgeleak/<run>/update/<aggregator>      aggregator -> coordinator  the group's update

The upstream update is the example-weighted mean of the group's updates with ``n`` = their total
examples (the sum is mean × n), so the coordinator's FedAvg over aggregators equals the flat
FedAvg over devices. Its ``group`` field (JSON) reports the group's traffic for the ledger:
``{"devices": K, "up": bytes, "down": bytes}`` (packet bytes, as the aggregator counted them).
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import paho.mqtt.client as mqtt

from edge import wire
from edge.device import Outgoing
from edge.manifest import ModelArtifact
from edge.mqtt import (
    QOS,
    BrokerAddress,
    Received,
    connect_with_backoff,
    make_client,
    publish_packet_bytes,
)

if TYPE_CHECKING:
    from edge.sign import Credentials

log = logging.getLogger(__name__)

Params = dict[str, np.ndarray]
RUNTIME = "aggregator"  # the ``runtime`` of its status and of its upstream updates
WAIT_FRACTION = 0.8  # by default the group waits this fraction of the task's deadline
MAX_GROUP_CHARS = 256


def example_counts(updates: Sequence[tuple[Params, int]]) -> list[int]:
    """The updates' example counts. A sequence that knows them without reading its updates
    says so with an ``examples`` list (``coordinator.spool.SpooledUpdates``)."""
    known = getattr(updates, "examples", None)
    return list(known) if known is not None else [n for _, n in updates]


def weighted_mean(updates: Sequence[tuple[Params, int]]) -> Params:
    """Mean of the updates weighted by their example counts (FedAvg, McMahan et al. 2017),
    accumulated in float64 in the given order; one pass over the updates (each is read once:
    ``coordinator.spool`` serves them from disk)."""
    if not updates:
        raise ValueError("no updates to aggregate")
    total = float(sum(example_counts(updates)))
    acc: dict[str, np.ndarray] = {}
    for p, n in updates:
        for k, v in p.items():
            if k not in acc:
                acc[k] = np.zeros(v.shape, np.float64)
            acc[k] += v.astype(np.float64) * (n / total)
    return {k: a.astype(np.float32) for k, a in acc.items()}


def group_run(run: str, group: str) -> str:
    """The run id of a group's own topics: ``<run>.<group>``."""
    for value, what in ((run, "run"), (group, "group")):
        if not value or any(c in value for c in "/+#.\0"):
            raise ValueError(f"{what} {value!r} must be non-empty and free of '/', '+', '#', '.'")
    return f"{run}.{group}"


@dataclass(frozen=True)
class GroupInfo:
    """What an upstream update says of its group: devices summed, their packet bytes."""

    devices: int
    up: int
    down: int

    def to_json(self) -> str:
        return json.dumps({"devices": self.devices, "up": self.up, "down": self.down})


def parse_group(raw: str) -> GroupInfo | None:
    """The ``group`` field of an update ("" for a plain device); ``WireError('bad_group')``."""
    if not raw:
        return None
    try:
        obj = json.loads(raw) if len(raw) <= MAX_GROUP_CHARS else None
        values = [obj[k] for k in ("devices", "up", "down")] if isinstance(obj, dict) else []
    except (ValueError, KeyError, RecursionError):
        values = []
    if len(values) != 3 or any(type(v) is not int or not 0 <= v < wire.MAX_INT for v in values):
        raise wire.WireError(
            "bad_group", f"{raw[:80]!r}: expected {{'devices': int, 'up': int, 'down': int}}"
        )
    if values[0] < 1:
        raise wire.WireError("bad_group", f"devices={values[0]}: expected >= 1")
    return GroupInfo(*values)


@dataclass
class _Round:
    task: wire.Task
    t0: float
    wait_s: float
    updates: dict[str, wire.Update] = field(default_factory=dict)
    nonces: set[str] = field(default_factory=set)
    up: int = 0
    down: int = 0


class EdgeAggregator:
    """The aggregator's state; ``handle`` turns one received message into messages to publish,
    ``tick`` closes a round whose wait is over. No I/O of its own."""

    def __init__(
        self,
        agg_id: str,
        run: str,
        group: str,
        devices: Sequence[str],
        artifact: ModelArtifact,
        *,
        wait_s: float | None = None,
        credentials: Credentials | None = None,
    ) -> None:
        """``wait_s``: how long a round waits for its devices (default: ``WAIT_FRACTION`` of the
        task's deadline); then the updates that arrived go upstream. ``credentials`` (secure
        mode, ``edge.sign``): the coordinator's tasks and the devices' updates must be signed by
        them; the relayed tasks and the upstream update are signed with the aggregator's key."""
        if not devices or len(set(devices)) != len(devices):
            raise ValueError(f"devices {list(devices)!r}: expected distinct device ids")
        self.agg_id = agg_id
        self.run = run
        self.sub = group_run(run, group)
        self.devices = tuple(devices)
        self.artifact = artifact
        self.wait_s = wait_s
        self.credentials = credentials
        self.announced: dict[str, int] = {}
        self.rejected: dict[str, int] = {}
        self.rounds_done = 0
        self.ends = wire.EndCommitments()
        self.ended = False
        self._online = False
        self._state: _Round | None = None
        self._last_round = -1
        self._seen_tasks: set[str] = set()
        self._residual: Params | None = None

    # -- identity --------------------------------------------------------------------------

    @property
    def status_topic(self) -> str:
        return wire.status_topic(self.run, self.agg_id)

    @property
    def subscriptions(self) -> tuple[str, ...]:
        prefix = f"{wire.TOPIC_PREFIX}/{self.sub}"
        return (
            wire.task_topic(self.run, self.agg_id),
            wire.control_topic(self.run),
            self.status_topic,
            f"{prefix}/update/+",
            f"{prefix}/status/+",
        )

    def status(self, state: str) -> bytes:
        info = {
            "state": state,
            "runtime": RUNTIME,
            "examples": sum(self.announced.values()),
            "devices": len(self.announced),
        }
        return json.dumps(info, sort_keys=True).encode()

    def client(
        self, inbox: queue.Queue[Received], protocol: int, on_ready: list[str]
    ) -> mqtt.Client:
        """Its MQTT client: "offline" as its last will; ``on_ready`` once subscribed."""
        return make_client(
            self.agg_id, inbox, protocol=protocol,
            will=(self.status_topic, self.status("offline")), subscriptions=self.subscriptions,
            on_ready=on_ready,
        )  # fmt: skip

    def _announce(self) -> Outgoing:
        self._online = True
        return Outgoing(self.status_topic, self.status("online"), kind="status", retain=True)

    def _reject(self, err: wire.WireError, who: str) -> None:
        self.rejected[err.reason] = self.rejected.get(err.reason, 0) + 1
        log.warning("aggregator %s: rejected %s from %s: %s", self.agg_id, err.reason, who, err)

    # -- messages --------------------------------------------------------------------------

    def handle(self, msg: Received) -> list[Outgoing]:
        """One message in, what to publish out (relayed tasks, the upstream update, status)."""
        try:
            run, channel, device = wire.parse_topic(msg.topic)
        except wire.WireError:
            return []
        if run == self.run:
            if channel == "control":
                if self.ends.accepts(run, msg.payload):
                    self.ended = True  # relay the genuine end to the group
                    return [Outgoing(wire.control_topic(self.sub), msg.payload, kind="control")]
                return [self._announce()] if msg.payload == wire.HELLO and self._ready() else []
            if channel == "status" and device == self.agg_id:
                forged = msg.payload != self.status("online") and self._online
                return [self._announce()] if forged else []
            if channel == "task" and device == self.agg_id:
                return self._relay(msg)
            return []
        if run != self.sub or device not in self.devices:
            return []
        if channel == "status":
            return self._on_status(msg, device)
        if channel == "update":
            self._collect(msg, device)
            return self.tick(msg.t)
        return []

    def _ready(self) -> bool:
        return set(self.announced) == set(self.devices)

    def _on_status(self, msg: Received, device: str) -> list[Outgoing]:
        try:
            status = json.loads(msg.payload)
            state, examples = status["state"], status.get("examples")
        except (ValueError, KeyError, TypeError, RecursionError):
            self._reject(wire.WireError("bad_status", msg.payload[:60].decode("replace")), device)
            return []
        before = self.status("online")
        if state == "online" and type(examples) is int and examples > 0:
            self.announced[device] = examples
        else:
            self.announced.pop(device, None)
        # Upstream, the group is online once every device is, with their total examples.
        if self._ready() and (not self._online or before != self.status("online")):
            return [self._announce()]
        return []

    def _relay(self, msg: Received) -> list[Outgoing]:
        try:
            if self.credentials is not None:
                from edge.sign import COORDINATOR

                self.credentials.verifier.check(msg.payload, COORDINATOR, role=COORDINATOR)
            task = wire.decode_task(msg.payload, self.artifact.manifest)
            if task.run != self.run or task.device != self.agg_id:
                raise wire.WireError("not_mine", f"task for {task.run[:40]}/{task.device[:40]}")
            if task.model_hash != self.artifact.manifest.sha256:
                raise wire.WireError("model_mismatch", f"task model {task.model_hash[:12]}")
            if task.nonce in self._seen_tasks or task.round <= self._last_round:
                raise wire.WireError("stale_round", f"round {task.round} (nonce {task.nonce})")
            if task.decoys:
                raise wire.WireError("no_decoys", "decoys do not pass through an aggregator")
        except wire.WireError as e:
            self._reject(e, "the coordinator")
            return []
        self._seen_tasks.add(task.nonce)
        self._last_round = task.round
        self.ends.add(self.run, task.end)
        wait = self.wait_s if self.wait_s is not None else WAIT_FRACTION * task.deadline_s
        st = _Round(task, msg.t, wait)
        self._state = st
        out = []
        signer = self.credentials.signer if self.credentials is not None else None
        for d in self.devices:
            sub_task = wire.Task(
                run=self.sub, round=task.round, device=d, algorithm=task.algorithm, lr=task.lr,
                epochs=task.epochs, batch_size=task.batch_size, model_hash=task.model_hash,
                weights=task.weights, deadline_s=wait, codec=task.codec, uplink=task.uplink,
                end=task.end, protect=task.protect,
            )  # fmt: skip
            topic, payload = wire.task_topic(self.sub, d), wire.encode_task(sub_task, signer=signer)
            st.down += publish_packet_bytes(topic, len(payload), QOS, protocol=msg.protocol)
            out.append(Outgoing(topic, payload, kind="task", run=self.sub, round=task.round))
        return out

    def _collect(self, msg: Received, device: str) -> None:
        st = self._state
        try:
            if self.credentials is not None:
                self.credentials.verifier.check(msg.payload, device, role="device")
            update = wire.decode_update(msg.payload, self.artifact.manifest)
            if st is None or update.round != st.task.round or update.run != self.sub:
                raise wire.WireError("stale_round", f"{update.run[:40]} round {update.round}")
            if update.device != device:
                raise wire.WireError("device_mismatch", f"{update.device!r} on {device!r}")
            if device in st.updates or update.nonce in st.nonces:
                raise wire.WireError("duplicate", f"{device} already answered")
            if update.kind != ("gradient" if st.task.algorithm == "fedsgd" else "delta"):
                raise wire.WireError("bad_kind", f"{update.kind!r} in a {st.task.algorithm} round")
            if update.num_examples > self.announced.get(device, 0):
                raise wire.WireError("bad_examples", f"n={update.num_examples} > announced")
        except wire.WireError as e:
            self._reject(e, device)
            return
        st.updates[device] = update
        st.nonces.add(update.nonce)
        st.up += msg.packet_bytes

    def tick(self, now: float) -> list[Outgoing]:
        """The upstream update once every device answered or the wait is over (none if no
        device answered)."""
        st = self._state
        if st is None or (len(st.updates) < len(self.devices) and now - st.t0 < st.wait_s):
            return []
        self._state = None
        if not st.updates:
            log.warning("aggregator %s: no update in round %d", self.agg_id, st.task.round)
            return []
        return [self._upstream(st)]

    def _upstream(self, st: _Round) -> Outgoing:
        # Canonical order (device id), as the coordinator's, so one group of all devices is
        # bit-identical to the flat run.
        ordered = [st.updates[d] for d in sorted(st.updates)]
        n = sum(u.num_examples for u in ordered)
        mean = weighted_mean([(u.params, u.num_examples) for u in ordered])
        losses = [u.train_loss for u in ordered]
        loss = sum(u.num_examples * x for u, x in zip(ordered, losses, strict=True)) / n
        codec = wire.get_codec(st.task.uplink)
        tensors, corrected, self._residual = codec.compress(
            mean, self._residual, self.artifact.manifest
        )
        defences = {u.defence for u in ordered}
        update = wire.Update(
            run=self.run, round=st.task.round, device=self.agg_id, kind=ordered[0].kind,
            num_examples=n, params=corrected, train_loss=loss if math.isfinite(loss) else math.nan,
            runtime=RUNTIME, codec=codec.name,
            defence=defences.pop() if len(defences) == 1 else "{}",
            group=GroupInfo(len(ordered), st.up, st.down).to_json(),
        )  # fmt: skip
        signer = self.credentials.signer if self.credentials is not None else None
        payload = wire.encode_update(update, tensors=tensors, signer=signer)
        topic = wire.update_topic(self.run, self.agg_id)
        self.rounds_done += 1
        return Outgoing(
            topic, payload, run=self.run, round=st.task.round, examples=n, loss=update.train_loss,
            packet_bytes=publish_packet_bytes(topic, len(payload), QOS),
            seconds=time.monotonic() - st.t0,
        )  # fmt: skip


def run_aggregator(
    agg: EdgeAggregator,
    broker: BrokerAddress,
    *,
    stop: threading.Event | None = None,
    exit_on_end: bool = True,
    say: Callable[[str], None] = log.info,
) -> None:
    """Run the aggregator on its own MQTT connection until ``stop`` or (``exit_on_end``) the
    run's genuine ``end``, which it relays to its group first."""
    inbox: queue.Queue[Received] = queue.Queue()
    ready: list[str] = []
    client = agg.client(inbox, broker.protocol, ready)
    stop = stop or threading.Event()
    if not connect_with_backoff(client, broker, stop=stop, say=say, identity=agg.agg_id):
        return
    client.loop_start()
    hello = 0
    try:
        while not stop.is_set() and not (exit_on_end and agg.ended):
            try:
                out = agg.handle(inbox.get(timeout=0.1))
            except queue.Empty:
                out = agg.tick(time.monotonic())
            if len(ready) > hello:  # (re)subscribed: ask the group's devices to announce
                hello = len(ready)
                client.publish(wire.control_topic(agg.sub), wire.HELLO, qos=QOS)
            for o in out:
                client.publish(o.topic, o.payload, qos=QOS, retain=o.retain).wait_for_publish(60)
                if o.kind == "update":
                    say(o.line(agg.agg_id))
    finally:
        if client.is_connected():
            client.publish(
                agg.status_topic, agg.status("offline"), qos=QOS, retain=True
            ).wait_for_publish(5)
        client.disconnect()
        client.loop_stop()


def main(argv: list[str], prog: str = "python -m edge aggregate") -> int:
    """``python -m edge aggregate --broker URL --run RUN --group G --devices d0,d1 --model DIR``."""
    import argparse
    import signal
    import sys

    from edge.args import OneLineParser, secure_broker

    p = OneLineParser(prog=prog, description="Run one edge aggregator for a group of devices.")
    p.add_argument(
        "--broker", required=True, help="mqtt://[USER:PASSWORD@]HOST:PORT, or mqtts:// with --pki"
    )
    p.add_argument("--pki", help="PKI folder with this aggregator's identity (secure mode)")
    p.add_argument("--run", required=True, help="the coordinator's run id")
    p.add_argument("--group", required=True, help="the group name: devices use --run RUN.GROUP")
    p.add_argument("--devices", required=True, help="comma-separated device ids of the group")
    p.add_argument("--model", required=True, help="model folder with manifest.json")
    p.add_argument("--id", help="the aggregator's id toward the coordinator (default: agg-GROUP)")
    p.add_argument(
        "--wait-s", type=float, default=None,
        help=f"how long a round waits for the group (default: {WAIT_FRACTION} × the deadline)",
    )  # fmt: skip
    args: argparse.Namespace = p.parse_args(argv)
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    agg_id = args.id or f"agg-{args.group}"
    try:
        broker, credentials = secure_broker(args.broker, args.pki, agg_id)
        artifact = ModelArtifact.load(args.model)
        agg = EdgeAggregator(
            agg_id, args.run, args.group, devices, artifact, wait_s=args.wait_s,
            credentials=credentials,
        )  # fmt: skip
    except (ValueError, OSError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    print(f"aggregator {agg.agg_id}: {len(devices)} devices on run {agg.sub}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    run_aggregator(agg, broker, stop=stop, say=lambda line: print(line, flush=True))
    refused = ", ".join(f"{k} {v}" for k, v in sorted(agg.rejected.items())) or "none"
    print(f"aggregator {agg.agg_id}: {agg.rounds_done} updates; rejected: {refused}", flush=True)
    return 0
