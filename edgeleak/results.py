"""A sweep's results as pandas DataFrames, for notebooks: ``edgeleak.results.load(path)``.

Tables (one row per ...), all keyed by ``point`` (12 hex digits, see ``edgeleak.sweep.point_id``):

- ``points`` (point): ``label``, ``seed``, ``status`` (pending|running|done|failed), ``attempts``,
  ``error``, ``seconds`` (wall-clock of the run), the varied settings as columns of their own,
  ``config`` (the full JSON), and the run's figures: ``rounds_done``, ``final_accuracy`` (fraction),
  ``bytes_up``/``bytes_down`` (MQTT packet bytes over the run), ``bytes_per_round`` (up + down),
  ``bytes_rejected``, ``epsilon`` (largest per-device ε at the end; NaN without DP), and the mean
  over the attacked updates of ``psnr_mean`` (dB), ``ssim_mean``, ``baseline_psnr`` (dB, the mean
  training image), ``label_accuracy``, ``exact_fraction``, ``recovered_fraction``, and of the
  text attack's ``word_precision`` and ``word_recall``; ``attacked`` (number of attacked updates).
- ``rounds`` (point, round): ``accuracy``, ``loss``, ``bytes_up``, ``bytes_down``, ``selected``,
  ``accepted``, ``rejected``, ``epsilon`` (largest per-device ε after the round).
- ``leakage`` (point, attacked update and attack): ``round``, ``device``, ``attack``,
  ``examples``, ``psnr_mean``, ``ssim_mean``, ``baseline_psnr``, ``label_accuracy``,
  ``exact_fraction``, ``recovered_fraction``, ``seconds``, ``grid`` (path of the PNG), and for
  the text attack ``word_precision``, ``word_recall`` and ``text`` (path of its .txt table).
- ``messages`` (point, direction and kind): ``count``, ``bytes``.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgeleak.errors import UsageError

if TYPE_CHECKING:
    import pandas as pd

TABLES = ("points", "rounds", "leakage", "messages")


@dataclass(frozen=True)
class Results:
    points: pd.DataFrame
    rounds: pd.DataFrame
    leakage: pd.DataFrame
    messages: pd.DataFrame

    def table(self, name: str) -> pd.DataFrame:
        return getattr(self, name)


def sweep_db(path: str | Path) -> Path:
    """The ``sweep.db`` of a sweep folder (or the file itself); a clear error otherwise."""
    p = Path(path)
    db = p / "sweep.db" if p.is_dir() else p
    if not db.is_file():
        raise UsageError(f"{path}: no sweep.db there; expected a sweep's output folder")
    return db


def load(path: str | Path) -> Results:
    """A sweep's tables as DataFrames (see the module docstring for the columns)."""
    import pandas as pd

    with sqlite3.connect(sweep_db(path)) as db:
        points = pd.read_sql_query(
            "SELECT p.point, p.label, p.seed, p.status, p.attempts, p.error, p.seconds, "
            "p.setting, p.config, r.* FROM points p LEFT JOIN results r ON r.point = p.point "
            "ORDER BY p.ord",
            db,
        )
        points = points.loc[:, ~points.columns.duplicated()]
        settings = pd.DataFrame([json.loads(s) for s in points.pop("setting")], index=points.index)
        points = pd.concat([points, settings], axis=1)
        rounds = pd.read_sql_query("SELECT * FROM rounds ORDER BY point, round", db)
        leakage = pd.read_sql_query("SELECT * FROM leakage ORDER BY point, round, device", db)
        messages = pd.read_sql_query("SELECT * FROM messages ORDER BY point, direction, kind", db)
    return Results(points, rounds, leakage, messages)


def export(path: str | Path, fmt: str, out: Path) -> list[Path]:
    """Write every table as ``out/<table>.<fmt>`` (csv or parquet); return the files."""
    res = load(path)
    if fmt == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise UsageError(
                "--format parquet needs pyarrow: pip install 'edgeleak[lab]' (or use csv)"
            ) from None
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in TABLES:
        df = res.table(name)
        f = out / f"{name}.{fmt}"
        if fmt == "csv":
            df.to_csv(f, index=False)
        else:
            df.to_parquet(f, index=False)
        written.append(f)
    return written
