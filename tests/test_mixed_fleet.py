"""A fleet that mixes runtimes aggregates to the same model as a single-runtime fleet."""

from __future__ import annotations

import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from coordinator.server import Coordinator, RoundPlan
from coordinator.store import RunStore
from devices.fleet import Fleet
from edge.manifest import ModelArtifact
from edge.mqtt import BrokerAddress
from tests.fedutil import contiguous_shards, fleet

pytest.importorskip("executorch", reason="pip install 'edgeleak[executorch]'")


@pytest.fixture(scope="module")
def lenet_all_runtimes(tmp_path_factory: pytest.TempPathFactory) -> ModelArtifact:
    from export.cache import cached_export

    return cached_export(
        "lenet", tmp_path_factory.mktemp("lenet-et"), targets=("onnx", "executorch")
    )


def _two_rounds(
    broker: BrokerAddress, artifact: ModelArtifact, runtimes: list[str], tmp: Path
) -> dict[str, np.ndarray]:
    run = "m" + uuid.uuid4().hex[:8]
    devices = tuple(
        replace(d, runtime=rt)
        for d, rt in zip(contiguous_shards([16, 16, 16]), runtimes, strict=True)
    )
    spec = fleet(run, broker, artifact, devices, tmp / run, workers=2)
    plan = RoundPlan(algorithm="fedavg", lr=0.1, epochs=1, batch_size=8, deadline_s=120)
    with (
        Coordinator(run, artifact, broker, RunStore(tmp / f"{run}.db"), plan) as coord,
        Fleet(spec),
    ):
        coord.wait_for_devices(3, 90)
        for r in (1, 2):
            assert coord.run_round(r).accepted == 3
        coord.end()
        return dict(coord.weights)


def test_mixed_runtime_fleet_matches_single_runtime(
    mosquitto: BrokerAddress, lenet_all_runtimes: ModelArtifact, tmp_path: Path
) -> None:
    single = _two_rounds(mosquitto, lenet_all_runtimes, ["onnx"] * 3, tmp_path)
    mixed = _two_rounds(mosquitto, lenet_all_runtimes, ["onnx", "executorch", "torch"], tmp_path)
    w0 = lenet_all_runtimes.initial_params()
    for k in single:
        np.testing.assert_allclose(mixed[k], single[k], rtol=0, atol=1e-5)
    assert max(np.abs(single[k] - w0[k]).max() for k in w0) > 1e-3  # the rounds did move the model
