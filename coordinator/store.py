"""The run store: SQLite tables for runs, rounds, the byte ledger (messages) and rejections."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from edge.secagg import LEDGER_KINDS as SECAGG_KINDS

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run TEXT PRIMARY KEY, created REAL, config TEXT, broker TEXT, runtime TEXT,
    devices INTEGER, model TEXT, model_hash TEXT
);
CREATE TABLE IF NOT EXISTS rounds (
    run TEXT, round INTEGER, selected INTEGER, accepted INTEGER, rejected INTEGER,
    bytes_up INTEGER, bytes_down INTEGER, accuracy REAL, loss REAL, train_loss REAL, seconds REAL,
    virtual_seconds REAL, bytes_rejected INTEGER, model_sha256 TEXT,
    PRIMARY KEY (run, round)
);
CREATE TABLE IF NOT EXISTS messages (
    run TEXT, round INTEGER, device TEXT, topic TEXT, direction TEXT, kind TEXT,
    bytes INTEGER, payload_bytes INTEGER, t REAL
);
CREATE TABLE IF NOT EXISTS rejections (
    run TEXT, round INTEGER, device TEXT, topic TEXT, reason TEXT, detail TEXT, t REAL
);
CREATE TABLE IF NOT EXISTS privacy (
    run TEXT, round INTEGER, device TEXT, mechanism TEXT, sigma REAL, rounds INTEGER,
    epsilon REAL, delta REAL,
    PRIMARY KEY (run, round, device)
);
CREATE TABLE IF NOT EXISTS anomaly (
    run TEXT, round INTEGER, device TEXT, defence TEXT, norm REAL, score REAL, kept INTEGER,
    clip REAL,
    PRIMARY KEY (run, round, device)
);
CREATE TABLE IF NOT EXISTS dropouts (
    run TEXT, round INTEGER, device TEXT, reason TEXT,
    PRIMARY KEY (run, round, device)
);
CREATE TABLE IF NOT EXISTS sites (
    run TEXT, device TEXT, site TEXT, PRIMARY KEY (run, device)
);
CREATE INDEX IF NOT EXISTS messages_run_round ON messages (run, round);
"""


@dataclass(frozen=True)
class RoundResult:
    """One finished round as the coordinator reports it and the ``rounds`` table keeps it."""

    round: int
    selected: int
    accepted: int
    rejected: int
    bytes_up: int
    bytes_down: int
    accuracy: float
    loss: float
    train_loss: float
    seconds: float
    rejections: dict[str, int] = field(default_factory=dict)
    virtual_seconds: float | None = None  # with a clock: min(deadline, slowest arrival)
    bytes_rejected: int = 0  # packet bytes of rejected messages (not counted in bytes_up)
    model_sha256: str = ""  # edge.codec.params_sha256 of the global model after the round


@dataclass(frozen=True)
class MessageRow:
    """One MQTT PUBLISH as the ledger records it; ``bytes`` is the whole MQTT packet."""

    run: str
    round: int
    device: str
    topic: str
    direction: str  # "up" (device -> broker) or "down" (broker -> device)
    # "task", "update", "decoy" (a dropped decoy), "status", "control"; "rejected": refused
    # incoming traffic; "bridge": a site device's message again, on its site's bridge
    kind: str
    bytes: int
    payload_bytes: int
    t: float


@dataclass(frozen=True)
class PrivacyRow:
    """A device's cumulative privacy spend after a round (written by the coordinator)."""

    device: str
    mechanism: str
    sigma: float
    rounds: int
    epsilon: float
    delta: float


@dataclass(frozen=True)
class AnomalyRow:
    """One accepted update as the defence saw it: its L2 norm, its anomaly score
    (``coordinator.robust.anomaly_scores``), whether it entered the aggregate and the factor
    it was scaled by."""

    device: str
    defence: str
    norm: float
    score: float
    kept: bool
    clip: float


def rounds_recorded(path: str | Path) -> int:
    """Rounds recorded in the run store at ``path`` (0 when there is none yet)."""
    if not Path(path).is_file():
        return 0
    con = sqlite3.connect(path)
    try:
        return int(con.execute("SELECT COUNT(*) FROM rounds").fetchone()[0])
    except sqlite3.Error:
        return 0
    finally:
        con.close()


class RunStore:
    """Thin wrapper over one SQLite file; every write commits."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._deferring = 0  # inside ``deferred``: commit at its end
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; no fsync per row
        self.db.executescript(SCHEMA)
        cols = {row[1] for row in self.db.execute("PRAGMA table_info(rounds)")}
        for col, sql_type in (("bytes_rejected", "INTEGER"), ("model_sha256", "TEXT")):
            if col not in cols:  # a run.db written before the column existed
                self.db.execute(f"ALTER TABLE rounds ADD COLUMN {col} {sql_type}")

    def close(self) -> None:
        self.db.commit()
        self.db.close()

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Rows added inside are committed once, at the end (the coordinator's batch of
        messages: one commit per batch, not per message); nests."""
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
            self._commit()

    def _commit(self) -> None:
        if not self._deferring:
            self.db.commit()

    def add_run(
        self,
        run: str,
        *,
        config: dict[str, object],
        broker: str,
        runtime: str,
        devices: int,
        model: str,
        model_hash: str,
    ) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO runs VALUES (?,?,?,?,?,?,?,?)",
            (
                run,
                time.time(),
                json.dumps(config, sort_keys=True),
                broker,
                runtime,
                devices,
                model,
                model_hash,
            ),
        )
        self._commit()

    def add_messages(self, rows: list[MessageRow]) -> None:
        self.db.executemany(
            "INSERT INTO messages VALUES (?,?,?,?,?,?,?,?,?)",
            [
                (
                    r.run,
                    r.round,
                    r.device,
                    r.topic,
                    r.direction,
                    r.kind,
                    r.bytes,
                    r.payload_bytes,
                    r.t,
                )
                for r in rows
            ],
        )
        self._commit()

    def add_rejection(
        self, run: str, round_: int, device: str, topic: str, reason: str, detail: str
    ) -> None:
        self.db.execute(
            "INSERT INTO rejections VALUES (?,?,?,?,?,?,?)",
            (run, round_, device, topic, reason, detail[:500], time.time()),
        )
        self._commit()

    def add_round(self, run: str, r: RoundResult) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO rounds (run, round, selected, accepted, rejected, bytes_up, "
            "bytes_down, accuracy, loss, train_loss, seconds, virtual_seconds, bytes_rejected, "
            "model_sha256) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (run, r.round, r.selected, r.accepted, r.rejected, r.bytes_up, r.bytes_down,
             r.accuracy, r.loss, r.train_loss, r.seconds, r.virtual_seconds, r.bytes_rejected,
             r.model_sha256),
        )  # fmt: skip
        self._commit()

    def add_dropouts(self, run: str, round_: int, rows: list[tuple[str, str]]) -> None:
        """Selected devices of ``round_`` without an accepted update: (device, reason), the
        reasons of ``coordinator.dropout``."""
        self.db.executemany(
            "INSERT OR REPLACE INTO dropouts VALUES (?,?,?,?)",
            [(run, round_, device, reason) for device, reason in rows],
        )
        self._commit()

    def add_site(self, run: str, device: str, site: str) -> None:
        """``device`` announced that it connects through ``site``'s bridged broker."""
        self.db.execute("INSERT OR REPLACE INTO sites VALUES (?,?,?)", (run, device, site))
        self._commit()

    def bridge_bytes(self, run: str) -> dict[tuple[str, str], int]:
        """(site, direction) -> the packet bytes of the ledger's ``bridge`` rows: what crossed
        each site's bridge to and from the coordinator's broker."""
        rows = self.db.execute(
            "SELECT s.site, m.direction, SUM(m.bytes) FROM messages m JOIN sites s "
            "ON m.run = s.run AND m.device = s.device WHERE m.run=? AND m.kind='bridge' "
            "GROUP BY s.site, m.direction",
            (run,),
        ).fetchall()
        return {(str(site), str(d)): int(b) for site, d, b in rows}

    def dropouts(self, run: str) -> list[tuple[int, str, str]]:
        """(round, device, reason) of every dropout of ``run``, in round and device order."""
        rows = self.db.execute(
            "SELECT round, device, reason FROM dropouts WHERE run=? ORDER BY round, device", (run,)
        ).fetchall()
        return [(int(r), str(d), str(why)) for r, d, why in rows]

    def add_privacy(self, run: str, round_: int, rows: list[PrivacyRow]) -> None:
        """Each device's cumulative ε after ``round_`` (``epsilon`` may be ``inf`` for σ = 0)."""
        self.db.executemany(
            "INSERT OR REPLACE INTO privacy VALUES (?,?,?,?,?,?,?,?)",
            [(run, round_, r.device, r.mechanism, r.sigma, r.rounds, r.epsilon, r.delta)
             for r in rows],
        )  # fmt: skip
        self._commit()

    def add_anomaly(self, run: str, round_: int, rows: list[AnomalyRow]) -> None:
        self.db.executemany(
            "INSERT OR REPLACE INTO anomaly VALUES (?,?,?,?,?,?,?,?)",
            [(run, round_, r.device, r.defence, r.norm, r.score, int(r.kept), r.clip)
             for r in rows],
        )  # fmt: skip
        self._commit()

    def anomaly(self, run: str) -> list[dict[str, object]]:
        """Every scored update of ``run``, by round and device."""
        cur = self.db.execute("SELECT * FROM anomaly WHERE run=? ORDER BY round, device", (run,))
        cols = [c[0] for c in cur.description]
        return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]

    def privacy(self, run: str) -> dict[str, dict[str, object]]:
        """Each device's latest cumulative privacy row, by device."""
        cur = self.db.execute(
            "SELECT p.* FROM privacy p JOIN (SELECT device, MAX(round) r FROM privacy "
            "WHERE run=? GROUP BY device) m ON p.device=m.device AND p.round=m.r "
            "WHERE p.run=? ORDER BY p.device",
            (run, run),
        )
        cols = [c[0] for c in cur.description]
        return {row[2]: dict(zip(cols, row, strict=True)) for row in cur.fetchall()}

    def ledger_bytes(
        self,
        run: str,
        *,
        direction: str,
        kinds: tuple[str, ...] = (
            "task",
            "update",
            "aggregate",
            "decoy",
            "model",
            *SECAGG_KINDS,
        ),  # fmt: skip
        round_: int | None = None,
    ) -> int:
        """Sum of packet bytes for a run (optionally one round), one direction, the given kinds."""
        q = f"SELECT COALESCE(SUM(bytes),0) FROM messages WHERE run=? AND direction=? AND kind IN ({','.join('?' * len(kinds))})"
        args: list[object] = [run, direction, *kinds]
        if round_ is not None:
            q += " AND round=?"
            args.append(round_)
        return int(self.db.execute(q, args).fetchone()[0])

    def rejection_counts(self, run: str) -> dict[str, int]:
        rows = self.db.execute(
            "SELECT reason, COUNT(*) FROM rejections WHERE run=? GROUP BY reason", (run,)
        ).fetchall()
        return {str(r): int(n) for r, n in rows}

    def rounds(self, run: str) -> list[dict[str, object]]:
        cur = self.db.execute("SELECT * FROM rounds WHERE run=? ORDER BY round", (run,))
        cols = [c[0] for c in cur.description]
        return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]
