"""Interception: an eavesdropper that subscribes to a run's topics and keeps every message.

It is a subscriber like any other. It stores each captured PUBLISH (SQLite index plus the raw
payload on disk), and pairs every update with the global model of its round, taken from the task
it intercepted for that device, never from the coordinator's files.
"""

from __future__ import annotations

import queue
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np

from attacks.base import Algorithm, AttackUpdate, UpdateKind
from edge import wire
from edge.codec import CodecError, read_header
from edge.manifest import Manifest
from edge.mqtt import BrokerAddress, Received, connect, make_client, wait_until

SCHEMA = """
CREATE TABLE IF NOT EXISTS captures (
    id INTEGER PRIMARY KEY, t REAL, topic TEXT, run TEXT, channel TEXT, device TEXT,
    round INTEGER, bytes INTEGER, file TEXT, decoded INTEGER, error TEXT
);
"""


@dataclass(frozen=True)
class Intercepted:
    """An update paired with the global model and hyper-parameters of the task it answered."""

    run: str
    round: int
    device: str
    update: AttackUpdate
    global_model: dict[str, np.ndarray]
    capture_id: int


class CaptureStore:
    """``capture.db`` plus ``payloads/<id>.bin`` in one folder; readable offline later."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        (self.folder / "payloads").mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.folder / "capture.db", check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)
        self.lock = threading.Lock()

    def add(self, msg: Received) -> int:
        """Store one captured message; its header is read for the index, not trusted."""
        try:
            run, channel, device = wire.parse_topic(msg.topic)
        except wire.WireError:
            run, channel, device = "", "other", None
        round_: int | None = None
        error = None
        if channel in ("task", "update"):
            try:
                round_ = int(read_header(msg.payload)[1].get("round", ""))
            except (CodecError, ValueError) as e:
                error = str(e)[:200]
        with self.lock:
            cur = self.db.execute(
                "INSERT INTO captures (t, topic, run, channel, device, round, bytes, file, decoded, error)"
                " VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    time.time(),
                    msg.topic,
                    run,
                    channel,
                    device,
                    round_,
                    len(msg.payload),
                    "",
                    0,
                    error,
                ),
            )
            cid = int(cur.lastrowid or 0)
            name = f"payloads/{cid}.bin"
            (self.folder / name).write_bytes(msg.payload)
            self.db.execute("UPDATE captures SET file=? WHERE id=?", (name, cid))
            self.db.commit()
        return cid

    def payload(self, cid: int) -> bytes:
        (name,) = self.db.execute("SELECT file FROM captures WHERE id=?", (cid,)).fetchone()
        return (self.folder / name).read_bytes()

    def count(self, channel: str | None = None) -> int:
        if channel is None:
            return int(self.db.execute("SELECT COUNT(*) FROM captures").fetchone()[0])
        q = "SELECT COUNT(*) FROM captures WHERE channel=?"
        return int(self.db.execute(q, (channel,)).fetchone()[0])

    def paired(self, manifest: Manifest, *, run: str | None = None) -> Iterator[Intercepted]:
        """Every decodable update with the task its device got in the same round."""
        q = "SELECT id, run, device, round FROM captures WHERE channel='update'"
        args: tuple[str, ...] = ()
        if run:
            q, args = q + " AND run=?", (run,)
        for cid, run_, device, round_ in self.db.execute(q + " ORDER BY id", args).fetchall():
            task_row = self.db.execute(
                "SELECT id FROM captures WHERE channel='task' AND run=? AND device=? AND round=? "
                "ORDER BY id DESC LIMIT 1",
                (run_, device, round_),
            ).fetchone()
            if task_row is None:
                # A pseudonymous update (decoys): every task of a round carries the same global
                # model from an honest coordinator, so any task of the round will do.
                task_row = self.db.execute(
                    "SELECT id FROM captures WHERE channel='task' AND run=? AND round=? "
                    "ORDER BY id DESC LIMIT 1",
                    (run_, round_),
                ).fetchone()
            if task_row is None:
                continue
            try:
                task = wire.decode_task(self.payload(task_row[0]), manifest)
                upd = wire.decode_update(self.payload(cid), manifest)
            except wire.WireError:
                continue
            yield Intercepted(
                run=run_,
                round=upd.round,
                device=upd.device,
                update=AttackUpdate(
                    params=upd.params,
                    kind=cast(UpdateKind, upd.kind),  # validated by decode_update
                    num_examples=upd.num_examples,
                    lr=task.lr,
                    epochs=task.epochs,
                    batch_size=task.batch_size,
                    algorithm=cast(Algorithm, task.algorithm),  # validated by decode_task
                ),
                global_model=task.weights,
                capture_id=cid,
            )

    def close(self) -> None:
        self.db.close()


class Eavesdropper:
    """Subscribes to ``edgeleak/<run>/#`` and writes every message to a ``CaptureStore``.

    Use as a context manager; storing runs on its own thread, off the network thread.
    """

    def __init__(
        self, broker: BrokerAddress, run: str, store: CaptureStore, *, client_id: str | None = None
    ) -> None:
        self.broker = broker
        self.store = store
        self.inbox: queue.Queue[Received] = queue.Queue()
        self._ready: list[str] = []
        self.client = make_client(
            client_id or f"eavesdropper-{run}",
            self.inbox,
            protocol=broker.protocol,
            subscriptions=(f"{wire.TOPIC_PREFIX}/{run}/#",),
            on_ready=self._ready,
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self.captured = 0
        self.ended = threading.Event()  # set by the run's genuine "end" (its token matches)
        self._ends = wire.EndCommitments()

    def _drain(self) -> None:
        while not (self._stop.is_set() and self.inbox.empty()):
            try:
                msg = self.inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            self.store.add(msg)
            self.captured += 1
            self._watch_end(msg)

    def _watch_end(self, msg: Received) -> None:
        """Collect the end commitments of intercepted tasks; set ``ended`` on a genuine end."""
        try:
            run, channel, _ = wire.parse_topic(msg.topic)
        except wire.WireError:
            return
        if channel == "task":
            try:
                commitment = read_header(msg.payload)[1].get("end", "")
            except CodecError:
                return
            self._ends.add(run, commitment)
        elif channel == "control" and self._ends.accepts(run, msg.payload):
            self.ended.set()

    def __enter__(self) -> Eavesdropper:
        connect(self.client, self.broker, keepalive=60)
        self.client.loop_start()
        wait_until(lambda: bool(self._ready), 10, "the eavesdropper's subscription")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self._stop.set()
        self._thread.join()
