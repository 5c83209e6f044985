"""A counting TCP relay between MQTT clients and a broker: the ground truth for the byte ledger.

It forwards bytes unchanged and splits each direction of each connection into MQTT packets
(fixed header + remaining length), naming the connection by the client id of its CONNECT.
"""

from __future__ import annotations

import socket
import threading
from collections import defaultdict
from dataclasses import dataclass, field

from edge.mqtt import BrokerAddress, read_varint

PUBLISH, CONNECT = 3, 1


@dataclass
class PacketLog:
    """Per (client id, direction): PUBLISH bytes by topic, and all other packet bytes."""

    publish: dict[tuple[str, str, str], int] = field(default_factory=lambda: defaultdict(int))
    other: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    total: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Splitter:
    """Feeds a byte stream, yields whole MQTT packets."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self.buf += data
        out = []
        while len(self.buf) >= 2:
            try:
                rem, n = read_varint(bytes(self.buf[1:5]))
            except ValueError:
                if len(self.buf) < 5:
                    break
                raise
            size = 1 + n + rem
            if len(self.buf) < size:
                break
            out.append(bytes(self.buf[:size]))
            del self.buf[:size]
        return out


def _client_id(packet: bytes) -> str:
    """The client id of an MQTT 3.1.1 or 5 CONNECT packet."""
    _, n = read_varint(packet[1:5])
    p = 1 + n
    name_len = int.from_bytes(packet[p : p + 2], "big")
    p += 2 + name_len
    level = packet[p]
    p += 1 + 1 + 2  # level, flags, keepalive
    if level == 5:
        plen, k = read_varint(packet[p : p + 4])
        p += k + plen
    cid_len = int.from_bytes(packet[p : p + 2], "big")
    return packet[p + 2 : p + 2 + cid_len].decode()


def _topic(packet: bytes) -> str:
    _, n = read_varint(packet[1:5])
    p = 1 + n
    tlen = int.from_bytes(packet[p : p + 2], "big")
    return packet[p + 2 : p + 2 + tlen].decode()


class CountingRelay:
    """Listen on a free loopback port; forward to ``upstream``; log packet sizes."""

    def __init__(self, upstream: BrokerAddress) -> None:
        self.upstream = upstream
        self.log = PacketLog()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.address = BrokerAddress("127.0.0.1", self.sock.getsockname()[1], upstream.protocol)
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        self.sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                down, _ = self.sock.accept()
            except OSError:
                return
            up = socket.create_connection((self.upstream.host, self.upstream.port))
            ident: list[str] = []
            ready = threading.Event()
            threading.Thread(
                target=self._pump, args=(down, up, "up", ident, ready), daemon=True
            ).start()
            threading.Thread(
                target=self._pump, args=(up, down, "down", ident, ready), daemon=True
            ).start()

    def _pump(
        self,
        src: socket.socket,
        dst: socket.socket,
        direction: str,
        ident: list[str],
        ready: threading.Event,
    ) -> None:
        split = _Splitter()
        try:
            while data := src.recv(1 << 16):
                for pkt in split.feed(data):
                    kind = pkt[0] >> 4
                    if direction == "up" and kind == CONNECT:
                        ident.append(_client_id(pkt))
                        ready.set()
                    ready.wait(5)
                    cid = ident[0] if ident else "?"
                    with self.log.lock:
                        self.log.total[(cid, direction)] += len(pkt)
                        if kind == PUBLISH:
                            self.log.publish[(cid, direction, _topic(pkt))] += len(pkt)
                        else:
                            self.log.other[(cid, direction)] += len(pkt)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
