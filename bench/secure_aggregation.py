"""Server-side protections over the real broker: secure aggregation (SecAgg / SecAgg+),
homomorphic encryption and hierarchical aggregation.

    python bench/secure_aggregation.py --json secure_aggregation.json [--parts secagg he aggregation]

Writes ``{"secagg": [...], "he": [...], "aggregation": [...]}`` (a part not run stays empty).

``secagg`` rows: light devices (``devices.secagg_fleet``: one MQTT connection each, a fixed
random update of ``--length`` words, no training) run one round with the coordinator
(``coordinator.secagg.SecAggService``) on a mosquitto of their own; ``round(dropout × devices)``
devices vanish after sharing their keys (their masks are removed with their rebuilt mask keys).
Neighbours: the smallest even k whose union bound on an abort at 30% dropout is ≤ 1e-6 with
t = k/2 (``edge.secagg.choose_k``; complete graph below that, i.e. classic SecAgg).
``bytes_per_device``: packet bytes of every secagg message to and from a device (the ``begin``
that stands in for the task excluded) ÷ devices; ``bytes_ratio``: that ÷ the packet bytes of the
same update as a plaintext f32 ``update`` message (``edge.wire``), both measured in this run.

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
"""

from __future__ import annotations

# ruff: noqa: E402
import sys
from pathlib import Path

# Run as a script, this folder comes first on sys.path and bench/attacks.py would shadow the
# package; the repository root goes there instead.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import contextlib
import dataclasses
import json
import secrets
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from coordinator.secagg import SecAggService, local_round
from devices.secagg_fleet import LightDevice, LightSecAggFleet
from edge import secagg as sa
from edge import wire
from edge.mqtt import QOS, BrokerAddress, publish_packet_bytes
from edgeleak.broker import local_broker

# The zoo LeNet's parameter count (DESIGN.md): an update of realistic size.
LENET_PARAMETERS = 19_670
DESIGN_DROPOUT = 0.3
THRESHOLD = 0.5


def plaintext_update_bytes(length: int, run: str = "run", device: str = "d0000") -> int:
    """Packet bytes of a dense f32 update of ``length`` values on the wire (the baseline)."""
    update = wire.Update(
        run=run, round=1, device=device, kind="gradient", num_examples=1,
        params={"w": np.zeros(length, np.float32)},
    )  # fmt: skip
    payload = wire.encode_update(update)
    return publish_packet_bytes(wire.update_topic(run, device), len(payload), QOS)


def measure_secagg(
    broker: BrokerAddress, devices: int, dropout: float, *, length: int, seed: int = 0
) -> dict[str, Any]:
    """One round of ``devices`` light devices, ``dropout`` of them vanishing after sharing."""
    run = f"bench-{secrets.token_hex(4)}"
    ids = [f"d{i:04d}" for i in range(devices)]
    rng = np.random.default_rng(seed)
    xs = {d: rng.normal(0.0, 0.1, length) for d in ids}
    gone = set(rng.choice(ids, int(round(dropout * devices)), replace=False).tolist())
    k = sa.choose_k(devices, t=THRESHOLD, dropout=DESIGN_DROPOUT)
    spec = sa.SecAggSpec(k=k, t=THRESHOLD, clip=1.0, bits=16)
    fleet = [LightDevice(d, xs[d], "share" if d in gone else "") for d in ids]
    with LightSecAggFleet(run, broker, fleet) as lf, SecAggService(run, broker) as svc:
        t0 = time.monotonic()
        rnd = svc.run_round(1, ids, spec, length, deadline_s=600.0)
        seconds = time.monotonic() - t0
    out = rnd.outcome
    assert out is not None
    exact = False
    if out.total is not None:
        want = np.sum(
            np.stack([sa.encode_fixed(xs[d], spec.clip, spec.bits) for d in out.survivors]).astype(
                np.uint64
            ),
            axis=0,
        ).astype(np.uint32)
        exact = bool(np.array_equal(out.total, want))
    secagg_bytes = sum(
        r.bytes for r in svc.rows if r.kind in sa.LEDGER_KINDS and r.kind != "secagg_begin"
    )
    per_device = secagg_bytes / devices
    plain = plaintext_update_bytes(length, run)
    return {
        "devices": devices,
        "dropout": dropout,
        "k": spec.degree(devices),
        "t": sa.SecAggSpec(k=k, t=THRESHOLD).threshold(devices),
        "length": length,
        "bytes_per_device": round(per_device, 1),
        "plaintext_bytes": plain,
        "bytes_ratio": round(per_device / plain, 4),
        "device_seconds": round(float(np.mean([d.seconds for d in lf.devices.values()])), 4),
        "coordinator_seconds": round(out.seconds, 3),
        "round_seconds": round(seconds, 3),
        "exact": exact,
        "aborted": bool(out.aborted),
        "abort_reason": out.aborted,
        "device_errors": dict(lf.errors),
    }


def measure_secagg_ig(images: int = 4, budget_s: float = 15.0, seed: int = 0) -> dict[str, Any]:
    """The wire attacker's Inverting Gradients on a masked update: each victim (one
    Fashion-MNIST image, FedSGD, the sigmoid LeNet of the IG paper) runs a local SecAgg round with
    two other devices; the attacker decodes the victim's captured ``masked`` message with the
    public fixed point and inverts it. The same attack on the plaintext update, and the
    mean-image baseline, for comparison."""
    import torch

    from attacks import get_attack
    from attacks.base import AttackMetadata
    from attacks.model import FunctionalModel, InputMap, manifest_for
    from attacks.truth.leakage import evaluate
    from attacks.truth.metrics import mean_image_psnr
    from attacks.truth.victim import simulate_update
    from devices.datasets import load_dataset
    from export import zoo

    torch.manual_seed(seed)
    shape = (1, 28, 28)
    module = zoo.build("lenet_zhu", shape)
    meta = AttackMetadata(manifest_for("lenet_zhu", module, shape, 10), budget_s=budget_s)
    victim = FunctionalModel(module, InputMap.from_metadata(meta, torch.device("cpu")))
    w0 = {k: v.detach().numpy().copy() for k, v in module.named_parameters()}
    names = list(w0)
    shapes = {k: tuple(v.shape) for k, v in w0.items()}
    data = load_dataset("fashion-mnist")
    x, y = data.x_train[: images * 3], data.y_train[: images * 3]
    grads = [
        simulate_update(victim, w0, x[i : i + 1], y[i : i + 1], algorithm="fedsgd", lr=0.1)
        for i in range(len(x))
    ]
    clip = max(float(np.max(np.abs(sa.flatten(g.params, names)))) for g in grads)
    spec = sa.SecAggSpec(k=0, t=0.5, clip=clip, bits=16)
    attack = get_attack("inverting_gradients")
    masked_psnr, plain_psnr = [], []
    for i in range(images):
        trio = {f"d{j}": sa.flatten(grads[3 * i + j].params, names) for j in range(3)}
        _, log = local_round("ig", 1, trio, spec)
        y_wire = next(
            sa.decode_message(p, "masked", "ig", 1, "d0").tensors["y"]
            for t, p in log
            if t == sa.up_topic("ig", "masked", "d0")
        )
        seen = sa.unflatten(sa.decode_fixed(y_wire.view(np.uint32), spec.bits), shapes)
        truth = grads[3 * i]
        for params, out in ((seen, masked_psnr), (truth.params, plain_psnr)):
            upd = dataclasses.replace(truth, params=params)
            rec = attack.reconstruct(upd, w0, meta)
            report = evaluate(rec, x[3 * i : 3 * i + 1], y[3 * i : 3 * i + 1])
            out.append(float(report.psnr[0]))
    return {
        "attack": "inverting_gradients",
        "model": "lenet_zhu",
        "images": images,
        "budget_s": budget_s,
        "masked_psnr_mean": round(float(np.mean(masked_psnr)), 2),
        "plaintext_psnr_mean": round(float(np.mean(plain_psnr)), 2),
        "baseline_psnr": round(mean_image_psnr(x[0 : images * 3 : 3]), 2),
    }


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--devices", default="10,100,1000", help="comma-separated fleet sizes")
    p.add_argument("--dropout", default="0,0.1,0.3", help="comma-separated dropout fractions")
    p.add_argument("--length", type=int, default=LENET_PARAMETERS, help="update length (words)")
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument(
        "--ig", type=int, default=0, metavar="N",
        help="also invert N masked updates (key secagg_ig; needs the lab extra)",
    )  # fmt: skip
    p.add_argument(
        "--parts", nargs="+", choices=("secagg", "he", "aggregation"),
        default=["secagg", "he", "aggregation"], help="which tables to measure (default: all)",
    )  # fmt: skip
    p.add_argument("--iterations", type=int, default=2000, help="aggregation: IG iterations")
    p.add_argument("--budget-s", type=float, default=900.0, help="aggregation: IG time cap")
    p.add_argument(
        "--ks", default=",".join(map(str, KS)), help="aggregation: comma-separated group sizes"
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rows: list[dict[str, Any]] = []
    if "secagg" in args.parts:
        with local_broker("mosquitto") as (broker, _):
            for n in (int(v) for v in args.devices.split(",")):
                for d in (float(v) for v in args.dropout.split(",")):
                    row = measure_secagg(broker, n, d, length=args.length)
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    result: dict[str, Any] = {"secagg": rows, "he": [], "aggregation": []}
    if "he" in args.parts or "aggregation" in args.parts:
        if "he" in args.parts:
            result["he"] = measure_he(seed=args.seed)
            print(json.dumps(result["he"]), flush=True)
        if "aggregation" in args.parts:
            ks = [int(k) for k in args.ks.split(",")]
            result["aggregation"] = measure_aggregation(
                ks, iterations=args.iterations, budget_s=args.budget_s, seed=args.seed
            )
            print(json.dumps(result["aggregation"]), flush=True)
    if args.ig:
        result["secagg_ig"] = measure_secagg_ig(args.ig)
        print(json.dumps(result["secagg_ig"]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
