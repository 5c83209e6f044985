"""Brokers for experiments: a mosquitto of our own on a free loopback port, else an embedded amqtt.

Both run in their own process with a config we write, and stop by PID. mosquitto's default
``max_queued_messages 1000`` silently drops QoS 1 messages to a slow subscriber while every
publisher still gets its PUBACK: the config sets it to 0 (unlimited).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from devices.orphans import parent_death_hook
from edge.mqtt import BrokerAddress

MOSQUITTO_CONF = """\
listener {port} 127.0.0.1
allow_anonymous true
persistence false
max_queued_messages 0
max_inflight_messages 0
message_size_limit 0
log_dest stderr
log_type error
log_type warning
"""

AMQTT_CONF = """\
listeners:
  default:
    type: tcp
    bind: 127.0.0.1:{port}
    max_connections: 0
plugins:
  amqtt.plugins.authentication.AnonymousAuthPlugin:
    allow_anonymous: true
"""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mosquitto_path() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).is_file()), None
    )


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"{what} exited with {proc.returncode}: {err.strip()[-500:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    proc.kill()
    raise TimeoutError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


@contextmanager
def local_broker(
    kind: str = "auto", *, port: int | None = None
) -> Iterator[tuple[BrokerAddress, str]]:
    """Start a broker on loopback for the block; yields (address, "mosquitto" | "amqtt").

    ``kind``: "auto" (mosquitto if installed, else amqtt), "mosquitto" or "amqtt".
    """
    if kind not in ("auto", "mosquitto", "amqtt"):
        raise ValueError(f"broker kind {kind!r}; expected auto, mosquitto or amqtt")
    exe = mosquitto_path()
    if kind == "mosquitto" and exe is None:
        raise RuntimeError("mosquitto is not installed: apt-get install -y mosquitto")
    use = "mosquitto" if kind == "mosquitto" or (kind == "auto" and exe) else "amqtt"
    port = port or free_port()
    with tempfile.TemporaryDirectory(prefix="edgeleak-broker-") as tmp:
        if use == "mosquitto":
            conf = Path(tmp) / "mosquitto.conf"
            # As root, mosquitto drops to user "mosquitto", which clears the parent-death signal:
            # stay the user we run as, so the broker dies with us.
            stay = "user root\n" if hasattr(os, "geteuid") and os.geteuid() == 0 else ""
            conf.write_text(MOSQUITTO_CONF.format(port=port) + stay)
            cmd = [str(exe), "-c", str(conf)]
        else:
            conf = Path(tmp) / "amqtt.yaml"
            conf.write_text(AMQTT_CONF.format(port=port))
            cmd = [sys.executable, "-m", "edgeleak.amqtt_main", str(conf)]
        # Its own process group: Ctrl-C in the terminal does not reach it; the block stops it.
        # It dies with this process, even on SIGKILL (Linux; a no-op elsewhere).
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            process_group=0,
            preexec_fn=parent_death_hook(),  # noqa: PLW1509
        )
        try:
            _wait_listening(port, proc, 15, use)
            # amqtt 0.12 speaks MQTT 3.1.1 only.
            yield BrokerAddress("127.0.0.1", port, 5 if use == "mosquitto" else 4), use
        finally:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
