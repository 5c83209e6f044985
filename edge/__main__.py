"""``python -m edge``: one device process on the base install (numpy, paho-mqtt, onnxruntime,
safetensors), as a deployment bundle's ``start.sh`` runs it on a Raspberry Pi or a phone.

    python -m edge --broker mqtt://[USER:PASSWORD@]HOST:PORT --data shard.npz --model model/
                   [--id ID] [--run RUN [--exit-on-end]] [--runtime onnx] [--profile rpi4]
                   [--seed 0] [--max-backoff-s 30] [--config config.json]

Without ``--run`` the device takes part in any run that sends it a task and stays up between
runs; with ``--run`` it is pinned to that run (and exits at its end with ``--exit-on-end``).
It waits for the broker with capped exponential backoff, reconnects when it goes away, prints
one line per round and stops cleanly on Ctrl-C or SIGTERM. ``--config`` reads the same settings
from a JSON object (paths relative to its folder); flags given on the command line override it.
"""

from __future__ import annotations

import argparse
import json
import platform
import signal
import socket
import sys
import threading
from pathlib import Path

SETTINGS = (
    "broker", "data", "model", "run", "id", "runtime", "profile", "seed", "exit_on_end",
    "max_backoff_s",
)  # fmt: skip
PATHS = ("data", "model")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m edge", description="run one edgeleak device")
    p.add_argument("--config", help="JSON object with any of the settings below")
    p.add_argument(
        "--broker",
        help="mqtt://[USER:PASSWORD@]HOST:PORT (mqtt311:// for an MQTT 3.1.1 broker)",
    )
    p.add_argument("--data", help=".npz with x (N,C,H,W float32) and y (N int64)")
    p.add_argument("--model", help="model folder with manifest.json")
    p.add_argument("--run", help="pin the device to this run id (default: take part in any run)")
    p.add_argument(
        "--exit-on-end", action="store_true", default=False,
        help="exit when the pinned run ends (default: stay up for the next run)",
    )  # fmt: skip
    p.add_argument("--id", help="this device's id, its MQTT client id (default: host name)")
    p.add_argument("--runtime", default="onnx", help="onnx, executorch or torch")
    p.add_argument("--profile", default="", help="device profile name it announces (e.g. rpi4)")
    p.add_argument("--seed", type=int, default=0, help="seed of local batch order (default 0)")
    p.add_argument(
        "--max-backoff-s", type=float, default=30.0,
        help="longest wait between attempts to reach the broker (default 30 s)",
    )  # fmt: skip
    return p


def settings(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line over config file over defaults; exits naming any missing setting."""
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.config:
        path = Path(first.config).absolute()
        cfg = json.loads(path.read_text())
        unknown = set(cfg) - set(SETTINGS)
        if unknown:
            parser.error(
                f"{path}: unknown settings {sorted(unknown)}; expected {', '.join(SETTINGS)}"
            )
        for key in PATHS:
            if cfg.get(key):
                cfg[key] = str(path.parent / cfg[key])
        parser.set_defaults(**{k: v for k, v in cfg.items() if v is not None})
    args = parser.parse_args(argv)
    args.id = args.id or socket.gethostname()
    missing = [f"--{k}" for k in ("broker", "data", "model") if not getattr(args, k)]
    if missing:
        parser.error(f"missing {', '.join(missing)} (on the command line or in --config)")
    if args.exit_on_end and not args.run:
        parser.error("--exit-on-end needs --run (an unpinned device serves run after run)")
    if not args.max_backoff_s >= 1:
        parser.error(f"--max-backoff-s {args.max_backoff_s}: expected a number >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    import edge
    from edge.backends import load_backend
    from edge.data import load_shard
    from edge.device import Device, run_device
    from edge.manifest import ModelArtifact
    from edge.mqtt import parse_broker_url

    args = settings(argv)
    try:
        broker = parse_broker_url(args.broker)
    except ValueError as e:
        build_parser().error(str(e))
    x, y = load_shard(args.data)
    artifact = ModelArtifact.load(args.model)
    backend = load_backend(args.runtime, artifact)
    device = Device(
        args.id, args.run, artifact, backend, x, y, seed=args.seed, profile=args.profile
    )
    print(
        f"device {args.id}: {len(x)} examples, runtime {args.runtime}, {platform.machine()}, "
        f"run {args.run or 'any'}, broker {broker.url}, edge from {Path(edge.__file__).parent}",
        flush=True,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    run_device(
        device, broker, stop=stop, exit_on_end=args.exit_on_end,
        say=lambda line: print(line, flush=True), backoff_s=(1.0, args.max_backoff_s),
    )  # fmt: skip
    print(f"device {args.id}: stopped after {device.rounds_done} updates", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
