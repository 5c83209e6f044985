"""Shared fixtures: a real mosquitto on a free loopback port, exported models."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge.manifest import ModelArtifact
from edge.mqtt import BrokerAddress
from edgeleak.broker import local_broker, mosquitto_path


def pytest_configure(config: pytest.Config) -> None:
    """A suite started in the background (``cmd &`` in a script) inherits SIGINT ignored, and
    so would every process the tests start and then interrupt. Handle it again: exec resets a
    handled signal to its default in the children."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session", autouse=True)
def export_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One export cache for the session (demos run as subprocesses inherit it): each model is
    exported once per session, never taken from a cache outside the tests."""
    from export.cache import CACHE_ENV

    folder = tmp_path_factory.mktemp("export-cache")
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
