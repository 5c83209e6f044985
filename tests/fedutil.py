"""Helpers for the integration tests: a small fleet, and the model a round must produce."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from coordinator.aggregate import weighted_mean
from devices.datasets import load_dataset
from devices.fleet import DeviceSpec, FleetSpec, read_truth
from edge.backends import load_backend
from edge.manifest import ModelArtifact
from edge.mqtt import BrokerAddress
from edge.train import sgd_step
from edge.wire import get_codec

Params = dict[str, np.ndarray]


def device_argv(
    broker_url: str, shard: Path, artifact: ModelArtifact, run: str, device: str, *extra: str
) -> list[str]:
    """The command line of one real `edgeleak device` process."""
    return [sys.executable, "-m", "edgeleak.cli", "device", "--broker", broker_url,
            "--data", str(shard), "--model", str(artifact.folder), "--run", run, "--id", device,
            *extra]  # fmt: skip


def contiguous_shards(sizes: list[int], runtime: str = "onnx") -> tuple[DeviceSpec, ...]:
    """Devices d0000.. holding consecutive training examples."""
    starts = np.cumsum([0, *sizes])
    return tuple(
        DeviceSpec(f"d{i:04d}", np.arange(starts[i], starts[i + 1]), runtime, seed=i)
        for i in range(len(sizes))
    )


def fleet(
    run: str,
    broker: BrokerAddress,
    artifact: ModelArtifact,
    devices: tuple[DeviceSpec, ...],
    truth: Path,
    workers: int = 1,
) -> FleetSpec:
    return FleetSpec(
        run, broker.url, str(artifact.folder), "fashion-mnist", devices, workers, str(truth)
    )


def expected_round(
    artifact: ModelArtifact,
    w0: Params,
    truth: Path,
    run: str,
    round_: int,
    *,
    algorithm: str,
    lr: float,
    batch_size: int,
    codec: str = "f32",
) -> Params:
    """Recompute a round from the fleet's truth records: same examples, same order, same runtime;
    each update through ``codec`` (no error-feedback residual: a device's first update)."""
    data = load_dataset("fashion-mnist")
    backend = load_backend("onnx", artifact)
    updates: list[tuple[Params, int]] = []
    for rec in read_truth(truth):
        if rec["run"] != run or rec["round"] != round_:
            continue
        idx = np.array(rec["examples"])
        if algorithm == "fedsgd":
            step = backend.loss_and_grad(w0, data.x_train[idx], data.y_train[idx])
            updates.append((step.grads, len(idx)))
        else:
            w = dict(w0)
            for i in range(0, len(idx), batch_size):
                b = idx[i : i + batch_size]
                w = sgd_step(
                    w, backend.loss_and_grad(w, data.x_train[b], data.y_train[b]).grads, lr
                )
            updates.append(({k: w[k] - w0[k] for k in w0}, len(set(idx.tolist()))))
    c = get_codec(codec)
    agg = weighted_mean([(c.decode(c.encode(u), artifact.manifest), n) for u, n in updates])
    sign = -lr if algorithm == "fedsgd" else 1.0
    return {k: w0[k] + np.float32(sign) * agg[k] for k in w0}
