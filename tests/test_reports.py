"""What people look at: the rounds plot, the reconstruction grids, the leakage table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.image import imread

from attacks.truth.report import save_grid, save_reconstructions
from edgeleak.report import cumulative_mb, leak_table, plot_rounds, software_versions


def _round(r: int, acc: float, up: int, down: int) -> dict[str, float]:
    return {"round": r, "accuracy": acc, "bytes_up": up, "bytes_down": down}


def test_cumulative_mb_adds_both_directions() -> None:
    rounds = [_round(1, 0.5, 1_000_000, 500_000), _round(2, 0.6, 250_000, 250_000)]
    assert cumulative_mb(rounds) == [1.5, 2.0]


def test_plot_rounds_handles_one_round(tmp_path: Path) -> None:
    plot_rounds([_round(1, 0.1, 109_284, 109_424)], tmp_path / "r.png", title="one round")
    h, w = imread(tmp_path / "r.png").shape[:2]
    assert (w, h) == (1210, 484)  # 11 x 4.4 inches at 110 dpi


def test_grid_of_one_image_is_large_enough(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    truth = rng.random((1, 1, 28, 28), dtype=np.float32)
    out = save_grid(
        tmp_path / "g.png", truth, [truth[0]], np.array([21.5]), title="inverting_gradients",
        true_labels=[3], recovered_labels=[3],
    )  # fmt: skip
    h, w = imread(out).shape[:2]
    assert w >= 400 and h >= 500  # two image rows of about 1.9 inches at 100 dpi


def test_grid_bands_and_reconstructions_alone(tmp_path: Path) -> None:
    imgs = np.zeros((10, 1, 28, 28), np.float32)
    out = save_grid(tmp_path / "g.png", imgs, [None] * 10, np.full(10, np.nan), columns=8)
    h, w = imread(out).shape[:2]
    assert w == round(1.9 * 8 * 100)  # 8 pairs per band
    assert h == round((2.25 * 4 + 0.6) * 100)  # 2 bands of originals over reconstructions
    alone = save_reconstructions(tmp_path / "r.png", imgs[:3], [1, 2, 3], title="no truth")
    assert imread(alone).shape[:2] == (round((2.25 + 0.6) * 100), round(5.7 * 100))


def test_leak_table_rows() -> None:
    from rich.console import Console

    rows = [
        {"round": 1, "device": "d0001", "attack": "inverting_gradients", "examples": 1,
         "psnr_mean": 10.24, "ssim_mean": 0.3401, "label_accuracy": 1.0, "seconds": 3.14},
        {"round": 1, "device": "d0001", "attack": "idlg", "examples": 1, "psnr_mean": None,
         "ssim_mean": None, "label_accuracy": None, "seconds": 0.01},
    ]  # fmt: skip
    con = Console(width=120, record=True)
    con.print(leak_table(rows))
    text = con.export_text()
    lines = [line for line in text.splitlines() if "d0001" in line]
    assert [line.split() for line in lines] == [
        ["1", "│", "d0001", "│", "inverting_gradients", "│", "1", "│", "10.2", "│", "0.340", "│",
         "100%", "│", "3.1"],
        ["1", "│", "d0001", "│", "idlg", "│", "1", "│", "—", "│", "—", "│", "—", "│", "0.0"],
    ]  # fmt: skip


def test_versions_name_what_ran() -> None:
    v = software_versions()
    assert set(v) == {"edgeleak", "onnxruntime", "torch", "mosquitto", "python", "platform"}
    import onnxruntime

    assert v["onnxruntime"] == onnxruntime.__version__
