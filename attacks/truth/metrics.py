"""Leakage metrics as pure functions over images in [0, 1] ([C, H, W] each) and labels."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from skimage.metrics import structural_similarity

PSNR_CAP = 200.0  # dB; what an exact (identical) reconstruction counts as in means and matching
RECOVERED_DB = 30.0
EXACT_DB = 60.0


def psnr(a: np.ndarray, b: np.ndarray, *, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB over all elements; ``inf`` for identical arrays."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(data_range**2 / mse))


def ssim(a: np.ndarray, b: np.ndarray, *, data_range: float = 1.0) -> float:
    """Structural similarity of two [C, H, W] images: Gaussian window (sigma 1.5, 11 pixels,
    fewer for images smaller than that), averaged over channels."""
    side = min(a.shape[-2:])
    return float(
        structural_similarity(
            np.asarray(a, np.float64),
            np.asarray(b, np.float64),
            data_range=data_range,
            channel_axis=0,
            gaussian_weights=True,
            sigma=1.5,
            win_size=min(11, side if side % 2 else side - 1),
            use_sample_covariance=False,
        )
    )


def psnr_matrix(recs: np.ndarray, truths: np.ndarray) -> np.ndarray:
    """PSNR of every reconstruction (rows) against every true image (columns), capped."""
    size = int(np.prod(truths.shape[1:]))
    r = recs.reshape(len(recs), size).astype(np.float64)
    t = truths.reshape(len(truths), size).astype(np.float64)
    mse = ((r[:, None, :] - t[None, :, :]) ** 2).mean(axis=2)
    with np.errstate(divide="ignore"):
        db = 10 * np.log10(1.0 / mse)
    return np.minimum(db, PSNR_CAP)


def match(recs: np.ndarray, truths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hungarian matching on PSNR: (reconstruction indices, truth indices) of the best pairing.

    With fewer reconstructions than truths (or more), only ``min`` of them are paired.
    """
    rows, cols = linear_sum_assignment(psnr_matrix(recs, truths), maximize=True)
    return rows.astype(np.int64), cols.astype(np.int64)


def matched_psnr(recs: np.ndarray, truths: np.ndarray) -> np.ndarray:
    """Per true image, the PSNR of its matched reconstruction (``-inf`` when none is matched)."""
    rows, cols = match(recs, truths)
    out = np.full(len(truths), -np.inf)
    out[cols] = psnr_matrix(recs, truths)[rows, cols]
    return out


def fraction_at_least(values: np.ndarray, threshold: float) -> float:
    """Share of ``values`` at or above ``threshold`` (e.g. per-truth PSNR vs 30 or 60 dB)."""
    return float(np.mean(np.asarray(values) >= threshold)) if len(values) else 0.0


def recovered_fraction(per_truth_psnr: np.ndarray) -> float:
    """Share of true images reconstructed at 30 dB or better."""
    return fraction_at_least(per_truth_psnr, RECOVERED_DB)


def exact_fraction(per_truth_psnr: np.ndarray) -> float:
    """Share of true images reconstructed at 60 dB or better (exact up to float noise)."""
    return fraction_at_least(per_truth_psnr, EXACT_DB)


def mean_image_psnr(truths: np.ndarray, mean_image: np.ndarray | None = None) -> float:
    """Baseline: mean PSNR of guessing ``mean_image`` (default: the truths' mean) for each."""
    guess = truths.mean(axis=0) if mean_image is None else mean_image
    return float(np.mean([min(psnr(guess, t), PSNR_CAP) for t in truths]))


def label_accuracy(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Share of positions where the predicted label equals the true one."""
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} predicted labels for {len(truth)} true ones")
    return float(np.mean(np.asarray(predicted) == np.asarray(truth)))


def label_count_accuracy(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Order-free label accuracy: ``sum_c min(n̂_c, n_c) / B`` for the multisets of labels."""
    k = int(max(np.max(predicted, initial=0), np.max(truth, initial=0))) + 1
    hits = np.minimum(np.bincount(predicted, minlength=k), np.bincount(truth, minlength=k))
    return float(hits.sum() / len(truth))
