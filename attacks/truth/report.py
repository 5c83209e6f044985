"""Pictures of leakage: originals above their reconstructions, each with its PSNR and labels."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes


def _show(ax: Axes, image: np.ndarray | None) -> None:
    """Draw one [C, H, W] image in [0, 1] (gray for one channel), or an empty cell."""
    ax.set_xticks([])
    ax.set_yticks([])
    if image is None:
        ax.set_facecolor("#dddddd")
        ax.set_box_aspect(1)
        return
    pixels = np.clip(image, 0, 1)
    if pixels.shape[0] == 1:
        ax.imshow(pixels[0], cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(pixels.transpose(1, 2, 0))


def _figure(rows: int, cols: int, title: str) -> tuple[Any, np.ndarray]:
    """A figure of ``rows`` x ``cols`` image cells, each about 1.9 inches, title wrapped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = max(4.2, 1.9 * cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width, 2.25 * rows + 0.6), squeeze=False)
    if title:
        fig.suptitle(textwrap.fill(title, width=max(30, int(width * 9))), fontsize=11)
    return fig, axes


def _save(fig: Any, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def save_grid(
    path: str | Path,
    truth_images: np.ndarray,
    matched: Sequence[np.ndarray | None],
    psnr: np.ndarray,
    *,
    title: str = "",
    columns: int = 8,
    true_labels: Sequence[int] | None = None,
    recovered_labels: Sequence[int | None] | None = None,
) -> Path:
    """Write a PNG: a row of originals over the row of their matched reconstructions (a gray
    cell where none matched), ``columns`` pairs per band; each original is titled with its true
    label, each reconstruction with its PSNR and recovered label."""
    n = len(truth_images)
    cols = max(1, min(columns, n))
    bands = math.ceil(n / cols)
    fig, axes = _figure(2 * bands, cols, title)
    for i in range(bands * cols):
        top, bottom = axes[2 * (i // cols), i % cols], axes[2 * (i // cols) + 1, i % cols]
        if i >= n:
            top.axis("off")
            bottom.axis("off")
            continue
        _show(top, truth_images[i])
        _show(bottom, matched[i])
        truth = f"true {true_labels[i]}" if true_labels is not None else f"#{i}"
        top.set_title(truth, fontsize=10)
        value = psnr[i]
        got = recovered_labels[i] if recovered_labels is not None else None
        score = "not matched" if not np.isfinite(value) else f"{value:.1f} dB"
        bottom.set_title(score if got is None else f"{score}, got {got}", fontsize=10)
        if i % cols == 0:
            top.set_ylabel("original", fontsize=10)
            bottom.set_ylabel("reconstruction", fontsize=10)
    return _save(fig, path)


def save_reconstructions(
    path: str | Path,
    images: np.ndarray,
    labels: Sequence[int] | None = None,
    *,
    title: str = "",
    columns: int = 8,
) -> Path:
    """Write a PNG of reconstructions alone (no truth to compare with), each with its label."""
    n = len(images)
    cols = max(1, min(columns, n))
    rows = math.ceil(n / cols)
    fig, axes = _figure(rows, cols, title)
    for i in range(rows * cols):
        ax = axes[i // cols, i % cols]
        if i >= n:
            ax.axis("off")
            continue
        _show(ax, images[i])
        ax.set_title(f"#{i}" + (f", label {labels[i]}" if labels is not None else ""), fontsize=10)
    return _save(fig, path)
