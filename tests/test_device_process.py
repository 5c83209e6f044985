"""A real `edgeleak device` process, and the embedded amqtt broker, each take part in real rounds."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import numpy as np

from coordinator.server import Coordinator, RoundPlan
from coordinator.store import RunStore
from devices.datasets import load_dataset
from devices.fleet import Fleet
from edge.data import save_shard
from edge.manifest import ModelArtifact
from edge.mqtt import BrokerAddress
from edgeleak.broker import local_broker
from tests.fedutil import contiguous_shards, device_argv, fleet


def test_device_cli_process_joins_a_round(
    mosquitto: BrokerAddress, lenet_artifact: ModelArtifact, tmp_path: Path
) -> None:
    run = "p" + uuid.uuid4().hex[:8]
    data = load_dataset("fashion-mnist")
    save_shard(tmp_path / "shard.npz", data.x_train[:40], data.y_train[:40])
    proc = subprocess.Popen(
        device_argv(
            mosquitto.url, tmp_path / "shard.npz", lenet_artifact, run, "phone-1", "--exit-on-end"
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    store = RunStore(tmp_path / "run.db")
    plan = RoundPlan(algorithm="fedavg", lr=0.05, batch_size=8, deadline_s=60)
    try:
        with Coordinator(run, lenet_artifact, mosquitto, store, plan) as coord:
            coord.wait_for_devices(1, 60)
            assert coord.online["phone-1"] == {"state": "online", "runtime": "onnx", "examples": 40}
            w0 = dict(coord.weights)
            res = coord.run_round(1)
            coord.end()
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert f"device phone-1: run {run} ended after 1 updates" in out
    assert f"device phone-1: run {run} round 1: 40 examples, loss " in out
    assert (res.selected, res.accepted) == (1, 1)
    assert any(not np.array_equal(w0[k], coord.weights[k]) for k in w0)


def test_amqtt_embedded_broker_runs_rounds(lenet_artifact: ModelArtifact, tmp_path: Path) -> None:
    run = "a" + uuid.uuid4().hex[:8]
    store = RunStore(tmp_path / "run.db")
    plan = RoundPlan(algorithm="fedsgd", lr=0.1, batch_size=8, deadline_s=60)
    with local_broker("amqtt") as (broker, kind):
        assert kind == "amqtt" and broker.protocol == 4  # amqtt 0.12 speaks MQTT 3.1.1
        spec = fleet(run, broker, lenet_artifact, contiguous_shards([8, 8]), tmp_path / "truth")
        with Coordinator(run, lenet_artifact, broker, store, plan) as coord, Fleet(spec):
            coord.wait_for_devices(2, 60)
            res = coord.run_round(1)
            coord.end()
    assert (res.selected, res.accepted, res.rejected) == (2, 2, 0)


def test_device_process_sends_compressed_update_and_decoys(
    mosquitto: BrokerAddress, lenet_artifact: ModelArtifact, tmp_path: Path
) -> None:
    """`--key` and `--decoy-data`: the process answers a decoy task with topk+int8 messages."""
    from edge.decoy import new_key, save_key
    from edge.mqtt import wait_until

    run = "k" + uuid.uuid4().hex[:8]
    data = load_dataset("fashion-mnist")
    save_shard(tmp_path / "shard.npz", data.x_train[:24], data.y_train[:24])
    save_shard(tmp_path / "public.npz", data.x_test[:100], data.y_test[:100])
    key = new_key()
    save_key(tmp_path / "phone-2.key", key)
    argv = device_argv(mosquitto.url, tmp_path / "shard.npz", lenet_artifact, run, "phone-2",
                       "--exit-on-end", "--key", str(tmp_path / "phone-2.key"),
                       "--decoy-data", str(tmp_path / "public.npz"))  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    store = RunStore(tmp_path / "run.db")
    plan = RoundPlan(
        algorithm="fedavg", lr=0.05, batch_size=8, deadline_s=60, codec="topk:0.01+int8", decoys=1
    )
    kinds = "SELECT kind, device, bytes FROM messages WHERE kind IN ('update','decoy')"
    try:
        with Coordinator(run, lenet_artifact, mosquitto, store, plan, keys={"phone-2": key}) as c:
            c.wait_for_devices(1, 60)
            res = c.run_round(1)
            wait_until(lambda: (c.poll(0.05), len(store.db.execute(kinds).fetchall()))[1] == 2,
                       60, "the decoy")  # fmt: skip
            c.end()
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert out.count(f"device phone-2: run {run} round 1:") == 1, out  # a line for the real one
    assert (res.selected, res.accepted, res.rejected) == (1, 1, 0)
    rows = sorted(store.db.execute(kinds).fetchall())
    assert [(k, d) for k, d, _ in rows] == [("decoy", "phone-2"), ("update", "phone-2")]
    assert rows[0][2] == rows[1][2] < 2_700  # same size, a topk:0.01+int8 LeNet update
