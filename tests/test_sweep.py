"""Sweeps: the file's validation, the pure parts (expansion, ids, Pareto fronts), and a real
sweep of demo runs over mosquitto that is interrupted, resumed without redoing a finished point,
exported, and reported in HTML that a real headless Chromium renders."""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeleak import results
from edgeleak.claims import NOT_TESTED, claims, preset
from edgeleak.cli import main
from edgeleak.config import ConfigError
from edgeleak.figures import pareto_front
from edgeleak.sweep import SweepRunner, expand, load, parse, point_id

TINY = {
    "devices": 2, "rounds": 1, "model": "mlp", "algorithm": "fedsgd", "batch_size": 1,
    "attack": "analytic", "attack_max": 2, "workers": 1,
}  # fmt: skip


def test_expand_is_the_grid_product_then_the_points_per_seed() -> None:
    got = expand({"devices": 2}, {"codec": ["f32", "int8"], "lr": [0.1, 0.2]}, [{"fraction": 0.5}],
                 [0, 7])  # fmt: skip
    assert got == [
        {"codec": "f32", "lr": 0.1, "seed": 0}, {"codec": "f32", "lr": 0.1, "seed": 7},
        {"codec": "f32", "lr": 0.2, "seed": 0}, {"codec": "f32", "lr": 0.2, "seed": 7},
        {"codec": "int8", "lr": 0.1, "seed": 0}, {"codec": "int8", "lr": 0.1, "seed": 7},
        {"codec": "int8", "lr": 0.2, "seed": 0}, {"codec": "int8", "lr": 0.2, "seed": 7},
        {"fraction": 0.5, "seed": 0}, {"fraction": 0.5, "seed": 7},
    ]  # fmt: skip
    assert expand({"devices": 2}, {}, [], [3]) == [{"seed": 3}]
    assert expand({}, {}, [], [0]) == []


def test_point_id_is_the_config_not_its_key_order() -> None:
    assert point_id({"a": 1, "b": "x"}) == point_id({"b": "x", "a": 1})
    assert point_id({"a": 1}) != point_id({"a": 2})
    assert len(point_id({"a": 1})) == 12


def test_pareto_front_exact() -> None:
    xs, ys = [1.0, 2.0, 3.0, 2.0, 1.0], [5.0, 2.0, 1.0, 3.0, 5.0]
    # (1,5) twice: neither strictly dominates the other; (2,3) is dominated by (2,2).
    assert pareto_front(xs, ys, minimize_x=True, minimize_y=True) == [
        True, True, True, False, True
    ]  # fmt: skip
    # Accuracy is maximised: (3, 1) dominates everything else.
    assert pareto_front(xs, ys, minimize_x=False, minimize_y=True) == [
        False, False, True, False, False
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"gird": {}}, "unknown key(s) ['gird']; allowed: name, seeds, base, grid, points"),
        ({"grid": {"codec": ["zip"]}}, "point 1 (codec=zip): codec='zip': expected f32"),
        ({"grid": {"colour": [1]}}, "unknown config field(s) ['colour']; valid fields: devices"),
        ({"grid": {"codec": []}}, "grid.codec=[]: expected a non-empty list of values"),
        ({"grid": {"codec": "f32"}}, "grid.codec='f32': expected a non-empty list of values"),
        ({}, "empty sweep: give [grid] (field = [values]), [[points]] or at least [base]"),
        ({"base": {"devices": 2}, "seeds": []}, "seeds=[]: expected a non-empty list of integers"),
        ({"base": {"devices": 0}}, "point 1 (base): devices=0: expected an integer >= 1"),
        ({"points": [{"lr": 0.1}, {"lr": 0.1}]}, "point 2 (lr=0.1) repeats an earlier point"),
    ],
)
def test_bad_sweep_files_name_the_key_and_the_allowed_values(
    doc: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError) as e:
        parse(doc, source="", where="s.toml")
    assert message in str(e.value)


def test_bad_sweep_file_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "s.toml"
    f.write_text('[grid]\ncodec = ["f32", "gzip"]\n')
    assert main(["sweep", str(f), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "codec='gzip': expected f32" in err
    assert not (tmp_path / "out").exists()  # nothing ran, nothing was created
    f.write_text("name = [")
    assert main(["sweep", str(f)]) == 2
    assert "not TOML" in capsys.readouterr().err
    assert main(["sweep"]) == 2
    assert "expected a sweep FILE.toml" in capsys.readouterr().err


def test_claims_preset_is_a_valid_sweep_that_covers_every_claim() -> None:
    s = preset("claims")
    ids = {p.id for p in s.points}
    assert len(ids) == len(s.points)
    for c in claims():
        assert c.points, c.id
    assert {c.id for c in claims()} >= {"1", "2", "3", "4", "4b", "5", "6", "8a", "8b", "8c", "8d"}
    assert NOT_TESTED == ()  # every claim of the seed article is run


def test_claim_4b_permutes_the_same_model_and_judges_the_exact_fraction() -> None:
    (c,) = [c for c in claims() if c.id == "4b"]
    honest, permuted = c.points["honest"], c.points["permuted"]
    assert {**honest, "malicious": "permute"} == permuted  # the same run, rows permuted
    assert honest["attack"] == "analytic" and honest["batch_size"] == 32
    assert (
        c.judge({"honest": {"exact_fraction": 0.02}, "permuted": {"exact_fraction": 0.25}})[1]
        == "holds"
    )
    assert (
        c.judge({"honest": {"exact_fraction": 0.06}, "permuted": {"exact_fraction": 0.25}})[1]
        == "partly"
    )  # more, but not 5x
    assert (
        c.judge({"honest": {"exact_fraction": 0.0}, "permuted": {"exact_fraction": 0.05}})[1]
        == "partly"
    )  # under 10% of the batch
    assert (
        c.judge({"honest": {"exact_fraction": 0.1}, "permuted": {"exact_fraction": 0.1}})[1]
        == "does not hold"
    )


def test_the_shipped_sweep_files_are_valid() -> None:
    files = sorted((Path(__file__).parents[1] / "docs" / "sweeps").glob("*.toml"))
    assert files
    for f in files:
        assert load(f).points, f


def test_a_crashing_point_is_retried_once_then_recorded_failed(tmp_path: Path) -> None:
    sweep = parse({"base": TINY, "grid": {"lr": [0.1, 0.2]}}, source="", where="s.toml")

    def crash(_config: Path, _out: Path) -> list[str]:
        return [sys.executable, "-c", "import sys; print('boom: disk on fire'); sys.exit(3)"]

    runner = SweepRunner(sweep, tmp_path, jobs=2, command=crash)
    events: list[tuple[str, str]] = []
    rep = runner.run(lambda kind, p, detail: events.append((kind, p.label)))
    assert (rep.done, rep.failed, rep.ran) == (0, 2, 4)
    assert sorted(events) == sorted(
        [(k, f"lr={lr}") for lr in (0.1, 0.2) for k in ("start", "retry", "start", "failed")]
    )
    db = sqlite3.connect(tmp_path / "sweep.db")
    rows = db.execute("SELECT status, attempts, error FROM points ORDER BY ord").fetchall()
    assert rows == [("failed", 2, "exit 3: boom: disk on fire")] * 2
    # A rerun does not retry points that used their two attempts.
    assert SweepRunner(sweep, tmp_path, jobs=1, command=crash).pending() == []


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("chromium is not installed: apt-get install -y chromium (.ci/run does this)")
    return exe


def test_sweep_resumes_exports_and_reports(tmp_path: Path) -> None:
    """Three demo points; SIGINT once the first is done; the rerun redoes 0 finished points."""
    toml = tmp_path / "s.toml"
    base = "\n".join(f"{k} = {json.dumps(v)}" for k, v in TINY.items())
    toml.write_text(f'name = "t"\nseeds = [0, 1]\n[base]\n{base}\n[grid]\nlr = [0.1, 0.3]\n')
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "edgeleak.cli", "sweep", str(toml), "--out", str(out),
           "--jobs", "1"]  # fmt: skip
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    db_path = out / "sweep.db"
    for _ in range(6000):  # wait (up to 10 min on a loaded machine) for one finished point
        if db_path.exists():
            with sqlite3.connect(db_path) as db:
                try:
                    done = db.execute("SELECT COUNT(*) FROM points WHERE status='done'").fetchone()
                except sqlite3.OperationalError:  # the file is there, its tables not yet
                    done = (0,)
                if done[0]:
                    break
        if first.poll() is not None:
            break
        time.sleep(0.1)
    first.send_signal(signal.SIGINT)
    log1 = first.communicate(timeout=120)[0]
    assert first.returncode == 130, log1
    with sqlite3.connect(db_path) as db:
        done = db.execute(
            "SELECT point, finished FROM points WHERE status='done' ORDER BY point"
        ).fetchall()
        assert db.execute("SELECT COUNT(*) FROM points WHERE status='running'").fetchone() == (0,)
    assert 1 <= len(done) < 4
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"4 points, {len(done)} already done, {4 - len(done)} to run" in second.stdout
    with sqlite3.connect(db_path) as db:
        again = db.execute(
            f"SELECT point, finished FROM points WHERE point IN "
            f"({','.join('?' * len(done))}) ORDER BY point",
            [p for p, _ in done],
        ).fetchall()
        assert again == done  # redone points: 0
        statuses = db.execute("SELECT status, attempts FROM points").fetchall()
        assert statuses == [("done", 1)] * 4

    res = results.load(out)
    assert list(res.points["label"]) == ["lr=0.1", "lr=0.1", "lr=0.3", "lr=0.3"]
    assert list(res.points["seed"]) == [0, 1, 0, 1]
    for r in res.points.to_dict("records"):
        summary = json.loads((out / "points" / r["point"] / "run" / "summary.json").read_text())
        assert r["final_accuracy"] == summary["final_accuracy"]
        assert r["bytes_up"] == summary["bytes_up"]
        assert r["exact_fraction"] == 1.0  # the analytic attack on B=1 MLP updates
    assert len(res.leakage) == 8 and len(res.rounds) == 4
    m = res.messages
    up = (
        m[(m["direction"] == "up") & m["kind"].isin(["update", "decoy"])]
        .groupby("point")["bytes"]
        .sum()
    )
    assert dict(up) == dict(zip(res.points["point"], res.points["bytes_up"], strict=True))

    assert main(["export", str(out), "--format", "csv", "--out", str(tmp_path / "csv")]) == 0
    assert (tmp_path / "csv" / "points.csv").read_text().count("\n") == 5
    assert main(["export", str(out), "--format", "parquet", "--out", str(tmp_path / "pq")]) == 0
    import pandas as pd

    pq = pd.read_parquet(tmp_path / "pq" / "rounds.parquet")
    assert list(pq["accuracy"]) == list(res.rounds["accuracy"])

    _check_report_in_chromium(out / "report.html", res, tmp_path)
    run_dir = out / "points" / res.points["point"][0] / "run"
    assert (run_dir / "report.html").is_file()  # every demo writes its report
    dom = _dump_dom(run_dir / "report.html", tmp_path)
    assert dom.count("<img ") >= 2 and 'data-images-rendered="' in dom
    assert f'data-images-rendered="{dom.count("<img ")}"' in dom


def _browser(tmp: Path) -> list[str]:
    return [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            f"--user-data-dir={tmp / 'chromium'}"]  # fmt: skip


def _dump_dom(page: Path, tmp: Path) -> str:
    """The DOM after load (and the report's own image check) in a real headless Chromium."""
    return subprocess.run(
        [*_browser(tmp), "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=300,
    ).stdout  # fmt: skip


def _check_report_in_chromium(report: Path, res: results.Results, tmp: Path) -> None:
    base = _browser(tmp)
    dom = _dump_dom(report, tmp)
    imgs = dom.count("<img ")
    assert imgs >= 3  # Pareto fronts, accuracy and bytes, a reconstruction grid per point
    assert f'data-images-rendered="{imgs}"' in dom
    assert 'data-rendered="0x0"' not in dom
    for acc in res.points["final_accuracy"]:
        assert f"<td>{100 * acc:.2f}</td>" in dom  # the table holds the store's numbers
    shot = tmp / "shot.png"
    subprocess.run(
        [*base, "--window-size=1200,1600", f"--screenshot={shot}", report.as_uri()],
        capture_output=True, timeout=300, check=True,
    )  # fmt: skip
    from PIL import Image

    with Image.open(shot) as im:
        colours = im.convert("L").getextrema()
    assert im.size == (1200, 1600) and colours[0] < 100 < colours[1]  # not a blank page


def test_report_of_one_run_and_bad_targets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "neither a run (summary.json) nor a sweep (sweep.db)" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--format", "csv"]) == 2
    assert "no sweep.db there" in capsys.readouterr().err
    assert main(["export", "resnet1000", "--out", str(tmp_path / "m")]) == 2
    assert "expected a zoo model" in capsys.readouterr().err


def test_claim_1_counts_only_a_model_that_trained() -> None:
    (c,) = [c for c in claims() if c.id == "1"]
    assert c.points["trained"]["model"] == c.points["untrained"]["model"] == "convnet"
    row = {"psnr_mean": 20.0, "baseline_psnr": 10.0}
    trained = {**row, "final_accuracy": 0.7}
    assert c.judge({"untrained": row, "trained": trained})[1] == "holds"
    measured, verdict = c.judge({"untrained": row, "trained": {**trained, "final_accuracy": 0.1}})
    assert verdict == "not tested" and "did not train" in measured
    low = {**trained, "psnr_mean": 11.0}
    assert c.judge({"untrained": row, "trained": low})[1] == "partly"


def test_claim_8_prints_epsilon_only_where_dp_ran() -> None:
    (c,) = [c for c in claims() if c.id == "8d"]
    base = {"psnr_mean": 30.0, "baseline_psnr": 10.0, "bytes_per_round": 100.0}
    rows = {"none": base, "top-k + int8": {**base, "psnr_mean": 5.0, "epsilon": float("nan")}}
    measured, verdict = c.judge(rows)
    assert verdict == "holds" and "ε" not in measured
    (dp,) = [c for c in claims() if c.id == "8a"]
    measured, _ = dp.judge({"none": base, "dp (ε = 8)": {**base, "epsilon": 7.99}})
    assert measured.endswith("ε = 7.99")
