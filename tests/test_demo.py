"""The main job, `edgeleak demo`, end to end through the CLI on its own broker."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path


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


def test_demo_virtual_clock_drops_slow_profiles(tmp_path: Path) -> None:
    out = tmp_path / "virtual"
    proc = subprocess.run(
        [sys.executable, "-m", "edgeleak.cli", "demo", "--devices", "4", "--rounds", "2",
         "--out", str(out), "--dataset", "mnist-digits", "--clock", "virtual",
         "--profiles", "phone-low,orin-nano", "--deadline-s", "1.0"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["clock"] == "virtual"
    # 1,000 examples on a low-end phone take longer than 1 s of virtual time; on a Jetson they don't.
    db = sqlite3.connect(out / "run.db")
    stragglers = {
        d for (d,) in db.execute("SELECT device FROM rejections WHERE reason='straggler'")
    }
    assert stragglers == {"d0000", "d0002"}
    for r in s["rounds"]:  # availability draws decide who is selected; every miss is a straggler
        (late,) = db.execute(
            "SELECT COUNT(*) FROM rejections WHERE reason='straggler' AND round=?", (r["round"],)
        ).fetchone()
        assert r["selected"] - r["accepted"] == late
        assert (r["virtual_seconds"] == 1.0) if late else (0 < r["virtual_seconds"] < 1.0)
