"""A sweep's pictures: Pareto fronts of leakage against bytes and accuracy, accuracy and bytes per
setting, ε over the rounds. Each setting is one marker: the mean over its seeds (bars: ± one
standard deviation when there are several seeds)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeleak.sweep import LEAK_METRICS


def pareto_front(
    xs: Sequence[float], ys: Sequence[float], *, minimize_x: bool, minimize_y: bool
) -> list[bool]:
    """Whether each point (x, y) is non-dominated: no other point is at least as good on both
    axes and strictly better on one."""
    sx = 1.0 if minimize_x else -1.0
    sy = 1.0 if minimize_y else -1.0
    pts = [(sx * x, sy * y) for x, y in zip(xs, ys, strict=True)]
    return [
        not any(
            (bx <= ax and by <= ay) and (bx < ax or by < ay) for j, (bx, by) in enumerate(pts)
            if j != i
        )
        for i, (ax, ay) in enumerate(pts)
    ]  # fmt: skip


@dataclass(frozen=True)
class Setting:
    """One setting of a sweep, summarised over its finished seeds."""

    label: str
    seeds: int
    values: dict[str, tuple[float, float]]  # column → (mean, std over seeds)


def by_setting(points: Any, columns: Sequence[str]) -> list[Setting]:
    """Finished points grouped by label (the setting), in sweep order, with mean and std."""
    done = points[points["status"] == "done"]
    out = []
    for lab, g in done.groupby("label", sort=False):
        vals = {}
        for c in columns:
            col = g[c].dropna().astype(float)
            if len(col):
                vals[c] = (float(col.mean()), float(col.std(ddof=0)) if len(col) > 1 else 0.0)
        out.append(Setting(str(lab), len(g), vals))
    return out


def _colors(n: int) -> list[Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def plot_pareto(points: Any, path: Path, *, title: str = "") -> list[str]:
    """Leakage metrics (rows) against bytes per round and final accuracy (columns); the
    non-dominated settings ringed and joined. Returns the metrics plotted (none: no figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in LEAK_METRICS if points.get(m) is not None and points[m].notna().any()]
    settings = by_setting(points, ["bytes_per_round", "final_accuracy", *metrics])
    if not metrics or not settings:
        return []
    colors = _colors(len(settings))
    fig, axes = plt.subplots(len(metrics), 2, figsize=(11, 3.8 * len(metrics)), squeeze=False)
    axis_x = (
        ("bytes_per_round", "MQTT bytes per round, up + down (MB)", 1e-6, True),
        ("final_accuracy", "final test accuracy (%)", 100.0, False),
    )
    for row, metric in enumerate(metrics):
        scale_y = 1.0 if metric == "psnr_mean" else 100.0
        unit = "dB" if metric == "psnr_mean" else "%"
        for col, (xkey, xlabel, scale_x, min_x) in enumerate(axis_x):
            ax = axes[row][col]
            have = [s for s in settings if xkey in s.values and metric in s.values]
            xs = [s.values[xkey][0] * scale_x for s in have]
            ys = [s.values[metric][0] * scale_y for s in have]
            front = pareto_front(xs, ys, minimize_x=min_x, minimize_y=True)
            for s, x, y, c in zip(have, xs, ys, colors, strict=False):
                ax.errorbar(
                    x, y, xerr=s.values[xkey][1] * scale_x, yerr=s.values[metric][1] * scale_y,
                    fmt="o", color=c, label=s.label, capsize=3,
                )  # fmt: skip
            on = sorted((x, y) for x, y, f in zip(xs, ys, front, strict=True) if f)
            if on:
                ax.plot(*zip(*on, strict=True), color="black", lw=1, ls="--", zorder=0)
                ax.scatter(*zip(*on, strict=True), s=160, facecolors="none", edgecolors="black",
                           label="non-dominated", zorder=3)  # fmt: skip
            ax.set(xlabel=xlabel, ylabel=f"{LEAK_METRICS[metric].split(' (')[0]} ({unit})")
            ax.ticklabel_format(axis="both", useOffset=False, style="plain")
            if min_x:
                ax.set_xlim(left=0, right=max(xs, default=1.0) * 1.1 or 1.0)
            ax.grid(alpha=0.3)
            better = "left" if min_x else "right"
            ax.set_title(f"lower and further {better} is better", fontsize=9)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), frameon=False,
               fontsize=8)  # fmt: skip
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.04 + 0.025 * ((len(labels) + 2) // 3), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return metrics


def plot_points(points: Any, path: Path, *, title: str = "") -> bool:
    """Final accuracy and bytes per round, one bar per setting. False when nothing finished."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = by_setting(points, ["final_accuracy", "bytes_per_round"])
    if not settings:
        return False
    names = [s.label for s in settings]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 1.2 + 0.45 * len(names)))
    for ax, key, scale, xlabel in (
        (a1, "final_accuracy", 100.0, "final test accuracy (%)"),
        (a2, "bytes_per_round", 1e-6, "MQTT bytes per round, up + down (MB)"),
    ):
        means = [s.values.get(key, (float("nan"), 0.0))[0] * scale for s in settings]
        stds = [s.values.get(key, (0.0, 0.0))[1] * scale for s in settings]
        ax.barh(range(len(names)), means, xerr=stds, color=_colors(len(names)), capsize=3)
        ax.set_yticks(range(len(names)), names if ax is a1 else [""] * len(names), fontsize=8)
        ax.invert_yaxis()
        ax.set(xlabel=xlabel)
        ax.grid(alpha=0.3, axis="x")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_epsilon(points: Any, rounds: Any, path: Path, *, title: str = "") -> bool:
    """ε (largest per device) after each round, one line per DP setting. False without DP."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    dp = rounds[rounds["epsilon"].notna()]
    if dp.empty:
        return False
    labels = dict(zip(points["point"], points["label"], strict=True))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for lab, g in dp.assign(label=dp["point"].map(labels)).groupby("label", sort=False):
        mean = g.groupby("round")["epsilon"].mean()
        ax.plot(mean.index, mean.values, marker="o", label=str(lab))
    ax.set(xlabel="round", ylabel="ε per device (largest; δ as configured)", yscale="log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
