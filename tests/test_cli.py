"""The front door: bad input is one line and exit code 2 with nothing left behind, every
subcommand's --help lists the allowed values, Ctrl-C is one line and 130, `show` prints a store."""

from __future__ import annotations

import argparse
import ast
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from attacks.registry import ATTACK_NAMES
from coordinator.aggregate import AGGREGATORS
from coordinator.store import RoundResult, RunStore, rounds_recorded
from devices.datasets import DATASETS
from devices.partition import SCHEMES
from devices.profiles import PROFILES
from edge.backends import RUNTIMES
from edge.data import save_shard
from edge.manifest import ModelArtifact
from edge.wire import CODECS
from edgeleak.broker import free_port
from edgeleak.config import CLOCKS, FIELD_HELP, ExperimentConfig
from edgeleak.leak import LeakRow, record
from export.names import MODELS, TARGETS

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "edgeleak.cli", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def one_line_error(proc: subprocess.CompletedProcess[str], expected: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert expected in lines[0], lines[0]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A folder holding a corrupt shard, a text file posing as one, a shard of the wrong shape,
    a folder posing as a bundle, and a broken config."""
    (tmp_path / "text.npz").write_text("not a zip")
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04" + b"\x00" * 40)
    save_shard(tmp_path / "rgb.npz", np.zeros((4, 3, 32, 32)), np.zeros(4))
    np.savez(tmp_path / "noy.npz", x=np.zeros((4, 1, 28, 28)))
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "start.sh").write_text("#!/bin/sh\n")
    (tmp_path / "bad.json").write_text("{not json")
    return tmp_path


def listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def test_bad_input_is_one_line_exit_2_and_leaves_nothing(
    workdir: Path, lenet_artifact: ModelArtifact
) -> None:
    model = str(lenet_artifact.folder)
    closed = free_port()
    device = ["device", "--broker", f"mqtt://127.0.0.1:{closed}", "--run", "r", "--model", model]
    cases: list[tuple[list[str], str]] = [
        (["demo", "--config", "nofile.json", "--out", "run"], "nofile.json: cannot read it"),
        (["demo", "--config", "bad.json", "--out", "run"], "bad.json: not JSON"),
        (
            ["demo", "--broker", f"mqtt://127.0.0.1:{closed}", "--out", "run"],
            f"broker mqtt://127.0.0.1:{closed} is not reachable",
        ),
        (["demo", "--broker", "http://x", "--out", "run"], "mqtt://"),
        (["demo", "--devices", "x", "--out", "run"], "argument --devices: invalid int value: 'x'"),
        (["demo", "--model", "lenett", "--out", "run"], "model='lenett': expected one of mlp"),
        ([*device, "--data", "nope.npz"], "nope.npz: no such file"),
        ([*device, "--data", "text.npz"], "text.npz: not an .npz file"),
        ([*device, "--data", "corrupt.npz"], "corrupt.npz: not an .npz file"),
        ([*device, "--data", "noy.npz"], "expected an .npz with arrays 'x' and 'y', found ['x']"),
        ([*device, "--data", "rgb.npz"], "but model 'lenet' expects (1, 28, 28)"),
        ([*device, "--data", "rgb.npz", "--runtime", "onnxx"], "invalid choice: 'onnxx'"),
        ([*device, "--data", "rgb.npz", "--site", "a/b"], "--site 'a/b': expected 1 to 64"),
        ([*device, "--data", "rgb.npz", "--config", "bad.json"], "--config bad.json"),
        (
            ["device", "--broker", "mqtt://h:1", "--run", "r", "--model", ".", "--data", "rgb.npz"],
            "manifest.json does not exist",
        ),
        (["device", "--run", "r"], "missing --broker, --data, --model"),
        (["export", "lenett", "--out", "m"], "'lenett': expected a zoo model (mlp, lenet_zhu"),
        (["export", "lenet", "--out", "m", "--targets", "onnxx"], "unknown export target onnxx"),
        (["export", "lenet", "--out", "m", "--input-shape", "28x28"], "expected CxHxW"),
        (["shards", "--devices", "0", "--out", "s"], "argument --devices: '0': expected"),
        (["shards", "--devices", "2", "--out", "s", "--dataset", "cifar"], "invalid choice"),
        (
            ["device", "bundle", "--runtime", "onnxx", "--model", model, "--out", "b"],
            "invalid choice: 'onnxx' (choose from 'onnx', 'torch', 'executorch')",
        ),
        (
            ["device", "bundle", "--model", model, "--out", "b", "--data", "rgb.npz"],
            "but model 'lenet' expects (1, 28, 28)",
        ),
        (["device", "bundle", "--model", "nomodel", "--out", "b"], "nomodel/manifest.json"),
        (
            ["device", "deploy", f"ssh://pi@127.0.0.1:{closed}/x", "--bundle", "bundle"],
            f"ssh target 127.0.0.1:{closed} is not reachable",
        ),
        (["device", "deploy", "pi@host", "--bundle", "bundle"], "expected ssh://user@host"),
        (["device", "deploy", "ssh://pi@h/x", "--bundle", "nob"], "--bundle nob: no start.sh"),
        (
            ["attack", "--attack", "idgl", "--capture", "c", "--model", model],
            "unknown attack idgl; expected one of idlg, label_count",
        ),
        (
            ["attack", "--attack", "idlg", "--capture", "missing", "--model", model],
            "--capture missing: no capture.db there",
        ),
        (["attack", "--capture", "c", "--model", model], "nothing to do: give --attack"),
        (
            [
                "attack",
                "--broker",
                f"mqtt://127.0.0.1:{closed}",
                "--run",
                "r",
                "--capture",
                "c",
                "--model",
                model,
            ],
            "is not reachable",
        ),  # fmt: skip
        (["show", "nowhere"], "nowhere: no run.db there"),
    ]
    before = listing(workdir)
    for argv, expected in cases:
        proc = cli(*argv, cwd=workdir)
        one_line_error(proc, expected)
        assert listing(workdir) == before, argv


def _help_text(*argv: str, cwd: Path) -> str:
    proc = cli(*argv, "--help", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return "".join(proc.stdout.split())  # argparse wraps lines, at hyphens too


def test_help_lists_allowed_values(tmp_path: Path) -> None:
    expect = {
        ("demo",): [
            *MODELS, *DATASETS, *SCHEMES, *AGGREGATORS, *CODECS, *RUNTIMES, *CLOCKS, *PROFILES,
            *ATTACK_NAMES, "fedsgd", "fedavg",
        ],
        ("attack",): [*ATTACK_NAMES, *DATASETS],
        ("export",): [*MODELS, *TARGETS],
        ("shards",): [*DATASETS, *SCHEMES],
        ("device",): [*RUNTIMES, *PROFILES, "edgeleakdevicebundle", "edgeleakdevicedeploy"],
        ("device", "bundle"): [*RUNTIMES, *PROFILES],
        ("device", "deploy"): ["ssh://user@host[:port]/path"],
    }  # fmt: skip
    for argv, names in expect.items():
        text = _help_text(*argv, cwd=tmp_path)
        missing = [n for n in names if n not in text]
        assert not missing, (argv, missing)
    device = cli("device", "--help", cwd=tmp_path).stdout
    assert device.startswith("usage: edgeleak device ")
    assert "python -m edge" not in device


def _all_parsers() -> list[argparse.ArgumentParser]:
    from edge.__main__ import build_parser as device_parser
    from edgeleak.cli import _device_tools_parser, build_parser

    out = [device_parser()]
    for top in (build_parser(), _device_tools_parser()):
        out.append(top)
        for action in top._actions:
            if isinstance(action, argparse._SubParsersAction):
                out.extend(action.choices.values())
    return out


def test_every_flag_has_help() -> None:
    assert set(FIELD_HELP) == {f for f in ExperimentConfig.__dataclass_fields__}
    for parser in _all_parsers():
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction) or action.dest == "rest":
                continue
            assert action.help, (parser.prog, action.dest)


def _row(attack: str, psnr: float) -> LeakRow:
    return LeakRow(
        run="r", round=1, device="d0", attack=attack, capture_id=7, kind="gradient", examples=1,
        psnr_mean=psnr, ssim_mean=None, baseline_psnr=None, label_accuracy=1.0,
        label_count_accuracy=None, recovered_fraction=None, exact_fraction=None, seconds=0.5,
        budget_hit=False, grid="",
    )  # fmt: skip


def test_rerunning_an_attack_replaces_its_rows() -> None:
    db = sqlite3.connect(":memory:")
    record(db, [_row("idlg", 10.0), _row("dlg", 11.0)])
    record(db, [_row("dlg", 12.5)])
    rows = db.execute("SELECT attack, psnr_mean FROM leakage ORDER BY attack").fetchall()
    assert rows == [("dlg", 12.5), ("idlg", 10.0)]


def test_show_prints_a_runs_store(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "run.db")
    store.add_run(
        "run-x", config={"algorithm": "fedavg", "dataset": "fashion-mnist"}, broker="mosquitto",
        runtime="onnx", devices=3, model="lenet", model_hash="h",
    )  # fmt: skip
    for r, acc in ((1, 0.5), (2, 0.8125)):
        store.add_round("run-x", RoundResult(r, 3, 3, 0, 1_234_567, 2_000_000, acc, 0.7, 0.9, 1.5))
    store.add_rejection("run-x", 2, "d1", "t", "replayed_nonce", "")
    record(store.db, [LeakRow(**{**_row("idlg", 17.25).__dict__, "run": "run-x"})])
    store.close()
    proc = cli("show", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "run run-x: 3 devices, model lenet, runtime onnx, fedavg, fashion-mnist" in out
    assert "81.25%" in out
    assert "totals: 2 rounds, final accuracy 81.25%, 2.469 MB up, 4.000 MB down" in out
    assert "(2469134 and 4000000 bytes)" in out
    assert "rejections: replayed_nonce 1" in out
    assert "17.2" in out and "idlg" in out


def test_ctrl_c_in_a_demo_is_one_line_and_130(tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeleak.cli", "demo", "--devices", "2", "--rounds", "500",
         "--out", str(out), "--dataset", "mnist-digits", "--workers", "1"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300  # safety net only: the loop ends on the first round
        while rounds_recorded(out / "run.db") < 1 and proc.poll() is None:
            assert time.monotonic() < deadline, "no round completed"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: every process in the group
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    done = rounds_recorded(out / "run.db")
    assert lines[0] == (
        f"edgeleak demo: interrupted: {done} of 500 rounds completed; partial results in {out}"
    )


def test_the_main_guard_is_the_last_statement_of_every_module() -> None:
    """Run as ``python -m``, a module executes top to bottom: anything defined after its
    ``if __name__ == "__main__"`` block is missing when ``main()`` runs (a NameError that only
    ``-m`` runs hit, as the sweep's demo points do)."""
    late = []
    for package in ("edgeleak", "edge", "coordinator", "devices", "attacks", "export"):
        for path in sorted((ROOT / package).rglob("*.py")):
            body = ast.parse(path.read_text()).body
            guards = [
                i for i, node in enumerate(body)
                if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)
            ]  # fmt: skip
            if guards and guards[-1] != len(body) - 1:
                late.append(str(path.relative_to(ROOT)))
    assert late == []
