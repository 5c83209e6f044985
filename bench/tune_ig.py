"""Choose inverting-gradients settings on the tuning images only (never the held-out ones).

For each modality (natural photos on LeNetZhu, digits on the ReLU LeNet, batches of 4 digits on
LeNetZhu) runs every setting of a small grid, labels given, on the same FedSGD gradients of the
*tuning* split (``bench/attacks.py``: ``SPLIT_PHOTOS``, ``SPLIT_HALF``) and reports the mean PSNR
per setting, the best one, and "plain IG" (Geiping et al.: global cosine, TV 0.1 throughout).

    python bench/tune_ig.py --json tune.json [--images 2] [--iterations 1000] [--modalities ...]

JSON: ``{modality: {"settings": [{"config": {...}, "psnr_mean": dB, "psnr": [...],
"seconds_per_image": s}], "best": {...}, "plain": {...}}}``.
"""
# ruff: noqa: E402

from __future__ import annotations

import sys
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import argparse
import importlib.util
import json
import time
from functools import cache
from types import ModuleType
from typing import Any

import numpy as np
import torch

from attacks import get_attack
from attacks.base import AttackMetadata
from attacks.model import FunctionalModel, InputMap, manifest_for
from attacks.truth.leakage import evaluate
from attacks.truth.victim import simulate_update
from export import zoo


@cache
def bench_module() -> ModuleType:
    """``bench/attacks.py`` (its data splits), loaded by path."""
    path = Path(__file__).resolve().parent / "attacks.py"
    spec = importlib.util.spec_from_file_location("bench_attacks", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_attacks"] = module
    spec.loader.exec_module(module)
    return module


PLAIN: dict[str, Any] = bench_module().PLAIN_IG
"""Geiping et al.'s recipe as inversefed ships it (signed Adam, lr 0.1, step decay, TV 1e-1)."""

MODALITIES: dict[str, tuple[str, tuple[int, ...], int, str]] = {
    # name: (model, input shape, batch, tuning data)
    "photos": ("lenet_zhu", (3, 32, 32), 1, "photos"),
    "relu_digits": ("lenet", (1, 28, 28), 1, "mnist-digits"),
    "b4_digits": ("lenet_zhu", (1, 28, 28), 4, "mnist-digits"),
    "b8_digits": ("lenet_zhu", (1, 28, 28), 8, "mnist-digits"),
}

NO_FEATURE: dict[str, Any] = {"tv_decay": False, "feature_weight": 0.0}
SETTINGS: tuple[dict[str, Any], ...] = (
    PLAIN,
    {"cosine": "global", "tv_weight": 1e-2, **NO_FEATURE},
    # surrogate second derivatives through ReLUs and max-pools (IGConfig.surrogate)
    {"cosine": "global", "tv_weight": 1e-2, **NO_FEATURE, "surrogate": 3.0},
    {"cosine": "per_layer", "tv_weight": 1e-2, **NO_FEATURE},
    {"cosine": "global", "tv_weight": 1e-4, **NO_FEATURE},
    {"cosine": "per_layer", "tv_weight": 1e-1, **NO_FEATURE},
    {"cosine": "per_layer", "tv_weight": 1e-4, **NO_FEATURE},
    {"cosine": "per_layer", "tv_weight": 1e-4, "tv_decay": True, "feature_weight": 0.0},
    # the feature term (IGConfig.feature_weight), over the defaults otherwise
    {"feature_weight": 1e2},
    {"feature_weight": 1e3},
    {"feature_weight": 3e3},  # the default
    {"feature_weight": 1e4},
)
"""The grid, most informative first (a run cut short still compares plain IG and TV 1e-2)."""


def run_setting(
    model: str,
    shape: tuple[int, ...],
    batch: int,
    x: np.ndarray,
    y: np.ndarray,
    config: dict[str, Any],
    iterations: int,
) -> dict[str, Any]:
    """Mean PSNR of IG with ``config`` (labels given; no plain restart unless ``config`` asks
    for one: the recipe alone) over the batches of ``x``."""
    torch.manual_seed(0)
    module = zoo.build(model, shape)
    meta = AttackMetadata(manifest_for(model, module, shape, 10), budget_s=3600.0, device="cpu")
    client = FunctionalModel(module, InputMap.from_metadata(meta, torch.device("cpu")))
    weights = {k: v.detach().numpy().copy() for k, v in module.named_parameters()}
    psnr: list[float] = []
    seconds = 0.0
    for s in range(0, len(x) - batch + 1, batch):
        xb, yb = x[s : s + batch], y[s : s + batch]
        attack = get_attack(
            "inverting_gradients",
            max_iterations=iterations,
            labels="given",
            given_labels=tuple(int(v) for v in yb),
            **{"plain_restart": False, **config},
        )
        rec = attack.reconstruct(simulate_update(client, weights, xb, yb), weights, meta)
        report = evaluate(rec, xb, yb)
        psnr += [float(p) for p in report.psnr]
        seconds += rec.seconds
    return {
        "config": config,
        "psnr_mean": float(np.mean(psnr)),
        "psnr": psnr,
        "seconds_per_image": seconds / len(psnr),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--json", required=True)
    ap.add_argument(
        "--images",
        type=int,
        default=2,
        help="tuning images per modality (B=4: batches of 4 of them)",
    )
    ap.add_argument("--iterations", type=int, default=1000)
    ap.add_argument("--modalities", nargs="+", choices=list(MODALITIES), default=list(MODALITIES))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    bench = bench_module()
    out: dict[str, Any] = {}
    for name in args.modalities:
        model, shape, batch, data = MODALITIES[name]
        n = max(batch, args.images // batch * batch)
        if data == "photos":
            x, y = bench.split_photos("tune", n, args.seed)
        else:
            x, y = bench.split_test(data, "tune", n, args.seed)
        rows: list[dict[str, Any]] = []
        for config in SETTINGS:
            t0 = time.perf_counter()
            rows.append(run_setting(model, shape, batch, x, y, config, args.iterations))
            print(name, config, f"{rows[-1]['psnr_mean']:.1f} dB",
                  f"{time.perf_counter() - t0:.0f} s", flush=True)  # fmt: skip
            best = max(rows, key=lambda r: r["psnr_mean"])
            out[name] = {"settings": rows, "best": best, "plain": rows[0]}
            Path(args.json).write_text(json.dumps(out, indent=2))
        print(name, "best", best["config"], f"{best['psnr_mean']:.1f} dB; plain "
              f"{rows[0]['psnr_mean']:.1f} dB", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
