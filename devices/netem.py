"""Real network shaping for a small fleet: one Linux network namespace per device.

Each device namespace is joined to a bridge on the host by a veth pair. ``tc`` shapes both ends
from the device's profile: a token bucket (``tbf``) at the downlink rate on the host end (traffic
towards the device) and at the uplink rate on the device end. The one-way delay (half the
profile's RTT) and the packet loss are a ``netem`` qdisc under each token bucket where the kernel
has ``sch_netem``. Where it does not (some VM kernels), the relay below holds every chunk for the
delay in each direction instead; and a device whose link loses packets is joined by a pair of TUN
interfaces instead of the veth pair, with ``LossyWire`` between them: it drops IP packets at the
link's rate and delays the rest, so the device's and the host's TCP see real losses and
retransmit. Devices reach the broker through the relay, which listens on the bridge address (an
address this module creates) and forwards to the broker's own address (loopback), so the broker
binds nothing new.

Needs root and iproute2 (``ip``, ``tc``). Everything created is removed on exit, also on errors.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import queue
import random
import select
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache, partial

from devices.profiles import DeviceProfile
from edge.mqtt import BrokerAddress

log = logging.getLogger(__name__)

PREFIX = "edgeleak-"  # every namespace this module creates starts with it
SUPERNET = ipaddress.IPv4Network("10.231.0.0/16")  # one /24 of it per lab
FRAME_BYTES = 1514  # a full Ethernet frame
QUEUE_SECONDS = 2.0  # tbf queue bound, as time at the shaped rate


TUNSETIFF = 0x400454CA  # linux/if_tun.h
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000


@dataclass(frozen=True)
class LinkShape:
    """A device's access link: rates in Mbit/s (10^6 bit/s), one-way delay in milliseconds, and
    the fraction of IP packets lost in each direction."""

    down_mbps: float
    up_mbps: float
    delay_ms: float
    loss: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.loss < 1.0:
            raise ValueError(f"loss={self.loss}: expected a fraction in [0, 1)")


def link_shape(profile: DeviceProfile) -> LinkShape:
    """The profile's link: its rates, and half its RTT as the delay in each direction."""
    return LinkShape(profile.downlink_mbps, profile.uplink_mbps, profile.rtt_ms / 2)


def transfer_seconds(nbytes: int, *, rate_mbps: float, delay_ms: float) -> float:
    """Time for ``nbytes`` to cross one direction of a link: bytes / rate + delay."""
    return nbytes * 8 / (rate_mbps * 1e6) + delay_ms / 1e3


def tbf_burst(rate_mbps: float) -> int:
    """Token bucket depth in bytes: one millisecond at the rate, at least two full frames. A
    shaped transfer of ``n`` bytes takes at least ``transfer_seconds(n - burst, ...)``."""
    return max(2 * FRAME_BYTES, round(rate_mbps * 1e6 / 8 / 1e3))


def tc_commands(
    dev: str, *, rate_mbps: float, delay_ms: float, netem: bool, loss: float = 0.0
) -> list[list[str]]:
    """``tc`` argument lists that shape the egress of ``dev``: netem delay and loss (when
    ``netem``) with a token bucket at ``rate_mbps`` under it, or the token bucket alone."""
    kbit = max(1, round(rate_mbps * 1000))
    burst = tbf_burst(rate_mbps)
    limit = max(burst * 4, round(rate_mbps * 1e6 / 8 * QUEUE_SECONDS))
    tbf = ["tbf", "rate", f"{kbit}kbit", "burst", str(burst), "limit", str(limit)]
    if not netem or (delay_ms <= 0 and loss <= 0):
        return [["tc", "qdisc", "replace", "dev", dev, "root", "handle", "1:", *tbf]]
    lose = ["loss", f"{loss * 100:g}%"] if loss > 0 else []
    return [
        [
            "tc",
            "qdisc",
            "replace",
            "dev",
            dev,
            "root",
            "handle",
            "1:",
            "netem",
            "delay",
            f"{delay_ms}ms",
            *lose,
            "limit",
            "100000",
        ],
        ["tc", "qdisc", "replace", "dev", dev, "parent", "1:1", "handle", "10:", *tbf],
    ]


def _run(argv: Sequence[str]) -> None:
    res = subprocess.run(list(argv), capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr.strip()}")


def _ns(ns: str, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def missing_tools() -> str | None:
    """Why shaping cannot run here (not root, no ``ip`` or ``tc``), or ``None`` when it can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if not any(
            os.access(os.path.join(d, tool), os.X_OK)
            for d in (*os.environ.get("PATH", "").split(os.pathsep), "/usr/sbin", "/sbin")
        ):
            return f"`{tool}` is missing: apt-get install -y iproute2"
    return None


@cache
def netem_available() -> bool:
    """Whether this kernel has the ``netem`` qdisc (tried on loopback in a scratch namespace)."""
    ns = f"{PREFIX}probe-{os.getpid()}"
    try:
        _run(["ip", "netns", "add", ns])
    except RuntimeError:
        return False
    try:
        res = subprocess.run(
            _ns(ns, ["tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"]),
            capture_output=True,
        )
        return res.returncode == 0
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def namespaces(prefix: str = PREFIX) -> list[str]:
    """Network namespaces whose name starts with ``prefix``."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 of ``SUPERNET`` that no route of this host touches."""
    routes = subprocess.run(
        ["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True
    ).stdout
    used: set[ipaddress.IPv4Network | ipaddress.IPv6Network] = set()
    for line in routes.split("\n"):
        for word in line.split():
            try:
                used.add(ipaddress.ip_network(word, strict=False))
            except ValueError:
                continue
    for net in SUPERNET.subnets(new_prefix=24):
        if not any(net.overlaps(u) for u in used if u.prefixlen):
            return net
    raise RuntimeError(f"no free /24 left in {SUPERNET}")


Due = queue.Queue[tuple[float, bytes]]
"""Chunks to deliver, each with the ``time.monotonic()`` at which it is due."""


def deliver(due: Due, write: Callable[[bytes], bool]) -> None:
    """Write each chunk of ``due`` at its time, in order, until ``write`` returns False."""
    while True:
        at, data = due.get()
        if (wait := at - time.monotonic()) > 0:
            time.sleep(wait)
        if not write(data):
            return


def open_tun(name: str) -> int:
    """A new TUN interface ``name`` (IP packets, no extra header) in this process's namespace.
    Returns its descriptor; the interface goes away when the descriptor is closed, and may be
    moved to another namespace meanwhile (``ip link set NAME netns NS``)."""
    fd = os.open("/dev/net/tun", os.O_RDWR)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


class LossyWire:
    """Carries IP packets between two TUN descriptors: each direction drops a packet with
    probability ``loss`` (its own generator, seeded) and delivers the others ``delay_s`` after
    they were read, in order. ``dropped``/``forwarded``: packets per direction (0: a to b)."""

    def __init__(self, a: int, b: int, *, loss: float, delay_s: float, seed: int) -> None:
        self.fds = (a, b)
        self.loss = loss
        self.delay_s = delay_s
        self.dropped = [0, 0]
        self.forwarded = [0, 0]
        self._closing = threading.Event()
        self._threads: list[threading.Thread] = []
        self._due: list[Due] = []
        for k, (src, dst) in enumerate(((a, b), (b, a))):
            due: Due = queue.Queue()
            rng = random.Random(seed * 2 + k)
            write = partial(self._write, k, dst)
            self._due.append(due)
            self._threads += [
                threading.Thread(target=self._read, args=(k, src, due, rng), daemon=True),
                threading.Thread(target=deliver, args=(due, write), daemon=True),
            ]
        for t in self._threads:
            t.start()

    def _read(self, k: int, src: int, due: Due, rng: random.Random) -> None:
        while not self._closing.is_set():
            if not select.select([src], [], [], 0.2)[0]:
                continue
            try:
                packet = os.read(src, 1 << 16)
            except OSError:
                return
            if rng.random() < self.loss:
                self.dropped[k] += 1
            else:
                due.put((time.monotonic() + self.delay_s, packet))

    def _write(self, k: int, dst: int, packet: bytes) -> bool:
        if not packet:  # close()
            return False
        try:
            os.write(dst, packet)
        except OSError:  # the far end is down (``set_link``): lost, as on a cut cable
            return True
        self.forwarded[k] += 1
        return True

    def close(self) -> None:
        """Stop both directions, then close both descriptors (which removes the interfaces)."""
        self._closing.set()
        for due in self._due:
            due.put((0.0, b""))
        for t in self._threads:
            t.join()
        for fd in self.fds:
            os.close(fd)


class DelayRelay:
    """TCP relay from ``listen`` to ``upstream``; holds each chunk ``delay_s(peer ip)`` seconds
    in each direction (a pure latency: a chunk read at t is written at t + delay, in order)."""

    def __init__(
        self, listen: tuple[str, int], upstream: tuple[str, int], delay_s: dict[str, float]
    ) -> None:
        self.upstream = upstream
        self.delay_s = delay_s
        self.server = socket.create_server(listen)
        self.address: tuple[str, int] = self.server.getsockname()[:2]
        self._closing = threading.Event()
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="delay-relay", daemon=True).start()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                down, peer = self.server.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(self.upstream, timeout=10)
            except OSError as e:
                log.warning("relay: upstream %s unreachable: %s", self.upstream, e)
                down.close()
                continue
            up.settimeout(None)
            for s in (down, up):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._socks += [down, up]
            d = self.delay_s.get(peer[0], 0.0)
            self._pipe(down, up, d)
            self._pipe(up, down, d)

    def _pipe(self, src: socket.socket, dst: socket.socket, delay: float) -> None:
        chunks: Due = queue.Queue()

        def read() -> None:
            while True:
                try:
                    data = src.recv(1 << 16)
                except OSError:
                    data = b""
                chunks.put((time.monotonic() + delay, data))
                if not data:
                    return

        def write(data: bytes) -> bool:
            try:
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return False
                dst.sendall(data)
            except OSError:
                return False
            return True

        threading.Thread(target=read, daemon=True).start()
        threading.Thread(target=deliver, args=(chunks, write), daemon=True).start()

    def close(self) -> None:
        self._closing.set()
        self.server.close()
        with self._lock:
            for s in self._socks:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()


def set_link(iface: str, *, up: bool) -> None:
    """Bring a link of a lab up or down (``NetLab.link``)."""
    _run(["ip", "link", "set", iface, "up" if up else "down"])


class NetLab:
    """Namespaces ``edgeleak-<tag>-<i>`` for devices with the given links, a bridge, and a relay
    to ``broker``. Use as a context manager; ``argv(i, [...])`` runs a command in device ``i``'s
    namespace, which reaches the broker at ``broker_url``."""

    def __init__(
        self, links: Sequence[LinkShape], broker: BrokerAddress, *, netem: bool | None = None
    ) -> None:
        if not links:
            raise ValueError("a lab needs at least one device link")
        if why := missing_tools():
            raise RuntimeError(f"cannot shape links: {why}")
        self.links = tuple(links)
        self.broker = broker
        self.netem = netem_available() if netem is None else netem
        self.tag = os.urandom(2).hex()
        self.bridge = f"elbr{self.tag}"
        self.names = [f"{PREFIX}{self.tag}-{i}" for i in range(len(links))]
        self.subnet: ipaddress.IPv4Network | None = None
        self.relay: DelayRelay | None = None
        self.wires: dict[int, LossyWire] = {}  # device index -> its wire (``wired``)
        self._made: list[list[str]] = []  # undo commands, in creation order

    @property
    def host_ip(self) -> str:
        assert self.subnet is not None, "use NetLab as a context manager"
        return str(self.subnet.network_address + 1)

    def device_ip(self, i: int) -> str:
        assert self.subnet is not None, "use NetLab as a context manager"
        return str(self.subnet.network_address + 2 + i)

    @property
    def broker_url(self) -> str:
        """The broker as devices inside the namespaces reach it (through the relay)."""
        assert self.relay is not None, "use NetLab as a context manager"
        b = self.broker
        return BrokerAddress(
            self.host_ip, self.relay.address[1], b.protocol, b.username, b.password
        ).secret_url

    def argv(self, i: int, command: Sequence[str]) -> list[str]:
        """``command`` run inside device ``i``'s namespace."""
        return _ns(self.names[i], command)

    def link(self, i: int) -> str:
        """The host end of namespace ``i``'s link (for ``set_link``)."""
        return f"elh{self.tag}{i}"

    def set_link(self, i: int, *, up: bool) -> None:
        """Bring namespace ``i``'s link up or down (down: its packets stop, no FIN is sent)."""
        set_link(self.link(i), up=up)

    def __enter__(self) -> NetLab:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self) -> None:
        self.subnet = _free_subnet()
        plen = self.subnet.prefixlen
        _run(["ip", "link", "add", self.bridge, "type", "bridge"])
        self._made.append(["ip", "link", "del", self.bridge])
        _run(["ip", "addr", "add", f"{self.host_ip}/{plen}", "dev", self.bridge])
        _run(["ip", "link", "set", self.bridge, "up"])
        for i, (ns, link) in enumerate(zip(self.names, self.links, strict=True)):
            host_end, dev_end = self.link(i), f"eld{self.tag}{i}"
            _run(["ip", "netns", "add", ns])
            self._made.append(["ip", "netns", "del", ns])  # removes the veth pair with it
            if self.wired(i):
                self._join_by_wire(i, ns, host_end, dev_end)
            else:
                self._join_by_veth(i, ns, host_end, dev_end, plen)
            _run(["ip", "-n", ns, "link", "set", dev_end, "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            for cmd in tc_commands(
                host_end,
                rate_mbps=link.down_mbps,
                delay_ms=link.delay_ms,
                netem=self.netem,
                loss=link.loss,
            ):
                _run(cmd)
            for cmd in tc_commands(
                dev_end,
                rate_mbps=link.up_mbps,
                delay_ms=link.delay_ms,
                netem=self.netem,
                loss=link.loss,
            ):
                _run(_ns(ns, cmd))
        delays = {
            self.device_ip(i): link.delay_ms / 1e3
            for i, link in enumerate(self.links)
            if not self.netem and not self.wired(i)
        }
        self.relay = DelayRelay((self.host_ip, 0), (self.broker.host, self.broker.port), delays)

    def wired(self, i: int) -> bool:
        """Whether device ``i`` is joined through a ``LossyWire`` (loss, and no netem here)."""
        return self.links[i].loss > 0 and not self.netem

    def _join_by_veth(self, i: int, ns: str, host_end: str, dev_end: str, plen: int) -> None:
        """A veth pair, its host end on the bridge; the device's address in the lab's subnet."""
        _run(["ip", "link", "add", host_end, "type", "veth", "peer", "name", dev_end, "netns", ns])
        # Deleting the host end removes the pair at once (a namespace's own teardown is lazy).
        self._made.append(["ip", "link", "del", host_end])
        _run(["ip", "link", "set", host_end, "master", self.bridge, "up"])
        _run(["ip", "-n", ns, "addr", "add", f"{self.device_ip(i)}/{plen}", "dev", dev_end])

    def _join_by_wire(self, i: int, ns: str, host_end: str, dev_end: str) -> None:
        """Two point-to-point TUN interfaces, ``host_ip`` on the host's and the device's address
        on the namespace's, with a ``LossyWire`` (the link's loss and delay) between them."""
        host_fd = open_tun(host_end)
        try:
            dev_fd = open_tun(dev_end)
        except OSError:
            os.close(host_fd)
            raise
        link = self.links[i]
        self.wires[i] = LossyWire(
            host_fd, dev_fd, loss=link.loss, delay_s=link.delay_ms / 1e3, seed=i
        )
        _run(["ip", "link", "set", dev_end, "netns", ns])
        _run(["ip", "addr", "add", self.host_ip, "peer", self.device_ip(i), "dev", host_end])
        _run(["ip", "link", "set", host_end, "up"])
        _run(
            ["ip", "-n", ns, "addr", "add", self.device_ip(i), "peer", self.host_ip, "dev", dev_end]
        )

    def close(self) -> None:
        """Stop the relay and remove every namespace, veth and bridge this lab created."""
        if self.relay is not None:
            self.relay.close()
            self.relay = None
        for wire in self.wires.values():
            wire.close()
        self.wires.clear()
        for cmd in reversed(self._made):
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                log.warning("cleanup %s: %s", " ".join(cmd), res.stderr.strip())
        self._made.clear()
