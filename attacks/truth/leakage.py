"""The leakage evaluator: the only place where ground truth meets a reconstruction."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from attacks.base import Reconstruction
from attacks.truth import metrics


@dataclass(frozen=True)
class LeakageReport:
    """How much one reconstruction revealed about one batch.

    ``psnr`` and ``ssim`` are per true image, for its Hungarian-matched reconstruction (PSNR
    capped at ``metrics.PSNR_CAP``; ``-inf`` / ``nan`` where no reconstruction was matched);
    ``psnr_mean`` averages the matched ones. ``truth_of`` gives each reconstruction's true image
    (-1: unmatched). Label fields are None where the attack recovered no labels.
    """

    attack: str
    num_truth: int
    psnr: np.ndarray = field(repr=False)
    ssim: np.ndarray = field(repr=False)
    truth_of: np.ndarray = field(repr=False)
    psnr_mean: float | None
    ssim_mean: float | None
    recovered_fraction: float | None
    exact_fraction: float | None
    baseline_psnr: float | None
    label_accuracy: float | None
    label_count_accuracy: float | None
    seconds: float
    budget_hit: bool = False  # the attack's time cap stopped it early (``Reconstruction``)


def evaluate(
    reconstruction: Reconstruction,
    truth_images: np.ndarray,
    truth_labels: np.ndarray,
    *,
    mean_image: np.ndarray | None = None,
) -> LeakageReport:
    """Score ``reconstruction`` against the batch it came from.

    Images are matched on PSNR; per-image labels are scored on that matching when the attack
    returned images, else (label-only attacks) as a multiset. ``mean_image`` is the baseline
    guess (default: the batch mean).
    """
    n = len(truth_images)
    rec = reconstruction
    per_psnr = np.full(n, -np.inf)
    per_ssim = np.full(n, np.nan)
    truth_of = np.full(rec.count, -1, dtype=np.int64)
    psnr_mean = ssim_mean = recovered = exact = baseline = None
    label_acc: float | None = None
    if rec.images is not None:
        rows, cols = metrics.match(rec.images, truth_images)
        truth_of[rows] = cols
        per_psnr = metrics.matched_psnr(rec.images, truth_images)
        for r, c in zip(rows, cols, strict=True):
            per_ssim[c] = metrics.ssim(rec.images[r], truth_images[c])
        matched = per_psnr[cols]
        psnr_mean = float(matched.mean()) if len(cols) else None
        ssim_mean = float(np.nanmean(per_ssim)) if len(cols) else None
        recovered = metrics.recovered_fraction(per_psnr)
        exact = metrics.exact_fraction(per_psnr)
        baseline = metrics.mean_image_psnr(truth_images, mean_image)
        if rec.labels is not None and len(cols):
            hits = rec.labels[rows] == truth_labels[cols]
            label_acc = float(hits.sum() / n)
    count_acc = None
    if rec.labels is not None:
        count_acc = metrics.label_count_accuracy(rec.labels, truth_labels)
        if rec.images is None and rec.count == n:
            label_acc = count_acc
    return LeakageReport(
        attack=rec.attack,
        num_truth=n,
        psnr=per_psnr,
        ssim=per_ssim,
        truth_of=truth_of,
        psnr_mean=psnr_mean,
        ssim_mean=ssim_mean,
        recovered_fraction=recovered,
        exact_fraction=exact,
        baseline_psnr=baseline,
        label_accuracy=label_acc,
        label_count_accuracy=count_acc,
        seconds=rec.seconds,
        budget_hit=rec.budget_hit,
    )


def matched_images(
    reconstruction: Reconstruction, report: LeakageReport
) -> list[np.ndarray | None]:
    """Per true image, its matched reconstructed image (None where none was matched)."""
    out: list[np.ndarray | None] = [None] * report.num_truth
    if reconstruction.images is not None:
        for r, t in enumerate(report.truth_of):
            if t >= 0:
                out[int(t)] = reconstruction.images[r]
    return out


def matched_labels(reconstruction: Reconstruction, report: LeakageReport) -> list[int | None]:
    """Per true image, the label recovered with its matched reconstruction (None where none)."""
    out: list[int | None] = [None] * report.num_truth
    if reconstruction.images is not None and reconstruction.labels is not None:
        for r, t in enumerate(report.truth_of):
            if t >= 0 and r < len(reconstruction.labels):
                out[int(t)] = int(reconstruction.labels[r])
    return out
