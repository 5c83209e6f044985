"""Homomorphic encryption over the real broker: the coordinator adds CKKS ciphertexts without the
secret key, a key-holder process decrypts only the aggregate, and the round equals plaintext."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

# TenSEAL comes with the dev extra (through 'he'): a missing one fails here, it is not skipped.
import tenseal  # noqa: E402, F401

from coordinator.server import Coordinator, RoundPlan
from coordinator.store import RunStore
from devices.fleet import Fleet
from edge import he, wire
from edge.backends import load_backend
from edge.device import Device
from edge.manifest import ModelArtifact
from edge.mqtt import BrokerAddress
from tests.fedutil import contiguous_shards, expected_round, fleet


def test_ckks_sum_within_tolerance(lenet_artifact: ModelArtifact) -> None:
    manifest = lenet_artifact.manifest
    keys = he.new_keys()
    public = he.public_context(keys.public)
    assert not public.is_private()
    rng = np.random.default_rng(0)
    vectors = [rng.normal(0, 0.01, manifest.num_parameters) * (i + 1) for i in range(3)]
    tensors = [he.encrypt(public, v) for v in vectors]
    total = he.add([he.load(public, t, manifest.num_parameters) for t in tensors])
    got = he.decrypt(keys, he.pack(total), manifest.num_parameters)
    want = np.sum(vectors, axis=0)
    # CKKS is approximate: at scale 2^52 within ~1e-11 (absolute) of the float64 sum
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-10
    # ciphertexts cannot be decrypted with the public context
    with pytest.raises(ValueError, match="secret"):
        total[0].decrypt()
    # a "public" context that carries the secret key is refused
    with pytest.raises(he.HEError, match="secret key"):
        he.public_context(keys.secret.serialize(save_secret_key=True))


def test_he_round_equals_plaintext(
    mosquitto: BrokerAddress, lenet_artifact: ModelArtifact, tmp_path: Path
) -> None:
    run = "t" + uuid.uuid4().hex[:8]
    plan = RoundPlan(algorithm="fedavg", lr=0.05, epochs=1, batch_size=8, deadline_s=120, he=True)
    store = RunStore(tmp_path / "run.db")
    sizes = [8, 16, 8]
    spec = fleet(run, mosquitto, lenet_artifact, contiguous_shards(sizes), tmp_path / "truth")
    keyholder = subprocess.Popen(
        [sys.executable, "-m", "edge", "keyholder", "--broker", mosquitto.url, "--run", run,
         "--model", str(lenet_artifact.folder)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        with Coordinator(run, lenet_artifact, mosquitto, store, plan) as coord, Fleet(spec):
            coord.wait_for_devices(len(sizes), 60)
            w0 = dict(coord.weights)
            res = coord.run_round(1)
            coord.end()
    finally:
        keyholder.terminate()
        out, _ = keyholder.communicate(timeout=30)
    assert (res.selected, res.accepted, res.rejected) == (3, 3, 0), res.rejections
    assert "decrypted the aggregate of round 1" in out
    # The coordinator never held a secret key: its context is public, and what it received
    # were ciphertexts (no dense update in any accepted message).
    assert coord.he is not None and coord.he.context is not None
    assert not coord.he.holds_secret_key()
    assert not coord.he.context.is_private()  # type: ignore[attr-defined]
    want = expected_round(
        lenet_artifact, w0, tmp_path / "truth", run, 1, algorithm="fedavg", lr=0.05, batch_size=8
    )
    # CKKS at scale 2^52: the mean is off by ~1e-13, which rounds to the other float32 only
    # where the exact mean lies on (or next to) a rounding tie: 1 ULP of the mean, so at most
    # 2 ULP of a weight after the step
    for k in w0:
        np.testing.assert_array_max_ulp(coord.weights[k], want[k], maxulp=2)
    assert any(np.abs(coord.weights[k] - w0[k]).max() > 1e-4 for k in w0)
    (n, up,) = store.db.execute(
        "SELECT COUNT(*), SUM(bytes) FROM messages WHERE run=? AND kind='update'", (run,)
    ).fetchone()  # fmt: skip
    dense = 4 * lenet_artifact.manifest.num_parameters
    assert n == 3 and 10 * dense * 3 < up < 20 * dense * 3  # CKKS: ~15x the dense f32 bytes


def test_device_without_tenseal_refuses_with_install_hint(
    lenet_artifact: ModelArtifact, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = np.zeros((4, 1, 28, 28), np.float32)
    device = Device(
        "d0", "r1", lenet_artifact, load_backend("onnx", lenet_artifact), x, np.zeros(4, np.int64)
    )
    task = wire.Task(
        run="r1", round=1, device="d0", algorithm="fedsgd", lr=0.1, epochs=1, batch_size=4,
        model_hash=lenet_artifact.manifest.sha256, weights=lenet_artifact.initial_params(),
        he="ab" * 32,
    )  # fmt: skip
    payload = wire.encode_task(task)
    assert wire.decode_task(payload, lenet_artifact.manifest).he == "ab" * 32
    monkeypatch.setitem(sys.modules, "tenseal", None)  # as on a Pi: no aarch64 wheel
    with pytest.raises(wire.WireError) as e:
        device.accept(payload, "r1")
    assert e.value.reason == "no_tenseal"
    assert "pip install 'edgeleak[he]'" in e.value.detail
    with pytest.raises(he.HEError, match="no aarch64 wheel"):
        he.new_keys()
