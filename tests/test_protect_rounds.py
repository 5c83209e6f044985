"""Protections over the real broker: central DP's aggregate exactly, what the eavesdropper sees,
ε per device in the run store; one `edgeleak demo --protect dp:...` end to end."""

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

from coordinator.accounting import epsilon, round_event
from coordinator.server import Coordinator, RoundPlan, central_noise_seed
from coordinator.store import RunStore
from devices.datasets import load_dataset
from devices.fleet import Fleet, read_truth
from edge import protect, wire
from edge.backends import load_backend
from edge.manifest import ModelArtifact
from edge.mqtt import BrokerAddress, Received, make_client, running, wait_until
from tests.fedutil import contiguous_shards, fleet


def test_central_dp_round_is_clipped_sum_plus_seeded_noise(
    mosquitto: BrokerAddress, lenet_artifact: ModelArtifact, tmp_path: Path
) -> None:
    run = "t" + uuid.uuid4().hex[:8]
    spec_str = "central_dp:clip=0.05,sigma=0.5"
    plan = RoundPlan(algorithm="fedsgd", lr=0.1, batch_size=4, deadline_s=60, protect=spec_str)
    store = RunStore(tmp_path / "run.db")
    sizes = [6, 6, 6]
    spec = fleet(run, mosquitto, lenet_artifact, contiguous_shards(sizes), tmp_path / "truth")
    seen: queue.Queue[Received] = queue.Queue()
    ready: list[str] = []
    spy = make_client(
        "spy-" + run, seen, subscriptions=(f"edgeleak/{run}/update/+",), on_ready=ready
    )
    with (
        running(spy, mosquitto),
        Coordinator(run, lenet_artifact, mosquitto, store, plan, seed=5) as coord,
        Fleet(spec),
    ):
        wait_until(lambda: bool(ready), 10, "the spy's subscription")
        coord.wait_for_devices(len(sizes), 60)
        w0 = dict(coord.weights)
        res = coord.run_round(1)
        w1 = dict(coord.weights)
        coord.end()
    assert (res.selected, res.accepted) == (3, 3)
    # what crossed the wire: clipped updates, no noise, the defence as applied
    on_wire = {}
    while not seen.empty():
        msg = seen.get()
        u = wire.decode_update(msg.payload, lenet_artifact.manifest)
        on_wire[u.device] = u
        assert json.loads(u.defence) == {
            "protect": [{"name": "central_dp", "clip": 0.05, "sigma": 0.5}]
        }
    assert sorted(on_wire) == ["d0000", "d0001", "d0002"]
    # recompute each device's gradient from the fleet's truth, clip, sum, add the seeded noise
    data = load_dataset("fashion-mnist")
    backend = load_backend("onnx", lenet_artifact)
    clipped = {}
    for rec in read_truth(tmp_path / "truth"):
        idx = np.array(rec["examples"])
        g = backend.loss_and_grad(w0, data.x_train[idx], data.y_train[idx]).grads
        clipped[rec["device"]] = protect.clip_l2(g, 0.05)
        assert protect.l2_norm(on_wire[rec["device"]].params) == pytest.approx(0.05, rel=1e-5)
        for k in g:
            np.testing.assert_allclose(
                on_wire[rec["device"]].params[k], clipped[rec["device"]][k], rtol=0, atol=1e-7
            )
    noise = protect.gaussian_like(w0, 0.5 * 0.05, np.random.default_rng(central_noise_seed(5, 1)))
    for k in w0:
        total = sum(on_wire[d].params[k].astype(np.float64) for d in sorted(on_wire))
        agg = ((total + noise[k]) / 3).astype(np.float32)
        np.testing.assert_array_equal(w1[k], (w0[k] + np.float32(-0.1) * agg).astype(np.float32))
    # ε per device after round 1: one Gaussian mechanism, σ = 0.5, at δ = 1e-5
    rows = store.db.execute(
        "SELECT device, mechanism, sigma, rounds, epsilon, delta FROM privacy WHERE run=? "
        "AND round=1 ORDER BY device",
        (run,),
    ).fetchall()
    want = epsilon([round_event(protect.CentralDP(0.05, 0.5), sigma=0.5, algorithm="fedsgd",
                                examples=6, batch_size=4, epochs=1)], 1e-5)  # fmt: skip
    assert rows == [(d, "central_dp", 0.5, 1, want, 1e-5) for d in ("d0000", "d0001", "d0002")]
    assert want > 10  # σ = 0.5 for one round: a weak guarantee, and the accountant says so


def test_demo_with_dp_reports_epsilon_per_device(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "edgeleak.cli", "demo", "--devices", "3", "--rounds", "2",
         "--out", str(out), "--seed", "2", "--algorithm", "fedsgd", "--batch-size", "8",
         "--protect", "dp:clip=1", "--protect", "dummy:m=2", "--dp-epsilon", "20"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    (step, dummy) = protect.parse(s["protect"])[::-1]
    assert isinstance(step, protect.DP) and step.clip == 1.0 and dummy == protect.Dummy(m=2)
    assert s["dp_calibration"] == {"epsilon": 20.0, "delta": 1e-5, "protect": s["protect"]}
    assert sorted(s["privacy"]) == ["d0000", "d0001", "d0002"]
    sigma = step.sigma
    assert sigma is not None
    ev = round_event(step, sigma=sigma, algorithm="fedsgd", examples=1, batch_size=8, epochs=1)
    for dev, p in s["privacy"].items():
        assert (p["mechanism"], p["rounds"], p["sigma"]) == ("dp", 2, sigma)
        assert p["epsilon"] == pytest.approx(20.0, rel=1e-3)  # every device took part twice
        assert p["epsilon"] == epsilon([ev, ev], 1e-5), dev
    assert "privacy (dummy:m=2,source=noise;dp:clip=1.0,sigma=" in proc.stdout
    assert f"ε per device {p['epsilon']:.3g}..{p['epsilon']:.3g} at δ=1e-05" in proc.stdout
    db = sqlite3.connect(out / "run.db")
    per_round = db.execute("SELECT round, COUNT(*), MAX(rounds) FROM privacy GROUP BY round")
    assert per_round.fetchall() == [(1, 3, 1), (2, 3, 2)]


def test_demo_refuses_an_epsilon_it_cannot_meet(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "edgeleak.cli", "demo", "--rounds", "1000", "--out",
         str(tmp_path / "x"), "--protect", "dp:clip=1", "--dp-epsilon", "0.01"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.startswith("edgeleak demo: dp over 1000 rounds: ε=0.01 at δ=1e-05 needs")
    assert "ask for fewer --rounds or a larger --dp-epsilon" in proc.stderr
    assert not (tmp_path / "x").exists()
