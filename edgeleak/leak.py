"""Leakage of a run: attack intercepted updates, score them against the fleet's ground truth.

The attacks see only what the eavesdropper captured (``attacks.intercept``). Ground truth (which
examples each update used, written by the fleet) enters here, in ``attacks.truth.leakage.evaluate``
only, and only after the attack has returned.

With decoys (``edge.decoy``) the eavesdropper sees pseudonyms only. The scoring side holds the
devices' keys (the demo's ``OUT/keys``) and maps each pseudonym to its owner and slot: a real
slot is scored against its owner's batch, a decoy against the same batch (what an attacker that
takes it for real would claim), and per attack the run gets ``DecoyLeak``: the fraction of its
reconstructions that are real and, per image of the attacked devices' real batches, the best
PSNR among all its reconstructions.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from attacks.base import Attack, AttackMetadata, NotApplicable, Reconstruction
from attacks.intercept import CaptureStore, Intercepted
from attacks.registry import config_class, get_attack
from attacks.text import TextReconstruction
from attacks.truth.leakage import LeakageReport, evaluate, matched_images, matched_labels
from attacks.truth.metrics import mean_image_psnr, psnr_matrix
from attacks.truth.report import save_grid, save_reconstructions
from attacks.truth.text import TextLeakage, text_table
from attacks.truth.text import score as score_text
from devices.datasets import load_dataset
from devices.fleet import read_truth
from edge import decoy
from edge.manifest import ModelArtifact
from edge.text import BOS, SPECIALS, load_vocab

log = logging.getLogger(__name__)
TEXT_WIDTH = 56  # characters per side of the typed | recovered table (fits 120 columns)

LEAKAGE_SCHEMA = """
CREATE TABLE IF NOT EXISTS leakage (
    run TEXT, round INTEGER, device TEXT, attack TEXT, capture_id INTEGER, kind TEXT,
    examples INTEGER, psnr_mean REAL, ssim_mean REAL, baseline_psnr REAL, label_accuracy REAL,
    label_count_accuracy REAL, recovered_fraction REAL, exact_fraction REAL, seconds REAL,
    budget_hit INTEGER, grid TEXT, owner TEXT, real INTEGER, word_precision REAL,
    word_recall REAL, rouge1 REAL, rouge2 REAL, text TEXT
);
CREATE TABLE IF NOT EXISTS decoy_leakage (
    run TEXT, attack TEXT, updates INTEGER, real_updates INTEGER, real_fraction REAL,
    targets INTEGER, best_psnr_real REAL, baseline_psnr REAL
);
"""


# Columns added to ``leakage`` after its first release (older capture stores get them on write).
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
    owner: str | None = None  # decoys: the device behind the pseudonym (scoring side only)
    real: bool | None = None  # decoys: whether the update was the real one; None: no decoys

    # The text attack (``words``): word-set scores, ROUGE F1 of the examples (exact_fraction:
    # examples recovered with window and next word), and the typed-vs-recovered table (.txt).
    word_precision: float | None = None
    word_recall: float | None = None
    rouge1: float | None = None
    rouge2: float | None = None
    text: str = ""


@dataclass(frozen=True)
class Slot:
    """Who published under a pseudonym (decoys), known to the scoring side only."""

    owner: str
    real: bool


@dataclass(frozen=True)
class DecoyLeak:
    """One attack over a decoy run: the fraction of its reconstructions that are real, and per
    image of the attacked devices' real batches the best PSNR among all its reconstructions."""

    run: str
    attack: str
    updates: int  # intercepted updates attacked
    real_updates: int  # ... of which were real
    real_fraction: float
    targets: int  # real images of the attacked devices
    best_psnr_real: float | None  # mean over targets
    baseline_psnr: float | None  # the mean training image against the same targets


def decoy_slots(
    keys: Mapping[str, bytes], run: str, rounds: Iterable[int], decoys: int
) -> dict[tuple[int, str], Slot]:
    """(round, pseudonym) -> its owner and slot kind, recomputed from every device's key."""
    out: dict[tuple[int, str], Slot] = {}
    for r in rounds:
        for device, key in keys.items():
            real = decoy.real_slot(key, run, r, decoys)
            for i in range(decoys + 1):
                out[(r, decoy.pseudonym(key, run, r, i))] = Slot(device, i == real)
    return out


@dataclass(frozen=True)
class GroundTruth:
    """The fleet's records of which training examples each update used, and the data itself;
    with decoys, who is behind each pseudonym."""

    records: dict[tuple[str, int, str], list[int]]
    x: np.ndarray
    y: np.ndarray
    slots: dict[tuple[int, str], Slot] = field(default_factory=dict)

    def slot(self, item: Intercepted) -> Slot | None:
        """The owner and kind of a pseudonymous update (None: not a decoy run's pseudonym)."""
        return self.slots.get((item.round, item.device))

    def batch(self, item: Intercepted) -> tuple[np.ndarray, np.ndarray] | None:
        """The images and labels ``item`` was computed on, for a decoy its owner's real batch
        (None if the fleet has no record, or the update used no example: a DP-SGD Poisson
        sample can be empty, and then there is nothing to leak or score)."""
        slot = self.slot(item)
        device = slot.owner if slot is not None else item.device
        used = self.records.get((item.run, item.round, device))
        if not used:
            return None
        # FedAvg walks its examples once per epoch: the batch is the first epoch's examples.
        idx = np.asarray(used[: item.update.num_examples], dtype=np.int64)
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


def fleet_truth(
    truth_dir: str | Path,
    dataset: str,
    *,
    keys_dir: str | Path | None = None,
    decoys: int = 0,
) -> GroundTruth:
    """Ground truth from the fleet's truth folder and the dataset it trained on; with ``decoys``,
    the pseudonyms of every recorded run and round from the key files ``keys_dir/<device>.key``."""
    data = load_dataset(dataset)
    found = read_truth(truth_dir)
    records = {(r["run"], r["round"], r["device"]): r["examples"] for r in found}
    slots: dict[tuple[int, str], Slot] = {}
    if decoys and keys_dir is not None:
        keys = {p.stem: decoy.load_key(p) for p in sorted(Path(keys_dir).glob("*.key"))}
        for run in sorted({r["run"] for r in found}):
            rounds = sorted({r["round"] for r in found if r["run"] == run})
            slots.update(decoy_slots(keys, run, rounds, decoys))
    return GroundTruth(records, data.x_train, data.y_train, slots)


def device_seconds(truth_dir: str | Path, run: str) -> list[float]:
    """Seconds each device spent on each task of ``run`` (protections, decoys and encoding
    included), as the fleet recorded them."""
    return [float(r["seconds"]) for r in read_truth(truth_dir) if r["run"] == run]


def decoy_leak(
    run: str,
    attack: str,
    found: Sequence[tuple[Slot, np.ndarray]],
    targets: np.ndarray,
    mean_image: np.ndarray,
) -> DecoyLeak:
    """``DecoyLeak`` of one attack from its (slot, reconstructed images) and the real images of
    the attacked devices."""
    images = [imgs for _, imgs in found]
    counts = [len(imgs) for imgs in images]
    real = sum(c for (slot, _), c in zip(found, counts, strict=True) if slot.real)
    best = None
    if len(targets) and sum(counts):
        best = float(psnr_matrix(np.concatenate(images), targets).max(axis=0).mean())
    return DecoyLeak(
        run=run, attack=attack, updates=len(found),
        real_updates=sum(slot.real for slot, _ in found),
        real_fraction=real / sum(counts) if sum(counts) else 0.0, targets=len(targets),
        best_psnr_real=best,
        baseline_psnr=mean_image_psnr(targets, mean_image) if len(targets) else None,
    )  # fmt: skip


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
    iterations: int = 0,
) -> list[LeakRow]:
    """Run every named attack on up to ``max_updates`` intercepted updates of rounds
    ``from_round`` on; score, plot, store. ``iterations`` > 0 sets ``max_iterations`` of the
    attacks that have one."""
    from rich.progress import Progress

    out.mkdir(parents=True, exist_ok=True)
    paired = (i for i in capture.paired(artifact.manifest, run=run) if i.round >= from_round)
    items = list(itertools.islice(paired, max_updates))
    meta = AttackMetadata(artifact.manifest, budget_s=budget_s)
    rows: list[LeakRow] = []
    # decoys: per attack, (slot, images) of each reconstruction; the attacked devices' batches
    found: dict[tuple[str, str], list[tuple[Slot, np.ndarray]]] = {}
    targets: dict[tuple[str, int, str], np.ndarray] = {}
    with Progress(disable=not progress) as bar:
        job = bar.add_task("attacking intercepted updates", total=len(items) * len(attacks))
        for item in items:
            for name in attacks:
                try:
                    rec = _attack(name, iterations).reconstruct(
                        item.update, item.global_model, meta
                    )
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
                slot = truth.slot(item) if truth is not None else None
                if slot is not None and batch is not None and rec.images is not None:
                    found.setdefault((item.run, name), []).append((slot, rec.images))
                    targets[(item.run, item.round, slot.owner)] = batch[0]
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
                rows.append(_row(item, name, rec, report, grid, slot))
                bar.advance(job)
    if db is not None:
        record(db, rows)
        if truth is not None and found:
            leaks = [
                decoy_leak(
                    run_, name, found[(run_, name)], _images(targets, run_), truth.mean_image
                )
                for run_, name in sorted(found)
            ]
            record_decoy_leaks(db, leaks)
    return rows


def _attack(name: str, iterations: int) -> Attack:
    """Attack ``name``, with ``max_iterations=iterations`` when > 0 and it has that setting."""
    fields = {f.name for f in dataclasses.fields(config_class(name))}
    if iterations > 0 and "max_iterations" in fields:
        return get_attack(name, max_iterations=iterations)
    return get_attack(name)


def _images(batches: Mapping[tuple[str, int, str], np.ndarray], run: str) -> np.ndarray:
    return np.concatenate([batches[k] for k in sorted(batches) if k[0] == run])


def record_decoy_leaks(db: sqlite3.Connection, leaks: Sequence[DecoyLeak]) -> None:
    """Write ``leaks`` into the ``decoy_leakage`` table (replacing the same run and attack)."""
    db.executescript(LEAKAGE_SCHEMA)
    cols = list(DecoyLeak.__dataclass_fields__)
    db.executemany(
        "DELETE FROM decoy_leakage WHERE run = ? AND attack = ?", [(x.run, x.attack) for x in leaks]
    )
    db.executemany(
        f"INSERT INTO decoy_leakage ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
        [tuple(asdict(x)[c] for c in cols) for x in leaks],
    )
    db.commit()


def decoy_leaks(db: sqlite3.Connection, run: str) -> list[dict[str, object]]:
    """The ``decoy_leakage`` rows of ``run`` (none without decoys)."""
    db.executescript(LEAKAGE_SCHEMA)
    cur = db.execute("SELECT * FROM decoy_leakage WHERE run = ? ORDER BY attack", (run,))
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def _row(
    item: Intercepted,
    name: str,
    rec: Reconstruction,
    r: LeakageReport | None,
    grid: str,
    slot: Slot | None = None,
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
        owner=None if slot is None else slot.owner, real=None if slot is None else slot.real,
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
    for c in (c for c in cols if c not in have):  # a store written before decoy or text columns
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
