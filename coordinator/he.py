"""The coordinator's side of homomorphic encryption: add CKKS updates without the secret key.

It learns the public context from the key holder's retained ``he/public`` message, validates the
devices' encrypted updates, adds their ciphertexts, sends the sum to the key holder
(``he/aggregate``) and divides the decrypted sum (``he/result``) by the round's total examples.
It never holds a secret key: a context that has one is refused (``edge.he.public_context``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import numpy as np
import paho.mqtt.client as mqtt

from edge import he, wire
from edge.manifest import Manifest
from edge.mqtt import QOS, Received

Params = dict[str, np.ndarray]


class HECoordinator:
    """One run's HE state at the coordinator: the public context, the held ciphertexts, the
    key holder's results."""

    def __init__(self, run: str, manifest: Manifest) -> None:
        he.tenseal()  # HEError with the install command when TenSEAL is missing
        self.run = run
        self.manifest = manifest
        self.key = ""
        self.context: object | None = None
        self.held: dict[str, Mapping[str, np.ndarray]] = {}  # update nonce -> ciphertext tensors
        self.results: dict[int, Params] = {}
        self.add_seconds = 0.0  # the last round's ciphertext addition

    @property
    def topics(self) -> tuple[str, str]:
        return he.topic(self.run, "public"), he.topic(self.run, "result")

    def holds_secret_key(self) -> bool:
        return self.context is not None and bool(self.context.is_private())  # type: ignore[attr-defined]

    def owns(self, topic: str) -> bool:
        return topic in self.topics

    def on_message(self, msg: Received) -> None:
        """The key holder's public context or a decrypted result (others' are refused)."""
        if msg.topic == self.topics[0]:
            if not msg.payload:  # the key holder cleared its key
                return
            public = he.read_public(msg.payload, self.run)
            self.context = he.public_context(public)
            self.key = he.key_id(public)
        elif self.key:
            round_, params = he.read_result(msg.payload, self.run, self.key, self.manifest)
            self.results[round_] = params

    def validate(self, payload: bytes) -> wire.Update:
        """An encrypted update's header (params empty); its ciphertext is held by nonce."""
        if not self.key:
            raise wire.WireError("no_he_key", "no public key from the key holder yet")
        enc = he.decode_update(payload, self.manifest, self.key)
        self.held[enc.update.nonce] = enc.tensors
        return enc.update

    def wait_for_key(self, poll: Callable[[float], None], timeout: float) -> str:
        end = time.monotonic() + timeout
        while not self.key:
            if time.monotonic() > end:
                raise TimeoutError(
                    f"no public key on {self.topics[0]} after {timeout:.0f} s: start the key "
                    f"holder (python -m edge keyholder --run {self.run} ...)"
                )
            poll(0.05)
        return self.key

    def aggregate(
        self,
        client: mqtt.Client,
        round_: int,
        updates: list[wire.Update],
        poll: Callable[[float], None],
        timeout: float,
    ) -> Params:
        """The example-weighted mean of ``updates``: their ciphertexts (each ``n × update``)
        added here, the sum decrypted by the key holder, divided by the total ``n``."""
        size = self.manifest.num_parameters
        t0 = time.perf_counter()
        cts = [he.load(self.context, self.held.pop(u.nonce), size) for u in updates]
        total = he.add(cts)
        self.add_seconds = time.perf_counter() - t0
        payload = he.aggregate_message(self.run, round_, self.key, he.pack(total))
        client.publish(he.topic(self.run, "aggregate"), payload, qos=QOS)
        end = time.monotonic() + timeout
        while round_ not in self.results:
            if time.monotonic() > end:
                raise TimeoutError(f"no decrypted aggregate for round {round_} in {timeout:.0f} s")
            poll(0.05)
        n = float(sum(u.num_examples for u in updates))
        summed = self.results.pop(round_)
        self.held.clear()
        return {k: (v / n).astype(np.float32) for k, v in summed.items()}
