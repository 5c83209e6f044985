"""Reports people look at: the per-round plot, the leakage table, a run's summary from its store."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

LEAK_COLUMNS = ("round", "device", "attack", "images", "PSNR dB", "SSIM", "labels", "time s")
TEXT_KEYS = ("word_precision", "word_recall", "exact_fraction", "rouge1", "rouge2")
TEXT_COLUMNS = ("word P", "word R", "exact", "ROUGE-1", "ROUGE-2")


def cumulative_mb(rounds: Sequence[Mapping[str, Any]]) -> list[float]:
    """MB (10^6 bytes, up + down) on the wire by the end of each round."""
    total, out = 0, []
    for r in rounds:
        total += int(r["bytes_up"]) + int(r["bytes_down"])
        out.append(total / 1e6)
    return out


def plot_rounds(rounds: Sequence[Mapping[str, Any]], path: Path, *, title: str = "") -> None:
    """Two panels: test accuracy against cumulative MB on the wire (the trade-off), and test
    accuracy per round; legends sit below the axes, off the data. One round is one point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    r = [int(x["round"]) for x in rounds]
    acc = [100 * float(x["accuracy"]) for x in rounds]
    mb = cumulative_mb(rounds)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.4))
    ax1.plot(mb, acc, marker="o", label="global model after each round")
    for x, y, n in zip(mb, acc, r, strict=True):
        ax1.annotate(str(n), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=8)
    ax1.set(
        xlabel="cumulative MQTT traffic, up + down (MB)", ylabel="test accuracy (%)",
        title="accuracy against bandwidth",
    )  # fmt: skip
    ax1.set_xlim(left=0)
    ax2.plot(r, acc, marker="o", color="tab:green", label="test accuracy")
    ax2.set(xlabel="round", ylabel="test accuracy (%)", title="accuracy per round")
    ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(r) == 1:
        ax2.set_xlim(r[0] - 1, r[0] + 1)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False, fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(value: Any, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def leak_table(rows: Sequence[Mapping[str, Any]]) -> Any:
    """A rich table: one line per attack on one intercepted update (scores need the truth)."""
    from rich import box
    from rich.table import Table

    table = Table(
        title="leakage of intercepted updates", box=box.MINIMAL_HEAVY_HEAD, show_edge=False
    )
    words = any(r.get("word_recall") is not None for r in rows)  # the text attack's scores
    for c in LEAK_COLUMNS + (TEXT_COLUMNS if words else ()):
        text = c in ("device", "attack")
        table.add_column(c, justify="left" if text else "right", no_wrap=True)
    for r in rows:
        labels = r.get("label_accuracy")
        table.add_row(
            str(r["round"]), str(r["device"]), str(r["attack"]), str(r["examples"]),
            _fmt(r.get("psnr_mean"), ".1f"), _fmt(r.get("ssim_mean"), ".3f"),
            "—" if labels is None else f"{100 * labels:.0f}%", f"{r['seconds']:.1f}",
            *(_fmt(r.get(k), ".3f") for k in TEXT_KEYS if words),
        )  # fmt: skip
    return table


def _console() -> Any:
    """A rich console: the terminal's width, or 120 columns when output goes to a file or pipe."""
    from rich.console import Console

    con = Console()
    return con if con.is_terminal else Console(width=120)


def print_leak_table(rows: Sequence[Mapping[str, Any]]) -> None:
    con = _console()
    con.print(leak_table(rows))
    for r in rows:  # the text attack: typed and recovered side by side
        if r.get("text") and Path(r["text"]).is_file():
            con.print(Path(r["text"]).read_text(), markup=False, highlight=False)


def _query(db: sqlite3.Connection, sql: str, *params: object) -> list[sqlite3.Row]:
    try:
        return list(db.execute(sql, params))
    except sqlite3.OperationalError:  # a table this store does not have (e.g. no attack ran)
        return []


def show_run(path: Path, *, run: str | None = None) -> None:
    """Print a run's rounds, totals, rejections and leakage from its ``run.db``."""
    from rich.table import Table

    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    runs = _query(db, "SELECT * FROM runs ORDER BY created")
    if run is not None:
        runs = [x for x in runs if x["run"] == run]
    if not runs:
        from edgeleak.errors import UsageError

        raise UsageError(f"{path}: no run {run!r} in this store" if run else f"{path}: no runs")
    info = runs[-1]
    name = info["run"]
    cfg = json.loads(info["config"] or "{}")
    con = _console()
    con.print(
        f"run {name}: {info['devices']} devices, model {info['model']}, runtime "
        f"{info['runtime']}, {cfg.get('algorithm', '?')}, {cfg.get('dataset', '?')}, "
        f"broker {info['broker']}"
    )
    rounds = _query(db, "SELECT * FROM rounds WHERE run = ? ORDER BY round", name)
    t = Table(title="rounds")
    for c in ("round", "accuracy", "loss", "MB up", "MB down", "accepted", "rejected", "seconds"):
        t.add_column(c, justify="right")
    for r in rounds:
        t.add_row(
            str(r["round"]), _fmt(None if r["accuracy"] is None else 100 * r["accuracy"], ".2f")
            + "%", _fmt(r["loss"], ".4f"), f"{r['bytes_up'] / 1e6:.3f}",
            f"{r['bytes_down'] / 1e6:.3f}", f"{r['accepted']}/{r['selected']}",
            str(r["rejected"]), _fmt(r["seconds"], ".1f"),
        )  # fmt: skip
    con.print(t)
    up = sum(int(r["bytes_up"]) for r in rounds)
    down = sum(int(r["bytes_down"]) for r in rounds)
    final = rounds[-1]["accuracy"] if rounds else None
    con.print(
        f"totals: {len(rounds)} rounds, final accuracy "
        f"{_fmt(None if final is None else 100 * final, '.2f')}%, {up / 1e6:.3f} MB up, "
        f"{down / 1e6:.3f} MB down ({up} and {down} bytes)"
    )
    rej = _query(
        db, "SELECT reason, COUNT(*) AS n FROM rejections WHERE run = ? GROUP BY reason", name
    )
    con.print(
        "rejections: " + (", ".join(f"{x['reason']} {x['n']}" for x in rej) if rej else "none")
    )
    leaks = _query(db, "SELECT * FROM leakage WHERE run = ? ORDER BY round, device, attack", name)
    if leaks:
        con.print(leak_table([dict(x) for x in leaks]))
    db.close()


# Units of summary.json's numbers (its key names say bytes_*, seconds, *_s).
SUMMARY_UNITS = {
    "accuracy": "fraction of the test set in [0, 1]",
    "loss": "mean cross-entropy on the test set (nats)",
    "train_loss": "mean local training loss of the accepted updates (nats)",
    "bytes_up": "bytes of MQTT PUBLISH packets sent by devices (updates)",
    "bytes_down": "bytes of MQTT PUBLISH packets delivered to devices (tasks)",
    "seconds": "wall-clock seconds",
    "virtual_seconds": "seconds on the virtual clock (profiles)",
    "psnr_mean": "dB",
    "ssim_mean": "SSIM in [-1, 1]",
    "label_accuracy": "fraction in [0, 1]",
}


def software_versions() -> dict[str, str]:
    """Versions of what a run used: edgeleak, onnxruntime, torch, mosquitto, python, platform."""
    import importlib.metadata
    import platform
    import subprocess

    def dist(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    from edgeleak.broker import mosquitto_path

    mosquitto = "not installed"
    if exe := mosquitto_path():
        try:
            out = subprocess.run([exe, "-h"], capture_output=True, text=True, timeout=10).stdout
            mosquitto = out.splitlines()[0].split("version", 1)[-1].strip() if out else "unknown"
        except (OSError, subprocess.TimeoutExpired):
            mosquitto = "unknown"
    return {
        "edgeleak": dist("edgeleak"),
        "onnxruntime": dist("onnxruntime"),
        "torch": dist("torch"),
        "mosquitto": mosquitto,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
