"""Secure aggregation inside real rounds: real devices (fleet, onnx) train, then run SecAgg with
the coordinator over mosquitto; the model moves by exactly the fixed-point mean of the updates,
and nothing on the wire or in the coordinator is an individual update."""

from __future__ import annotations

import json
import queue
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from coordinator.server import Coordinator, RoundPlan
from coordinator.store import RunStore
from devices.datasets import load_dataset
from devices.fleet import Fleet, read_truth
from edge import protect
from edge import secagg as sa
from edge.backends import load_backend
from edge.device import noise_rng
from edge.manifest import ModelArtifact
from edge.mqtt import BrokerAddress, Received, make_client, running, wait_until
from edgeleak.config import ConfigError, ExperimentConfig
from tests.fedutil import contiguous_shards, fleet


@pytest.mark.parametrize("ddp", ["", "distributed_dp:clip=0.05,sigma=0.5"])
def test_fedsgd_round_with_secagg_is_the_fixed_point_mean(
    mosquitto: BrokerAddress, lenet_artifact: ModelArtifact, tmp_path: Path, ddp: str
) -> None:
    """Plain, and with distributed DP: each device clips and adds N(0, σ²C²/4) (its seeded
    noise), and the model moves by the fixed-point mean of exactly those updates."""
    run = "t" + uuid.uuid4().hex[:8]
    spec = sa.SecAggSpec(k=0, t=0.5, clip=0.5, bits=20)
    plan = RoundPlan(
        algorithm="fedsgd", lr=0.1, batch_size=4, deadline_s=120, secagg=spec.text, protect=ddp
    )
    store = RunStore(tmp_path / "run.db")
    sizes = [5, 6, 7, 8]
    fspec = fleet(run, mosquitto, lenet_artifact, contiguous_shards(sizes), tmp_path / "truth")
    seen: queue.Queue[Received] = queue.Queue()
    ready: list[str] = []
    spy = make_client("spy-" + run, seen, subscriptions=(f"edgeleak/{run}/#",), on_ready=ready)
    with (
        running(spy, mosquitto),
        Coordinator(run, lenet_artifact, mosquitto, store, plan, seed=3) as coord,
        Fleet(fspec),
    ):
        wait_until(lambda: bool(ready), 10, "the spy's subscription")
        coord.wait_for_devices(len(sizes), 60)
        w0 = dict(coord.weights)
        res = coord.run_round(1)
        w1 = dict(coord.weights)
        res2 = coord.run_round(2)
        coord.end()
    assert (res.selected, res.accepted, res.rejected) == (4, 4, 0), res.rejections
    assert (res2.selected, res2.accepted) == (4, 4)
    # recompute each device's gradient from the fleet's truth; fixed point; mean; SGD step
    data = load_dataset("fashion-mnist")
    backend = load_backend("onnx", lenet_artifact)
    names = lenet_artifact.manifest.param_names
    enc = []
    for rec in read_truth(tmp_path / "truth"):
        if rec["round"] != 1:
            continue
        idx = np.array(rec["examples"])
        g = backend.loss_and_grad(w0, data.x_train[idx], data.y_train[idx]).grads
        if ddp:
            g = protect.clip_l2(g, 0.05)
            noise = protect.gaussian_like(
                g, 0.5 * 0.05 / 2, noise_rng(int(rec["device"][1:]), 1, rec["device"])
            )
            g = protect.add_noise(g, noise)
        enc.append(sa.encode_fixed(sa.flatten(g, names), spec.clip, spec.bits))
    assert len(enc) == 4
    total = np.sum(np.stack(enc).astype(np.uint64), axis=0).astype(np.uint32)  # mod 2^32
    shapes = {p.name: p.shape for p in lenet_artifact.manifest.params}
    mean = sa.unflatten(sa.decode_fixed(total, spec.bits) / 4, shapes)
    for k in w0:
        np.testing.assert_array_equal(w1[k], w0[k] + np.float32(-0.1) * mean[k])
    # the wire: no update topic at all; every secagg message by phase in the ledger
    topics = set()
    while not seen.empty():
        topics.add(seen.get().topic.split("/")[2])
    assert "update" not in topics and {"secagg", "secagg-to", "task"} <= topics
    kinds = dict(
        store.db.execute(
            "SELECT kind || '/' || direction, COUNT(*) FROM messages WHERE run=? AND round=1 "
            "AND kind LIKE 'secagg%' GROUP BY 1",
            (run,),
        )
    )
    assert kinds == {
        "secagg_advertise/up": 4, "secagg_keys/down": 4, "secagg_share/up": 4,
        "secagg_shares/down": 4, "secagg_masked/up": 4, "secagg_unmask/down": 4,
        "secagg_unmask/up": 4,
    }  # fmt: skip
    up = store.db.execute(
        "SELECT SUM(bytes) FROM messages WHERE run=? AND round=1 AND direction='up' "
        "AND kind LIKE 'secagg%'",
        (run,),
    ).fetchone()[0]
    assert res.bytes_up == up
    # ε per device: one Gaussian mechanism on the sum, σ·√(4 survivors / 4 shares) = σ
    privacy = store.db.execute(
        "SELECT round, device, mechanism, sigma, rounds FROM privacy WHERE run=? ORDER BY 1, 2",
        (run,),
    ).fetchall()
    want = [(r, f"d{i:04d}", "distributed_dp", 0.5, r) for r in (1, 2) for i in range(4)]
    assert privacy == (want if ddp else [])


def test_config_and_flag_refuse_what_secagg_cannot_do(tmp_path: Path) -> None:
    assert ExperimentConfig(secagg="k=0,t=0.6").secagg == "k=0,t=0.6"
    for kw, msg in (
        ({"secagg": "k=3"}, "even"),
        ({"secagg": "k=0", "aggregator": "median"}, "aggregator 'mean'"),
        ({"secagg": "k=0", "codec": "int8"}, "codec f32"),
        ({"secagg": "k=0", "protect": "central_dp:clip=1,sigma=1"}, "distributed_dp:clip=1,"),
    ):
        with pytest.raises(ConfigError, match=msg):
            ExperimentConfig(**kw)  # type: ignore[arg-type]
    proc = subprocess.run(
        [sys.executable, "-m", "edgeleak.cli", "demo", "--secagg", "k=5", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "secagg='k=5'" in proc.stderr and "even" in proc.stderr


@pytest.mark.slow
def test_demo_with_secagg(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "edgeleak.cli", "demo", "--devices", "4", "--rounds", "2",
         "--out", str(out), "--seed", "1", "--algorithm", "fedsgd", "--batch-size", "8",
         "--secagg", "k=0,t=0.5,clip=1,bits=16"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    db = sqlite3.connect(out / "run.db")
    accepted = db.execute("SELECT round, accepted FROM rounds ORDER BY round").fetchall()
    assert accepted == [(1, 4), (2, 4)]
    n = db.execute("SELECT COUNT(*) FROM messages WHERE kind='update'").fetchone()[0]
    assert n == 0
    s = json.loads((out / "summary.json").read_text())
    secagg_up = db.execute(
        "SELECT SUM(bytes) FROM messages WHERE direction='up' AND kind LIKE 'secagg%'"
    ).fetchone()[0]
    assert s["bytes_up"] == secagg_up > 0
    assert s["config"]["secagg"] == "k=0,t=0.5,clip=1,bits=16"
