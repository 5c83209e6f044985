"""Up-front checks of the front door's inputs: each returns the parsed value or raises
``UsageError`` saying what was expected, before anything heavy runs or any folder is created."""

from __future__ import annotations

import argparse
import socket
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from edge.args import csv_choices
from edge.manifest import ModelArtifact
from edge.mqtt import BrokerAddress, parse_broker_url
from edge.wire import ANY_RUN
from edgeleak.errors import UsageError

CONNECT_TIMEOUT_S = 3.0


def tcp_reachable(host: str, port: int, timeout: float = CONNECT_TIMEOUT_S) -> str | None:
    """``None`` when a TCP connection to ``host:port`` opens within ``timeout``, else why not."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return e.strerror or type(e).__name__


def broker(url: str, *, timeout: float = CONNECT_TIMEOUT_S, or_else: str = "") -> BrokerAddress:
    """The parsed broker URL, after checking that something listens there; ``or_else`` ends the
    error with the command's own alternative."""
    try:
        addr = parse_broker_url(url)
    except ValueError as e:
        raise UsageError(str(e)) from None
    why = tcp_reachable(addr.host, addr.port, timeout)
    if why is not None:
        raise UsageError(
            f"broker {addr.url} is not reachable ({why}): start one (e.g. `edgeleak broker "
            f"--port {addr.port}`){or_else}"
        )
    return addr


def run_id(run: str) -> str:
    """A run id usable in topics: not empty, no '/', '+', '#', and not the reserved 'any'."""
    if run == ANY_RUN or not run or any(c in run for c in "/+#\0"):
        raise UsageError(f"--run {run!r}: expected an id without '/', '+', '#', other than 'any'")
    return run


def broker_url(url: str) -> BrokerAddress:
    """The parsed broker URL, unchecked (it may be reachable from a device only)."""
    try:
        return parse_broker_url(url)
    except ValueError as e:
        raise UsageError(str(e)) from None


def ssh_target(url: str, *, timeout: float = 5.0) -> None:
    """Check an ``ssh://user@host[:port]/path`` target's form and that its port answers."""
    from devices.deploy import parse_ssh_url

    try:
        target = parse_ssh_url(url)
    except ValueError as e:
        raise UsageError(str(e)) from None
    why = tcp_reachable(target.host, target.port, timeout)
    if why is not None:
        raise UsageError(f"ssh target {target.host}:{target.port} is not reachable ({why})")


def model(folder: str | Path) -> ModelArtifact:
    """The model folder written by ``edgeleak export``, manifest and content hash checked."""
    try:
        return ModelArtifact.load(folder)
    except (OSError, ValueError) as e:
        raise UsageError(f"--model {folder}: {e}") from None


def shard(path: str | Path, artifact: ModelArtifact | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A shard .npz with x (N, C, H, W) and y (N), fitting ``artifact`` when given."""
    from edge.data import check_fits, load_shard

    try:
        x, y = load_shard(path)
        if artifact is not None:
            check_fits(x, y, artifact.manifest, where=str(path))
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise UsageError(str(e)) from None
    return x, y


def folder(path: str | Path, what: str) -> Path:
    """An existing folder."""
    p = Path(path)
    if not p.is_dir():
        raise UsageError(f"{what} {path}: no such folder")
    return p


def file(path: str | Path, what: str) -> Path:
    """An existing file."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{what} {path}: no such file")
    return p


def empty_or_new(path: str | Path, what: str) -> Path:
    """A folder that does not exist yet or is empty."""
    p = Path(path)
    if p.exists() and (not p.is_dir() or any(p.iterdir())):
        raise UsageError(f"{what} {path} exists and is not empty: give a new folder")
    return p


def names(values: str, allowed: Sequence[str], what: str) -> list[str]:
    """Comma-separated names, each one of ``allowed`` (the error lists them)."""
    try:
        return csv_choices(values, tuple(allowed), what)
    except ValueError as e:
        raise UsageError(str(e)) from None


def number(
    kind: Callable[[str], float], lo: float, *, strict: bool = False
) -> Callable[[str], float]:
    """An argparse ``type=``: ``kind`` (int or float) at least ``lo`` (above it when ``strict``)."""

    def convert(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if kind is int else 'a number'}"
            ) from None
        if value < lo or (strict and value == lo):
            raise argparse.ArgumentTypeError(
                f"{text!r}: expected a number {'>' if strict else '>='} {lo:g}"
            )
        return value

    convert.__name__ = kind.__name__  # argparse names the type in its messages
    return convert
