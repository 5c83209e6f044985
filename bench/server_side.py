"""Server-side protections measured over the real wire: aggregation before the wire and CKKS.

``measure_aggregation``: one FedSGD round of the sigmoid LeNet of DLG/IG (``lenet_zhu``,
Fashion-MNIST 1x28x28) in which groups of K = 1, 2, 4, 8, 16, 32 devices (one training image each,
B=1) answer through one edge aggregator per group; the real eavesdropper
(``attacks.intercept.Eavesdropper``) listens on the run's topics, so it captures what crosses the
aggregators' uplinks (the group topics ``<run>.<group>`` are not the run's). Inverting Gradients
(with its label recovery) runs on every captured aggregate; PSNR is that of the best
(Hungarian-matched) reconstruction per true image; "recovered" means >= 30 dB.

``measure_he``: CKKS (TenSEAL) on the zoo LeNet's update size: ciphertext bytes / dense f32 bytes,
device encryption seconds, coordinator addition seconds (n ciphertexts), and the decryption's max
relative error on the aggregate.

Both return the rows of ``bench/secure_aggregation.py``'s ``aggregation`` and ``he`` lists.
"""
# ruff: noqa: E402

from __future__ import annotations

import sys
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import contextlib
import dataclasses
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

KS = (1, 2, 4, 8, 16, 32)


def _aggregate_round(
    ks: Sequence[int], folder: Path, *, seed: int, say: Any
) -> tuple[Any, list[Any], dict[str, np.ndarray], Any]:
    """One FedSGD round with one aggregator per K; (artifact, intercepted aggregates, the
    groups' true image indices by aggregator id, the training set)."""
    from attacks.intercept import CaptureStore, Eavesdropper
    from coordinator.server import Coordinator, RoundPlan, new_run_id
    from coordinator.store import RunStore
    from devices.datasets import load_dataset
    from devices.fleet import DeviceSpec, Fleet, FleetSpec
    from edge.aggregator import EdgeAggregator, group_run, run_aggregator
    from edgeleak.broker import local_broker
    from export import export_model

    data = load_dataset("fashion-mnist")
    artifact = export_model("lenet_zhu", folder / "model", input_shape=(1, 28, 28), seed=seed)
    pick = np.random.default_rng(seed).choice(len(data.x_train), size=sum(ks), replace=False)
    run = new_run_id("agg")
    plan = RoundPlan(algorithm="fedsgd", lr=0.1, batch_size=1, deadline_s=300)
    truth: dict[str, np.ndarray] = {}
    aggs, fleets, at = [], [], 0
    for k in ks:
        g = f"k{k}"
        devs = tuple(
            DeviceSpec(f"{g}-d{i:02d}", pick[at + i : at + i + 1], seed=at + i) for i in range(k)
        )
        truth[f"agg-{g}"] = pick[at : at + k]
        at += k
        aggs.append(EdgeAggregator(f"agg-{g}", run, g, [d.device_id for d in devs], artifact))
        fleets.append((group_run(run, g), devs))
    capture = CaptureStore(folder / "capture")
    stop = threading.Event()
    with local_broker("mosquitto") as (broker, _), contextlib.ExitStack() as stack:
        coord = stack.enter_context(
            Coordinator(run, artifact, broker, RunStore(folder / "run.db"), plan, seed=seed)
        )
        stack.enter_context(Eavesdropper(broker, run, capture))
        threads = [
            threading.Thread(target=run_aggregator, args=(a, broker), kwargs={"stop": stop})
            for a in aggs
        ]
        for t in threads:
            t.start()
        stack.callback(lambda: [t.join(30) for t in threads])
        stack.callback(stop.set)
        for sub, devs in fleets:
            spec = FleetSpec(sub, broker.url, str(artifact.folder), "fashion-mnist", devs, 1)
            stack.enter_context(Fleet(spec))
        coord.wait_for_devices(len(ks), 300)
        res = coord.run_round(1)
        say(f"round 1: {res.accepted}/{res.selected} aggregates, {res.bytes_up} bytes up")
        coord.end()
    items = list(capture.paired(artifact.manifest, run=run))
    capture.close()
    return artifact, items, truth, data


def measure_aggregation(
    ks: Sequence[int] = KS,
    *,
    iterations: int = 2000,
    budget_s: float = 900.0,
    seed: int = 0,
    say: Any = print,
) -> list[dict[str, Any]]:
    """The ``aggregation`` rows: ``{k, ig_psnr_mean, recovered_fraction}`` per group size.
    IG runs ``iterations`` steps of its schedule (machine-independent; 2,000 recover one image
    of the untrained sigmoid LeNet at ~70 dB), ``budget_s`` is only a safety cap."""
    import torch

    from attacks import get_attack
    from attacks.base import AttackMetadata
    from attacks.truth.leakage import evaluate

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-agg-") as tmp:
        artifact, items, truth, data = _aggregate_round(ks, Path(tmp), seed=seed, say=say)
        meta = AttackMetadata(artifact.manifest, budget_s=budget_s)
        rows = []
        for item in sorted(items, key=lambda it: it.update.num_examples):
            idx = truth[item.device]
            # the attacker reads K from the aggregate's n: one batch of K images
            update = dataclasses.replace(item.update, batch_size=item.update.num_examples)
            t0 = time.perf_counter()
            ig = get_attack("inverting_gradients", max_iterations=iterations)
            rec = ig.reconstruct(update, item.global_model, meta)
            report = evaluate(
                rec, data.x_train[idx], data.y_train[idx], mean_image=data.x_train[idx].mean(0)
            )
            psnr = np.asarray(report.psnr, dtype=np.float64)
            row = {
                "k": int(len(idx)),
                "ig_psnr_mean": float(np.mean(psnr)),
                "recovered_fraction": float(np.mean(psnr >= 30.0)),
            }
            say(
                f"K={row['k']:2d}: IG {row['ig_psnr_mean']:.1f} dB, recovered "
                f"{row['recovered_fraction']:.2f}, labels {report.label_accuracy}, "
                f"{time.perf_counter() - t0:.0f} s"
            )
            rows.append(row)
    return rows


def measure_he(
    devices: Sequence[int] = (10, 100), *, examples: int = 16, seed: int = 0, say: Any = print
) -> list[dict[str, Any]]:
    """The ``he`` rows: ``{devices, ciphertext_ratio, encrypt_seconds, add_seconds,
    max_rel_error}``. Updates are real FedSGD gradients of the zoo LeNet (Fashion-MNIST, one
    batch of ``examples`` per device), encrypted as devices do (``n × gradient``); the error is
    ``max |decrypted - exact| / max |exact|`` over the sum, exact in float64."""
    from devices.datasets import load_dataset
    from edge import he
    from edge.backends import load_backend
    from export import export_model

    data = load_dataset("fashion-mnist")
    with tempfile.TemporaryDirectory(prefix="bench-he-") as tmp:
        artifact = export_model("lenet", Path(tmp) / "model", seed=seed)
        backend = load_backend("onnx", artifact)
        manifest = artifact.manifest
        w = artifact.initial_params()
        keys = he.new_keys()
        public = he.public_context(keys.public)
        rng = np.random.default_rng(seed)
        vectors, payloads, enc_s = [], [], []
        for _ in range(max(devices)):
            idx = rng.choice(len(data.x_train), size=examples, replace=False)
            g = backend.loss_and_grad(w, data.x_train[idx], data.y_train[idx]).grads
            v = he.flatten(g, manifest) * examples
            t0 = time.perf_counter()
            payloads.append(he.encrypt(public, v))
            enc_s.append(time.perf_counter() - t0)
            vectors.append(v)
        ct_bytes = int(payloads[0]["ckks"].nbytes + payloads[0]["ckks_sizes"].nbytes)
        rows = []
        for n in devices:
            t0 = time.perf_counter()
            total = he.add([he.load(public, p, manifest.num_parameters) for p in payloads[:n]])
            packed = he.pack(total)
            add_s = time.perf_counter() - t0
            got = he.decrypt(keys, packed, manifest.num_parameters)
            exact = np.sum(np.stack(vectors[:n]), axis=0)
            row = {
                "devices": n,
                "ciphertext_ratio": ct_bytes / (4 * manifest.num_parameters),
                "encrypt_seconds": float(np.mean(enc_s[:n])),
                "add_seconds": add_s,
                "max_rel_error": float(np.abs(got - exact).max() / np.abs(exact).max()),
            }
            say(f"HE {n} devices: {row}")
            rows.append(row)
    return rows
