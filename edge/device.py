"""The device: turns tasks into updates. Network drivers live beside it (``run_device``)."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import math
import os
import queue
import secrets
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import paho.mqtt.client as mqtt

from edge import decoy, protect, secagg, wire
from edge.backends.base import Backend
from edge.manifest import ModelArtifact
from edge.mqtt import (
    QOS,
    BrokerAddress,
    Received,
    connect_with_backoff,
    make_client,
    publish_packet_bytes,
)
from edge.poison import Poison, poison_data, poison_update
from edge.train import LocalResult, device_rng

if TYPE_CHECKING:
    from edge.sign import Credentials

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outgoing:
    """A message the device wants published: an update (with what it reports of the round),
    or its retained ``online`` status again."""

    topic: str
    payload: bytes
    # or "status", "decoy" (published like an update, printed as none), or "resend" (an update
    # sent again after the coordinator reconnected: published at once, printed as none)
    kind: str = "update"
    retain: bool = False
    run: str = ""
    round: int = 0
    examples: int = 0
    loss: float = math.nan
    packet_bytes: int = 0
    seconds: float = 0.0

    def line(self, device: str) -> str:
        """One printed line per round: round, examples, loss, bytes up, seconds."""
        return (
            f"device {device}: run {self.run} round {self.round}: {self.examples} examples, "
            f"loss {self.loss:.4f}, {self.packet_bytes} bytes up, {self.seconds:.2f} s"
        )


class SpillFile:
    """The payloads the devices of one process keep to send once more (``Device.unconfirmed``),
    in one unnamed temporary file instead of memory: a fleet worker's 5,000 devices would
    otherwise hold 5,000 updates. Each device has one slot, rewritten in place while its
    payloads fit."""

    def __init__(self, directory: str | None = None) -> None:
        self._file = tempfile.TemporaryFile(prefix="edgeleak-spill-", dir=directory)
        self._end = 0
        self._slots: dict[str, tuple[int, int, list[int]]] = {}  # offset, capacity, sizes

    def put(self, device: str, payloads: list[bytes]) -> None:
        """Keep ``payloads`` for ``device`` (replacing what it kept before)."""
        size = sum(len(p) for p in payloads)
        offset, capacity, _ = self._slots.get(device, (self._end, 0, []))
        if size > capacity:
            offset, capacity = self._end, size
            self._end += size
        wrote = os.pwritev(self._file.fileno(), payloads, offset)  # no joined copy
        if wrote != size:
            raise OSError(f"spill: wrote {wrote} of {size} bytes of {device}'s payloads")
        self._slots[device] = (offset, capacity, [len(p) for p in payloads])

    def take(self, device: str) -> list[bytes]:
        """The payloads ``device`` kept, in order (none: an empty list); its slot stays."""
        offset, _, sizes = self._slots.get(device, (0, 0, []))
        data = os.pread(self._file.fileno(), sum(sizes), offset)
        out = []
        for n in sizes:
            out.append(data[:n])
            data = data[n:]
        return out

    def close(self) -> None:
        self._file.close()


@dataclass(frozen=True)
class TaskLimits:
    """The most a task may ask of this device; a task above any is refused (``over_limit``)."""

    max_epochs: int = 10
    max_batch_size: int = 1024
    max_steps: int = 10_000  # SGD steps (one backend call each) one task may cost

    def __post_init__(self) -> None:
        for name in ("max_epochs", "max_batch_size", "max_steps"):
            v = getattr(self, name)
            if type(v) is not int or v < 1:
                raise ValueError(f"{name}={v!r}: expected an integer >= 1")

    def check(self, task: wire.Task, examples: int) -> None:
        """Raise ``WireError("over_limit")`` if ``task`` on ``examples`` examples is too much."""
        if task.epochs > self.max_epochs:
            raise wire.WireError("over_limit", f"epochs {task.epochs} > max {self.max_epochs}")
        if task.batch_size > self.max_batch_size:
            raise wire.WireError(
                "over_limit", f"batch_size {task.batch_size} > max {self.max_batch_size}"
            )
        steps = task_steps(task.algorithm, task.epochs, task.batch_size, examples)
        if steps > self.max_steps:
            raise wire.WireError("over_limit", f"{steps} SGD steps > max {self.max_steps}")


def task_steps(algorithm: str, epochs: int, batch_size: int, examples: int) -> int:
    """SGD steps a task costs on ``examples`` examples: 1 for FedSGD, epochs × batches for FedAvg
    (``batch_size`` 0 is one batch of everything)."""
    if algorithm == "fedsgd":
        return 1
    per_epoch = 1 if batch_size <= 0 else math.ceil(examples / batch_size)
    return epochs * per_epoch


# How many task nonces a device remembers to refuse a replayed task.
SEEN_NONCES = 256


@dataclass(frozen=True)
class TrainingRecord:
    """Device-local truth of one update (which examples it used): never sent on the wire."""

    run: str
    round: int
    device: str
    used: np.ndarray
    # seconds the device spent on the task: training with its protections, decoys, encoding
    seconds: float = 0.0


TASK_SIGNERS = ("coordinator", "aggregator")  # roles whose signed tasks a device accepts


def noise_rng(seed: int, round_: int, device_id: str) -> np.random.Generator:
    """The generator of a device's noise and dummies in ``round_``: seeded by (seed, round,
    device id), so devices sharing a seed still draw different noise. Reproducible by design
    (emulation, runtime parity); a real deployment keeps its device's seed secret."""
    device = int.from_bytes(hashlib.sha256(device_id.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, round_, 1, device])


class Device:
    """One federated client: its data, its runtime, its identity. No I/O of its own."""

    def __init__(
        self,
        device_id: str,
        run: str | None,
        artifact: ModelArtifact,
        backend: Backend,
        x: np.ndarray,
        y: np.ndarray,
        *,
        seed: int = 0,
        profile: str = "",
        on_trained: Callable[[TrainingRecord], None] | None = None,
        max_message_bytes: int = wire.MAX_MESSAGE_BYTES,
        limits: TaskLimits | None = None,
        ends: wire.EndCommitments | None = None,
        public: tuple[np.ndarray, np.ndarray] | None = None,
        key: bytes | None = None,
        decoy_data: tuple[np.ndarray, np.ndarray] | None = None,
        credentials: Credentials | None = None,
        poison: Poison | None = None,
        verify_model: bool = False,
        spill: SpillFile | None = None,
        site: str = "",
    ) -> None:
        """``run=None``: not pinned, takes part in any run that sends it a task. ``ends`` may be
        shared by the devices of one process (a fleet worker). ``public``: examples anyone may
        hold (the source of ``dummy:source=public``). ``key``: this device's secret (enrolment),
        needed for decoys; ``decoy_data``: public examples ``(x, y)`` of the same domain that
        decoy updates train on. ``credentials`` (secure mode, ``edge.sign``): tasks must be
        signed by the coordinator (or the group's aggregator), and updates are signed with this
        device's key. ``poison``:
        a malicious device (back-door experiments): its data and updates as ``edge.poison``
        says. ``verify_model``: train only on the weights the coordinator announced to every
        device of the run (``wire.model_announcement`` on the control topic), so a coordinator
        that ships devices different models (LOKI) is refused as ``model_inconsistent``.
        ``spill``: keep the last update's bytes on disk (a fleet worker's devices share one).
        ``site``: the site broker it connects to, bridged to the coordinator's (announced in its
        status, so that the coordinator's ledger books the bridge hop too)."""
        if len(x) != len(y) or len(x) == 0:
            raise ValueError(
                f"device {device_id}: need as many labels as examples, and some ({len(x)}, {len(y)})"
            )
        want = artifact.manifest.input_shape
        if tuple(x.shape[1:]) != want:
            raise ValueError(
                f"device {device_id}: examples of shape {x.shape[1:]}, model expects {want}"
            )
        self.device_id = device_id
        self.run = run
        self.artifact = artifact
        self.backend = backend
        self.x = np.ascontiguousarray(x, dtype=np.float32)
        self.y = np.ascontiguousarray(y, dtype=np.int64)
        self.poison = poison
        if poison is not None:
            self.x, self.y = self._poisoned_data(poison, seed)
        self.seed = seed
        self.profile = profile
        self.on_trained = on_trained
        self.max_message_bytes = max_message_bytes
        self.limits = limits or TaskLimits()
        self.ends = ends if ends is not None else wire.EndCommitments()
        self.public = public
        self.rejected: dict[str, int] = {}
        self.rounds_done = 0
        self.updates: dict[str, int] = {}  # updates sent, per run
        self.last_round: dict[str, int] = {}  # the latest round answered, per run
        # The last update(s) published (run, messages), kept to send once more when the
        # coordinator reconnects and asks (``hello``): the broker may have acknowledged them and
        # then died before passing them on. Once per update, so forged hellos cannot make the
        # device flood the broker.
        self.unconfirmed: tuple[str, list[Outgoing]] = ("", [])
        self.spill = spill  # where the payloads of ``unconfirmed`` are, when not in it
        self.site = wire.check_site(site) if site else ""
        self._seen: collections.deque[str] = collections.deque(maxlen=SEEN_NONCES)
        self.key = key
        self.decoy_data = decoy_data
        self.credentials = credentials
        # Error feedback: what earlier updates did not carry, per run and codec; slot -1 is the
        # real update, slots 0.. the decoys (so decoys carry residuals like the real one).
        self.residuals: dict[tuple[str, str, int], wire.Params] = {}
        self.secagg: dict[str, secagg.SecAggClient] = {}  # run -> this round's secure aggregation
        self.he_keys: dict[str, tuple[str, object]] = {}  # run -> (key id, public CKKS context)
        self.verify_model = verify_model
        self.announced: dict[str, tuple[int, str]] = {}  # run -> (round, model digest) announced

    def _poisoned_data(self, p: Poison, seed: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([seed, zlib.crc32(self.device_id.encode()), 0xBAD])
        n = self.artifact.manifest.num_classes
        return poison_data(self.x, self.y, p, num_classes=n, rng=rng)

    @property
    def status_topic(self) -> str:
        if self.run is None:
            return wire.lobby_status_topic(self.device_id)
        return wire.status_topic(self.run, self.device_id)

    @property
    def subscriptions(self) -> tuple[str, ...]:
        """Task and control topics of its run (any run when not pinned), and its own status
        topic: a forged ``offline`` there is answered with ``online`` again."""
        he_public = f"{wire.TOPIC_PREFIX}/{self.run or '+'}/he/public"  # edge.he
        return (
            *wire.device_filters(self.device_id, self.run),
            self.status_topic,
            secagg.down_filter(self.run or "+", self.device_id),
            he_public,
        )

    def client(self, inbox: queue.Queue[Received], protocol: int) -> mqtt.Client:
        """This device's MQTT client: its id, its subscriptions, "online" once subscribed,
        "offline" as its last will."""
        return make_client(
            self.device_id, inbox, protocol=protocol,
            will=(self.status_topic, self.status("offline")), subscriptions=self.subscriptions,
            announce=(self.status_topic, self.status("online")),
        )  # fmt: skip

    def status(self, state: str) -> bytes:
        """The retained status message: state, runtime, examples and (if any) device profile."""
        info: dict[str, object] = {"runtime": self.backend.name, "examples": len(self.x)}
        if self.profile:
            info["profile"] = self.profile
        if self.site:
            info["site"] = self.site
        return wire.encode_status(state, **info)

    def train(
        self,
        task: wire.Task,
        steps: tuple[protect.Protection, ...] = (),
        data: tuple[np.ndarray, np.ndarray] | None = None,
        rng: np.random.Generator | None = None,
    ) -> LocalResult:
        """Run the task's local training on this device's data (or on ``data``) with the
        protections ``steps``.

        Batches are drawn from a generator seeded by (seed, device id, round), noise and dummies
        from ``noise_rng(round)``: every runtime gets the same of both. An ``rng`` given replaces
        both (decoys draw theirs unpredictably)."""
        x, y = data if data is not None else (self.x, self.y)
        return protect.protected_training(
            steps,
            self.backend,
            task.weights,
            x,
            y,
            protect.LocalPlan(task.algorithm, task.epochs, task.batch_size, task.lr),
            rng=rng if rng is not None else device_rng(self.seed, self.device_id, task.round),
            noise_rng=rng if rng is not None else self.noise_rng(task.round),
            num_classes=self.artifact.manifest.num_classes,
            public=self.public,
        )

    def refuse(self, err: wire.WireError) -> None:
        """Count a refused task and say why in one log line."""
        self.rejected[err.reason] = self.rejected.get(err.reason, 0) + 1
        log.warning("device %s rejected a task: %s", self.device_id, str(err)[:300])

    def accept(self, payload: bytes, run: str) -> wire.Task:
        """The task in ``payload``, received on run ``run``'s topic, if this device should run
        it; ``WireError`` saying why not."""
        if self.credentials is not None:
            # the coordinator, or (a group's device) its edge aggregator: the broker's ACL lets
            # only those two write this device's task topic
            self.credentials.verifier.check_any(payload, TASK_SIGNERS)
        task = wire.decode_task(payload, self.artifact.manifest)
        if task.run != run or task.device != self.device_id:
            raise wire.WireError("not_mine", f"task for {task.run[:40]}/{task.device[:40]}")
        if task.model_hash != self.artifact.manifest.sha256:
            raise wire.WireError("model_mismatch", f"task model {task.model_hash[:12]}")
        if task.nonce in self._seen:
            raise wire.WireError("replayed_nonce", f"task nonce {task.nonce} was seen before")
        self._seen.append(task.nonce)
        last = self.last_round.get(task.run, -1)
        if task.round == last:
            raise wire.WireError("duplicate", f"round {task.round} was already answered")
        if task.round < last:
            raise wire.WireError("stale_round", f"round {task.round} < {last}")
        self.limits.check(task, len(self.x))
        if self.verify_model:
            self._check_model(task)
        if task.decoys and self.key is None:
            raise wire.WireError("no_key", "decoys need this device's key (--key)")
        if task.decoys and self.decoy_data is None:
            raise wire.WireError("no_decoy_data", "decoys need public examples (--decoy-data)")
        if task.he:
            from edge.he import check_key

            check_key(self.he_keys, task)
        return task

    def _check_model(self, task: wire.Task) -> None:
        """The task's weights must be those announced to the whole run for its round."""
        announced = self.announced.get(task.run)
        if announced is None or announced[0] != task.round:
            raise wire.WireError(
                "model_inconsistent", f"no model announced for round {task.round} of the run"
            )
        digest = wire.model_digest(task.weights, task.codec)
        if digest != announced[1]:
            raise wire.WireError(
                "model_inconsistent",
                f"weights {digest[:12]} differ from the model announced to the run "
                f"({announced[1][:12]}): the coordinator sends devices different models",
            )

    def noise_rng(self, round_: int) -> np.random.Generator:
        """The generator of this device's noise and dummies in ``round_`` (``noise_rng``)."""
        return noise_rng(self.seed, round_, self.device_id)

    def _mine(self, msg: Received) -> tuple[str, str] | None:
        """(run, channel) of a message on one of this device's topics; None otherwise."""
        try:
            run, channel, device = wire.parse_topic(msg.topic)
        except wire.WireError:
            return None
        if self.run is not None and run != self.run and channel != "status":
            return None
        if channel == "control" or (channel in ("task", "status") and device == self.device_id):
            return run, channel
        return None

    def ended(self, msg: Received) -> str | None:
        """The run a genuine ``end`` ends (its token matches a commitment of a task this device
        received; that run's state is forgotten); None for anything else, forged ends included."""
        where = self._mine(msg)
        if where is None or where[1] != "control" or not self.ends.accepts(where[0], msg.payload):
            return None
        self.ends.forget(where[0])
        return where[0]

    def _announce(self) -> Outgoing:
        return Outgoing(self.status_topic, self.status("online"), kind="status", retain=True)

    def _decoy_result(self, task: wire.Task, steps: tuple[protect.Protection, ...]) -> LocalResult:
        """A decoy: the task's protected training on as many public examples as this device
        holds, drawn with an unpredictable generator."""
        assert self.decoy_data is not None
        px, py = self.decoy_data
        rng = np.random.default_rng(secrets.randbits(128))
        pick = rng.choice(len(px), size=len(self.x), replace=len(px) < len(self.x))
        return self.train(task, steps, (px[pick], py[pick]), rng)

    def _message(
        self, task: wire.Task, result: LocalResult, device_field: str, slot: int, defence: str
    ) -> tuple[str, bytes]:
        """(topic, payload) of one update, with error feedback for ``slot`` (-1: the real one)."""
        codec = wire.get_codec(task.uplink)
        key = (task.run, codec.name, slot)
        tensors, corrected, residual = codec.compress(
            result.params, self.residuals.get(key), self.artifact.manifest
        )
        if residual is not None:
            self.residuals[key] = residual
        update = wire.Update(
            run=task.run,
            round=task.round,
            device=device_field,
            kind=result.kind,
            num_examples=result.num_examples,
            params=corrected,
            train_loss=result.train_loss,
            runtime=self.backend.name,
            codec=codec.name,
            defence=defence,
        )
        signer = self.credentials.signer if self.credentials is not None else None
        if task.he:
            from edge.he import encrypt_update

            _, ctx = self.he_keys[task.run]
            payload = encrypt_update(update, ctx, task.he, self.artifact.manifest, signer)
        else:
            payload = wire.encode_update(update, tensors=tensors, signer=signer)
        return wire.update_topic(task.run, device_field), payload

    def handle(self, msg: Received) -> list[Outgoing]:
        """A task in, its update(s) out (the real one, or K decoys and the real one under
        pseudonyms); ``hello`` on a control topic, or any status of its own that is not its
        ``online`` (a forged ``offline``), in: its ``online`` status out. Anything else is
        dropped; a bad task is counted."""
        sa_topic = secagg.parse_secagg_topic(msg.topic)
        if sa_topic is not None:
            return self._secagg_step(msg, *sa_topic)
        if msg.topic.endswith("/he/public"):
            from edge.he import on_public

            on_public(self.he_keys, msg, self.run)
            return []
        where = self._mine(msg)
        if where is None:
            return []
        run, channel = where
        if channel == "control":
            if (announced := wire.parse_model_announcement(msg.payload)) is not None:
                self.announced[run] = announced
                return []
            return self._hello(run) if msg.payload == wire.HELLO else []
        if channel == "status":
            on_own = msg.topic == self.status_topic
            return [self._announce()] if on_own and msg.payload != self.status("online") else []
        t0 = time.monotonic()
        try:
            task = self.accept(msg.payload, run)
            self.ends.add(task.run, task.end)
            # the task's decoys field and a decoys step must agree (a task may carry only the field)
            steps = protect.parse(protect.with_decoys(task.protect, task.decoys))
            if protect.decoy_count(steps) != task.decoys:
                raise protect.ProtectError(
                    f"{task.protect!r} asks for decoys, the task's decoys field is {task.decoys}"
                )
            protect.check_task(steps, secagg=bool(task.secagg))
            sa_spec = secagg.task_spec(task.secagg) if task.secagg else None
            result = self.train(task, steps)
            if self.poison is not None:
                result = dataclasses.replace(
                    result, params=poison_update(result.params, self.poison)
                )
        except protect.ProtectError as e:
            self.refuse(wire.WireError("bad_protect", str(e)))
            return []
        except wire.WireError as e:
            self.refuse(e)
            return []
        if sa_spec is not None:
            if self.on_trained is not None:
                seconds = time.monotonic() - t0
                rec = TrainingRecord(task.run, task.round, self.device_id, result.used, seconds)
                self.on_trained(rec)
            return [self._secagg_start(task, sa_spec, result, t0)]
        defence = protect.defence_json(steps)
        real = 0
        if not task.decoys:
            sent = [self._message(task, result, self.device_id, -1, defence)]
        else:
            assert self.key is not None
            real = decoy.real_slot(self.key, task.run, task.round, task.decoys)
            sent = []
            for slot in range(task.decoys + 1):
                name = decoy.pseudonym(self.key, task.run, task.round, slot)
                if slot == real:
                    sent.append(self._message(task, result, name, -1, defence))
                else:
                    fake = self._decoy_result(task, steps)
                    sent.append(self._message(task, fake, name, slot, defence))
        sizes = [publish_packet_bytes(topic, len(payload), QOS) for topic, payload in sent]
        if max(sizes) > self.max_message_bytes:
            # paho would retry an over-size packet forever after the broker drops the connection.
            log.error(
                "device %s: update of %d bytes exceeds %d; not sent",
                self.device_id,
                max(sizes),
                self.max_message_bytes,
            )
            return []
        self.rounds_done += 1
        self.last_round[task.run] = task.round
        self.updates[task.run] = self.updates.get(task.run, 0) + 1
        seconds = time.monotonic() - t0
        if self.on_trained is not None:
            rec = TrainingRecord(task.run, task.round, self.device_id, result.used, seconds)
            self.on_trained(rec)
        out = [
            Outgoing(
                topic,
                payload,
                kind="update" if i == real else "decoy",
                run=task.run,
                round=task.round,
                examples=result.num_examples,
                loss=result.train_loss,
                packet_bytes=size,
                seconds=seconds,
            )  # fmt: skip
            for i, ((topic, payload), size) in enumerate(zip(sent, sizes, strict=True))
        ]
        self._keep(task.run, out)
        return out

    def _keep(self, run: str, out: list[Outgoing]) -> None:
        """Keep ``out`` to send once more on ``hello`` (its payloads in ``spill`` if any)."""
        if self.spill is None:
            self.unconfirmed = (run, out)
            return
        self.spill.put(self.device_id, [o.payload for o in out])
        self.unconfirmed = (run, [dataclasses.replace(o, payload=b"") for o in out])

    def _hello(self, run: str) -> list[Outgoing]:
        """``hello`` of ``run``: the ``online`` status, and the last update(s) of that run once
        more if not re-sent yet (the coordinator refuses a second copy as a duplicate)."""
        mine, outs = self.unconfirmed
        if mine != run or not outs:
            return [self._announce()]
        self.unconfirmed = ("", [])
        payloads = self.spill.take(self.device_id) if self.spill else [o.payload for o in outs]
        again = [
            dataclasses.replace(o, kind="resend", payload=p)
            for o, p in zip(outs, payloads, strict=True)
        ]
        return [self._announce(), *again]

    def _secagg_start(
        self, task: wire.Task, spec: secagg.SecAggSpec, result: LocalResult, t0: float
    ) -> Outgoing:
        """Secure aggregation: the update stays on the device; its keys go out (``edge.secagg``)."""
        x = secagg.flatten(result.params, self.artifact.manifest.param_names)
        client = secagg.SecAggClient(task.run, task.round, self.device_id, x, spec)
        self.secagg[task.run] = client
        payload = client.advertise(examples=result.num_examples, loss=result.train_loss)
        topic = secagg.up_topic(task.run, "advertise", self.device_id)
        self.rounds_done += 1
        self.last_round[task.run] = task.round
        self.updates[task.run] = self.updates.get(task.run, 0) + 1
        return Outgoing(
            topic, payload, run=task.run, round=task.round, examples=result.num_examples,
            loss=result.train_loss, packet_bytes=publish_packet_bytes(topic, len(payload), QOS),
            seconds=time.monotonic() - t0,
        )  # fmt: skip

    def _secagg_step(
        self, msg: Received, run: str, direction: str, phase: str, device: str
    ) -> list[Outgoing]:
        """The coordinator's next secure-aggregation message in, this device's answer out."""
        client = self.secagg.get(run)
        if direction != "down" or device != self.device_id or client is None:
            return []
        try:
            m = secagg.decode_message(msg.payload, phase, run, client.round, device)
            up, payload = client.handle(m)
        except secagg.SecAggError as e:
            self.refuse(e)
            return []
        if client.phase == "done":
            del self.secagg[run]
        topic = secagg.up_topic(run, up, device)
        return [Outgoing(topic, payload, kind="secagg", run=run, round=client.round)]

    def handle_safely(self, msg: Received) -> list[Outgoing]:
        """``handle``, but an unexpected error is logged and counted (``internal_error``) and the
        device carries on."""
        try:
            return self.handle(msg)
        except Exception as e:  # a message must never take the device down
            log.exception("device %s: error while handling %s", self.device_id, msg.topic)
            self.refuse(wire.WireError("internal_error", repr(e)))
            return []


def run_device(
    device: Device,
    broker: BrokerAddress,
    *,
    stop: threading.Event | None = None,
    exit_on_end: bool = False,
    say: Callable[[str], None] = log.info,
    backoff_s: tuple[float, float] = (1.0, 30.0),
) -> None:
    """Run one device on its own MQTT connection until ``stop`` (or, with ``exit_on_end``, the
    first genuine ``end``); ``say`` gets one line per round and per ended run.

    The broker may be down at start and may restart: connecting and reconnecting back off
    exponentially from ``backoff_s[0]`` up to ``backoff_s[1]`` seconds."""
    inbox: queue.Queue[Received] = queue.Queue()
    client = device.client(inbox, broker.protocol)
    client.reconnect_delay_set(max(1, round(backoff_s[0])), max(1, round(backoff_s[1])))
    stop = stop or threading.Event()
    if not connect_with_backoff(
        client, broker, stop=stop, say=say, initial_s=backoff_s[0], cap_s=backoff_s[1],
        identity=device.device_id,
    ):  # fmt: skip
        return
    client.loop_start()
    try:
        while not stop.is_set():
            try:
                msg = inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            run = device.ended(msg)
            if run is not None:
                n = device.updates.pop(run, 0)
                say(f"device {device.device_id}: run {run} ended after {n} updates")
                if exit_on_end:
                    break
                continue
            for out in device.handle_safely(msg):
                _send(client, out.topic, out.payload, retain=out.retain, timeout=60)
                if out.kind == "update":
                    say(out.line(device.device_id))
    finally:
        if client.is_connected():
            _send(client, device.status_topic, device.status("offline"), retain=True, timeout=5)
        client.disconnect()
        client.loop_stop()


def _send(client: mqtt.Client, topic: str, payload: bytes, *, retain: bool, timeout: float) -> None:
    """Publish at QoS 1 and wait for the PUBACK; while the broker is away, paho keeps the
    message and sends it after reconnecting."""
    info = client.publish(topic, payload, qos=QOS, retain=retain)
    try:
        info.wait_for_publish(timeout)
    except RuntimeError as e:
        log.warning("%s: %s; it goes out when the broker is back", topic, e)
