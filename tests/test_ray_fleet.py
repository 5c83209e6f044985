"""The fleet on Ray (``--engine ray``): the same devices as Ray actors, the same models."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from coordinator.server import Coordinator, RoundPlan
from coordinator.store import RunStore
from devices.fleet import Fleet
from edge.manifest import ModelArtifact
from edge.mqtt import BrokerAddress
from edgeleak.cli import main
from tests.fedutil import contiguous_shards, fleet

SIZES = [8, 16, 8, 24]


def _models(
    engine: str, run: str, broker: BrokerAddress, art: ModelArtifact, tmp: Path
) -> list[tuple[int, int, str]]:
    """Two FedAvg rounds on ``engine``: (selected, accepted, model hash) per round."""
    from devices.ray_fleet import RayFleet

    plan = RoundPlan(algorithm="fedavg", lr=0.05, epochs=1, batch_size=8, deadline_s=300)
    store = RunStore(tmp / f"{engine}.db")
    spec = fleet(run, broker, art, contiguous_shards(SIZES), tmp / f"truth-{engine}")
    devices = Fleet(spec) if engine == "local" else RayFleet(spec, "local")
    with Coordinator(run, art, broker, store, plan, seed=4) as coord, devices:
        coord.wait_for_devices(len(SIZES), 120)
        results = [coord.run_round(r) for r in (1, 2)]
        coord.end()
    return [(r.selected, r.accepted, r.model_sha256) for r in results]


def test_ray_actors_train_the_models_of_local_workers(
    mosquitto: BrokerAddress, lenet_artifact: ModelArtifact, tmp_path: Path
) -> None:
    """A one-machine Ray cluster runs the fleet's workers as actors: bit-identical models to
    the same seeded run on local worker processes (a device's result is where-independent)."""
    pytest.importorskip("ray")
    run = "r" + uuid.uuid4().hex[:8]
    local = _models("local", run, mosquitto, lenet_artifact, tmp_path)
    on_ray = _models("ray", run + "x", mosquitto, lenet_artifact, tmp_path)
    assert [(s, a) for s, a, _ in on_ray] == [(len(SIZES), len(SIZES))] * 2
    assert [h for *_, h in on_ray] == [h for *_, h in local]


def test_engine_flags_are_checked(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["demo", "--engine", "spark"],
        ["demo", "--ray-address", "auto"],  # without --engine ray
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("edgeleak demo: "), err
