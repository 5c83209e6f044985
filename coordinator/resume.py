"""Resuming a run after a coordinator crash: the global model of every completed round is kept in
the run folder, and a resumed run starts from the last one whose bytes hash to the run store's
``model_sha256`` of that round (bit-identical, or refused).

Layout: ``RUN_DIR/run.db`` (the run store) and ``RUN_DIR/models/round-NNNNNN.safetensors`` (the
model after round N; the last ``KEEP`` rounds are kept). A model file is written (to a temporary
name, then renamed) after its round is in the store, so a crash between the two resumes one round
earlier, never from a model the store does not vouch for.
"""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from coordinator.store import RoundResult
from edge.codec import CodecError, params_sha256, read_container, write_tensors

Params = dict[str, np.ndarray]
MODELS = "models"
KEEP = 2  # model files kept: the last round's, and the one before in case a write was cut


class ResumeError(ValueError):
    """A run folder that cannot be resumed; the message says why and what was expected."""


def model_path(run_dir: Path, round_: int) -> Path:
    return run_dir / MODELS / f"round-{round_:06d}.safetensors"


def save_model(run_dir: Path, run: str, round_: int, weights: Params, names: list[str]) -> Path:
    """Write the global model after ``round_`` (parameters in ``names`` order); keep the last
    ``KEEP`` rounds' files."""
    path = model_path(run_dir, round_)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(
        write_tensors({k: weights[k] for k in names}, {"run": run, "round": str(round_)})
    )
    os.replace(tmp, path)
    for old in sorted(path.parent.glob("round-*.safetensors"))[:-KEEP]:
        old.unlink(missing_ok=True)
    return path


@dataclass(frozen=True)
class ResumePoint:
    """Where a run continues: after ``round`` (0: from the start) with ``weights`` (None: the
    model's initial weights)."""

    run: str
    round: int
    weights: Params | None = field(repr=False)
    model_sha256: str
    config: dict[str, object]
    model_hash: str  # the manifest hash the run was started with
    proven: frozenset[str]  # devices with an accepted update up to ``round``
    results: tuple[RoundResult, ...]  # the completed rounds, as the store recorded them


def _load(path: Path) -> Params:
    try:
        tensors, _ = read_container(path.read_bytes())
    except (OSError, CodecError) as e:
        raise ResumeError(f"{path}: cannot read the stored model ({e})") from None
    return {k: np.array(v, dtype=np.float32) for k, v in tensors.items()}


def _result(row: dict[str, object]) -> RoundResult:
    keys = RoundResult.__dataclass_fields__
    return RoundResult(**{k: v for k, v in row.items() if k in keys and k != "rejections"})  # type: ignore[arg-type]


def resume_point(run_dir: Path) -> ResumePoint:
    """The last completed round of the latest run in ``run_dir`` with its stored model, checked
    against the store's ``model_sha256``; ``ResumeError`` when there is none to trust."""
    db_path = run_dir / "run.db"
    if not db_path.is_file():
        raise ResumeError(f"{run_dir}: no run.db; expected the folder of a run to resume")
    db = sqlite3.connect(db_path)
    db.row_factory = sqlite3.Row
    try:
        run_row = db.execute("SELECT * FROM runs ORDER BY created DESC LIMIT 1").fetchone()
        if run_row is None:
            raise ResumeError(f"{db_path}: no run recorded; nothing to resume")
        run = str(run_row["run"])
        rows = [
            dict(r) for r in db.execute("SELECT * FROM rounds WHERE run=? ORDER BY round", (run,))
        ]
        point_round, weights, sha = 0, None, ""
        for row in reversed(rows):
            path = model_path(run_dir, int(row["round"]))
            if not path.is_file():
                continue  # the crash came between the store and the model file
            weights = _load(path)
            sha = params_sha256(weights)
            if sha != row["model_sha256"]:
                raise ResumeError(
                    f"{path}: model SHA-256 {sha[:16]}… differs from the store's "
                    f"{str(row['model_sha256'])[:16]}… for round {row['round']}; refusing to resume"
                )
            point_round = int(row["round"])
            break
        if rows and point_round == 0:
            raise ResumeError(
                f"{run_dir}: {len(rows)} rounds recorded but no stored model in {MODELS}/"
            )
        proven = db.execute(
            "SELECT DISTINCT device FROM messages WHERE run=? AND kind='update' AND round<=?",
            (run, point_round),
        ).fetchall()
        return ResumePoint(
            run=run,
            round=point_round,
            weights=weights,
            model_sha256=sha,
            config=json.loads(run_row["config"]),
            model_hash=str(run_row["model_hash"]),
            proven=frozenset(str(d[0]) for d in proven),
            results=tuple(_result(r) for r in rows if int(r["round"]) <= point_round),
        )
    except sqlite3.Error as e:
        raise ResumeError(f"{db_path}: not a readable run store ({e})") from None
    finally:
        db.close()
