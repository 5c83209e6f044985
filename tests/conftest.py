"""Shared fixtures: a real mosquitto on a free loopback port, exported models."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edge.manifest import ModelArtifact
from edge.mqtt import BrokerAddress
from edgeleak.broker import local_broker, mosquitto_path


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
    from export import export_model

    out = tmp_path_factory.mktemp("lenet")
    export_model("lenet", out, seed=0)
    return ModelArtifact.load(out)


def model_dir(artifact: ModelArtifact) -> Path:
    return artifact.folder
