"""The ``edgeleak`` command line. Imports stay inside the subcommands: ``edgeleak device`` runs
with the base install (no torch, no rich)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from edgeleak.errors import UsageError


def _demo(args: argparse.Namespace) -> int:
    from edgeleak.config import ConfigError, ExperimentConfig
    from edgeleak.experiment import run_experiment

    try:
        base = ExperimentConfig.from_file(args.config).to_dict() if args.config else {}
        for f in dataclasses.fields(ExperimentConfig):
            if getattr(args, f.name) is not None:
                base[f.name] = getattr(args, f.name)
        cfg = ExperimentConfig.from_dict(base)
    except ConfigError as e:
        print(f"edgeleak demo: bad config: {e}", file=sys.stderr)
        return 2
    from coordinator.server import new_run_id

    run = new_run_id("demo")
    out = Path(args.out or Path("runs") / run)
    res = run_experiment(cfg, out, broker_url=args.broker, run=run)
    s = res.summary
    print(
        f"run {res.run}: accuracy {100 * s['final_accuracy']:.2f}% after {cfg.rounds} rounds, "
        f"{s['bytes_up'] / 1e6:.2f} MB up, {s['bytes_down'] / 1e6:.2f} MB down, "
        f"{s['seconds']:.1f} s, broker {s['broker']}"
    )
    print(f"wrote {out}/run.db, {out}/summary.json, {out}/rounds.png")
    return 0


def _broker(args: argparse.Namespace) -> int:
    from edgeleak.broker import serve_broker

    if not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port}: expected 1..65535")
    return serve_broker(
        port=args.port,
        bind=args.bind,
        data=Path(args.data) if args.data else None,
        password_file=Path(args.password_file) if args.password_file else None,
    )


def _coordinator(args: argparse.Namespace) -> int:
    from edgeleak.config import ExperimentConfig
    from edgeleak.experiment import run_coordinator

    base = ExperimentConfig.from_file(args.config).to_dict() if args.config else {}
    for key in ("rounds", "dataset"):
        if getattr(args, key) is not None:
            base[key] = getattr(args, key)
    cfg = ExperimentConfig.from_dict(base)
    if args.min_devices < 1:
        raise UsageError(f"--min-devices {args.min_devices}: expected an integer >= 1")
    for flag, value in (("--wait-s", args.wait_s), ("--unproven-wait-s", args.unproven_wait_s)):
        if not value > 0:
            raise UsageError(f"{flag} {value}: expected a number of seconds > 0")
    res = run_coordinator(
        cfg, broker_url=args.broker, model_dir=Path(args.model),
        out=Path(args.out) if args.out else None, run=args.run, min_devices=args.min_devices,
        wait_s=args.wait_s, quiet_s=args.unproven_wait_s,
    )  # fmt: skip
    s = res.summary
    print(
        f"run {res.run}: accuracy {100 * (s['final_accuracy'] or 0):.2f}% after "
        f"{len(s['rounds'])} rounds with {s['devices']} devices; wrote {res.out}/run.db, "
        f"{res.out}/summary.json, {res.out}/rounds.png"
    )
    return 0


def _device(rest: list[str]) -> int:
    """``device bundle ...``, ``device deploy ...``, else run one device (``python -m edge``)."""
    if rest and rest[0] in ("bundle", "deploy"):
        sub = _device_tools_parser().parse_args(rest)
        return int(sub.func(sub))
    from edge.__main__ import main as run_device

    return run_device(rest)


def _bundle(args: argparse.Namespace) -> int:
    from devices.deploy import build_bundle

    out = build_bundle(
        args.out, model_dir=args.model, runtime=args.runtime, profile=args.profile,
        data=args.data, broker=args.broker, run=args.run, device_id=args.id, seed=args.seed,
        wheels=args.wheels,
    )  # fmt: skip
    print(f"bundle in {out}: run ./start.sh on the device, or `edgeleak device deploy`")
    return 0


def _deploy(args: argparse.Namespace) -> int:
    from devices.deploy import deploy_ssh

    extra = [a for k in ("broker", "run", "id") if (v := getattr(args, k)) for a in (f"--{k}", v)]
    dep = deploy_ssh(
        args.bundle, args.target, identity=args.identity, args=extra,
        ssh_options=tuple(args.ssh_option or ()),
    )  # fmt: skip
    print(f"started on {args.target} (pid {dep.pid}); log: device.log in the bundle folder")
    return 0


def _device_tools_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgeleak device")
    sub = p.add_subparsers(dest="action", required=True)
    b = sub.add_parser("bundle", help="build a self-contained device bundle (edge + model + data)")
    b.add_argument("--out", required=True)
    b.add_argument("--model", required=True, help="model folder written by `edgeleak export`")
    b.add_argument("--runtime", default="onnx")
    b.add_argument("--profile", default="", help="device profile, e.g. rpi4")
    b.add_argument("--data", help=".npz shard to ship with the bundle")
    b.add_argument("--broker", help="mqtt://HOST:PORT written into the bundle's config")
    b.add_argument("--run")
    b.add_argument("--id")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--wheels", help="folder of wheels for an offline install on the device")
    b.set_defaults(func=_bundle)
    d = sub.add_parser("deploy", help="copy a bundle over SSH and start the device there")
    d.add_argument("target", help="ssh://user@host[:port]/path")
    d.add_argument("--bundle", required=True)
    d.add_argument("--identity", help="SSH private key")
    d.add_argument("--ssh-option", action="append", help="extra ssh -o option (repeatable)")
    d.add_argument("--broker")
    d.add_argument("--run")
    d.add_argument("--id")
    d.set_defaults(func=_deploy)
    return p


def _attack(args: argparse.Namespace) -> int:
    """Capture a run's traffic live (--broker/--run), then attack what was captured."""
    from attacks.intercept import CaptureStore, Eavesdropper
    from edge.manifest import ModelArtifact
    from edge.mqtt import parse_broker_url
    from edgeleak.leak import attack_captures, fleet_truth

    capture = CaptureStore(args.capture)
    artifact = ModelArtifact.load(args.model)
    if args.broker:
        if not args.run:
            print(
                "edgeleak attack: --broker needs --run (the run id to listen to)", file=sys.stderr
            )
            return 2
        with Eavesdropper(parse_broker_url(args.broker), args.run, capture) as spy:
            print(f"listening to edgeleak/{args.run}/# on {args.broker} (until the run ends)")
            spy.ended.wait(args.seconds)
        print(f"captured {spy.captured} messages into {args.capture}")
    names = [a for a in args.attack.split(",") if a]
    if not names:
        return 0
    truth = fleet_truth(args.truth, args.dataset) if args.truth else None
    out = Path(args.out or Path(args.capture) / "attack")
    rows = attack_captures(
        capture,
        artifact,
        out,
        attacks=names,
        budget_s=args.budget_s,
        max_updates=args.max_updates,
        truth=truth,
        run=args.run,
        db=capture.db,
    )
    for r in rows:
        score = f"{r.psnr_mean:.1f} dB (baseline {r.baseline_psnr:.1f})" if r.psnr_mean else ""
        labels = f"labels {100 * r.label_accuracy:.0f}%" if r.label_accuracy is not None else ""
        print(
            f"round {r.round} {r.device} {r.attack}: {r.examples} examples {score} {labels} "
            f"{r.seconds:.1f} s"
        )
    print(f"wrote reconstructions to {out} and the leakage table to {args.capture}/capture.db")
    return 0


def _export(args: argparse.Namespace) -> int:
    from export import export_model

    shape = tuple(int(s) for s in args.input_shape.split("x")) if args.input_shape else None
    targets = tuple(args.targets.split(","))
    art = export_model(args.model, args.out, input_shape=shape, seed=args.seed, targets=targets)
    m = art.manifest
    files = ", ".join(m.artifacts.values())
    print(f"exported {m.model} ({m.num_parameters} parameters) to {args.out}: {files}")
    return 0


def _shards(args: argparse.Namespace) -> int:
    from devices.datasets import load_dataset
    from devices.partition import partition
    from edge.data import save_shard

    data = load_dataset(args.dataset)
    parts = partition(
        data.y_train, args.devices, scheme=args.partition, alpha=args.alpha, seed=args.seed
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, idx in enumerate(parts):
        save_shard(out / f"shard-{i:04d}.npz", data.x_train[idx], data.y_train[idx])
    print(f"wrote {len(parts)} shards of {data.name} to {out}")
    return 0


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ExperimentConfig field (``batch_size`` -> ``--batch-size``), default unset."""
    from edgeleak.config import ExperimentConfig

    defaults = ExperimentConfig()
    for f in dataclasses.fields(ExperimentConfig):
        value = getattr(defaults, f.name)
        parser.add_argument(
            f"--{f.name.replace('_', '-')}", dest=f.name, type=type(value),
            help=f"default {value!r}",
        )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgeleak", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="run a federated experiment on a local (or --broker) broker")
    d.add_argument("--config", help="JSON file of ExperimentConfig fields (flags override it)")
    d.add_argument("--out", help="output folder (default runs/demo-<time>)")
    d.add_argument("--broker", help="external broker mqtt://HOST:PORT (default: start one here)")
    _add_config_flags(d)
    d.set_defaults(func=_demo)

    b = sub.add_parser(
        "broker", help="run mosquitto with the project's config in the foreground (Ctrl-C stops)"
    )
    b.add_argument("--port", type=int, default=1883, help="TCP port (default 1883)")
    b.add_argument(
        "--bind", default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; 0.0.0.0 for devices on a LAN: "
        "unauthenticated unless --password-file)",
    )  # fmt: skip
    b.add_argument("--data", help="folder for mosquitto.conf and mosquitto.log (default: temp)")
    b.add_argument(
        "--password-file", help="mosquitto_passwd file: clients must log in (mqtt://USER:PW@...)"
    )
    b.set_defaults(func=_broker)

    c = sub.add_parser(
        "coordinator",
        help="run rounds for the devices online on a broker (they join with `edgeleak device`)",
    )
    c.add_argument("--broker", required=True, help="mqtt://[USER:PASSWORD@]HOST:PORT")
    c.add_argument("--model", required=True, help="model folder written by `edgeleak export`")
    c.add_argument("--run", help="run id (default: run-<UTC time>-<random>)")
    c.add_argument("--rounds", type=int, help="rounds to run (default from --config, else 10)")
    c.add_argument(
        "--min-devices", type=int, default=1,
        help="each round waits until this many devices are online (default 1)",
    )  # fmt: skip
    c.add_argument(
        "--wait-s", type=float, default=300.0,
        help="how long a round waits for --min-devices (default 300 s)",
    )  # fmt: skip
    c.add_argument(
        "--unproven-wait-s", type=float, default=60.0,
        help="once only devices without an accepted update are left, stop waiting for them "
        "after this long without an answer (default 60 s)",
    )  # fmt: skip
    c.add_argument("--config", help="JSON file of ExperimentConfig fields (algorithm, lr, ...)")
    c.add_argument("--dataset", help="evaluation split (default from --config: fashion-mnist)")
    c.add_argument("--out", help="output folder (default runs/<run id>)")
    c.set_defaults(func=_coordinator)

    v = sub.add_parser(
        "device", add_help=False,
        help="run one device (flags of `python -m edge`: --broker --data --model [--id --run "
        "--exit-on-end --runtime --profile --seed --max-backoff-s --config]), or `device bundle ...` / `device deploy ...`",
    )  # fmt: skip
    v.add_argument("rest", nargs=argparse.REMAINDER)  # dispatched in main(): see _device

    a = sub.add_parser("attack", help="intercept a run's updates and invert them")
    a.add_argument("--capture", required=True, help="capture folder (written live, read offline)")
    a.add_argument("--model", required=True, help="the run's model folder (public artifacts)")
    a.add_argument("--broker", help="capture live from mqtt://HOST:PORT (needs --run)")
    a.add_argument("--run", help="run id to listen to / to attack")
    a.add_argument("--seconds", type=float, default=None, help="stop listening after S seconds")
    a.add_argument(
        "--attack", default="", help="comma-separated attacks, e.g. idlg,inverting_gradients"
    )
    a.add_argument("--budget-s", type=float, default=30.0, help="seconds per attack and update")
    a.add_argument("--max-updates", type=int, default=4)
    a.add_argument("--truth", help="the fleet's truth folder, to score reconstructions")
    a.add_argument("--dataset", default="fashion-mnist", help="the dataset the fleet trained on")
    a.add_argument("--out", help="where reconstructions go (default CAPTURE/attack)")
    a.set_defaults(func=_attack)

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
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["device"]:
        # The device's own flags belong to `python -m edge`; argparse cannot pass them through.
        logging.basicConfig(level=logging.WARNING)
        return _device(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    from edgeleak.config import ConfigError

    try:
        return int(args.func(args))
    except (UsageError, ConfigError) as e:
        print(f"edgeleak {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
