"""The coordinator: selects devices, broadcasts tasks, collects and validates updates, aggregates,
evaluates and records every message in the byte ledger."""

from __future__ import annotations

import dataclasses
import logging
import queue
import secrets
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
import paho.mqtt.client as mqtt

from coordinator import dropout, policy, robust
from coordinator import secagg as secure
from coordinator.spool import UpdateSpool
from coordinator.store import AnomalyRow, MessageRow, PrivacyRow, RoundResult, RunStore
from edge import decoy, protect, wire
from edge.aggregator import GroupInfo, parse_group
from edge.codec import MAX_HEADER_BYTES, params_sha256
from edge.manifest import ModelArtifact
from edge.mqtt import (
    QOS,
    BrokerAddress,
    Received,
    connect,
    make_client,
    publish_packet_bytes,
    wait_until,
)
from edge.secagg import up_filter as secagg_filter
from edge.train import examples_processed
from edge.wire import UPDATE_KIND, Params

if TYPE_CHECKING:
    from coordinator.accounting import PrivacyLedger
    from coordinator.he import HECoordinator
    from edge.sign import Credentials

log = logging.getLogger(__name__)

Evaluator = Callable[[Params], tuple[float, float]]
# A dishonest coordinator: (round, global weights) -> the weights it actually ships.
Tamper = Callable[[int, Params], Params]
# A dishonest coordinator that ships each device its own model: (round, device, weights) -> them.
DeviceTamper = Callable[[int, str, Params], Params]
# Nonces of accepted updates are kept for the current round and this many before it; an older
# update is a stale_round whatever its nonce.
NONCE_ROUNDS = 2


def new_run_id(prefix: str = "run") -> str:
    """``<prefix>-<UTC time>-<8 random hex digits>``: sortable, and unpredictable (``secrets``)."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(4)}"


class RoundClock(Protocol):
    """Virtual time of emulated devices (``devices.clock.VirtualClock``): who is online in a
    round, and how many seconds after the broadcast an update would have arrived."""

    def available(self, device: str, round_: int) -> bool: ...

    def arrival(self, device: str, *, examples: int, bytes_down: int, bytes_up: int) -> float: ...


@dataclass(frozen=True)
class RoundPlan:
    """How every round runs. FedSGD: w <- w - server_lr*lr*mean(g); FedAvg: w <- w + server_lr*mean(delta)."""

    algorithm: str = "fedavg"
    lr: float = 0.1
    epochs: int = 1
    batch_size: int = 16
    fraction: float = 1.0
    deadline_s: float = 120.0
    server_lr: float = 1.0
    aggregator: str = "mean"
    codec: str = "f32"  # the devices' uplink codec; tasks go dense (f16 when this is f16)
    # An update whose n is above this, or above the examples its device announced, is refused.
    max_examples: int = 100_000
    max_unproven: int = 0  # > 0: at most max(this, proven devices) unproven ones per round
    unproven_quiet_s: float = 0.0  # > 0: stop waiting for unproven devices after this quiet
    protect: str = ""  # client-side protections (edge.protect spec), sent in every task
    dp_delta: float = 1e-5  # δ at which ε is accounted (with a DP protection)
    decoys: int = 0  # decoy updates per device and round (needs every device's key)
    secagg: str = ""  # secure aggregation (edge.secagg spec, e.g. "k=0,t=0.5,clip=1,bits=16")
    he: bool = False  # CKKS updates added here, decrypted by the key holder (coordinator.he)
    # announce each round's global weights on the control topic before the tasks, for devices
    # that verify the model's consistency (they train only on it: wire.model_announcement)
    verify_model_consistency: bool = False
    # Size limits (README "Reliability"): an update message, its container header, and how many
    # devices may be online at once (more online statuses are refused: too_many_devices).
    max_payload_bytes: int = wire.MAX_MESSAGE_BYTES
    max_header_bytes: int = MAX_HEADER_BYTES
    max_devices_online: int = 20_000
    # Pace steering: at most this many selected devices hold a task they have not answered;
    # the others get theirs in selection order as answers come in. 0: every task at once.
    max_concurrent: int = 1000

    @property
    def task_codec(self) -> str:
        return self.codec if self.codec in wire.DENSE_CODECS else "f32"


@dataclass(frozen=True)
class _Slot:
    """Who a pseudonym belongs to (decoys on): the device, the round, real or decoy."""

    device: str
    round: int
    real: bool


@dataclass
class _RoundState:
    round: int
    selected: set[str]
    heard: set[str] = field(default_factory=set)  # tasked devices that sent an update
    last_answer: float | None = None  # monotonic time of the last update from a selected device
    accepted: dict[str, wire.Update] = field(default_factory=dict)
    rejections: dict[str, int] = field(default_factory=dict)
    bytes_up: int = 0  # accepted updates and this round's decoys
    bytes_rejected: int = 0  # rejected messages on the update and status topics
    lost: set[str] = field(default_factory=set)  # selected devices that went offline
    late: set[str] = field(default_factory=set)  # updates dropped as stragglers
    decoy_up: dict[str, int] = field(default_factory=dict)  # packet bytes of each one's decoys
    decoy_n: dict[str, int] = field(default_factory=dict)  # decoys of each device so far
    down: dict[str, int] = field(default_factory=dict)  # packet bytes of each device's task
    up: dict[str, int] = field(default_factory=dict)  # packet bytes of each accepted update
    waiting: deque[str] = field(default_factory=deque)  # selected, task not sent yet (paced)
    tasked: set[str] = field(default_factory=set)  # selected devices sent their task
    # tasked and not answered yet; a device that went offline before its turn still gets its
    # task (a forged offline must not cost it the round) but holds no slot
    open: set[str] = field(default_factory=set)
    weights: Params = field(default_factory=dict)  # what this round's tasks ship
    bytes_down: int = 0  # the round's tasks (and model announcement) so far

    def answered(self, device: str) -> None:
        """``device`` accepted, or not waited for any longer: its slot goes to the next one."""
        self.open.discard(device)


class Coordinator:
    """One run's server side over MQTT. Use as a context manager (connects, subscribes, stops)."""

    def __init__(
        self,
        run: str,
        artifact: ModelArtifact,
        broker: BrokerAddress,
        store: RunStore,
        plan: RoundPlan,
        *,
        evaluator: Evaluator | None = None,
        seed: int = 0,
        weights: Params | None = None,
        clock: RoundClock | None = None,
        collect_timeout_s: float = 600.0,
        tamper: Tamper | None = None,
        tamper_device: DeviceTamper | None = None,
        keys: Mapping[str, bytes] | None = None,
        credentials: Credentials | None = None,
    ) -> None:
        """With a ``clock``, ``plan.deadline_s`` is virtual: rounds select available devices only,
        wait in real time (up to ``collect_timeout_s``) for every selected device, then drop the
        updates whose virtual arrival is after the deadline (rejection ``straggler``).
        ``keys``: every device's secret key, needed when ``plan.decoys`` > 0 to tell its real
        update from its decoys (``edge.decoy``). ``credentials`` (secure mode, ``edge.sign``):
        tasks are signed with the coordinator's key; an update must be signed by the enrolled,
        unrevoked device of its topic, and a revoked or unknown device's status is refused.
        ``tamper`` / ``tamper_device`` (dishonest-server experiments): the weights shipped to
        every device / to each device (LOKI) instead of the global model."""
        if plan.algorithm not in UPDATE_KIND:
            raise ValueError(
                f"algorithm {plan.algorithm!r}; expected one of {', '.join(UPDATE_KIND)}"
            )
        wire.check_codec(plan.codec)
        # decoys: one protection step (decoys:k=K); plan.decoys is its alias (folded in here)
        spec = protect.with_decoys(plan.protect, plan.decoys)
        plan = dataclasses.replace(
            plan, protect=spec, decoys=protect.decoy_count(protect.parse(spec))
        )
        if not 0 <= plan.decoys <= wire.MAX_DECOYS:
            raise ValueError(f"decoys={plan.decoys}: expected 0..{wire.MAX_DECOYS}")
        if plan.decoys and not keys:
            raise ValueError("decoys need every device's key (keys={device: key})")
        self.keys: dict[str, bytes] = dict(keys or {})
        if credentials is not None and plan.decoys:
            raise ValueError("decoys publish under pseudonyms, which secure mode's ACL refuses")
        self.credentials = credentials
        self.secagg = secure.check_plan(plan.secagg, decoys=plan.decoys, codec=plan.codec,
                                        aggregator=plan.aggregator, protect=plan.protect) if plan.secagg else None  # fmt: skip
        self.secagg_round: secure.SecAggRound | None = None
        self._slots: dict[str, _Slot] = {}  # pseudonym -> owner, this round and the last
        self.run = run
        self.artifact = artifact
        self.manifest = artifact.manifest
        self.broker = broker
        self.store = store
        self.plan = plan
        self.defence = robust.get_defence(plan.aggregator)
        self.protections = protect.parse(plan.protect)
        self.dp = protect.dp_step(self.protections)
        protect.require_secagg(self.protections, secagg=bool(plan.secagg))
        if isinstance(self.dp, protect.CentralDP) and plan.aggregator != "mean":
            raise ValueError(
                f"central_dp replaces the aggregator; use aggregator 'mean', not {plan.aggregator!r}"
            )
        self.privacy: PrivacyLedger | None = None
        if self.dp is not None:
            from coordinator.accounting import PrivacyLedger

            sigma = protect.require_sigma(self.dp)
            self.privacy = PrivacyLedger(self.dp, sigma, plan.dp_delta)
        self.he: HECoordinator | None = None
        if plan.he:
            from coordinator.he import HECoordinator

            if plan.aggregator != "mean" or self.dp is not None or plan.decoys:
                raise ValueError("he adds ciphertexts: use aggregator 'mean', no DP, no decoys")
            self.he = HECoordinator(run, artifact.manifest)
        self.evaluator = evaluator
        self.seed = seed
        self.clock = clock
        self.tamper = tamper
        self.tamper_device = tamper_device
        # the aggregate this coordinator learned in its last round (secure aggregation: the
        # survivors' mean, all it ever sees); None before any, or when nothing arrived
        self.revealed: Params | None = None
        self.collect_timeout_s = collect_timeout_s
        self.weights: Params = weights if weights is not None else artifact.initial_params()
        # the round's accepted plaintext updates, on disk next to the run store (their
        # ``wire.Update`` in ``_RoundState.accepted`` keeps every field but the parameters)
        spool_dir = None if str(store.path) == ":memory:" else store.path.parent
        self.spool = UpdateSpool({p.name: p.shape for p in self.manifest.params}, spool_dir)
        if run == wire.ANY_RUN:
            raise ValueError(f"run id {run!r} is reserved for devices not pinned to a run")
        self.online: dict[str, dict[str, object]] = {}  # last online status of each device
        self.announced: dict[str, int] = {}  # examples each device last said it holds
        self.sites: dict[str, str] = {}  # device -> the site broker it said it is behind
        self.standing: dict[str, policy.Standing] = {}
        self.proven: set[str] = set()
        self._end_token = wire.new_end_token()
        self.end_commitment = wire.end_commitment(self._end_token)
        self.nonces: dict[int, set[str]] = {}  # round -> nonces of its accepted updates
        self.round = 0
        self._state: _RoundState | None = None
        self._inbox: queue.Queue[Received] = queue.Queue()
        self._ready: list[str] = []
        self._greeted = 0  # len(self._ready) at the last hello
        prefix = f"{wire.TOPIC_PREFIX}/{run}"
        self.client: mqtt.Client = make_client(
            f"coordinator-{run}",
            self._inbox,
            protocol=broker.protocol,
            subscriptions=(
                f"{prefix}/update/+",
                f"{prefix}/status/+",
                f"{wire.TOPIC_PREFIX}/{wire.ANY_RUN}/status/+",
                *([secagg_filter(run)] if plan.secagg else []),
                *(self.he.topics if self.he else ()),
            ),
            on_ready=self._ready,
        )

    # -- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> Coordinator:
        identity = self.credentials.signer.identity if self.credentials else None
        connect(self.client, self.broker, keepalive=60, identity=identity)
        self.client.loop_start()
        wait_until(lambda: bool(self._ready), 10, "the coordinator's subscriptions")
        self.hello()
        return self

    def hello(self) -> None:
        """Ask the devices on the broker to announce themselves live (see ``policy``); devices
        also send their last update of this run once more (it may have died with a broker)."""
        self._greeted = len(self._ready)
        self.client.publish(wire.control_topic(self.run), wire.HELLO, qos=QOS)

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self.spool.close()

    def end(self) -> None:
        """Tell every device that the run is over: reveal the token its tasks committed to."""
        payload = wire.end_payload(self._end_token)
        self.client.publish(wire.control_topic(self.run), payload, qos=QOS).wait_for_publish(10)

    def eligible(self) -> list[str]:
        """Devices a round may select now (``policy.eligible``)."""
        return policy.eligible(self.standing)

    def wait_for_devices(self, n: int, timeout: float) -> None:
        """Block until ``n`` devices are eligible (announced online live, not silent)."""
        end = time.monotonic() + timeout
        while len(self.eligible()) < n:
            if time.monotonic() > end:
                raise TimeoutError(
                    f"only {len(self.eligible())} of {n} devices came online in {timeout:.0f} s"
                )
            self.poll(0.05)

    # -- message handling -----------------------------------------------------------------------

    def poll(self, timeout: float = 0.05) -> None:
        """Handle every message that arrives within ``timeout`` (status, late updates); after a
        reconnect (subscriptions acknowledged again), say ``hello`` first."""
        if len(self._ready) > self._greeted:
            self.hello()
        try:
            msg = self._inbox.get(timeout=timeout)
        except queue.Empty:
            return
        with self.store.deferred():  # one commit for the batch
            while True:
                try:
                    self._handle(msg)
                except Exception as e:  # a message must never take the coordinator down
                    log.exception("unexpected error on %s", msg.topic)
                    self._reject(msg.topic, "?", wire.WireError("internal_error", repr(e)))
                try:
                    msg = self._inbox.get_nowait()
                except queue.Empty:
                    break
            if self._state is not None and self._state.waiting:
                self._send_waiting(self._state)

    def _ledger(self, msg: Received, device: str, kind: str, round_: int | None = None) -> int:
        """Record an incoming message; ``kind`` "rejected" keeps it apart from device traffic."""
        size = msg.packet_bytes
        if kind == "rejected" and self._state is not None:
            self._state.bytes_rejected += size
        row = MessageRow(
            self.run, self.round if round_ is None else round_, device, msg.topic, "up", kind,
            size, len(msg.payload), time.time(),
        )  # fmt: skip
        self.store.add_messages([row, *self._bridge_rows([row])])
        return size

    def _bridge_rows(self, rows: list[MessageRow]) -> list[MessageRow]:
        """For each of ``rows`` (a device's messages on this broker) whose device is behind a
        site broker, the same message on the site's bridge: kind ``bridge``, its bytes as the
        bridge's MQTT 3.1.1 PUBLISH at QoS 1 (``edgeleak.broker.bridge_conf``)."""
        return [
            dataclasses.replace(
                r,
                kind="bridge",
                bytes=publish_packet_bytes(r.topic, r.payload_bytes, QOS, protocol=mqtt.MQTTv311),
            )  # fmt: skip
            for r in rows
            if r.device in self.sites
        ]

    def _handle(self, msg: Received) -> None:
        if self.secagg is not None and secure.upload(self.secagg_round, msg):
            if self.secagg_round is None:  # between rounds: too late
                self._ledger(msg, "?", "rejected")
                self._reject(msg.topic, "?", wire.WireError("wrong_phase", "no secure round runs"))
            return
        if self.he is not None and self.he.owns(msg.topic):
            try:
                self.he.on_message(msg)
            except (wire.WireError, ValueError, RuntimeError) as e:
                self._reject(msg.topic, "keyholder", wire.WireError("bad_he", str(e)[:200]))
            return
        try:
            _run, channel, device = wire.parse_topic(msg.topic)
        except wire.WireError as e:
            self._reject(msg.topic, "?", e)
            return
        assert device is not None
        if channel == "status":
            self._on_status(msg, device)
        elif channel == "update":
            slot = self._slots.get(device) if self.plan.decoys else None
            owner = slot.device if slot else device
            st = self._state
            if st is not None and owner in st.tasked:
                st.heard.add(owner)
            if owner in self.standing and self.standing[owner].silent:
                # a late answer: the device is there, only slow
                self.standing[owner] = policy.Standing(live=True, silent=False)
            if slot is not None and not slot.real:
                # A decoy: dropped before aggregation; its bytes count for its device.
                size = self._ledger(msg, owner, "decoy", slot.round)
                if st is not None and slot.round == st.round:
                    st.bytes_up += size
                    st.decoy_up[owner] = st.decoy_up.get(owner, 0) + size
                    st.decoy_n[owner] = st.decoy_n.get(owner, 0) + 1
                return
            try:
                if self.plan.decoys and slot is None:
                    raise wire.WireError("unknown_pseudonym", f"{device!r} is no device's slot")
                update = self._validate(msg, device, owner)
            except wire.WireError as e:
                self._ledger(msg, owner, "rejected")
                self._reject(msg.topic, owner, e)
                signed = self.credentials is not None  # checked first: only then a content reason
                if (
                    st is not None
                    and owner in st.tasked
                    and policy.final_rejection(e.reason, signed=signed)
                ):
                    st.lost.add(owner)
                    st.answered(owner)
                return
            assert st is not None
            group = parse_group(update.group)  # an edge aggregator's update: its own kinds
            size = self._ledger(msg, owner, "update" if group is None else "aggregate")
            if group is not None:
                self._ledger_group(owner, msg.topic, group)
            st.bytes_up += size
            if self.he is None:
                self.spool.put(owner, update.params)
                update = dataclasses.replace(update, params={})
            st.accepted[owner] = dataclasses.replace(update, device=owner)
            st.answered(owner)
            st.up[owner] = size
            st.last_answer = time.monotonic()
            self.nonces.setdefault(st.round, set()).add(update.nonce)

    def _ledger_group(self, agg: str, topic: str, group: GroupInfo) -> None:
        """The group's traffic as its aggregator reported it: ``group_up`` (device -> aggregator)
        and ``group_down`` (aggregator -> device), apart from ``aggregate`` (aggregator -> here);
        ``topic`` is the aggregator's upstream topic."""
        rows = [
            MessageRow(self.run, self.round, agg, topic, d, kind, b, 0, time.time())
            for d, kind, b in (("up", "group_up", group.up), ("down", "group_down", group.down))
        ]
        self.store.add_messages(rows)

    def _on_status(self, msg: Received, device: str) -> None:
        if self.credentials is not None:
            try:
                self.credentials.verifier.admit(device)
            except wire.WireError as e:
                if not msg.retain:
                    self._ledger(msg, device, "rejected")
                self._reject(msg.topic, device, e)
                return
        try:
            status = wire.decode_status(msg.payload)
            if (
                status["state"] == "online"
                and device not in self.online
                and len(self.online) >= self.plan.max_devices_online
            ):
                raise wire.WireError(
                    "too_many_devices", f"{len(self.online)} devices online already"
                )
        except wire.WireError as e:
            if not msg.retain:
                self._ledger(msg, device, "rejected")
            self._reject(msg.topic, device, e)
            return
        state = status["state"]
        if not msg.retain:
            self._ledger(msg, device, "status")
        online = state == "online"
        if online:
            self.online[device] = status
            examples = status.get("examples")
            self.announced[device] = examples if type(examples) is int and examples > 0 else 0
            site = str(status.get("site", ""))  # checked by decode_status
            if site and self.sites.get(device) != site:
                self.sites[device] = site
                self.store.add_site(self.run, device, site)
        else:
            self.online.pop(device, None)
            if self._state is not None and device in self._state.selected:
                self._state.lost.add(device)
                self._state.answered(device)
            if self.secagg_round is not None:
                self.secagg_round.device_gone(device)
        new = policy.on_status(self.standing.get(device), online=online, retained=msg.retain)
        if new is None:
            self.standing.pop(device, None)
        else:
            self.standing[device] = new

    def _validate(self, msg: Received, topic_device: str, device: str) -> wire.Update:
        """The update of ``device``, sent on ``topic_device`` (its pseudonym when decoys are on)."""
        if self.credentials is not None:
            self.credentials.verifier.check(msg.payload, topic_device)
        if self.he is not None:
            update = self.he.validate(msg.payload)
        else:
            update = wire.decode_update(
                msg.payload,
                self.manifest,
                max_bytes=self.plan.max_payload_bytes,
                max_header_bytes=self.plan.max_header_bytes,
            )
        st = self._state
        refused = policy.admit(
            update, run=self.run, topic_device=topic_device, device=device,
            round_=None if st is None else st.round,
            selected=st.selected if st else (), tasked=st.tasked if st else (),
            accepted=st.accepted if st else (),
            nonces=self.nonces.values(), kind=UPDATE_KIND[self.plan.algorithm],
            announced=self.announced.get(device, 0), max_examples=self.plan.max_examples,
        )  # fmt: skip
        if refused is not None:
            raise refused
        parse_group(update.group)
        return update

    def _reject(self, topic: str, device: str, err: wire.WireError) -> None:
        if self._state is not None:
            self._state.rejections[err.reason] = self._state.rejections.get(err.reason, 0) + 1
        log.info("rejected %s from %s: %s", err.reason, device, err.detail)
        self.store.add_rejection(self.run, self.round, device, topic, err.reason, err.detail)

    # -- rounds ---------------------------------------------------------------------------------

    def select(self, round_: int) -> list[str]:
        """A seeded sample of ``fraction`` of the eligible devices (at least one), unproven ones
        capped (``policy``); with a clock, of those it says are available (possibly none)."""
        pool = online = self.eligible()
        if not pool:
            raise RuntimeError("no device is online: start devices (edgeleak device ...) first")
        if self.clock is not None:
            pool = [d for d in pool if self.clock.available(d, round_)]
            if not pool:
                log.warning("round %d: none of %d online devices is available", round_, len(online))
                return []
        return policy.choose(
            pool,
            self.proven,
            fraction=self.plan.fraction,
            cap=policy.unproven_cap(self.plan.max_unproven, len(self.proven)),
            rng=np.random.default_rng([self.seed, round_]),
        )

    def broadcast(self, st: _RoundState) -> None:
        """Start the round's tasks (``st.weights``): the model announcement when devices verify
        it, then the first ``max_concurrent`` selected devices' tasks (all under secure
        aggregation, whose phases need every device); ``poll`` sends the rest as slots free."""
        if self.plan.verify_model_consistency:
            row = self._announce_model(st.weights)
            self.store.add_messages([row])
            st.bytes_down += row.bytes
        st.waiting = deque(sorted(st.selected))
        self._send_waiting(st, everyone=self.secagg is not None)

    def _send_waiting(self, st: _RoundState, *, everyone: bool = False) -> None:
        """Tasks for the next waiting devices, while fewer than ``max_concurrent`` are open
        (``everyone``: all of them)."""
        cap = self.plan.max_concurrent
        devices: list[str] = []
        while st.waiting and (everyone or cap <= 0 or len(st.open) < cap):
            devices.append(device := st.waiting.popleft())
            if device not in st.lost:
                st.open.add(device)
        if devices:
            self._send_tasks(st, devices)

    def _send_tasks(self, st: _RoundState, devices: list[str]) -> None:
        """Publish the round's task to each of ``devices``; book its bytes. A ``distributed_dp``
        step gets the round's ``shares``: the noise is split over the devices selected."""
        spec = protect.with_shares(self.plan.protect, len(st.selected))
        rows: list[MessageRow] = []
        for device in devices:
            task = wire.Task(
                run=self.run,
                round=self.round,
                device=device,
                algorithm=self.plan.algorithm,
                lr=self.plan.lr,
                epochs=self.plan.epochs,
                batch_size=self.plan.batch_size,
                model_hash=self.manifest.sha256,
                weights=self.tamper_device(self.round, device, st.weights)
                if self.tamper_device
                else st.weights,
                deadline_s=self.plan.deadline_s,
                codec=self.plan.task_codec,
                uplink=self.plan.codec,
                decoys=self.plan.decoys,
                end=self.end_commitment,
                protect=spec,
                secagg=self.plan.secagg,
                he=self.he.key if self.he else "",
            )
            self._register_slots(device)
            payload = wire.encode_task(
                task, signer=self.credentials.signer if self.credentials else None
            )
            topic = wire.task_topic(self.run, device)
            st.tasked.add(device)
            self.client.publish(topic, payload, qos=QOS)
            size = publish_packet_bytes(topic, len(payload), QOS, protocol=self.broker.protocol)
            rows.append(
                MessageRow(
                    self.run,
                    self.round,
                    device,
                    topic,
                    "down",
                    "task",
                    size,
                    len(payload),
                    time.time(),
                )
            )
            st.down[device] = size
            st.bytes_down += size
        self.store.add_messages(rows + self._bridge_rows(rows))

    def _announce_model(self, weights: Params) -> MessageRow:
        """Tell every device of the run which weights this round ships (``verify_model_consistency``)."""
        digest = wire.model_digest(
            {k: weights[k] for k in self.manifest.param_names}, self.plan.task_codec
        )
        payload = wire.model_announcement(self.round, digest)
        topic = wire.control_topic(self.run)
        self.client.publish(topic, payload, qos=QOS)
        size = publish_packet_bytes(topic, len(payload), QOS, protocol=self.broker.protocol)
        return MessageRow(
            self.run, self.round, "", topic, "down", "model", size, len(payload), time.time()
        )

    def _register_slots(self, device: str) -> None:
        """With decoys, the pseudonyms ``device`` will use this round, and which one is real."""
        k = self.plan.decoys
        if not k:
            return
        if device not in self.keys:
            raise ValueError(f"no key for device {device!r}: decoys need every device's key")
        key = self.keys[device]
        real = decoy.real_slot(key, self.run, self.round, k)
        for i in range(k + 1):
            name = decoy.pseudonym(key, self.run, self.round, i)
            self._slots[name] = _Slot(device, self.round, i == real)

    def _drop_stragglers(self, st: _RoundState) -> float:
        """Reject the updates that arrive after the deadline in virtual time; returns the round's
        virtual length: the slowest arrival, or the deadline when any selected device missed it."""
        assert self.clock is not None
        arrivals: list[float] = []
        missing = len(st.selected) - len(st.accepted)
        for device in sorted(st.accepted):
            n = st.accepted[device].num_examples
            t = self.clock.arrival(
                device,
                examples=examples_processed(
                    self.plan.algorithm, epochs=self.plan.epochs, reported=n
                ),
                bytes_down=st.down[device],
                bytes_up=st.up[device] + st.decoy_up.get(device, 0),
            )
            arrivals.append(t)
            if t > self.plan.deadline_s:
                del st.accepted[device]
                st.late.add(device)
                self._reject(
                    wire.update_topic(self.run, device),
                    device,
                    wire.WireError(
                        "straggler",
                        f"arrives at {t:.3f} s virtual, after the {self.plan.deadline_s} s deadline",
                    ),
                )
        return policy.round_length(arrivals, deadline_s=self.plan.deadline_s, missing=missing)

    def _round_over(self, st: _RoundState, t0: float, limit: float) -> bool:
        now = time.monotonic()
        if (
            now - t0 < limit
            and self.plan.unproven_quiet_s <= 0
            and len(st.accepted) + len(st.lost) < len(st.selected)
        ):
            # Both are subsets of the selected: someone is still awaited. Checked before the
            # sets below, which cost O(n) per message (10,000 devices: O(n²) a round).
            return False
        return policy.round_over(
            elapsed=now - t0,
            deadline_s=limit,
            waiting=st.selected - set(st.accepted) - st.lost,
            proven=self.proven,
            since_last_answer=now - (t0 if st.last_answer is None else st.last_answer),
            quiet_s=self.plan.unproven_quiet_s,
        )

    def _decoys_in(self, st: _RoundState) -> bool:
        """Every accepted device's decoys of the round have arrived (true without decoys)."""
        return all(st.decoy_n.get(d, 0) >= self.plan.decoys for d in st.accepted)

    def run_round(self, round_: int) -> RoundResult:
        """One full round: select, broadcast, collect until all answered or the deadline, aggregate."""
        t0 = time.monotonic()
        self.poll(0.0)
        self.round = round_
        selected = self.select(round_)
        st = _RoundState(round_, set(selected))
        self._state = st
        self.spool.clear()
        self.nonces = {r: n for r, n in self.nonces.items() if r >= round_ - NONCE_ROUNDS}
        # Pseudonyms of the last round stay known for its late decoys; older ones are dropped.
        self._slots = {p: s for p, s in self._slots.items() if s.round >= round_ - 1}
        sent = self.tamper(round_, self.weights) if self.tamper else self.weights
        st.weights = sent
        if self.he is not None:
            self.he.wait_for_key(self.poll, self.plan.deadline_s)
        self.broadcast(st)
        if self.secagg is not None:
            return self._secure_round(st, sent, st.bytes_down, t0)
        limit = self.collect_timeout_s if self.clock is not None else self.plan.deadline_s
        while not self._round_over(st, t0, limit):
            self.poll(0.05)
        # Decoys sent after a real update would otherwise miss the ledger (and the round's bytes).
        while not self._decoys_in(st) and time.monotonic() - t0 < limit:
            self.poll(0.05)
        virtual = self._drop_stragglers(st) if self.clock is not None else None
        self._state = None
        self.proven |= set(st.accepted)
        self.standing = policy.after_round(self.standing, sorted(st.tasked), st.heard)
        self.revealed = self._aggregate(st, len(selected)) if st.accepted else None
        if self.revealed is not None:
            self.weights = policy.server_step(sent, self.revealed, self.plan)
        else:
            log.warning("round %d: no update arrived before the deadline; model unchanged", round_)
        acc, loss = self.evaluator(self.weights) if self.evaluator else (float("nan"), float("nan"))
        losses = [st.accepted[d].train_loss for d in sorted(st.accepted)]  # canonical order
        train_loss = float(np.mean(losses)) if losses else float("nan")
        result = RoundResult(
            round=round_,
            selected=len(selected),
            accepted=len(st.accepted),
            rejected=sum(st.rejections.values()),
            bytes_up=st.bytes_up,
            bytes_down=st.bytes_down,
            accuracy=acc,
            loss=loss,
            train_loss=train_loss,
            seconds=time.monotonic() - t0,
            rejections=dict(st.rejections),
            virtual_seconds=virtual,
            bytes_rejected=st.bytes_rejected,
            model_sha256=params_sha256({k: self.weights[k] for k in self.manifest.param_names}),
        )
        self.store.add_round(self.run, result)
        self.store.add_dropouts(
            self.run,
            round_,
            dropout.dropouts(
                selected,
                st.accepted,
                heard=st.heard,
                lost=st.lost,
                late=st.late,
                untasked=st.selected - st.tasked,
            ),
        )
        self._account(st.round, {d: u.num_examples for d, u in st.accepted.items()})
        return result

    def _secure_round(
        self, st: _RoundState, sent: Params, bytes_down: int, t0: float
    ) -> RoundResult:
        """The round's updates through secure aggregation (``coordinator.secagg``): only the
        survivors' mean is ever known here."""
        assert self.secagg is not None
        shapes = {p.name: p.shape for p in self.manifest.params}
        sr = secure.secure_round(
            self, st.round, sorted(st.selected), self.secagg, shapes, self.plan.deadline_s
        )
        self._state = None
        self.proven |= set(sr.survivors)
        self.standing = policy.after_round(self.standing, sorted(st.selected), sr.heard)
        self.revealed = sr.mean
        if sr.mean is not None:
            self.weights = policy.server_step(sent, sr.mean, self.plan)
        acc, loss = self.evaluator(self.weights) if self.evaluator else (float("nan"), float("nan"))
        result = RoundResult(
            round=st.round, selected=len(st.selected), accepted=len(sr.survivors) if sr.mean is not None else 0,
            rejected=sum(sr.rejections.values()), bytes_up=sr.bytes_up, bytes_down=bytes_down + sr.bytes_down,
            accuracy=acc, loss=loss, train_loss=float(np.mean(sr.losses)) if sr.losses else float("nan"),
            seconds=time.monotonic() - t0, rejections=sr.rejections, bytes_rejected=st.bytes_rejected,
            model_sha256=params_sha256({k: self.weights[k] for k in self.manifest.param_names}),
        )  # fmt: skip
        self.store.add_round(self.run, result)
        if sr.mean is not None:
            self._account_secure(st, sr)
        return result

    def _account_secure(self, st: _RoundState, sr: secure.SecureResult) -> None:
        """The privacy of the survivors, whose updates are in the secure sum: under
        ``distributed_dp`` the sum's σ is what the survivors' shares of the noise add up to."""
        sigma = None
        if isinstance(self.dp, protect.DistributedDP) and self.privacy is not None:
            from coordinator.accounting import distributed_sigma

            sigma = distributed_sigma(
                self.privacy.sigma, survivors=len(sr.survivors), shares=len(st.selected)
            )
        self._account(st.round, {d: sr.examples.get(d, 0) for d in sr.survivors}, sigma=sigma)

    def _aggregate(self, st: _RoundState, selected: int) -> Params:
        """The round's aggregate (``policy.aggregate``: the plan's defence, or DP-FedAvg's noised
        mean under ``central_dp``; anomaly rows recorded), or (HE) the key holder's decryption of
        the ciphertexts' sum."""
        order = sorted(st.accepted)
        if self.he is not None:
            ups = [st.accepted[d] for d in order]
            return self.he.aggregate(self.client, st.round, ups, self.poll, self.plan.deadline_s)
        updates = self.spool.updates(order, [st.accepted[d].num_examples for d in order])
        # The anomaly scores (every aggregate but central DP's) read the spool beside the
        # aggregation, in a thread of their own: numpy leaves the GIL in both, and the
        # round's devices are done, so a core is free (at 10,000 LeNet updates 2.4 s, not 3.1).
        with ThreadPoolExecutor(1, thread_name_prefix="anomaly") as pool:
            central = isinstance(self.dp, protect.CentralDP)
            scoring = None if central else pool.submit(self._anomaly_scores, order)
            agg, out = policy.aggregate(
                updates, self.plan, selected=selected,
                noise_seed=central_noise_seed(self.seed, st.round),
                defence_seed=robust.defence_seed(self.seed, st.round),
            )  # fmt: skip
            if scoring is not None and out is not None:
                rows = anomaly_rows(self.plan.aggregator, order, scoring.result(), out)
                self.store.add_anomaly(self.run, st.round, rows)
        return agg

    def _anomaly_scores(self, order: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(norms, anomaly scores) of the spooled updates of ``order``
        (``robust.norms_and_scores``), against the median of an evenly spaced sample."""
        sample = order[:: robust.median_step(len(order))]
        median = robust.median_update(self.spool.column_blocks(sample))
        return robust.norms_and_scores(median, self.spool.row_chunks(order))

    def _account(
        self, round_: int, accepted: dict[str, int], *, sigma: float | None = None
    ) -> None:
        """Add ``round_`` to the privacy ledger of every accepted device (id → the examples its
        update reports), with the run's σ or this round's; store each ε so far."""
        if self.privacy is None:
            return
        for device in sorted(accepted):
            examples = self.online.get(device, {}).get("examples")
            if not isinstance(examples, int) or examples < 1:
                # DP-SGD's sampling rate needs the shard size the device announced
                examples = accepted[device]
            self.privacy.record(
                device, algorithm=self.plan.algorithm, examples=examples,
                batch_size=self.plan.batch_size, epochs=self.plan.epochs, sigma=sigma,
            )  # fmt: skip
        rows = [PrivacyRow(b.device, b.mechanism, b.sigma, b.rounds, b.epsilon, b.delta)
                for b in self.privacy.budgets()]  # fmt: skip
        self.store.add_privacy(self.run, round_, rows)


def anomaly_rows(
    defence: str,
    devices: list[str],
    scored: tuple[np.ndarray, np.ndarray],
    out: robust.Defended,
) -> list[AnomalyRow]:
    """One row per update: its norm and anomaly score (``scored``: ``robust.norms_and_scores``),
    whether the defence kept it, and its clip factor."""
    norms, scores = scored
    return [
        AnomalyRow(d, defence, float(norms[i]), float(scores[i]), out.kept[i], out.clip[i])
        for i, d in enumerate(devices)
    ]


def central_noise_seed(seed: int, round_: int) -> list[int]:
    """The seed of the coordinator's central-DP noise in ``round_`` (reproducible runs)."""
    return [seed, round_, 2]
