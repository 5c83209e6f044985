"""The fleet's selector loop over a real broker: a client whose connection closed is connected
again by ``misc``; a client dropped on purpose stays gone."""

from __future__ import annotations

import secrets
import socket
from collections.abc import Callable

import paho.mqtt.client as mqtt

from devices.fleet import SelectorLoop
from edge.mqtt import BrokerAddress, connect, make_client


def _serve_until(loop: SelectorLoop, done: Callable[[], bool], steps: int = 400) -> bool:
    """Poll and ``misc`` until ``done`` (at most ``steps`` polls of 50 ms: a safety net)."""
    for _ in range(steps):
        if done():
            return True
        loop.poll(0.05)
        loop.misc()
    return done()


def test_misc_reconnects_closed_clients_but_not_dropped_ones(mosquitto: BrokerAddress) -> None:
    loop = SelectorLoop()
    loop.RECONNECT_S = 0.0  # every misc call is due
    loop.KEEPALIVE_SWEEP_S = float("inf")  # reconnects come from the closed sockets alone
    tag = secrets.token_hex(3)
    lost, dropped, steady = (
        make_client(f"sl-{name}-{tag}", protocol=mosquitto.protocol)
        for name in ("lost", "dropped", "steady")
    )
    for c in (lost, dropped, steady):
        loop.add(c)
        connect(c, mosquitto, keepalive=60)
    assert _serve_until(loop, lambda: all(c.is_connected() for c in (lost, dropped, steady)))

    sock = lost.socket()
    assert isinstance(sock, socket.socket)
    sock.shutdown(socket.SHUT_RDWR)  # the connection breaks under the client
    dropped.disconnect()
    loop.drop(dropped)
    # connected again by misc, on a new socket
    assert _serve_until(loop, lambda: lost.socket() not in (None, sock) and lost.is_connected())

    # dropped on purpose: never connected again
    assert not _serve_until(loop, lambda: dropped.socket() is not None, steps=20)
    assert not dropped.is_connected()
    assert dropped not in loop.clients and steady.is_connected()
    for c in (lost, steady):
        assert c.disconnect() == mqtt.MQTT_ERR_SUCCESS
    _serve_until(loop, lambda: not any(c.want_write() for c in (lost, steady)), steps=40)
