"""MQTT plumbing shared by every role: broker URLs, packet sizes, and queue-fed paho clients.

paho callbacks only hand messages to a queue; training and aggregation run elsewhere.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from urllib.parse import parse_qs, quote, unquote, urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

QOS = 1
# MQTT 5 persistent sessions: a client's first connection starts clean, its reconnections do not,
# and the broker keeps its subscriptions and queued QoS 1 messages this long while it is away
# (a broker restart with persistence included). 0: the session ends with the connection.
SESSION_EXPIRY_S = 600
log = logging.getLogger(__name__)


# URL scheme -> MQTT protocol level. MQTT 5 is the contract; 3.1.1 serves brokers without 5
# (the embedded amqtt). Packet sizes differ only by the properties field.
SCHEMES = {"mqtt": 5, "mqtt311": 4}
# mqtts: MQTT 5 over TLS with a client certificate from a PKI folder (``edge.sign``).
TLS_SCHEME = "mqtts"
TLS_PORT = 8883


@dataclass(frozen=True)
class BrokerAddress:
    """Where the broker is, and the credentials every client of ours connects with.

    ``url`` and ``repr`` never show the password; ``secret_url`` does (hand it to a child
    process, never print it)."""

    host: str
    port: int
    protocol: int = 5  # MQTT protocol level: 5, or 4 for 3.1.1
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False  # mqtts: TLS with the client certificate of an identity in ``pki``
    pki: str | None = None  # PKI folder (``edgeleak pki``) of the TLS identities

    def _url(self, password: str | None) -> str:
        scheme = next(k for k, v in SCHEMES.items() if v == self.protocol)
        scheme = TLS_SCHEME if self.tls else scheme
        query = f"?pki={quote(self.pki, safe='/')}" if self.pki else ""
        auth = ""
        if self.username is not None:
            auth = quote(self.username, safe="")
            if self.password is not None:
                auth += ":" + (password or "")
            auth += "@"
        return f"{scheme}://{auth}{self.host}:{self.port}{query}"

    @property
    def url(self) -> str:
        """The URL with the password replaced by ``***``: safe to print and store."""
        return self._url(None if self.password is None else "***")

    @property
    def secret_url(self) -> str:
        """The URL with the password: for a child process's settings only."""
        return self._url(None if self.password is None else quote(self.password, safe=""))


def parse_broker_url(url: str) -> BrokerAddress:
    """``mqtt://[USER[:PASSWORD]@]HOST[:PORT]`` (MQTT 5) or ``mqtt311://...`` (MQTT 3.1.1);
    port defaults to 1883. The error message never repeats the password."""
    try:
        p = urlparse(url)
        port = p.port
    except ValueError:
        p, port = None, None
    if p is None or p.scheme not in (*SCHEMES, TLS_SCHEME) or not p.hostname:
        shown = url if p is None or p.password is None else url.replace(p.password, "***")
        raise ValueError(
            f"broker URL {shown!r}: expected mqtt://HOST:PORT (or mqtt311:// for an MQTT 3.1.1 "
            f"broker, mqtts://HOST:PORT with --pki for TLS; a login as "
            f"mqtt://USER:PASSWORD@HOST:PORT), e.g. mqtt://127.0.0.1:1883"
        )
    user = unquote(p.username) if p.username is not None else None
    password = unquote(p.password) if p.password is not None else None
    tls = p.scheme == TLS_SCHEME
    pki = parse_qs(p.query).get("pki", [None])[-1]
    return BrokerAddress(
        p.hostname, port or (TLS_PORT if tls else 1883), SCHEMES.get(p.scheme, 5), user, password,
        tls=tls, pki=pki,
    )  # fmt: skip


def with_pki(broker: BrokerAddress, pki: str | None) -> BrokerAddress:
    """``broker`` with the PKI folder its TLS identities come from (``--pki``); an mqtts address
    needs one, and a PKI folder needs an mqtts address."""
    if pki is None and not broker.tls:
        return broker
    if pki is None or not broker.tls:
        raise ValueError(
            f"broker {broker.url}: TLS needs both an mqtts://HOST:PORT broker and --pki DIR "
            "(`edgeleak pki init`)"
        )
    return dataclasses.replace(broker, pki=str(pki))


_TLS_READY: weakref.WeakSet[mqtt.Client] = weakref.WeakSet()


def connect(
    client: mqtt.Client,
    broker: BrokerAddress,
    *,
    keepalive: int = 60,
    identity: str | None = None,
    session_expiry_s: int = SESSION_EXPIRY_S,
) -> None:
    """Connect ``client`` to ``broker`` with the broker address's credentials, if any; over TLS
    (mqtts) with ``identity``'s certificate from ``broker.pki``; over MQTT 5 with a persistent
    session (clean start on the first connection only, then resumed)."""
    if broker.tls and client not in _TLS_READY:
        if broker.pki is None or identity is None:
            raise ValueError(f"broker {broker.url}: TLS needs --pki and an enrolled identity")
        from edge.sign import tls_context

        client.tls_set_context(tls_context(broker.pki, identity))
        _TLS_READY.add(client)
    if broker.username is not None:
        client.username_pw_set(broker.username, broker.password)
    props = None
    if broker.protocol == 5:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = session_expiry_s
    client.connect(broker.host, broker.port, keepalive=keepalive, properties=props)


def backoff_delays(initial: float = 1.0, cap: float = 30.0) -> Iterator[float]:
    """Capped exponential backoff: initial, 2×initial, … up to ``cap``, then ``cap`` forever."""
    delay = initial
    while True:
        yield min(delay, cap)
        delay = min(delay * 2, cap)


def connect_with_backoff(
    client: mqtt.Client,
    broker: BrokerAddress,
    *,
    stop: threading.Event,
    say: Callable[[str], None],
    initial_s: float = 1.0,
    cap_s: float = 30.0,
    keepalive: int = 60,
    identity: str | None = None,
) -> bool:
    """Connect, retrying with capped exponential backoff while the broker is not reachable;
    one ``say`` line per failed attempt. False when ``stop`` was set before a connection."""
    for delay in backoff_delays(initial_s, cap_s):
        if stop.is_set():
            return False
        try:
            connect(client, broker, keepalive=keepalive, identity=identity)
            return True
        except OSError as e:
            say(f"broker {broker.url} not reachable ({e.strerror or e}), retrying in {delay:g} s")
        if stop.wait(delay):
            return False
    return False  # pragma: no cover - the delays never run out


def varint_len(n: int) -> int:
    """Bytes of an MQTT variable byte integer."""
    if not 0 <= n <= 268_435_455:
        raise ValueError(f"{n} does not fit an MQTT variable byte integer")
    return 1 if n < 128 else 2 if n < 16_384 else 3 if n < 2_097_152 else 4


def read_varint(buf: bytes, offset: int = 0) -> tuple[int, int]:
    """(value, bytes used) of the MQTT variable byte integer at ``offset``."""
    value, mult = 0, 1
    for i in range(4):
        if offset + i >= len(buf):
            break
        b = buf[offset + i]
        value += (b & 0x7F) * mult
        if not b & 0x80:
            return value, i + 1
        mult *= 128
    raise ValueError("malformed MQTT variable byte integer")


def publish_packet_bytes(
    topic: str, payload_len: int, qos: int = QOS, properties_len: int = 0, protocol: int = 5
) -> int:
    """Exact size of a PUBLISH packet: fixed header, variable header, properties (MQTT 5), payload."""
    variable = 2 + len(topic.encode()) + (2 if qos > 0 else 0)
    if protocol == 5:
        variable += varint_len(properties_len) + properties_len
    remaining = variable + payload_len
    return 1 + varint_len(remaining) + remaining


@dataclass(frozen=True)
class Received:
    """One delivered message, as the network thread saw it."""

    topic: str
    payload: bytes
    retain: bool
    t: float
    qos: int = QOS
    properties_len: int = 0
    protocol: int = 5
    client: str = ""  # the id of the client that received it

    @property
    def packet_bytes(self) -> int:
        """Size of the PUBLISH packet that carried this message."""
        return publish_packet_bytes(
            self.topic, len(self.payload), self.qos, self.properties_len, self.protocol
        )


def make_client(
    client_id: str,
    inbox: queue.Queue[Received] | None = None,
    *,
    protocol: int = 5,
    will: tuple[str, bytes] | None = None,
    subscriptions: tuple[str, ...] = (),
    on_ready: list[str] | None = None,
    announce: tuple[str, bytes] | None = None,
) -> mqtt.Client:
    """A paho client whose messages land in ``inbox``; subscribes on every (re)connect.

    Once the subscriptions are acknowledged, ``announce`` (topic, payload) is published retained
    (so "online" is only ever seen for a device that can already receive its task) and the client
    id is appended to ``on_ready``.
    """
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5 if protocol == 5 else mqtt.MQTTv311,
    )
    if will is not None:
        client.will_set(will[0], will[1], qos=QOS, retain=True)
    pending: set[int] = set()

    def ready(c: mqtt.Client) -> None:
        if announce is not None:
            c.publish(announce[0], announce[1], qos=QOS, retain=True)
        if on_ready is not None:
            on_ready.append(client_id)

    def on_connect(c: mqtt.Client, _u: object, _f: object, rc: ReasonCode, _p: object) -> None:
        if rc.is_failure:
            log.warning("%s: broker refused the connection: %s", client_id, rc)
            return
        if subscriptions:
            _, mid = c.subscribe([(s, QOS) for s in subscriptions])
            if mid is not None:
                pending.add(mid)
        else:
            ready(c)

    def on_subscribe(c: mqtt.Client, _u: object, mid: int, _rc: object, _p: object) -> None:
        if mid in pending:
            pending.discard(mid)
            ready(c)

    def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        if inbox is not None:
            props = msg.properties.pack() if msg.properties is not None else b"\x00"
            inbox.put(
                Received(
                    msg.topic,
                    bytes(msg.payload),
                    bool(msg.retain),
                    time.monotonic(),
                    msg.qos,
                    read_varint(props)[0],
                    protocol,
                    client_id,
                )
            )

    def on_disconnect(_c: mqtt.Client, _u: object, _f: object, rc: ReasonCode, _p: object) -> None:
        if rc.is_failure:
            log.warning("%s: lost the broker (%s); reconnecting with backoff", client_id, rc)

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.max_inflight_messages_set(0)  # 0 = unlimited: a device never queues behind itself
    client.max_queued_messages_set(0)
    client.reconnect_delay_set(1, 30)  # paho's network thread: capped exponential backoff
    return client


@contextmanager
def running(
    client: mqtt.Client, broker: BrokerAddress, *, keepalive: int = 60, identity: str | None = None
) -> Iterator[mqtt.Client]:
    """Connect and run paho's network thread for the duration of the block."""
    connect(client, broker, keepalive=keepalive, identity=identity)
    client.loop_start()
    try:
        yield client
    finally:
        client.disconnect()
        client.loop_stop()


def wait_until(predicate: object, timeout: float, what: str, poll: float = 0.01) -> None:
    """Poll ``predicate()`` until true; TimeoutError naming ``what`` otherwise."""
    assert callable(predicate)
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)
