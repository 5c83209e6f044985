"""Decoys against an eavesdropper: what it recovers when it cannot tell real updates from decoys.

Real devices (``edge.Device`` with the onnx runtime) answer one FedSGD task (batch size 1, the
zoo's ``mlp``) with their real update and K decoys trained on public examples (the test split);
the eavesdropper inverts every update it sees with the exact ``analytic`` attack. Ground truth
(which update is real, from the device keys) is used only for scoring:

- ``real_fraction``: the fraction of the attacker's reconstructions that are real private images;
- ``best_psnr_real``: per real image, the best PSNR among all reconstructions (mean);
- ``pick_real``: the chance that the attacker's single most confident guess per device is real;
- ``decoys_matched_public``: the fraction of decoy reconstructions within 40 dB of a public
  image, i.e. an attacker holding the public pool tells those decoys apart.

    python bench/decoys.py --json decoys.json [--devices 8] [--decoys 3]
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
import tempfile
import time

import numpy as np

from attacks import get_attack
from attacks.base import AttackMetadata, AttackUpdate
from attacks.truth.metrics import psnr_matrix
from devices.datasets import load_dataset
from edge import decoy, wire
from edge.backends import load_backend
from edge.device import Device, TrainingRecord
from edge.mqtt import Received
from export import export_model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True)
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--decoys", type=int, default=3)
    args = p.parse_args(argv)
    data = load_dataset("fashion-mnist")
    with tempfile.TemporaryDirectory() as tmp:
        artifact = export_model("mlp", tmp, input_shape=data.input_shape, seed=0)
        backend = load_backend("onnx", artifact)
        w0 = artifact.initial_params()
        attack = get_attack("analytic")
        meta = AttackMetadata(artifact.manifest, budget_s=10)
        used: dict[str, np.ndarray] = {}
        recs, real, truths = [], [], []
        picks_real = 0
        t0 = time.monotonic()
        for i in range(args.devices):
            name = f"d{i:04d}"
            idx = np.arange(i * 16, (i + 1) * 16)

            def keep(rec: TrainingRecord, idx: np.ndarray = idx) -> None:
                used[rec.device] = idx[rec.used]

            key = decoy.new_key()
            dev = Device(
                name, "bench", artifact, backend, data.x_train[idx], data.y_train[idx], seed=i,
                on_trained=keep, key=key, decoy_data=(data.x_test, data.y_test),
            )  # fmt: skip
            task = wire.Task(
                run="bench", round=1, device=name, algorithm="fedsgd", lr=0.1, epochs=1,
                batch_size=1, model_hash=artifact.manifest.sha256, weights=w0,
                decoys=args.decoys,
            )  # fmt: skip
            outs = dev.handle(
                Received(wire.task_topic("bench", name), wire.encode_task(task), False, 0.0)
            )
            truths.append(data.x_train[used[name]])
            real_name = decoy.pseudonym(
                key, "bench", 1, decoy.real_slot(key, "bench", 1, args.decoys)
            )
            best, best_real = -np.inf, False
            for out in outs:
                u = wire.decode_update(out.payload, artifact.manifest)
                r = attack.reconstruct(
                    AttackUpdate(u.params, "gradient", u.num_examples, 0.1, 1, 1, "fedsgd"),
                    w0,
                    meta,
                )
                assert r.images is not None
                recs.append(r.images[0])
                is_real = u.device == real_name
                real.append(is_real)
                if float(r.confidence[0]) > best:
                    best, best_real = float(r.confidence[0]), is_real
            picks_real += best_real
    rec_arr, truth_arr = np.stack(recs), np.concatenate(truths)
    real_arr = np.array(real)
    public = np.array([psnr_matrix(r[None], data.x_test).max() for r in rec_arr[~real_arr]])
    result = {
        "devices": args.devices,
        "decoys": args.decoys,
        "updates": len(recs),
        "real_fraction": float(real_arr.mean()),
        "best_psnr_real": float(np.mean(psnr_matrix(rec_arr, truth_arr).max(axis=0))),
        "pick_real": picks_real / args.devices,
        "decoys_matched_public": float(np.mean(public > 40)),
        "seconds": round(time.monotonic() - t0, 1),
    }
    print(json.dumps(result, indent=2))
    Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
