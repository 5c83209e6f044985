"""Virtual-clock rounds of a mixed fleet next to what the device profiles predict.

N devices (default 1,000) get the seven profiles round-robin (or ``--shares``), E examples each
of Fashion-MNIST, and run FedAvg rounds over mosquitto with the coordinator's virtual clock:
availability from each profile's hourly trace, arrival = compute + bytes / bandwidth + RTT from
the bytes the ledger counted, stragglers past the (virtual) deadline dropped. The prediction
uses ``round_time`` alone, with task and update sizes from encoding them here (no MQTT). The
compute cost is the model's FLOPs per example from its manifest (host-independent).

    python bench/fleet_clock.py --json fleet_clock.json [--devices 1000] [--rounds 2]
                                [--deadlines 0.3 600] [--examples 32] [--shares 3,3,1,1,1,1,1]

Each deadline gets ``--rounds`` rounds. With a deadline that no device misses, a round's virtual
length is its slowest arrival, which the prediction must match.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.policy import round_length
from coordinator.server import Coordinator, RoundPlan, RoundResult
from coordinator.store import RunStore
from devices.clock import (
    VirtualClock,
    assign_profiles,
    examples_processed,
)
from devices.fleet import DeviceSpec, Fleet, FleetSpec
from devices.profiles import PROFILES, load_profile, round_time
from edge import wire
from edge.manifest import ModelArtifact
from edge.mqtt import QOS, publish_packet_bytes
from edgeleak.broker import local_broker


def message_bytes(
    artifact: ModelArtifact, run: str, device: str, round_: int, plan: RoundPlan, examples: int
) -> tuple[int, int]:
    """PUBLISH sizes of a device's task and update, from encoding them (no broker)."""
    w = artifact.initial_params()
    task = wire.Task(
        run=run, round=round_, device=device, algorithm=plan.algorithm, lr=plan.lr,
        epochs=plan.epochs, batch_size=plan.batch_size, model_hash=artifact.manifest.sha256,
        weights=w, deadline_s=plan.deadline_s, codec=plan.task_codec, uplink=plan.codec,
    )  # fmt: skip
    update = wire.Update(
        run=run, round=round_, device=device, kind="delta", num_examples=examples, params=w,
        train_loss=2.3025850929940455, runtime="onnx", codec=plan.codec,
    )  # fmt: skip
    return (
        publish_packet_bytes(wire.task_topic(run, device), len(wire.encode_task(task)), QOS),
        publish_packet_bytes(wire.update_topic(run, device), len(wire.encode_update(update)), QOS),
    )


def fleet_rounds(
    artifact: ModelArtifact,
    devices: tuple[DeviceSpec, ...],
    clock: VirtualClock,
    plan: RoundPlan,
    deadlines: list[float],
    rounds: int,
    workers: int,
) -> tuple[str, float, list[RoundResult]]:
    """Run ``rounds`` rounds per deadline over a mosquitto of our own: (run, connect s, results)."""
    run = "clock" + uuid.uuid4().hex[:6]
    results: list[RoundResult] = []
    with tempfile.TemporaryDirectory() as tmp, local_broker("mosquitto") as (broker, _):
        store = RunStore(Path(tmp) / "run.db")
        spec = FleetSpec(run, broker.url, str(artifact.folder), "fashion-mnist", devices, workers)
        t0 = time.perf_counter()
        with (
            Coordinator(run, artifact, broker, store, plan, seed=clock.seed, clock=clock) as coord,
            Fleet(spec),
        ):
            coord.wait_for_devices(len(devices), 120 + len(devices) * 0.2)
            connect_s = time.perf_counter() - t0
            for i, deadline in enumerate(deadlines):
                coord.plan = dataclasses.replace(plan, deadline_s=deadline)
                results += [coord.run_round(i * rounds + r) for r in range(1, rounds + 1)]
            coord.end()
        store.close()
    return run, connect_s, results


def run_bench(
    n: int,
    rounds: int,
    deadlines: list[float],
    examples: int,
    shares: list[float] | None,
    workers: int,
    seed: int,
) -> dict[str, Any]:
    from devices.datasets import load_dataset
    from export import export_model

    n_train = len(load_dataset("fashion-mnist").y_train)
    if n * examples > n_train:
        raise SystemExit(f"{n} devices x {examples} examples > {n_train} training examples")
    plan = RoundPlan(algorithm="fedavg", lr=0.05, epochs=1, batch_size=32)
    names = assign_profiles(n, PROFILES, shares)
    trained = examples_processed(plan.algorithm, epochs=plan.epochs, reported=examples)
    with tempfile.TemporaryDirectory() as tmp:
        artifact = export_model("lenet", Path(tmp) / "model", seed=0)
        flops = artifact.manifest.flops_per_example
        devices = tuple(
            DeviceSpec(f"d{i:04d}", np.arange(i * examples, (i + 1) * examples), "onnx", seed=i,
                       profile=names[i])
            for i in range(n)
        )  # fmt: skip
        clock = VirtualClock.from_names(
            {d.device_id: d.profile for d in devices}, flops_per_example=flops, seed=seed
        )
        run, connect_s, results = fleet_rounds(
            artifact, devices, clock, plan, deadlines, rounds, workers
        )
        rows = []
        for res, deadline in zip(
            results, [d for d in deadlines for _ in range(rounds)], strict=True
        ):
            available = [d.device_id for d in devices if clock.available(d.device_id, res.round)]
            predicted = []
            for d in available:
                down, up = message_bytes(artifact, run, d, res.round, plan, examples)
                predicted.append(round_time(clock.profile(d), examples=trained, bytes_down=down,
                                            bytes_up=up, flops_per_example=flops))  # fmt: skip
            rows.append({
                "round": res.round,
                "deadline_s": deadline,
                "available": len(available),
                "selected": res.selected,
                "accepted": res.accepted,
                "stragglers": res.rejections.get("straggler", 0),
                "predicted_stragglers": sum(t > deadline for t in predicted),
                "virtual_s": res.virtual_seconds,
                "predicted_virtual_s": round_length(predicted, deadline_s=deadline),
                "real_s": res.seconds,
            })  # fmt: skip
        per_profile = []
        down, up = message_bytes(artifact, run, "d0000", 1, plan, examples)
        for name in PROFILES:
            p = load_profile(name)
            per_profile.append({
                "profile": name, "devices": names.count(name), "train_gflops": p.train_gflops,
                "downlink_mbps": p.downlink_mbps, "uplink_mbps": p.uplink_mbps,
                "rtt_ms": p.rtt_ms, "mean_availability": p.mean_availability,
                "bytes_down": down, "bytes_up": up,
                "predicted_arrival_s": round_time(p, examples=trained, bytes_down=down,
                                                  bytes_up=up, flops_per_example=flops),
            })  # fmt: skip
    return {
        "devices": n,
        "examples_per_device": examples,
        "algorithm": plan.algorithm,
        "deadlines_s": deadlines,
        "flops_per_example": flops,
        "seed": seed,
        "connect_s": connect_s,
        "profiles": per_profile,
        "rounds": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--json", required=True, help="write the figures here")
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=2, help="rounds per deadline")
    ap.add_argument("--deadlines", type=float, nargs="+", default=[0.3, 600.0],
                    help="virtual seconds per round")  # fmt: skip
    ap.add_argument("--examples", type=int, default=32, help="training examples per device")
    ap.add_argument("--shares", help=f"comma-separated shares for {','.join(PROFILES)}")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    shares = [float(s) for s in args.shares.split(",")] if args.shares else None
    out = run_bench(
        args.devices, args.rounds, args.deadlines, args.examples, shares, args.workers, args.seed
    )
    Path(args.json).write_text(json.dumps(out, indent=2))

    from rich.console import Console
    from rich.table import Table

    console = Console(width=130)
    t = Table(
        title=f"predicted arrival: lenet, {args.examples} examples, FedAvg E=1, base "
        f"{out['flops_per_example']:,} FLOPs per training example (from the manifest)"
    )
    cols = ("profile", "devices", "GFLOP/s", "down Mbit/s", "up Mbit/s", "RTT ms", "online",
            "arrival s")  # fmt: skip
    for col in cols:
        t.add_column(col, justify="right")
    for p in out["profiles"]:
        t.add_row(p["profile"], str(p["devices"]), f"{p['train_gflops']:.3f}",
                  f"{p['downlink_mbps']:.1f}", f"{p['uplink_mbps']:.1f}", f"{p['rtt_ms']:.0f}",
                  f"{p['mean_availability']:.2f}", f"{p['predicted_arrival_s']:.4f}")  # fmt: skip
    console.print(t)
    r = Table(
        title=f"{out['devices']} devices over mosquitto, virtual clock "
        f"(all online after {out['connect_s']:.1f} s)"
    )
    cols2 = ("round", "deadline s", "available", "accepted", "stragglers", "predicted",
            "virtual s", "predicted s", "real s")  # fmt: skip
    for col in cols2:
        r.add_column(col, justify="right")
    for row in out["rounds"]:
        r.add_row(str(row["round"]), f"{row['deadline_s']:g}", str(row["available"]),
                  str(row["accepted"]), str(row["stragglers"]), str(row["predicted_stragglers"]),
                  f"{row['virtual_s']:.6f}", f"{row['predicted_virtual_s']:.6f}",
                  f"{row['real_s']:.2f}")  # fmt: skip
    console.print(r)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
