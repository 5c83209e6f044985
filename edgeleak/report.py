"""Reports people look at: the per-round plot, next to summary.json and run.db."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def plot_rounds(rounds: Sequence[dict[str, Any]], path: Path, *, title: str = "") -> None:
    """Two panels: test accuracy per round; MB up and down per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    r = [x["round"] for x in rounds]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(r, [100 * x["accuracy"] for x in rounds], marker="o")
    ax1.set(xlabel="round", ylabel="test accuracy (%)", title="global model")
    ax1.grid(alpha=0.3)
    w = 0.4
    ax2.bar([i - w / 2 for i in r], [x["bytes_up"] / 1e6 for x in rounds], w, label="up (updates)")
    ax2.bar(
        [i + w / 2 for i in r], [x["bytes_down"] / 1e6 for x in rounds], w, label="down (tasks)"
    )
    ax2.set(xlabel="round", ylabel="MQTT bytes (MB)", title="traffic per round")
    ax2.legend(loc="lower right")
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.grid(alpha=0.3, axis="y")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
