"""Same seed, same config: bit-identical global models, whatever the fleet's worker count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np

from coordinator.server import Coordinator, RoundPlan
from coordinator.store import RunStore
from devices.deploy import build_bundle
from devices.fleet import Fleet
from edge.codec import params_sha256
from edge.manifest import ModelArtifact
from edge.mqtt import BrokerAddress
from edge.train import device_rng
from export.flops import training_flops_per_example
from tests.fedutil import contiguous_shards, fleet


def _hashes(
    broker: BrokerAddress, artifact: ModelArtifact, tmp: Path, workers: int, rounds: int
) -> list[str]:
    """Per-round model hashes of a 4-device FedAvg run with shuffled minibatches."""
    run = "r" + uuid.uuid4().hex[:8]
    plan = RoundPlan(algorithm="fedavg", lr=0.05, epochs=2, batch_size=8, deadline_s=600)
    store = RunStore(tmp / f"{run}.db")
    devices = tuple(replace(d, seed=7) for d in contiguous_shards([24, 16, 24, 16]))
    spec = fleet(run, broker, artifact, devices, tmp / run, workers=workers)
    with Coordinator(run, artifact, broker, store, plan, seed=3) as coord, Fleet(spec):
        coord.wait_for_devices(len(devices), 120)
        results = [coord.run_round(r) for r in range(1, rounds + 1)]
        coord.end()
        final = params_sha256({k: coord.weights[k] for k in artifact.manifest.param_names})
    assert [r.accepted for r in results] == [len(devices)] * rounds
    stored = [str(r["model_sha256"]) for r in store.rounds(run)]
    assert stored == [r.model_sha256 for r in results]
    assert stored[-1] == final
    return stored


def test_same_seed_same_models_with_one_or_two_workers(
    mosquitto: BrokerAddress, lenet_artifact: ModelArtifact, tmp_path: Path
) -> None:
    one = _hashes(mosquitto, lenet_artifact, tmp_path, workers=1, rounds=3)
    two = _hashes(mosquitto, lenet_artifact, tmp_path, workers=2, rounds=3)
    assert one == two
    assert len(set(one)) == 3  # the model moves every round
    w0 = params_sha256(lenet_artifact.initial_params())
    assert w0 not in one


def test_device_rng_depends_on_seed_device_and_round_only() -> None:
    a = device_rng(0, "d0001", 2).permutation(10)
    np.testing.assert_array_equal(a, device_rng(0, "d0001", 2).permutation(10))
    # CRC-32 of the id, not Python's salted hash(): a fixed value in every process.
    np.testing.assert_array_equal(a, np.random.default_rng([0, 0xF0480D68, 2]).permutation(10))
    for other in (device_rng(1, "d0001", 2), device_rng(0, "d0002", 2), device_rng(0, "d0001", 3)):
        assert not np.array_equal(a, other.permutation(10))


def test_params_sha256_sees_one_bit() -> None:
    w = {"a": np.zeros((2, 3), np.float32), "b": np.ones(4, np.float32)}
    h = params_sha256(w)
    assert h == params_sha256({k: v.copy() for k, v in w.items()})
    flipped = w["b"].copy()
    flipped.view(np.uint32)[0] ^= 1
    assert params_sha256({"a": w["a"], "b": flipped}) != h
    assert params_sha256({"b": w["b"], "a": w["a"]}) != h  # order is part of the layout


def test_flops_per_example_counted_from_the_exported_graph(lenet_artifact: ModelArtifact) -> None:
    # LeNet MACs per example: conv1 6*28*28*25 + conv2 16*10*10*150 + fc 400*120 + 120*84 + 84*10
    # = 416,520; forward 2x, training 3x forward.
    assert lenet_artifact.manifest.flops_per_example == 416_520 * 2 * 3 == 2_499_120
    assert training_flops_per_example(lenet_artifact.path("onnx_infer")) == 2_499_120


def test_device_calibrate_prints_a_profile_entry(
    lenet_artifact: ModelArtifact, tmp_path: Path
) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "edgeleak.cli", "device", "calibrate", "--model",
         str(lenet_artifact.folder), "--steps", "3", "--batch-size", "8"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    entry = json.loads(proc.stdout)["train_gflops"]
    assert entry["value"] > 0 and entry["estimate"] is False
    assert "2,499,120 FLOPs per training example" in entry["source"]
    # From a deployment bundle, as on the device (torch-free edge/ copied into it).
    bundle = build_bundle(tmp_path / "b", model_dir=lenet_artifact.folder, runtime="onnx",
                          profile="rpi4")  # fmt: skip
    env = {**os.environ, "EDGELEAK_PYTHON": sys.executable, "PYTHONPATH": ""}
    ok = subprocess.run([str(bundle / "start.sh"), "calibrate", "--steps", "2"], env=env,
                        capture_output=True, text=True, timeout=300)  # fmt: skip
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert json.loads(ok.stdout)["train_gflops"]["value"] > 0
    bad = subprocess.run([str(bundle / "start.sh"), "calibrate", "--steps", "0"], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 2 and "--steps must be >= 1" in bad.stderr
