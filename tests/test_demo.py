"""The main job, `edgeleak demo`, end to end through the CLI on its own broker."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np

from coordinator.policy import round_length
from devices.datasets import load_dataset
from devices.partition import partition
from devices.profiles import load_profile, round_time


def test_demo_writes_run_db_summary_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgeleak.cli",
            "demo",
            "--devices",
            "3",
            "--rounds",
            "2",
            "--out",
            str(out),
            "--seed",
            "1",
            "--epochs",
            "1",
            "--fraction",
            "1.0",
            "--deadline-s",
            "3600",  # a safety net: the round ends when all 3 answered, however busy the host
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert {"devices", "runtime", "broker", "bytes_up", "bytes_down", "rounds"} <= set(s)
    assert (s["devices"], s["runtime"], s["broker"]) == (3, "onnx", "mosquitto")
    assert s["versions"]["mosquitto"] == "2.0.11"  # Debian bookworm's, as on this machine
    assert set(s["versions"]) == {
        "edgeleak",
        "onnxruntime",
        "torch",
        "mosquitto",
        "python",
        "platform",
    }
    assert s["units"]["bytes_up"].startswith("bytes of MQTT PUBLISH packets")
    assert [r["round"] for r in s["rounds"]] == [1, 2]
    for r in s["rounds"]:
        assert {
            "round",
            "accuracy",
            "loss",
            "bytes_up",
            "bytes_down",
            "accepted",
            "rejected",
            "seconds",
        } <= set(r)
        assert (r["accepted"], r["rejected"]) == (3, 0)
    assert s["rounds"][-1]["accuracy"] > 0.6  # 3 devices × 20,000 Fashion-MNIST examples, 2 rounds
    assert s["bytes_up"] == sum(r["bytes_up"] for r in s["rounds"])
    assert s["bytes_down"] == sum(r["bytes_down"] for r in s["rounds"])
    db = sqlite3.connect(out / "run.db")
    assert db.execute("SELECT COUNT(*) FROM rounds").fetchone()[0] == 2
    assert (
        db.execute("SELECT COUNT(*) FROM messages WHERE kind IN ('task','update')").fetchone()[0]
        == 12
    )
    assert (out / "rounds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_bad_flag_names_field(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgeleak.cli",
            "demo",
            "--algorithm",
            "fedprox",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "algorithm='fedprox': expected one of fedsgd, fedavg" in proc.stderr


def _virtual_demo(out: Path, workers: int) -> tuple[dict, sqlite3.Connection]:  # type: ignore[type-arg]
    proc = subprocess.run(
        [sys.executable, "-m", "edgeleak.cli", "demo", "--devices", "4", "--rounds", "2",
         "--out", str(out), "--dataset", "mnist-digits", "--clock", "virtual",
         "--profiles", "phone-low,orin-nano", "--deadline-s", "2.2", "--workers", str(workers)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "summary.json").read_text()), sqlite3.connect(out / "run.db")


def test_demo_virtual_clock_drops_slow_profiles(tmp_path: Path) -> None:
    """Host-independent: compute = examples * FLOPs per example / the profile's throughput."""
    s, db = _virtual_demo(tmp_path / "a", workers=2)
    assert s["clock"] == "virtual" and s["flops_per_example"] == 2_499_120  # LeNet, counted
    # ~1,250 examples: a low-end phone (1.025 GFLOP/s) needs ~3 s, a Jetson (1.242) ~2.5 s...
    stragglers = {
        d for (d,) in db.execute("SELECT device FROM rejections WHERE reason='straggler'")
    }
    assert stragglers == {"d0000", "d0002"}  # the phone-low devices
    profiles = {"d0000": "phone-low", "d0001": "orin-nano", "d0002": "phone-low",
                "d0003": "orin-nano"}  # fmt: skip
    sizes = {f"d{i:04d}": len(x) for i, x in enumerate(_shards(s))}
    for r in s["rounds"]:  # availability draws decide who is selected; every miss is a straggler
        (late,) = db.execute(
            "SELECT COUNT(*) FROM rejections WHERE reason='straggler' AND round=?", (r["round"],)
        ).fetchone()
        assert r["selected"] - r["accepted"] == late
        rows = db.execute(
            "SELECT device, kind, bytes FROM messages WHERE round=? AND kind IN ('task','update')",
            (r["round"],),
        ).fetchall()
        ledger = {(d, k): b for d, k, b in rows}
        arrivals = [
            round_time(load_profile(profiles[d]), examples=sizes[d], bytes_down=ledger[d, "task"],
                       bytes_up=ledger[d, "update"], flops_per_example=2_499_120)
            for d in {d for d, _ in ledger}
        ]  # fmt: skip
        assert r["virtual_seconds"] == round_length(arrivals, deadline_s=2.2)
    # The same virtual config again, with one fleet worker: the same stragglers, virtual round
    # times and global models, to the bit.
    s2, db2 = _virtual_demo(tmp_path / "b", workers=1)
    keys = ("selected", "accepted", "virtual_seconds", "model_sha256", "accuracy")
    assert [{k: r[k] for k in keys} for r in s2["rounds"]] == [
        {k: r[k] for k in keys} for r in s["rounds"]
    ]
    q = "SELECT round, device, detail FROM rejections ORDER BY round, device"
    assert db2.execute(q).fetchall() == db.execute(q).fetchall()


def _shards(s: dict) -> list[np.ndarray]:  # type: ignore[type-arg]
    """The demo's partition of its training set (the same call as the experiment makes)."""
    data = load_dataset(s["dataset"])
    c = s["config"]
    return partition(data.y_train, c["devices"], scheme=c["partition"], alpha=c["alpha"],
                     seed=c["seed"], min_size=c["batch_size"] or 1)  # fmt: skip
