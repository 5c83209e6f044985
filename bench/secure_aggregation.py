"""Server-side protections over the real broker: secure aggregation (SecAgg / SecAgg+), and
(filled by their own functions) homomorphic encryption and hierarchical aggregation.

    python bench/secure_aggregation.py --json secure_aggregation.json

``secagg`` rows: light devices (``devices.secagg_fleet``: one MQTT connection each, a fixed
random update of ``--length`` words, no training) run one round with the coordinator
(``coordinator.secagg.SecAggService``) on a mosquitto of their own; ``round(dropout × devices)``
devices vanish after sharing their keys (their masks are removed with their rebuilt mask keys).
Neighbours: the smallest even k whose union bound on an abort at 30% dropout is ≤ 1e-6 with
t = k/2 (``edge.secagg.choose_k``; complete graph below that, i.e. classic SecAgg).
``bytes_per_device``: packet bytes of every secagg message to and from a device (the ``begin``
that stands in for the task excluded) ÷ devices; ``bytes_ratio``: that ÷ the packet bytes of the
same update as a plaintext f32 ``update`` message (``edge.wire``), both measured in this run.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coordinator.secagg import SecAggService  # noqa: E402
from devices.secagg_fleet import LightDevice, LightSecAggFleet  # noqa: E402
from edge import secagg as sa  # noqa: E402
from edge import wire  # noqa: E402
from edge.mqtt import QOS, BrokerAddress, publish_packet_bytes  # noqa: E402
from edgeleak.broker import local_broker  # noqa: E402

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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--devices", default="10,100,1000", help="comma-separated fleet sizes")
    p.add_argument("--dropout", default="0,0.1,0.3", help="comma-separated dropout fractions")
    p.add_argument("--length", type=int, default=LENET_PARAMETERS, help="update length (words)")
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args(argv)
    rows: list[dict[str, Any]] = []
    with local_broker("mosquitto") as (broker, _):
        for n in (int(v) for v in args.devices.split(",")):
            for d in (float(v) for v in args.dropout.split(",")):
                row = measure_secagg(broker, n, d, length=args.length)
                print(json.dumps(row), flush=True)
                rows.append(row)
    # "he" and "aggregation" are measured by their own functions (homomorphic encryption,
    # hierarchical aggregation); they stay empty until those are added.
    result: dict[str, list[dict[str, Any]]] = {"secagg": rows, "he": [], "aggregation": []}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
