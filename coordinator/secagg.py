"""Secure aggregation, coordinator side: relays keys and encrypted shares, collects masked
inputs, and reconstructs only the sum of the survivors' inputs (see ``edge.secagg``).

``SecAggRound`` is the state of one round, independent of transport: ``on_message`` takes what
arrived, ``step`` moves to the next phase when every expected device answered, went offline or
the phase's deadline passed, and ``outcome`` holds the sum or the reason the round aborted.
The coordinator sees public keys, ciphertexts it cannot open, masked inputs and, per device,
either the shares of its self mask (it survived) or of its mask key (it dropped), never both.
"""

from __future__ import annotations

import json
import logging
import queue
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from coordinator.store import MessageRow, RunStore
from edge import protect as pr
from edge import secagg as sa
from edge import wire
from edge.mqtt import (
    QOS,
    BrokerAddress,
    Received,
    connect,
    make_client,
    publish_packet_bytes,
    wait_until,
)

log = logging.getLogger(__name__)
# (device, topic, direction, kind, packet bytes, payload bytes) -> the byte ledger
Ledger = Callable[[str, str, str, str, int, int], None]
# (topic, payload) -> packet bytes published
Send = Callable[[str, bytes], int]
MIN_DEVICES = 3  # a device needs two neighbours, or the sum would expose the other's input


def kind(phase: str) -> str:
    """The ledger kind of a secure-aggregation message."""
    name = f"secagg_{phase}"
    assert name in sa.LEDGER_KINDS, name
    return name


@dataclass
class SecAggOutcome:
    """The decoded round: the sum mod 2^32 of the survivors' inputs, or why it aborted."""

    total: np.ndarray | None = None
    survivors: tuple[str, ...] = ()  # devices whose masked input is in the sum
    dropped: tuple[str, ...] = ()  # shared keys, then sent no masked input: masks removed
    aborted: str = ""  # reason code; "" when the sum is there
    detail: str = ""
    seconds: float = 0.0  # the coordinator's own compute (parsing, routing, unmasking)


@dataclass
class _Phase:
    name: str
    expected: set[str]
    started: float
    got: dict[str, sa.Message] = field(default_factory=dict)


class SecAggRound:
    """One round of SecAgg(+) among ``devices`` whose inputs have ``length`` words."""

    def __init__(
        self,
        run: str,
        round_: int,
        devices: Iterable[str],
        spec: sa.SecAggSpec,
        length: int,
        *,
        send: Send,
        ledger: Ledger,
        deadline_s: float,
        graph_seed: bytes | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``graph_seed``: the public seed of the SecAgg+ graph (fresh random by default)."""
        self.run, self.round, self.spec, self.length = run, round_, spec, length
        self.devices = sorted(devices)
        spec.check_capacity(len(self.devices))
        self.send, self.ledger, self.deadline_s, self.clock = send, ledger, deadline_s, clock
        self.graph_seed = graph_seed if graph_seed is not None else secrets.token_bytes(32)
        self.phase = _Phase("advertise", set(self.devices), clock())
        self.gone: set[str] = set()  # announced offline
        self.keys: dict[str, tuple[bytes, bytes]] = {}  # U1: device -> (c_pk, s_pk)
        self.graph: dict[str, list[str]] = {}
        self.t = 0
        self.cts: dict[str, dict[str, np.ndarray]] = {}  # U2: sender -> recipient -> ciphertext
        self.masked: dict[str, np.ndarray] = {}  # U3: device -> masked input (uint32)
        self.reveals: dict[str, sa.Message] = {}  # U4
        self.rejections: dict[str, int] = {}
        self.received: list[sa.Message] = []  # everything accepted, as received (for audits)
        self.outcome: SecAggOutcome | None = None
        self._busy = 0.0

    @property
    def done(self) -> bool:
        return self.outcome is not None

    # -- input ----------------------------------------------------------------------------------

    def device_gone(self, device: str) -> None:
        """``device`` announced itself offline: no phase waits for it any longer."""
        self.gone.add(device)

    def on_message(self, topic: str, payload: bytes, packet_bytes: int) -> None:
        """An incoming secure-aggregation message: recorded, checked, kept or counted rejected."""
        t0 = time.perf_counter()
        parsed = sa.parse_secagg_topic(topic)
        try:
            if parsed is None or parsed[1] != "up":
                raise sa.SecAggError("bad_topic", topic)
            run, _, phase, device = parsed
            if self.done or phase != self.phase.name:
                raise sa.SecAggError("wrong_phase", f"{phase} while in {self.phase.name}")
            if device not in self.phase.expected:
                raise sa.SecAggError("not_expected", f"{device} is not in phase {phase}")
            if device in self.phase.got:
                raise sa.SecAggError("duplicate", f"{device} already sent {phase}")
            msg = sa.decode_message(payload, phase, self.run, self.round, device)
            self._check(msg)
        except sa.SecAggError as e:
            who = parsed[3] if parsed else "?"
            self.ledger(who, topic, "up", "rejected", packet_bytes, len(payload))
            self.rejections[e.reason] = self.rejections.get(e.reason, 0) + 1
            return
        finally:
            self._busy += time.perf_counter() - t0
        self.ledger(device, topic, "up", kind(phase), packet_bytes, len(payload))
        self.phase.got[device] = msg
        self.received.append(msg)

    def _check(self, msg: sa.Message) -> None:
        """Shapes of each phase's payload (the content is checked when used)."""
        if msg.phase == "advertise":
            msg.tensor("c_pk", "uint8", (sa.KEY_BYTES,))
            msg.tensor("s_pk", "uint8", (sa.KEY_BYTES,))
        elif msg.phase == "share":
            if msg.names("to") != self.graph[msg.device]:
                raise sa.SecAggError("bad_roster", "shares not addressed to its neighbours")
            msg.tensor("ct", "uint8", (len(self.graph[msg.device]), sa.CIPHER_BYTES))
        elif msg.phase == "masked":
            msg.tensor("y", "int32", (self.length,))
        elif msg.phase == "unmask":
            alive, dropped = msg.names("survivors"), msg.names("dropped")
            want = self._unmask_lists(msg.device)
            if (alive, dropped) != want:
                raise sa.SecAggError("bad_unmask", "lists differ from the ones sent")
            msg.tensor("b", "uint8", (len(alive), sa.SHARE_BYTES))
            msg.tensor("s", "uint8", (len(dropped), sa.SHARE_BYTES))

    # -- phases ---------------------------------------------------------------------------------

    def step(self) -> None:
        """Close the current phase when nobody is left to wait for, or at its deadline."""
        if self.done:
            return
        ph = self.phase
        waiting = ph.expected - set(ph.got) - self.gone
        if waiting and self.clock() - ph.started < self.deadline_s:
            return
        t0 = time.perf_counter()
        try:
            {
                "advertise": self._after_advertise,
                "share": self._after_share,
                "masked": self._after_masked,
                "unmask": self._after_unmask,
            }[ph.name]()
        except _Abort as e:
            self.outcome = SecAggOutcome(aborted=e.reason, detail=e.detail)
        self._busy += time.perf_counter() - t0
        if self.outcome is not None:
            self.outcome.seconds = self._busy

    def _next(self, name: str, expected: Iterable[str]) -> None:
        self.phase = _Phase(name, set(expected), self.clock())

    def _publish(self, device: str, phase: str, msg: sa.Message) -> None:
        topic = sa.down_topic(self.run, device, phase)
        payload = msg.encode()
        size = self.send(topic, payload)
        self.ledger(device, topic, "down", kind(phase), size, len(payload))

    def begin(self) -> None:
        """Start light devices that no task starts (``edge.secagg.begin_message``)."""
        for d in self.devices:
            self._publish(
                d, "begin", sa.begin_message(self.run, self.round, d, self.spec, self.length)
            )

    def _after_advertise(self) -> None:
        got = self.phase.got
        u1 = sorted(got)
        if len(u1) < MIN_DEVICES:
            raise _Abort("too_few_devices", f"{len(u1)} advertised keys; need {MIN_DEVICES}")
        self.keys = {
            d: (got[d].tensors["c_pk"].tobytes(), got[d].tensors["s_pk"].tobytes()) for d in u1
        }
        self.graph = sa.neighbours(u1, self.spec.degree(len(u1)), self.graph_seed)
        self.t = self.spec.threshold(len(u1))
        self.x = {d: i + 1 for i, d in enumerate(u1)}  # Shamir evaluation points
        for d in u1:
            peers = self.graph[d]
            c_pk = np.stack([np.frombuffer(self.keys[p][0], np.uint8) for p in peers])
            s_pk = np.stack([np.frombuffer(self.keys[p][1], np.uint8) for p in peers])
            fields = {
                "peers": json.dumps(peers),
                "xs": json.dumps([self.x[p] for p in peers]),
                "t": str(self.t),
                "graph_seed": self.graph_seed.hex(),
            }
            msg = sa.Message("keys", self.run, self.round, d, fields, {"c_pk": c_pk, "s_pk": s_pk})
            self._publish(d, "keys", msg)
        self._next("share", u1)

    def _after_share(self) -> None:
        got = self.phase.got
        u2 = set(got)
        for d in sorted(u2):
            cts = got[d].tensors["ct"]
            self.cts[d] = {p: cts[i] for i, p in enumerate(self.graph[d])}
        for v in sorted(u2):
            senders = [u for u in self.graph[v] if u in u2]
            if len(senders) < self.t:
                raise _Abort(
                    "too_few_shares", f"{v} got shares from {len(senders)} neighbours, t={self.t}"
                )
        for v in sorted(u2):
            senders = [u for u in self.graph[v] if u in u2]
            ct = np.stack([self.cts[u][v] for u in senders])
            msg = sa.Message(
                "shares", self.run, self.round, v, {"from": json.dumps(senders)}, {"ct": ct}
            )
            self._publish(v, "shares", msg)
        self._next("masked", sorted(u2))

    def _unmask_lists(self, v: str) -> tuple[list[str], list[str]]:
        """(survivors, dropped) among the neighbours ``v`` masked with (they shared keys)."""
        peers = [u for u in self.graph[v] if u in self.cts]
        return [u for u in peers if u in self.masked], [u for u in peers if u not in self.masked]

    def _after_masked(self) -> None:
        got = self.phase.got
        self.masked = {d: got[d].tensors["y"].view(np.uint32).copy() for d in sorted(got)}
        # Every secret that must be rebuilt needs t surviving neighbours to reveal a share.
        for u in sorted(self.cts):
            left = sum(v in self.masked for v in self.graph[u])
            if left < self.t:
                raise _Abort(
                    "too_few_survivors",
                    f"{len(self.masked)} of {len(self.cts)} sent masked inputs; {u} has "
                    f"{left} surviving neighbours, t={self.t}",
                )
        for v in sorted(self.masked):
            alive, dropped = self._unmask_lists(v)
            fields = {"survivors": json.dumps(alive), "dropped": json.dumps(dropped)}
            self._publish(v, "unmask", sa.Message("unmask", self.run, self.round, v, fields))
        self._next("unmask", sorted(self.masked))

    def _shares_of(self, u: str, which: str) -> dict[int, int]:
        """Up to t revealed shares of device ``u``'s ``which`` secret ("b" or "s")."""
        out: dict[int, int] = {}
        for v in self.graph[u]:
            msg = self.reveals.get(v)
            if msg is None:
                continue
            ids = msg.names("survivors" if which == "b" else "dropped")
            if u in ids:
                row = msg.tensors[which][ids.index(u)]
                out[self.x[v]] = int.from_bytes(row.tobytes(), "big")
            if len(out) == self.t:
                break
        return out

    def _after_unmask(self) -> None:
        self.reveals = dict(self.phase.got)
        dropped = sorted(set(self.cts) - set(self.masked))
        m = self.length
        total = np.zeros(m, np.uint32)
        for y in self.masked.values():
            total += y
        for u in sorted(self.masked):
            shares = self._shares_of(u, "b")
            if len(shares) < self.t:
                raise _Abort(
                    "too_few_reveals", f"{len(shares)} shares of {u}'s self mask, t={self.t}"
                )
            total -= sa.prg(sa.int_bytes(sa.shamir_combine(shares))[1:], m)
        for d in dropped:
            shares = self._shares_of(d, "s")
            if len(shares) < self.t:
                raise _Abort(
                    "too_few_reveals", f"{len(shares)} shares of {d}'s mask key, t={self.t}"
                )
            raw = sa.int_bytes(sa.shamir_combine(shares))[1:]
            sk = X25519PrivateKey.from_private_bytes(raw)
            if sa.public_bytes(sk) != self.keys[d][1]:
                raise _Abort("bad_reveal", f"the shares of {d}'s mask key do not match its key")
            info = sa.context(self.run, self.round, "mask")
            for v in self.graph[d]:
                if v in self.masked:
                    # v added sign(v, d)·PRG(s_vd) to its input; d's opposite term never came.
                    mask = sa.prg(sa.agree(sk, self.keys[v][1], info), m)
                    total = total - mask if sa.pair_sign(v, d) > 0 else total + mask
        self.outcome = SecAggOutcome(
            total=total, survivors=tuple(sorted(self.masked)), dropped=tuple(dropped)
        )


class _Abort(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


# -- transport ------------------------------------------------------------------------------------


def feed(rnd: SecAggRound, msg: Received) -> bool:
    """Hand ``msg`` to the round if it is a secure-aggregation upload or an ``offline`` status
    of one of its devices; False when it is neither."""
    parsed = sa.parse_secagg_topic(msg.topic)
    if parsed is not None and parsed[1] == "up":
        rnd.on_message(msg.topic, msg.payload, msg.packet_bytes)
        return True
    try:
        _run, channel, device = wire.parse_topic(msg.topic)
    except wire.WireError:
        return False
    if channel == "status" and device in rnd.devices and b'"offline"' in msg.payload:
        rnd.device_gone(device)
        return True
    return False


class SecAggService:
    """A coordinator that runs only secure-aggregation rounds over MQTT (tests, benchmarks):
    one paho client, the byte ledger in ``rows`` (and in ``store`` when given)."""

    def __init__(self, run: str, broker: BrokerAddress, *, store: RunStore | None = None) -> None:
        self.run, self.broker, self.store = run, broker, store
        self.inbox: queue.Queue[Received] = queue.Queue()
        self._ready: list[str] = []
        self.rows: list[MessageRow] = []
        self._round = 0
        self.client = make_client(
            f"secagg-coordinator-{run}",
            self.inbox,
            protocol=broker.protocol,
            subscriptions=(sa.up_filter(run), f"{wire.TOPIC_PREFIX}/{run}/status/+"),
            on_ready=self._ready,
        )

    def __enter__(self) -> SecAggService:
        connect(self.client, self.broker)
        self.client.loop_start()
        wait_until(lambda: bool(self._ready), 10, "the secagg coordinator's subscriptions")
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _send(self, topic: str, payload: bytes) -> int:
        self.client.publish(topic, payload, qos=QOS)
        return publish_packet_bytes(topic, len(payload), QOS, protocol=self.broker.protocol)

    def _ledger(
        self, device: str, topic: str, direction: str, kind_: str, size: int, n: int
    ) -> None:
        self.rows.append(
            MessageRow(self.run, self._round, device, topic, direction, kind_, size, n, time.time())
        )

    def run_round(
        self,
        round_: int,
        devices: Iterable[str],
        spec: sa.SecAggSpec,
        length: int,
        *,
        deadline_s: float = 60.0,
        graph_seed: bytes | None = None,
    ) -> SecAggRound:
        """Start ``devices`` (``begin``) and run every phase; the round's ``outcome`` is set."""
        self._round = round_
        first = len(self.rows)
        rnd = SecAggRound(
            self.run, round_, devices, spec, length, send=self._send, ledger=self._ledger,
            deadline_s=deadline_s, graph_seed=graph_seed,
        )  # fmt: skip
        rnd.begin()
        drive(rnd, self.inbox)
        if self.store is not None:
            self.store.add_messages(self.rows[first:])
        return rnd


def drive(
    rnd: SecAggRound, inbox: queue.Queue[Received], other: Callable[[Received], None] | None = None
) -> None:
    """Feed ``rnd`` from ``inbox`` until it is done; messages it does not take go to ``other``."""
    while not rnd.done:
        try:
            msg: Received | None = inbox.get(timeout=0.05)
        except queue.Empty:
            msg = None
        while msg is not None:
            if not feed(rnd, msg) and other is not None:
                other(msg)
            try:
                msg = inbox.get_nowait()
            except queue.Empty:
                msg = None
        rnd.step()


# -- inside the coordinator's rounds --------------------------------------------------------------


def check_plan(
    spec_text: str, *, decoys: int, codec: str, aggregator: str, protect: str
) -> sa.SecAggSpec:
    """The plan's secure-aggregation spec, refused (ValueError saying why) where it cannot work:
    the coordinator sees only the sum, so no decoys, robust aggregators or central DP (the
    devices add the noise instead: ``distributed_dp``), and the fixed-point encoding replaces the
    uplink codec."""
    spec = sa.parse_spec(spec_text)
    if decoys:
        raise ValueError("secagg with decoys: the coordinator sees only the sum; use one of them")
    if codec != "f32":
        raise ValueError(
            f"secagg replaces the uplink codec with its fixed point; use codec f32, not {codec!r}"
        )
    if aggregator != "mean":
        raise ValueError(
            f"secagg yields the plain mean of the survivors; use aggregator 'mean', not {aggregator!r}"
        )
    dp = pr.dp_step(pr.parse(protect))
    if isinstance(dp, pr.CentralDP):
        raise ValueError(
            "secagg with central_dp: the coordinator sees only the sum; let the devices add the "
            f"noise with distributed_dp:clip={dp.clip:g},sigma=... instead"
        )
    if isinstance(dp, pr.DistributedDP) and spec.clip < dp.clip:
        raise ValueError(
            f"secagg clip={spec.clip:g} is below distributed_dp clip={dp.clip:g}: the fixed point "
            "would cut the clipped update; give secagg a clip >= the DP clip"
        )
    return spec


def upload(rnd: SecAggRound | None, msg: Received) -> bool:
    """True when ``msg`` is a secure-aggregation upload (handed to ``rnd`` if a round runs;
    ledgered as rejected by the caller otherwise)."""
    parsed = sa.parse_secagg_topic(msg.topic)
    if parsed is None or parsed[1] != "up":
        return False
    if rnd is not None:
        rnd.on_message(msg.topic, msg.payload, msg.packet_bytes)
    return True


class _Host(Protocol):
    """What ``secure_round`` uses of ``coordinator.server.Coordinator``."""

    run: str
    store: RunStore
    broker: BrokerAddress
    client: mqtt.Client
    secagg_round: SecAggRound | None

    def poll(self, timeout: float = 0.05) -> None: ...


@dataclass(frozen=True)
class SecureResult:
    """What a secure round hands back to the coordinator's round."""

    mean: dict[str, np.ndarray] | None  # the survivors' mean update; None when aborted
    survivors: tuple[str, ...]
    heard: set[str]  # devices that advertised keys (they trained)
    examples: dict[str, int]
    losses: list[float]  # the survivors' reported training losses, by device id
    bytes_up: int
    bytes_down: int
    rejections: dict[str, int]


def secure_round(
    host: _Host,
    round_: int,
    selected: Iterable[str],
    spec: sa.SecAggSpec,
    shapes: dict[str, tuple[int, ...]],
    deadline_s: float,
) -> SecureResult:
    """Run the phases among ``selected`` (their tasks are out); every message in the ledger."""
    rows: list[MessageRow] = []
    counted = {"up": 0, "down": 0}

    def send(topic: str, payload: bytes) -> int:
        host.client.publish(topic, payload, qos=QOS)
        return publish_packet_bytes(topic, len(payload), QOS, protocol=host.broker.protocol)

    def ledger(device: str, topic: str, direction: str, kind_: str, size: int, n: int) -> None:
        if kind_ != "rejected":
            counted[direction] += size
        rows.append(
            MessageRow(host.run, round_, device, topic, direction, kind_, size, n, time.time())
        )

    length = sum(int(np.prod(s)) for s in shapes.values())
    rnd = SecAggRound(
        host.run, round_, selected, spec, length, send=send, ledger=ledger, deadline_s=deadline_s
    )
    host.secagg_round = rnd
    try:
        while not rnd.done:
            host.poll(0.05)
            rnd.step()
    finally:
        host.secagg_round = None
        host.store.add_messages(rows)
    out = rnd.outcome
    assert out is not None
    adverts = {m.device: m for m in rnd.received if m.phase == "advertise"}
    rejections = dict(rnd.rejections)
    mean = None
    if out.aborted:
        rejections[f"secagg_{out.aborted}"] = 1
        host.store.add_rejection(
            host.run, round_, "*", sa.up_filter(host.run), f"secagg_{out.aborted}", out.detail
        )
        log.warning("round %d: secure aggregation aborted: %s: %s", round_, out.aborted, out.detail)
    else:
        assert out.total is not None
        flat = sa.decode_fixed(out.total, spec.bits) / len(out.survivors)
        mean = sa.unflatten(flat, shapes)

    def number(d: str, key: str) -> float:
        try:
            return float(adverts[d].fields.get(key, "nan"))
        except ValueError:
            return float("nan")

    return SecureResult(
        mean=mean,
        survivors=out.survivors,
        heard=set(adverts),
        examples={
            d: int(number(d, "examples")) for d in out.survivors if number(d, "examples") >= 0
        },
        losses=[number(d, "loss") for d in out.survivors],
        bytes_up=counted["up"],
        bytes_down=counted["down"],
        rejections=rejections,
    )


def local_round(
    run: str,
    round_: int,
    inputs: dict[str, np.ndarray],
    spec: sa.SecAggSpec,
    *,
    vanish: dict[str, str] | None = None,
    graph_seed: bytes | None = None,
) -> tuple[SecAggRound, list[tuple[str, bytes]]]:
    """One round with the devices' state machines called in this process, no broker (checks and
    attack benches): every message as it would cross the wire, in order. ``vanish``: device ->
    the last phase it sends ("advertise", "share", "masked")."""
    vanish = vanish or {}
    length = len(next(iter(inputs.values())))
    clients = {d: sa.SecAggClient(run, round_, d, x, spec) for d, x in inputs.items()}
    wire_log: list[tuple[str, bytes]] = []
    out: list[tuple[str, bytes]] = []

    def send(topic: str, payload: bytes) -> int:
        out.append((topic, payload))
        return len(payload)

    rnd = SecAggRound(
        run, round_, inputs, spec, length, send=send, ledger=lambda *a: None, deadline_s=0.0,
        graph_seed=graph_seed,
    )  # fmt: skip
    last = {"keys": "advertise", "shares": "share", "unmask": "masked"}
    for d, c in clients.items():
        topic, payload = sa.up_topic(run, "advertise", d), c.advertise()
        wire_log.append((topic, payload))
        rnd.on_message(topic, payload, len(payload))
    while not rnd.done:
        rnd.step()
        batch, out[:] = list(out), []
        wire_log += batch
        for topic, payload in batch:
            parsed = sa.parse_secagg_topic(topic)
            assert parsed is not None
            _, _, phase, d = parsed
            if vanish.get(d) == last[phase]:
                continue
            up, reply = clients[d].handle(sa.decode_message(payload, phase, run, round_, d))
            topic = sa.up_topic(run, up, d)
            wire_log.append((topic, reply))
            rnd.on_message(topic, reply, len(reply))
    return rnd, wire_log
