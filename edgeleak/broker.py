"""Brokers for experiments: a mosquitto of our own on a free loopback port, else an embedded amqtt.

Both run in their own process with a config we write, and stop by PID. mosquitto's default
``max_queued_messages 1000`` silently drops QoS 1 messages to a slow subscriber while every
publisher still gets its PUBACK: the config sets it to 0 (unlimited).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from devices.orphans import parent_death_hook
from edge import wire
from edge.mqtt import BrokerAddress
from edgeleak.errors import UsageError

MOSQUITTO_CONF = """\
listener {port} {bind}
user {user}
{auth}
{persistence}
max_queued_messages 0
max_inflight_messages 0
message_size_limit 0
{log}log_type error
log_type warning
"""


# What crosses a site broker's bridge to the coordinator's broker: device traffic out, the
# coordinator's (and key holder's) traffic in. Edge aggregators and key holders connect to the
# coordinator's broker.
BRIDGE_OUT = ("update/#", "status/#", "secagg/#")
BRIDGE_IN = ("task/#", "control", "secagg-to/#", "he/public")


def bridge_conf(site: str, remote: str) -> str:
    """mosquitto lines bridging this (site) broker to the coordinator's at ``remote``
    (``HOST:PORT``): ``BRIDGE_OUT`` topics of every run out, ``BRIDGE_IN`` in, QoS 1, a
    persistent session (queued messages cross once the link is back), MQTT 3.1.1 on the hop."""
    try:
        wire.check_site(site)
    except ValueError as e:
        raise UsageError(str(e)) from None
    host, _, port = remote.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"bridge to {remote!r}: expected HOST:PORT")
    topics = [f"topic edgeleak/+/{t} out 1" for t in BRIDGE_OUT]
    topics += [f"topic edgeleak/+/{t} in 1" for t in BRIDGE_IN]
    return "\n".join([
        f"connection edgeleak-site-{site}",
        f"address {host}:{port}",
        "bridge_protocol_version mqttv311",
        f"remote_clientid edgeleak-site-{site}",
        "cleansession false",
        "try_private true",
        "notifications false",
        "restart_timeout 1 5",
        "keepalive_interval 10",
        *topics,
    ]) + "\n"  # fmt: skip


def mosquitto_conf(
    port: int,
    *,
    bind: str = "127.0.0.1",
    password_file: Path | None = None,
    log_file: Path | None = None,
    tls: str | None = None,
    persistence_dir: Path | None = None,
    bridge: str = "",
) -> str:
    """The one mosquitto config of the project (demo, tests and ``edgeleak broker``): no silent
    drops, no size limit; anonymous unless ``password_file`` (made with ``mosquitto_passwd``);
    ``tls``: the secure mode's TLS, certificate and ACL lines (``edgeleak.pki.mosquitto_tls``).
    ``persistence_dir``: sessions, subscriptions, retained and queued messages are saved there
    on every change (mosquitto's default is every 30 minutes) and survive a ``kill -9``;
    ``bridge``: a site broker's ``bridge_conf`` lines."""
    auth = (
        "allow_anonymous true"
        if password_file is None
        else f"allow_anonymous false\npassword_file {password_file.absolute()}"
    )
    if tls is not None:
        auth = tls
    log = "log_dest stderr\n" + (f"log_dest file {log_file.absolute()}\n" if log_file else "")
    # Started as root, mosquitto would switch to the user "mosquitto", who cannot read our files
    # and whose switch clears the parent-death signal (the broker must die with us).
    user = pwd.getpwuid(os.getuid()).pw_name
    persistence = (
        "persistence false"
        if persistence_dir is None
        else f"persistence true\npersistence_location {persistence_dir.absolute()}/\n"
        "autosave_on_changes true\nautosave_interval 1"
    )
    return (
        MOSQUITTO_CONF.format(
            port=port, bind=bind, user=user, auth=auth, log=log, persistence=persistence
        )
        + bridge
    )


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


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate a broker process, killing it if it has not exited after 5 s."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


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
    _wait_listening_on("127.0.0.1", port, proc, timeout, what)


def _wait_listening_on(
    host: str, port: int, proc: subprocess.Popen[bytes], timeout: float, what: str = "mosquitto"
) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"{what} exited with {proc.returncode}: {err.strip()[-500:]}")
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.02)
    proc.kill()
    raise TimeoutError(f"{what} did not listen on {host}:{port} within {timeout:.0f} s")


@contextmanager
def local_broker(
    kind: str = "auto",
    *,
    port: int | None = None,
    password_file: Path | None = None,
    pki: Path | None = None,
    bridge: str = "",
) -> Iterator[tuple[BrokerAddress, str]]:
    """Start a broker on loopback for the block; yields (address, "mosquitto" | "amqtt").

    ``kind``: "auto" (mosquitto if installed, else amqtt), "mosquitto" or "amqtt";
    ``password_file`` (mosquitto only): clients must log in; ``pki`` (mosquitto only): the
    secure mode, TLS with client certificates of that PKI folder and the ACL of ``edgeleak.pki``;
    ``bridge`` (mosquitto only): a site broker's ``bridge_conf``.
    """
    if pki is not None and kind == "amqtt":
        raise ValueError("secure mode (TLS, ACL) needs mosquitto: apt-get install -y mosquitto")
    if pki is not None or bridge:
        kind = "mosquitto"
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
            conf.write_text(
                mosquitto_conf(port, password_file=password_file, tls=_tls(pki, tmp), bridge=bridge)
            )
            cmd = [str(exe), "-c", str(conf)]
        else:
            if password_file is not None:
                raise RuntimeError("a password file needs mosquitto: apt-get install -y mosquitto")
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
            protocol = 5 if use == "mosquitto" else 4
            pki_dir = str(pki) if pki is not None else None
            yield BrokerAddress("127.0.0.1", port, protocol, tls=pki is not None, pki=pki_dir), use
        finally:
            _stop(proc)


def _tls(pki: Path | None, folder: str | Path) -> str | None:
    """The secure mode's mosquitto lines, with its ACL file written into ``folder``."""
    if pki is None:
        return None
    from edgeleak.pki import acl_text, mosquitto_tls

    acl = Path(folder) / "acl"
    acl.write_text(acl_text(pki))
    return mosquitto_tls(pki, acl)


def serve_broker(
    *,
    port: int = 1883,
    bind: str = "127.0.0.1",
    data: Path | None = None,
    password_file: Path | None = None,
    say: Callable[[str], None] = print,
    pki: Path | None = None,
    persist: bool = False,
    bridge: str = "",
) -> int:
    """``edgeleak broker``: mosquitto with the project's config, in the foreground, until
    Ctrl-C or SIGTERM; config and log go to ``data`` (default: a temporary folder)."""
    exe = mosquitto_path()
    if exe is None:
        raise UsageError("mosquitto is not installed: apt-get install -y mosquitto")
    if password_file is not None and not password_file.is_file():
        raise UsageError(f"--password-file {password_file}: no such file (mosquitto_passwd -c)")
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((bind, port))
        except OSError as e:
            raise UsageError(f"cannot listen on {bind}:{port}: {e.strerror or e}") from None
    with contextlib.ExitStack() as stack:
        folder = data or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edgeleak-")))
        folder.mkdir(parents=True, exist_ok=True)
        conf = folder / "mosquitto.conf"
        log_file = folder / "mosquitto.log"
        tls = _tls(pki, folder)
        conf.write_text(
            mosquitto_conf(
                port,
                bind=bind,
                password_file=password_file,
                log_file=log_file,
                tls=tls,
                persistence_dir=folder if persist else None,
                bridge=bridge,
            )  # fmt: skip
        )
        if bind not in ("127.0.0.1", "localhost", "::1") and password_file is None and not tls:
            say(
                f"warning: listening on {bind}:{port} WITHOUT authentication: anyone on the "
                "network can read and publish every message (--password-file to require a login)"
            )
        proc = subprocess.Popen([exe, "-c", str(conf)])
        stop = threading.Event()
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            host = "127.0.0.1" if bind in ("0.0.0.0", "::") else bind
            _wait_listening_on(host, port, proc, 15)
            scheme = "mqtts" if tls else "mqtt"
            say(
                f"broker: mosquitto on {scheme}://{host}:{port} (config {conf}, log {log_file}); Ctrl-C stops it"
            )
            while proc.poll() is None and not stop.wait(0.2):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)
            _stop(proc)
        if proc.returncode not in (0, -signal.SIGTERM) and not stop.is_set():
            raise UsageError(f"mosquitto exited with {proc.returncode}; see {log_file}")
        say("broker stopped")
        return 0
