"""Pictures of leakage: originals above their reconstructions, each with its PSNR."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes


def _show(ax: Axes, image: np.ndarray | None) -> None:
    """Draw one [C, H, W] image in [0, 1] (gray for one channel), or an empty cell."""
    ax.set_xticks([])
    ax.set_yticks([])
    if image is None:
        ax.set_facecolor("#dddddd")
        return
    pixels = np.clip(image, 0, 1)
    if pixels.shape[0] == 1:
        ax.imshow(pixels[0], cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(pixels.transpose(1, 2, 0))


def save_grid(
    path: str | Path,
    truth_images: np.ndarray,
    matched: Sequence[np.ndarray | None],
    psnr: np.ndarray,
    *,
    title: str = "",
    columns: int = 10,
) -> Path:
    """Write a PNG: originals on top, their matched reconstructions (or a gray cell) below,
    each labelled with its PSNR; ``columns`` pairs per band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(truth_images)
    cols = max(1, min(columns, n))
    bands = math.ceil(n / cols)
    fig, axes = plt.subplots(2 * bands, cols, figsize=(1.3 * cols, 2.9 * bands), squeeze=False)
    for i in range(bands * cols):
        top, bottom = axes[2 * (i // cols), i % cols], axes[2 * (i // cols) + 1, i % cols]
        if i >= n:
            top.axis("off")
            bottom.axis("off")
            continue
        _show(top, truth_images[i])
        _show(bottom, matched[i])
        value = psnr[i]
        bottom.set_xlabel("—" if not np.isfinite(value) else f"{value:.1f} dB", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
