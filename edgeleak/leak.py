"""Leakage of a run: attack intercepted updates, score them against the fleet's ground truth.

The attacks see only what the eavesdropper captured (``attacks.intercept``). Ground truth (which
examples each update used, written by the fleet) enters here, in ``attacks.truth.leakage.evaluate``
only, and only after the attack has returned.
"""

from __future__ import annotations

import itertools
import logging
import sqlite3
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from attacks.base import AttackMetadata, NotApplicable, Reconstruction
from attacks.intercept import CaptureStore, Intercepted
from attacks.registry import get_attack
from attacks.text import TextReconstruction
from attacks.truth.leakage import LeakageReport, evaluate, matched_images, matched_labels
from attacks.truth.report import save_grid, save_reconstructions
from attacks.truth.text import TextLeakage, text_table
from attacks.truth.text import score as score_text
from devices.datasets import load_dataset
from devices.fleet import read_truth
from edge.manifest import ModelArtifact
from edge.text import BOS, SPECIALS, load_vocab

log = logging.getLogger(__name__)
TEXT_WIDTH = 56  # characters per side of the typed | recovered table (fits 120 columns)

LEAKAGE_SCHEMA = """
CREATE TABLE IF NOT EXISTS leakage (
    run TEXT, round INTEGER, device TEXT, attack TEXT, capture_id INTEGER, kind TEXT,
    examples INTEGER, psnr_mean REAL, ssim_mean REAL, baseline_psnr REAL, label_accuracy REAL,
    label_count_accuracy REAL, recovered_fraction REAL, exact_fraction REAL, seconds REAL,
    budget_hit INTEGER, grid TEXT, word_precision REAL, word_recall REAL, rouge1 REAL,
    rouge2 REAL, text TEXT
);
"""


@dataclass(frozen=True)
class LeakRow:
    """One attack on one intercepted update, scored (score fields are None without truth)."""

    run: str
    round: int
    device: str
    attack: str
    capture_id: int
    kind: str
    examples: int
    psnr_mean: float | None
    ssim_mean: float | None
    baseline_psnr: float | None
    label_accuracy: float | None
    label_count_accuracy: float | None
    recovered_fraction: float | None
    exact_fraction: float | None
    seconds: float
    budget_hit: bool  # the time cap stopped the attack before its iterations ended
    grid: str
    # The text attack (``words``): word-set scores, ROUGE F1 of the examples (exact_fraction:
    # examples recovered with window and next word), and the typed-vs-recovered table (.txt).
    word_precision: float | None = None
    word_recall: float | None = None
    rouge1: float | None = None
    rouge2: float | None = None
    text: str = ""


@dataclass(frozen=True)
class GroundTruth:
    """The fleet's records of which training examples each update used, and the data itself."""

    records: dict[tuple[str, int, str], list[int]]
    x: np.ndarray
    y: np.ndarray

    def batch(self, item: Intercepted) -> tuple[np.ndarray, np.ndarray] | None:
        """The images and labels ``item`` was computed on (None if the fleet has no record)."""
        used = self.records.get((item.run, item.round, item.device))
        if used is None:
            return None
        # FedAvg walks its examples once per epoch: the batch is the first epoch's examples.
        idx = np.asarray(used[: item.update.num_examples])
        return self.x[idx], self.y[idx]

    @property
    def mean_image(self) -> np.ndarray:
        """The "no leakage" guess: the mean training image."""
        return np.asarray(self.x.mean(axis=0))

    def text(self, item: Intercepted) -> tuple[np.ndarray, np.ndarray] | None:
        """The windows and next words ``item`` was computed on: FedAvg's local epochs cover
        all the update's examples, whose words all reach the delta."""
        used = self.records.get((item.run, item.round, item.device))
        if used is None:
            return None
        idx = np.unique(np.asarray(used, dtype=np.int64))
        return self.x[idx], self.y[idx]


def fleet_truth(truth_dir: str | Path, dataset: str) -> GroundTruth:
    """Ground truth from the fleet's truth folder and the dataset it trained on."""
    data = load_dataset(dataset)
    records = {(r["run"], r["round"], r["device"]): r["examples"] for r in read_truth(truth_dir)}
    return GroundTruth(records, data.x_train, data.y_train)


def attack_captures(
    capture: CaptureStore,
    artifact: ModelArtifact,
    out: Path,
    *,
    attacks: Sequence[str],
    budget_s: float,
    max_updates: int,
    truth: GroundTruth | None = None,
    run: str | None = None,
    db: sqlite3.Connection | None = None,
    progress: bool = True,
    from_round: int = 1,
) -> list[LeakRow]:
    """Run every named attack on up to ``max_updates`` intercepted updates of rounds
    ``from_round`` on; score, plot, store."""
    from rich.progress import Progress

    out.mkdir(parents=True, exist_ok=True)
    paired = (i for i in capture.paired(artifact.manifest, run=run) if i.round >= from_round)
    items = list(itertools.islice(paired, max_updates))
    meta = AttackMetadata(artifact.manifest, budget_s=budget_s)
    rows: list[LeakRow] = []
    with Progress(disable=not progress) as bar:
        job = bar.add_task("attacking intercepted updates", total=len(items) * len(attacks))
        for item in items:
            for name in attacks:
                try:
                    rec = get_attack(name).reconstruct(item.update, item.global_model, meta)
                except NotApplicable as e:  # the attack does not apply to this update (kind, size)
                    log.warning("%s on round %d %s: %s", name, item.round, item.device, e)
                    bar.advance(job)
                    continue
                stem = f"r{item.round:03d}-{item.device}-{name}"
                if isinstance(rec, TextReconstruction):
                    title = f"{name} on round {item.round}, device {item.device}"
                    text_batch = truth.text(item) if truth is not None else None
                    scored = None
                    if text_batch is not None:
                        scored = score_text(rec, text_batch[0], text_batch[1], vocab(artifact))
                    path = save_text(out / f"{stem}.txt", rec, scored, vocab(artifact), title)
                    rows.append(_text_row(item, rec, scored, str(path)))
                    bar.advance(job)
                    continue
                if rec.images is not None:
                    np.savez(
                        out / f"{stem}.npz",
                        images=rec.images,
                        labels=rec.labels if rec.labels is not None else np.zeros(0, np.int64),
                    )
                batch = truth.batch(item) if truth is not None else None
                report = None
                if truth is not None and batch is not None:
                    report = evaluate(rec, batch[0], batch[1], mean_image=truth.mean_image)
                grid = ""
                title = f"{name} on round {item.round}, device {item.device}"
                if batch is not None and report is not None and rec.images is not None:
                    grid = str(
                        save_grid(
                            out / f"{stem}.png",
                            batch[0],
                            matched_images(rec, report),
                            report.psnr,
                            title=title,
                            true_labels=[int(v) for v in batch[1]],
                            recovered_labels=matched_labels(rec, report),
                        )
                    )
                elif rec.images is not None and len(rec.images):
                    labels = None if rec.labels is None else [int(v) for v in rec.labels]
                    grid = str(
                        save_reconstructions(
                            out / f"{stem}.png", rec.images, labels, title=f"{title} (no truth)"
                        )
                    )
                rows.append(_row(item, name, rec, report, grid))
                bar.advance(job)
    if db is not None:
        record(db, rows)
    return rows


def _row(
    item: Intercepted, name: str, rec: Reconstruction, r: LeakageReport | None, grid: str
) -> LeakRow:
    def score(field: str) -> float | None:
        return None if r is None else getattr(r, field)

    return LeakRow(
        run=item.run, round=item.round, device=item.device, attack=name,
        capture_id=item.capture_id, kind=item.update.kind, examples=item.update.num_examples,
        psnr_mean=score("psnr_mean"), ssim_mean=score("ssim_mean"),
        baseline_psnr=score("baseline_psnr"), label_accuracy=score("label_accuracy"),
        label_count_accuracy=score("label_count_accuracy"),
        recovered_fraction=score("recovered_fraction"), exact_fraction=score("exact_fraction"),
        seconds=rec.seconds, budget_hit=rec.budget_hit, grid=grid,
    )  # fmt: skip


def vocab(artifact: ModelArtifact) -> tuple[str, ...]:
    """The vocabulary shipped in a text model's folder."""
    return load_vocab(artifact.path("vocab"))


def recovered_text(rec: TextReconstruction, words: Sequence[str]) -> list[str]:
    """The recovered examples as text (window without ``<s>`` padding, then the next word)."""
    return [
        " ".join(words[int(i)] for i in (*w, lab) if int(i) != SPECIALS.index(BOS))
        for w, lab in zip(rec.windows, rec.next_words, strict=True)
    ]


def save_text(
    path: Path,
    rec: TextReconstruction,
    scored: TextLeakage | None,
    words: Sequence[str],
    title: str,
) -> Path:
    """Write the text leakage of one update: the recovered word set, then the typed and
    recovered examples side by side (with truth) or the recovered examples alone."""
    found = [words[int(i)] for i in rec.words if int(i) >= len(SPECIALS)]
    lines = [title, "", f"recovered words ({len(found)}): {' '.join(found)}", ""]
    if scored is not None:
        lines += [
            f"word precision {scored.word_precision:.3f}, recall {scored.word_recall:.3f}, "
            f"exact examples {scored.exact_fraction:.3f}, ROUGE-1 {scored.rouge1:.3f}, "
            f"ROUGE-2 {scored.rouge2:.3f} (unigram baseline: precision "
            f"{scored.baseline_precision:.3f}, recall {scored.baseline_recall:.3f}, ROUGE-1 "
            f"{scored.baseline_rouge1:.3f})",
            "",
            text_table(scored.pairs, width=TEXT_WIDTH),
        ]
    else:
        lines += ["recovered examples (no truth):", *recovered_text(rec, words)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _text_row(
    item: Intercepted, rec: TextReconstruction, s: TextLeakage | None, path: str
) -> LeakRow:
    def score(field: str) -> float | None:
        return None if s is None else float(getattr(s, field))

    return LeakRow(
        run=item.run, round=item.round, device=item.device, attack=rec.attack,
        capture_id=item.capture_id, kind=item.update.kind, examples=item.update.num_examples,
        psnr_mean=None, ssim_mean=None, baseline_psnr=None, label_accuracy=None,
        label_count_accuracy=None, recovered_fraction=None,
        exact_fraction=score("exact_fraction"), seconds=rec.seconds, budget_hit=rec.budget_hit,
        grid="", word_precision=score("word_precision"), word_recall=score("word_recall"),
        rouge1=score("rouge1"), rouge2=score("rouge2"), text=path,
    )  # fmt: skip


def record(db: sqlite3.Connection, rows: Sequence[LeakRow]) -> None:
    """Write ``rows`` into the ``leakage`` table of a run store or capture store; a row replaces
    any earlier one of the same run, round, device and attack (rerunning an attack)."""
    db.executescript(LEAKAGE_SCHEMA)
    cols = list(LeakRow.__dataclass_fields__)
    have = {r[1] for r in db.execute("PRAGMA table_info(leakage)")}
    for c in (c for c in cols if c not in have):  # a store written before the text columns
        db.execute(f"ALTER TABLE leakage ADD COLUMN {c}")
    db.executemany(
        "DELETE FROM leakage WHERE run = ? AND round = ? AND device = ? AND attack = ?",
        [(r.run, r.round, r.device, r.attack) for r in rows],
    )
    db.executemany(
        f"INSERT INTO leakage ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
        [tuple(asdict(r)[c] for c in cols) for r in rows],
    )
    db.commit()
