"""``python -m edge``: one device process on the base install (numpy, paho-mqtt, onnxruntime,
safetensors), as a deployment bundle's ``start.sh`` runs it on a Raspberry Pi or a phone.

    python -m edge --broker mqtt://HOST:PORT --data shard.npz --model model/ --run RUN --id ID
                   [--runtime onnx] [--profile rpi4] [--seed 0] [--config config.json]

``python -m edge calibrate --model model/`` measures this device's training throughput instead
(``edge.calibrate``). ``--config`` reads the same settings from a JSON object (paths relative to its folder); flags
given on the command line override it.
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import sys
from pathlib import Path

SETTINGS = ("broker", "data", "model", "run", "id", "runtime", "profile", "seed")
PATHS = ("data", "model")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m edge", description="run one edgeleak device")
    p.add_argument("--config", help="JSON object with any of the settings below")
    p.add_argument("--broker", help="mqtt://HOST:PORT (mqtt311:// for an MQTT 3.1.1 broker)")
    p.add_argument("--data", help=".npz with x (N,C,H,W float32) and y (N int64)")
    p.add_argument("--model", help="model folder with manifest.json")
    p.add_argument("--run", help="run id the coordinator uses")
    p.add_argument("--id", help="this device's id, its MQTT client id (default: host name)")
    p.add_argument("--runtime", default="onnx", help="onnx, executorch or torch")
    p.add_argument("--profile", default="", help="device profile name it announces (e.g. rpi4)")
    p.add_argument("--seed", type=int, default=0)
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
    missing = [f"--{k}" for k in ("broker", "data", "model", "run") if not getattr(args, k)]
    if missing:
        parser.error(f"missing {', '.join(missing)} (on the command line or in --config)")
    return args


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "calibrate":
        from edge.calibrate import main as calibrate

        return calibrate(argv[1:])
    import edge
    from edge.backends import load_backend
    from edge.data import load_shard
    from edge.device import Device, run_device
    from edge.manifest import ModelArtifact
    from edge.mqtt import parse_broker_url

    args = settings(argv)
    x, y = load_shard(args.data)
    artifact = ModelArtifact.load(args.model)
    backend = load_backend(args.runtime, artifact)
    device = Device(
        args.id, args.run, artifact, backend, x, y, seed=args.seed, profile=args.profile
    )
    print(
        f"device {args.id}: {len(x)} examples, runtime {args.runtime}, {platform.machine()}, "
        f"run {args.run}, broker {args.broker}, edge from {Path(edge.__file__).parent}",
        flush=True,
    )
    run_device(device, parse_broker_url(args.broker))
    print(f"device {args.id}: run ended after {device.rounds_done} updates", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
