"""The device: turns tasks into updates. Network drivers live beside it (``run_device``)."""

from __future__ import annotations

import collections
import json
import logging
import math
import queue
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import paho.mqtt.client as mqtt

from edge import decoy, wire
from edge.backends.base import Backend
from edge.manifest import ModelArtifact
from edge.mqtt import QOS, BrokerAddress, Received, make_client, publish_packet_bytes, running
from edge.train import LocalResult, fedavg, fedsgd

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outgoing:
    topic: str
    payload: bytes


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


class Device:
    """One federated client: its data, its runtime, its identity. No I/O of its own."""

    def __init__(
        self,
        device_id: str,
        run: str,
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
        key: bytes | None = None,
        decoy_data: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        """``key``: this device's secret (enrolment), needed for decoys; ``decoy_data``: public
        examples ``(x, y)`` of the same domain that decoy updates train on."""
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
        self.seed = seed
        self.profile = profile
        self.on_trained = on_trained
        self.max_message_bytes = max_message_bytes
        self.limits = limits or TaskLimits()
        self.rejected: dict[str, int] = {}
        self.rounds_done = 0
        self.last_round = -1  # the latest round this device answered
        self._seen: collections.deque[str] = collections.deque(maxlen=SEEN_NONCES)
        self.key = key
        self.decoy_data = decoy_data
        # Error feedback: what earlier updates did not carry, per codec; slot -1 is the real
        # update, slots 0.. the decoys (so decoys carry residuals like the real one).
        self.residuals: dict[tuple[str, int], wire.Params] = {}

    @property
    def task_topic(self) -> str:
        return wire.task_topic(self.run, self.device_id)

    @property
    def status_topic(self) -> str:
        return wire.status_topic(self.run, self.device_id)

    @property
    def subscriptions(self) -> tuple[str, ...]:
        return (self.task_topic, wire.control_topic(self.run))

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
        info: dict[str, object] = {
            "state": state,
            "runtime": self.backend.name,
            "examples": len(self.x),
        }
        if self.profile:
            info["profile"] = self.profile
        return json.dumps(info, sort_keys=True).encode()

    def train(
        self,
        task: wire.Task,
        data: tuple[np.ndarray, np.ndarray] | None = None,
        rng: np.random.Generator | None = None,
    ) -> LocalResult:
        """Run the task's local training on this device's data (or on ``data``)."""
        x, y = data if data is not None else (self.x, self.y)
        rng = rng if rng is not None else np.random.default_rng([self.seed, task.round])
        if task.algorithm == "fedsgd":
            return fedsgd(self.backend, task.weights, x, y, task.batch_size, rng)
        return fedavg(
            self.backend,
            task.weights,
            x,
            y,
            epochs=task.epochs,
            batch_size=task.batch_size,
            lr=task.lr,
            rng=rng,
        )

    def refuse(self, err: wire.WireError) -> None:
        """Count a refused task and say why in one log line."""
        self.rejected[err.reason] = self.rejected.get(err.reason, 0) + 1
        log.warning("device %s rejected a task: %s", self.device_id, str(err)[:300])

    def accept(self, payload: bytes) -> wire.Task:
        """The task in ``payload`` if this device should run it; ``WireError`` saying why not."""
        task = wire.decode_task(payload, self.artifact.manifest)
        if task.run != self.run or task.device != self.device_id:
            raise wire.WireError("not_mine", f"task for {task.run[:40]}/{task.device[:40]}")
        if task.model_hash != self.artifact.manifest.sha256:
            raise wire.WireError("model_mismatch", f"task model {task.model_hash[:12]}")
        if task.nonce in self._seen:
            raise wire.WireError("replayed_nonce", f"task nonce {task.nonce} was seen before")
        self._seen.append(task.nonce)
        if task.round == self.last_round:
            raise wire.WireError("duplicate", f"round {task.round} was already answered")
        if task.round < self.last_round:
            raise wire.WireError("stale_round", f"round {task.round} < {self.last_round}")
        self.limits.check(task, len(self.x))
        if task.decoys and self.key is None:
            raise wire.WireError("no_key", "decoys need this device's key (--key)")
        if task.decoys and self.decoy_data is None:
            raise wire.WireError("no_decoy_data", "decoys need public examples (--decoy-data)")
        return task

    def _decoy_result(self, task: wire.Task) -> LocalResult:
        """A decoy: the task's training on as many public examples as this device holds, drawn
        with an unpredictable generator."""
        assert self.decoy_data is not None
        px, py = self.decoy_data
        rng = np.random.default_rng(secrets.randbits(128))
        pick = rng.choice(len(px), size=len(self.x), replace=len(px) < len(self.x))
        return self.train(task, (px[pick], py[pick]), rng)

    def _message(
        self, task: wire.Task, result: LocalResult, device_field: str, slot: int
    ) -> Outgoing:
        """Encode one update with error feedback for ``slot`` (-1: the real update)."""
        codec = wire.get_codec(task.uplink)
        key = (codec.name, slot)
        tensors, corrected, residual = codec.compress(
            result.params, self.residuals.get(key), self.artifact.manifest
        )
        if residual is not None:
            self.residuals[key] = residual
        update = wire.Update(
            run=self.run,
            round=task.round,
            device=device_field,
            kind=result.kind,
            num_examples=result.num_examples,
            params=corrected,
            train_loss=result.train_loss,
            runtime=self.backend.name,
            codec=codec.name,
        )
        payload = wire.encode_update(update, tensors=tensors)
        return Outgoing(wire.update_topic(self.run, device_field), payload)

    def handle(self, msg: Received) -> list[Outgoing]:
        """A task in, its update(s) out (the real one, or K decoys and the real one under
        pseudonyms); anything else is counted and dropped."""
        if msg.topic != self.task_topic:
            return []
        try:
            task = self.accept(msg.payload)
        except wire.WireError as e:
            self.refuse(e)
            return []
        result = self.train(task)
        if self.on_trained is not None:
            self.on_trained(TrainingRecord(self.run, task.round, self.device_id, result.used))
        if not task.decoys:
            out = [self._message(task, result, self.device_id, -1)]
        else:
            assert self.key is not None
            real = decoy.real_slot(self.key, self.run, task.round, task.decoys)
            out = []
            for slot in range(task.decoys + 1):
                name = decoy.pseudonym(self.key, self.run, task.round, slot)
                if slot == real:
                    out.append(self._message(task, result, name, -1))
                else:
                    out.append(self._message(task, self._decoy_result(task), name, slot))
        size = max(publish_packet_bytes(o.topic, len(o.payload), QOS) for o in out)
        if size > self.max_message_bytes:
            # paho would retry an over-size packet forever after the broker drops the connection.
            log.error(
                "device %s: update of %d bytes exceeds %d; not sent",
                self.device_id,
                size,
                self.max_message_bytes,
            )
            return []
        self.rounds_done += 1
        self.last_round = task.round
        return out

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
    exit_on_end: bool = True,
) -> None:
    """Run one device on its own MQTT connection until the run's control topic says ``end``."""
    inbox: queue.Queue[Received] = queue.Queue()
    client = device.client(inbox, broker.protocol)
    stop = stop or threading.Event()
    with running(client, broker):
        try:
            while not stop.is_set():
                try:
                    msg = inbox.get(timeout=0.2)
                except queue.Empty:
                    continue
                if msg.topic == wire.control_topic(device.run):
                    if msg.payload == b"end" and exit_on_end:
                        break
                    continue
                for out in device.handle_safely(msg):
                    client.publish(out.topic, out.payload, qos=QOS).wait_for_publish(timeout=60)
        finally:  # however the loop ends, the retained status must not stay "online"
            client.publish(
                device.status_topic, device.status("offline"), qos=QOS, retain=True
            ).wait_for_publish(5)
