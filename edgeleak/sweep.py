"""Sweeps: a grid or a list of experiment settings over seeds, each point one full ``edgeleak
demo`` run (broker, fleet, eavesdropper) in its own process; the sweep's SQLite store is the
source of truth, so an interrupted sweep resumes without redoing a finished point."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeleak.config import ConfigError, ExperimentConfig

SWEEP_KEYS = ("name", "seeds", "base", "grid", "points")
ATTEMPTS = 2  # a point that crashed is retried once, then recorded as failed
STATUSES = ("pending", "running", "done", "failed")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS points (
    point TEXT PRIMARY KEY, ord INTEGER, label TEXT, setting TEXT, seed INTEGER, config TEXT,
    status TEXT, attempts INTEGER, error TEXT, out TEXT, run TEXT, started REAL, finished REAL,
    seconds REAL
);
CREATE TABLE IF NOT EXISTS results (
    point TEXT PRIMARY KEY, rounds_done INTEGER, final_accuracy REAL, bytes_up INTEGER,
    bytes_down INTEGER, bytes_per_round REAL, bytes_rejected INTEGER, epsilon REAL,
    psnr_mean REAL, ssim_mean REAL, baseline_psnr REAL, label_accuracy REAL,
    exact_fraction REAL, recovered_fraction REAL, attacked INTEGER, word_precision REAL,
    word_recall REAL
);
CREATE TABLE IF NOT EXISTS rounds (
    point TEXT, round INTEGER, accuracy REAL, loss REAL, bytes_up INTEGER, bytes_down INTEGER,
    selected INTEGER, accepted INTEGER, rejected INTEGER, epsilon REAL,
    PRIMARY KEY (point, round)
);
CREATE TABLE IF NOT EXISTS leakage (
    point TEXT, round INTEGER, device TEXT, attack TEXT, examples INTEGER, psnr_mean REAL,
    ssim_mean REAL, baseline_psnr REAL, label_accuracy REAL, exact_fraction REAL,
    recovered_fraction REAL, seconds REAL, grid TEXT, word_precision REAL, word_recall REAL,
    text TEXT
);
CREATE TABLE IF NOT EXISTS messages (
    point TEXT, direction TEXT, kind TEXT, count INTEGER, bytes INTEGER
);
"""

# What the sweep's leakage columns mean: the mean over a point's attacked updates (all attacks).
LEAK_METRICS = {
    "psnr_mean": "attacker PSNR (dB, higher = more leakage)",
    "label_accuracy": "labels recovered (fraction)",
    "exact_fraction": "images recovered exactly (fraction)",
    "word_recall": "typed words recovered (fraction)",
}

# Columns added after a store's first release: (table, column and type), for older stores.
ADDED_COLUMNS = (
    ("results", "word_precision REAL"), ("results", "word_recall REAL"),
    ("leakage", "word_precision REAL"), ("leakage", "word_recall REAL"), ("leakage", "text TEXT"),
)  # fmt: skip


@dataclass(frozen=True)
class Point:
    """One run of a sweep: its settings (the keys the sweep varies), seed and full config."""

    id: str
    label: str
    setting: dict[str, Any]
    config: ExperimentConfig

    @property
    def seed(self) -> int:
        return self.config.seed


@dataclass(frozen=True)
class Sweep:
    name: str
    points: list[Point]
    source: str  # the sweep file's text (or the preset's name), kept in the store


def point_id(config: Mapping[str, Any]) -> str:
    """A point's id: the first 12 hex digits of SHA-256 over its canonical config JSON."""
    canon = json.dumps(dict(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:12]


def expand(
    base: Mapping[str, Any],
    grid: Mapping[str, Sequence[Any]],
    points: Sequence[Mapping[str, Any]],
    seeds: Sequence[int],
) -> list[dict[str, Any]]:
    """The settings of a sweep, in order: the grid's cartesian product (keys in file order),
    then the listed points; each setting once per seed. Each item: varied keys only."""
    settings: list[dict[str, Any]] = []
    if grid:
        keys = list(grid)
        settings += [
            dict(zip(keys, vals, strict=True)) for vals in itertools.product(*grid.values())
        ]
    settings += [dict(p) for p in points]
    if not settings and base:
        settings = [{}]  # only a base: one setting, over the seeds
    return [dict(s, seed=seed) for s in settings for seed in seeds]


def label(setting: Mapping[str, Any]) -> str:
    """A short human name for a point's setting (seed excluded)."""
    parts = [f"{k}={'none' if v == '' else v}" for k, v in setting.items() if k != "seed"]
    return ", ".join(parts) if parts else "base"


def parse(d: Mapping[str, Any], *, source: str, where: str) -> Sweep:
    """A sweep from a parsed TOML table; every point's config is validated before anything runs.
    Errors name the key and the allowed values."""
    unknown = sorted(set(d) - set(SWEEP_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {', '.join(SWEEP_KEYS)}")
    name = d.get("name", Path(where).stem)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: name={name!r}: expected a non-empty string")
    seeds = d.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(_is_int(s) for s in seeds):
        raise ConfigError(f"{where}: seeds={seeds!r}: expected a non-empty list of integers")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{where}: seeds={seeds!r}: a seed is listed twice")
    base = d.get("base", {})
    if not isinstance(base, dict):
        raise ConfigError(f"{where}: [base]: expected a table of config fields")
    grid = d.get("grid", {})
    if not isinstance(grid, dict):
        raise ConfigError(f"{where}: [grid]: expected a table of config field = [values]")
    for k, v in grid.items():
        if not isinstance(v, list) or not v:
            raise ConfigError(f"{where}: grid.{k}={v!r}: expected a non-empty list of values")
        if k == "seed":
            raise ConfigError(f"{where}: grid.seed: list seeds in `seeds = [...]` instead")
    listed = d.get("points", [])
    if not isinstance(listed, list) or not all(isinstance(p, dict) for p in listed):
        raise ConfigError(f"{where}: points: expected an array of tables ([[points]])")
    settings = expand(base, grid, listed, seeds)
    if not settings:
        raise ConfigError(
            f"{where}: empty sweep: give [grid] (field = [values]), [[points]] or at least [base]"
        )
    points: list[Point] = []
    for i, s in enumerate(settings):
        try:
            cfg = ExperimentConfig.from_dict({**base, **s})
        except ConfigError as e:
            raise ConfigError(f"{where}: point {i + 1} ({label(s)}): {e}") from None
        pid = point_id(cfg.to_dict())
        if any(p.id == pid for p in points):
            raise ConfigError(f"{where}: point {i + 1} ({label(s)}) repeats an earlier point")
        points.append(Point(pid, label(s), {k: v for k, v in s.items() if k != "seed"}, cfg))
    return Sweep(name, points, source)


def load(path: str | Path) -> Sweep:
    """A sweep from its TOML file."""
    p = Path(path)
    try:
        text = p.read_text()
        d = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not TOML ({e})") from None
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise ConfigError(f"{p}: cannot read it ({why}); expected a sweep TOML file") from None
    return parse(d, source=text, where=str(p))


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class SweepStore:
    """``sweep.db``: points with their status, and the results ingested from each point's run."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, check_same_thread=False)
        self.db.executescript(SCHEMA)
        for table, column in ADDED_COLUMNS:  # a store from before the text attack
            have = {r[1] for r in self.db.execute(f"PRAGMA table_info({table})")}
            if column.split()[0] not in have:
                self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
        self.lock = threading.Lock()

    def close(self) -> None:
        self.db.close()

    def register(self, sweep: Sweep, out: Path) -> None:
        """Add the sweep's points that the store does not hold yet; points marked running by an
        interrupted sweep become pending again. Finished points are left as they are."""
        with self.lock, self.db:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('name', ?)", (sweep.name,))
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('source', ?)", (sweep.source,))
            self.db.execute(  # an interrupted attempt does not count against the point
                "UPDATE points SET status = 'pending', attempts = MAX(0, attempts - 1) "
                "WHERE status = 'running'"
            )
            start = self.db.execute("SELECT COALESCE(MAX(ord) + 1, 0) FROM points").fetchone()[0]
            for i, p in enumerate(sweep.points):
                self.db.execute(
                    "INSERT OR IGNORE INTO points (point, ord, label, setting, seed, config, "
                    "status, attempts, out) VALUES (?, ?, ?, ?, ?, ?, 'pending', 0, ?)",
                    (
                        p.id, start + i, p.label, json.dumps(p.setting), p.seed,
                        json.dumps(p.config.to_dict()), str(out / "points" / p.id),
                    ),
                )  # fmt: skip

    def status(self, point: str) -> tuple[str, int]:
        with self.lock:
            row = self.db.execute(
                "SELECT status, attempts FROM points WHERE point = ?", (point,)
            ).fetchone()
        return str(row[0]), int(row[1])

    def counts(self) -> dict[str, int]:
        with self.lock:
            rows = self.db.execute("SELECT status, COUNT(*) FROM points GROUP BY status")
            return {s: 0 for s in STATUSES} | {str(s): int(n) for s, n in rows}

    def start(self, point: str) -> int:
        """Mark ``point`` running; return its attempt number (1-based)."""
        with self.lock, self.db:
            self.db.execute(
                "UPDATE points SET status = 'running', attempts = attempts + 1, started = ? "
                "WHERE point = ?",
                (time.time(), point),
            )
            return int(
                self.db.execute("SELECT attempts FROM points WHERE point = ?", (point,)).fetchone()[
                    0
                ]
            )

    def fail(self, point: str, error: str, *, final: bool) -> None:
        with self.lock, self.db:
            self.db.execute(
                "UPDATE points SET status = ?, error = ?, finished = ? WHERE point = ?",
                ("failed" if final else "pending", error, time.time(), point),
            )

    def finish(self, point: str, out: Path, seconds: float) -> None:
        """Ingest a finished point's run (summary.json, run.db) and mark it done, atomically."""
        summary = json.loads((out / "summary.json").read_text())
        with self.lock, self.db:
            ingest(self.db, point, summary, out / "run.db")
            self.db.execute(
                "UPDATE points SET status = 'done', error = NULL, run = ?, finished = ?, "
                "seconds = ? WHERE point = ?",
                (summary["run"], time.time(), seconds, point),
            )


def _mean(values: Sequence[float | None]) -> float | None:
    xs = [float(v) for v in values if v is not None]
    return sum(xs) / len(xs) if xs else None


def ingest(db: sqlite3.Connection, point: str, summary: Mapping[str, Any], run_db: Path) -> None:
    """Copy one run's figures into the sweep store (replacing any earlier copy of ``point``)."""
    for table in ("results", "rounds", "leakage", "messages"):
        db.execute(f"DELETE FROM {table} WHERE point = ?", (point,))
    rounds = summary["rounds"]
    eps_by_round: dict[int, float] = {}
    messages: list[tuple[str, str, int, int]] = []
    with sqlite3.connect(run_db) as run:
        eps_by_round = {
            int(r): float(e)
            for r, e in run.execute(
                "SELECT round, MAX(epsilon) FROM privacy WHERE run = ? GROUP BY round",
                (summary["run"],),
            )
        }
        messages = [
            (str(d), str(k), int(n), int(b))
            for d, k, n, b in run.execute(
                "SELECT direction, kind, COUNT(*), SUM(bytes) FROM messages WHERE run = ? "
                "GROUP BY direction, kind ORDER BY direction, kind",
                (summary["run"],),
            )
        ]
    attack = summary.get("attack") or []
    db.execute(
        "INSERT INTO results VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            point, len(rounds), summary["final_accuracy"], summary["bytes_up"],
            summary["bytes_down"],
            (summary["bytes_up"] + summary["bytes_down"]) / max(1, len(rounds)),
            summary["bytes_rejected"], max(eps_by_round.values(), default=None),
            *(_mean([a.get(k) for a in attack]) for k in (
                "psnr_mean", "ssim_mean", "baseline_psnr", "label_accuracy", "exact_fraction",
                "recovered_fraction",
            )),
            len(attack),
            _mean([a.get("word_precision") for a in attack]),
            _mean([a.get("word_recall") for a in attack]),
        ),
    )  # fmt: skip
    db.executemany(
        "INSERT INTO rounds VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                point, r["round"], r["accuracy"], r["loss"], r["bytes_up"], r["bytes_down"],
                r["selected"], r["accepted"], r["rejected"], eps_by_round.get(int(r["round"])),
            )
            for r in rounds
        ],
    )  # fmt: skip
    leak_cols = ("round", "device", "attack", "examples", "psnr_mean", "ssim_mean",
                 "baseline_psnr", "label_accuracy", "exact_fraction", "recovered_fraction",
                 "seconds", "grid", "word_precision", "word_recall", "text")  # fmt: skip
    db.executemany(
        f"INSERT INTO leakage (point, {', '.join(leak_cols)}) "
        f"VALUES ({', '.join('?' * (1 + len(leak_cols)))})",
        [(point, *(a.get(c) for c in leak_cols)) for a in attack],
    )
    db.executemany("INSERT INTO messages VALUES (?, ?, ?, ?, ?)", [(point, *m) for m in messages])


def default_jobs() -> int:
    """Points run at once: one per two cores (each point runs a broker, a coordinator and a
    fleet of ``workers`` processes)."""
    return max(1, (os.cpu_count() or 2) // 2)


def demo_command(config_path: Path, out: Path) -> list[str]:
    """The command that runs one point: ``edgeleak demo`` in a fresh interpreter."""
    return [sys.executable, "-m", "edgeleak.cli", "demo", "--config", str(config_path),
            "--out", str(out)]  # fmt: skip


@dataclass
class RunReport:
    done: int
    failed: int
    skipped: int  # finished before this invocation (resumed)
    ran: int  # point attempts started by this invocation


class SweepRunner:
    """Runs a sweep's unfinished points, ``jobs`` at a time, each ``edgeleak demo`` in its own
    process group (Ctrl-C stops them all and leaves the store consistent)."""

    def __init__(
        self,
        sweep: Sweep,
        out: Path,
        *,
        jobs: int,
        command: Callable[[Path, Path], list[str]] = demo_command,
    ) -> None:
        self.sweep, self.out, self.jobs, self.command = sweep, out, jobs, command
        out.mkdir(parents=True, exist_ok=True)
        self.store = SweepStore(out / "sweep.db")
        self.store.register(sweep, out)
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._stop = threading.Event()

    def pending(self) -> list[Point]:
        left = []
        for p in self.sweep.points:
            status, attempts = self.store.status(p.id)
            if status == "pending" or (status == "failed" and attempts < ATTEMPTS):
                left.append(p)
        return left

    def _run_point(self, p: Point) -> tuple[bool, str]:
        """One attempt at ``p``: True when it finished and was ingested; else the error."""
        out = self.out / "points" / p.id
        shutil.rmtree(out, ignore_errors=True)  # a previous attempt's half-run goes
        out.mkdir(parents=True)
        cfg_path = out / "config.json"
        cfg_path.write_text(json.dumps(p.config.to_dict(), indent=1))
        t0 = time.monotonic()
        with open(out / "log.txt", "wb") as log:
            proc = subprocess.Popen(
                self.command(cfg_path, out / "run"), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
            self._procs[p.id] = proc
            rc = proc.wait()
            self._procs.pop(p.id, None)
        if self._stop.is_set():
            return False, "interrupted"
        if rc != 0:
            tail = (out / "log.txt").read_text(errors="replace").strip().splitlines()
            return False, f"exit {rc}: {tail[-1] if tail else 'no output'}"
        try:
            self.store.finish(p.id, out / "run", time.monotonic() - t0)
        except (OSError, KeyError, ValueError, sqlite3.Error) as e:
            return False, f"results unreadable: {e}"
        return True, ""

    def stop(self) -> None:
        """Stop every running point (SIGINT to its process group, then SIGKILL)."""
        self._stop.set()
        for proc in list(self._procs.values()):
            _signal_group(proc, signal.SIGINT)
        deadline = time.monotonic() + 20
        for proc in list(self._procs.values()):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)

    def run(self, on_event: Callable[[str, Point, str], None] | None = None) -> RunReport:
        """Run until every point is done or failed; ``on_event(kind, point, detail)`` with kind
        start | done | retry | failed."""
        say = on_event or (lambda *_: None)
        before = self.store.counts()["done"]
        queue = self.pending()
        ran = 0
        try:
            with ThreadPoolExecutor(max_workers=self.jobs) as pool:
                running: dict[Future[tuple[bool, str]], Point] = {}
                while queue or running:
                    while queue and len(running) < self.jobs:
                        p = queue.pop(0)
                        attempt = self.store.start(p.id)
                        say("start", p, f"attempt {attempt}")
                        running[pool.submit(self._run_point, p)] = p
                        ran += 1
                    finished, _ = wait(running, return_when=FIRST_COMPLETED)
                    for f in finished:
                        p = running.pop(f)
                        ok, error = f.result()
                        if ok:
                            say("done", p, "")
                            continue
                        _, attempts = self.store.status(p.id)
                        final = attempts >= ATTEMPTS
                        self.store.fail(p.id, error, final=final)
                        say("failed" if final else "retry", p, error)
                        if not final:
                            queue.insert(0, p)
        except BaseException:
            self.stop()
            raise
        c = self.store.counts()
        return RunReport(c["done"], c["failed"], before, ran)


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
