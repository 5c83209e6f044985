"""The ``edgeleak`` command line. Imports stay inside the subcommands: ``edgeleak device`` runs
with the base install (no torch, no rich)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    from edgeleak.config import ConfigError, ExperimentConfig
    from edgeleak.experiment import run_experiment

    base = ExperimentConfig.from_file(args.config).to_dict() if args.config else {}
    for key in (
        "devices",
        "rounds",
        "seed",
        "model",
        "dataset",
        "algorithm",
        "runtime",
        "fraction",
        "partition",
        "alpha",
        "workers",
        "lr",
        "epochs",
        "batch_size",
        "aggregator",
        "codec",
    ):
        value = getattr(args, key)
        if value is not None:
            base[key] = value
    try:
        cfg = ExperimentConfig.from_dict(base)
    except ConfigError as e:
        print(f"edgeleak demo: bad config: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S"))
    res = run_experiment(cfg, out, broker_url=args.broker)
    s = res.summary
    print(
        f"run {res.run}: accuracy {100 * s['final_accuracy']:.2f}% after {cfg.rounds} rounds, "
        f"{s['bytes_up'] / 1e6:.2f} MB up, {s['bytes_down'] / 1e6:.2f} MB down, "
        f"{s['seconds']:.1f} s, broker {s['broker']}"
    )
    print(f"wrote {out}/run.db, {out}/summary.json, {out}/rounds.png")
    return 0


def _run_device(args: argparse.Namespace) -> int:
    from edge.backends import load_backend
    from edge.data import load_shard
    from edge.device import Device, run_device
    from edge.manifest import ModelArtifact
    from edge.mqtt import parse_broker_url

    x, y = load_shard(args.data)
    artifact = ModelArtifact.load(args.model)
    device = Device(
        args.id,
        args.run,
        artifact,
        load_backend(args.runtime, artifact),
        x,
        y,
        seed=args.seed,
        profile=args.profile,
    )
    print(
        f"device {args.id}: {len(x)} examples, runtime {args.runtime}, run {args.run}, broker {args.broker}",
        flush=True,
    )
    run_device(device, parse_broker_url(args.broker))
    print(f"device {args.id}: run ended after {device.rounds_done} updates", flush=True)
    return 0


def _export(args: argparse.Namespace) -> int:
    from export import export_model

    shape = tuple(int(s) for s in args.input_shape.split("x")) if args.input_shape else None
    art = export_model(
        args.model,
        args.out,
        input_shape=shape,
        seed=args.seed,
        targets=tuple(args.targets.split(",")),
    )
    m = art.manifest
    print(
        f"exported {m.model} ({m.num_parameters} parameters) to {args.out}: {', '.join(m.artifacts.values())}"
    )
    return 0


def _shards(args: argparse.Namespace) -> int:
    from devices.datasets import load_dataset
    from devices.partition import dirichlet, iid
    from edge.data import save_shard

    data = load_dataset(args.dataset)
    if args.partition == "iid":
        parts = iid(len(data.y_train), args.devices, seed=args.seed)
    else:
        parts = dirichlet(data.y_train, args.devices, alpha=args.alpha, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, idx in enumerate(parts):
        save_shard(out / f"shard-{i:04d}.npz", data.x_train[idx], data.y_train[idx])
    print(f"wrote {len(parts)} shards of {data.name} to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgeleak", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser(
        "demo", help="run a federated experiment on a local (or --broker) MQTT broker"
    )
    d.add_argument("--config", help="JSON file of ExperimentConfig fields (flags override it)")
    d.add_argument("--devices", type=int)
    d.add_argument("--rounds", type=int)
    d.add_argument("--seed", type=int)
    d.add_argument("--out", help="output folder (default runs/demo-<time>)")
    d.add_argument(
        "--broker", help="external broker mqtt://HOST:PORT (default: start one on loopback)"
    )
    d.add_argument("--model")
    d.add_argument("--dataset")
    d.add_argument("--algorithm", help="fedavg or fedsgd")
    d.add_argument("--runtime", help="onnx, torch, executorch, or a comma-separated mix")
    d.add_argument("--fraction", type=float)
    d.add_argument("--partition", help="iid or dirichlet")
    d.add_argument("--alpha", type=float)
    d.add_argument("--workers", type=int)
    d.add_argument("--lr", type=float)
    d.add_argument("--epochs", type=int)
    d.add_argument("--batch-size", dest="batch_size", type=int)
    d.add_argument("--aggregator")
    d.add_argument("--codec")
    d.set_defaults(func=_demo)

    v = sub.add_parser("device", help="run one real device process")
    v.add_argument("--broker", required=True, help="mqtt://HOST:PORT")
    v.add_argument("--data", required=True, help=".npz with x (N,C,H,W float32) and y (N int64)")
    v.add_argument("--model", required=True, help="model folder written by `edgeleak export`")
    v.add_argument("--run", required=True, help="run id the coordinator uses")
    v.add_argument("--id", required=True, help="this device's id (its MQTT client id)")
    v.add_argument("--runtime", default="onnx")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--profile", default="", help="device profile name it announces (e.g. rpi4)")
    v.set_defaults(func=_run_device)

    e = sub.add_parser("export", help="export a zoo model for devices")
    e.add_argument("model")
    e.add_argument("--out", required=True)
    e.add_argument("--input-shape", help="e.g. 1x28x28 or 3x32x32")
    e.add_argument("--targets", default="onnx", help="comma-separated: onnx, executorch")
    e.add_argument("--seed", type=int, default=0)
    e.set_defaults(func=_export)

    s = sub.add_parser("shards", help="write per-device data shards (.npz) for physical devices")
    s.add_argument("--dataset", default="fashion-mnist")
    s.add_argument("--devices", type=int, required=True)
    s.add_argument("--partition", default="iid", choices=("iid", "dirichlet"))
    s.add_argument("--alpha", type=float, default=0.5)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True)
    s.set_defaults(func=_shards)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
