"""Light devices that hold a fixed update and speak only the secure-aggregation protocol, each on
its own MQTT connection, all driven from one selector loop in a background thread (tests and
benchmarks of ``edge.secagg`` at 100–1,000 devices without training)."""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import paho.mqtt.client as mqtt

from devices.fleet import SelectorLoop, _raise_fd_limit
from edge import secagg as sa
from edge import wire
from edge.mqtt import QOS, BrokerAddress, Received, connect, make_client

log = logging.getLogger(__name__)
KEEPALIVE_S = 3600


@dataclass
class LightDevice:
    """A device's fixed input, and the phase after whose message it vanishes (``""``: never)."""

    device_id: str
    x: np.ndarray
    vanish_after: str = ""  # "advertise", "share" or "masked"
    client: sa.SecAggClient | None = None
    gone: bool = False
    seconds: float = 0.0  # compute spent in the protocol
    sent: dict[str, int] = field(default_factory=dict)  # up phase -> payload bytes


class LightSecAggFleet:
    """Use as a context manager: connects every device (one MQTT connection each), serves them
    until exit. ``errors`` counts the protocol errors devices raised (by reason)."""

    def __init__(self, run: str, broker: BrokerAddress, devices: list[LightDevice]) -> None:
        if any(d.vanish_after not in ("", "advertise", "share", "masked") for d in devices):
            raise ValueError("vanish_after: expected '', 'advertise', 'share' or 'masked'")
        self.run, self.broker = run, broker
        self.devices = {d.device_id: d for d in devices}
        self.inbox: queue.Queue[Received] = queue.Queue()
        self.loop = SelectorLoop()
        self.ready: list[str] = []
        self.errors: dict[str, int] = {}
        self.clients: dict[str, mqtt.Client] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="secagg-fleet", daemon=True)

    def __enter__(self) -> LightSecAggFleet:
        _raise_fd_limit()
        for d in self.devices:
            c = make_client(
                d, self.inbox, protocol=self.broker.protocol,
                subscriptions=(sa.down_filter(self.run, d),), on_ready=self.ready,
            )  # fmt: skip
            self.loop.add(c)
            # One thread computes for every device in turn: a phase of 1,000 devices can outlast
            # a 60 s keepalive on a busy host, so the emulated devices ask for a long one.
            connect(c, self.broker, keepalive=KEEPALIVE_S)
            self.clients[d] = c
        self._thread.start()
        end = time.monotonic() + 120
        while len(self.ready) < len(self.devices):
            if time.monotonic() > end:
                raise TimeoutError(f"{len(self.ready)} of {len(self.devices)} devices subscribed")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        for c in self.clients.values():
            c.disconnect()

    def _serve(self) -> None:
        last_poll = time.monotonic()
        while not self._stop.is_set():
            self.loop.poll(0.02)
            while True:
                try:
                    msg = self.inbox.get_nowait()
                except queue.Empty:
                    break
                self._handle(msg)
                if time.monotonic() - last_poll > 5.0:
                    self.loop.poll(0)  # send what is queued, keep the connections alive
                    self.loop.misc()
                    last_poll = time.monotonic()
            self.loop.misc()

    def _publish(self, device: str, topic: str, payload: bytes) -> None:
        self.clients[device].publish(topic, payload, qos=QOS)

    def _handle(self, msg: Received) -> None:
        dev = self.devices.get(msg.client)
        parsed = sa.parse_secagg_topic(msg.topic)
        if dev is None or dev.gone or parsed is None or parsed[1] != "down":
            return
        run, _, phase, device = parsed
        t0 = time.perf_counter()
        try:
            if phase == "begin":
                head = sa.decode_message(msg.payload, phase, run, None, device)
                spec = sa.parse_spec(head.fields["spec"])
                if int(head.fields["length"]) != len(dev.x):
                    raise sa.SecAggError("bad_length", f"{head.fields['length']} != {len(dev.x)}")
                dev.client = sa.SecAggClient(run, head.round, device, dev.x, spec)
                up, payload = "advertise", dev.client.advertise()
            else:
                if dev.client is None:
                    raise sa.SecAggError("wrong_phase", f"{phase} before begin")
                m = sa.decode_message(msg.payload, phase, run, dev.client.round, device)
                up, payload = dev.client.handle(m)
        except (sa.SecAggError, ValueError, KeyError) as e:
            reason = e.reason if isinstance(e, wire.WireError) else type(e).__name__
            self.errors[reason] = self.errors.get(reason, 0) + 1
            log.info("device %s: %s", device, e)
            return
        finally:
            dev.seconds += time.perf_counter() - t0
        self._publish(device, sa.up_topic(run, up, device), payload)
        dev.sent[up] = dev.sent.get(up, 0) + len(payload)
        if dev.vanish_after == up:
            # Gone for the rest of the round: says so (what a last will would), then leaves.
            dev.gone = True
            status = json.dumps({"state": "offline"}).encode()
            self._publish(device, wire.status_topic(run, device), status)
            self.clients[device].disconnect()
            self.loop.drop(self.clients[device])  # no reconnect by ``misc``
