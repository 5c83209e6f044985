"""Shared fixtures: a real mosquitto on a free loopback port, exported models."""

from __future__ import annotations

import fcntl
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge.manifest import ModelArtifact
from edge.mqtt import BrokerAddress
from edgeleak.broker import local_broker, mosquitto_path

# The files whose tests change machine-wide state (network namespaces, bridges, a Ray cluster).
# When the suite runs in parallel (``-n 2 --dist loadfile``: pytest-xdist, a file at a time on
# each worker, so that its module fixtures are made once), they take turns (``_machine_wide``).
MACHINE_WIDE = frozenset({"test_netem.py", "test_sites.py", "test_faults.py", "test_ray_fleet.py"})


@pytest.fixture(scope="module", autouse=True)
def _machine_wide(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """Under xdist, a ``MACHINE_WIDE`` file holds a lock shared by the workers while it runs
    (its module fixtures included: this one is set up before them)."""
    if request.path.name not in MACHINE_WIDE or "PYTEST_XDIST_WORKER" not in os.environ:
        yield
        return
    with open(tmp_path_factory.getbasetemp().parent / "machine-wide.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def pytest_configure(config: pytest.Config) -> None:
    """A suite started in the background (``cmd &`` in a script) inherits SIGINT ignored, and
    so would every process the tests start and then interrupt. Handle it again: exec resets a
    handled signal to its default in the children."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session", autouse=True)
def export_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One export cache for the session (demos run as subprocesses inherit it): each model is
    exported once per session, never taken from a cache outside the tests. The parallel
    suite's workers share it (the cache renames finished entries into place)."""
    from export.cache import CACHE_ENV

    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if "PYTEST_XDIST_WORKER" in os.environ else base) / "export-cache"
    folder.mkdir(exist_ok=True)
    before = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(folder)
    yield folder
    if before is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = before


@pytest.fixture(scope="session")
def mosquitto() -> Iterator[BrokerAddress]:
    """A mosquitto of our own (max_queued_messages 0) for the whole session."""
    if mosquitto_path() is None:
        pytest.fail("mosquitto is not installed: apt-get install -y mosquitto (.ci/run does this)")
    with local_broker("mosquitto") as (addr, _):
        yield addr


@pytest.fixture(scope="session")
def lenet_artifact(tmp_path_factory: pytest.TempPathFactory) -> ModelArtifact:
    """The zoo's ReLU LeNet for 1×28×28, exported once (ONNX gradient + inference graphs)."""
    from export.cache import cached_export

    return cached_export("lenet", tmp_path_factory.mktemp("lenet"), seed=0)


def model_dir(artifact: ModelArtifact) -> Path:
    return artifact.folder
