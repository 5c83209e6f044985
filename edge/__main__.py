"""``python -m edge``: one device process on the base install (numpy, paho-mqtt, onnxruntime,
safetensors), as a deployment bundle's ``start.sh`` runs it on a Raspberry Pi or a phone.

    python -m edge --broker mqtt://[USER:PASSWORD@]HOST:PORT --data shard.npz --model model/
                   [--id ID] [--run RUN [--exit-on-end]] [--runtime onnx] [--profile rpi4]
                   [--seed 0] [--site NAME] [--max-backoff-s 30] [--config config.json]
                   [--max-epochs 10] [--max-batch-size 1024] [--max-steps 10000]
                   [--key device.key --decoy-data public.npz]

``python -m edge calibrate --model model/`` measures this device's training throughput instead
(``edge.calibrate``); ``python -m edge aggregate ...`` runs an edge aggregator for a group of
devices instead (``edge.aggregator``), and ``python -m edge keyholder ...`` a run's CKKS key
holder (``edge.he``, extra ``he``).
Without ``--run`` the device takes part in any run that sends it a task and stays up between
runs; with ``--run`` it is pinned to that run (and exits at its end with ``--exit-on-end``).
It waits for the broker with capped exponential backoff, reconnects when it goes away, prints
one line per round and stops cleanly on Ctrl-C or SIGTERM. ``--config`` reads the same settings
from a JSON object (paths relative to its folder); flags given on the command line override it.
Bad input (a missing or corrupt shard, a model folder without a valid manifest, an unknown
runtime) is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import platform
import signal
import socket
import sys
import threading
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from edge.args import OneLineParser

if TYPE_CHECKING:
    from edge.device import Device
    from edge.mqtt import BrokerAddress

SETTINGS = (
    "broker", "data", "model", "run", "id", "runtime", "profile", "seed", "exit_on_end",
    "max_backoff_s", "max_epochs", "max_batch_size", "max_steps", "key", "decoy_data", "pki",
    "verify_model_consistency", "site",
)  # fmt: skip
PATHS = ("data", "model", "key", "decoy_data", "pki")
PROG = "python -m edge"


class SetupError(ValueError):
    """A device cannot start with these settings; the message says what was expected."""


def build_parser(
    prog: str = PROG, *, epilog: str | None = None, profiles: Sequence[str] = ()
) -> argparse.ArgumentParser:
    """The device's flags; ``profiles`` (when given) are the names ``--profile`` accepts."""
    from edge.backends import RUNTIMES

    p = OneLineParser(
        prog=prog,
        description="Run one edgeleak device: train on its own data shard when the coordinator "
        "sends a task, and send the update back over MQTT until the run ends.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="JSON object with any of the settings below")
    p.add_argument(
        "--broker",
        help="mqtt://[USER:PASSWORD@]HOST:PORT (mqtt311:// for an MQTT 3.1.1 broker)",
    )
    p.add_argument("--data", help=".npz with x (N,C,H,W float32) and y (N int64)")
    p.add_argument("--model", help="model folder with manifest.json (`edgeleak export`)")
    p.add_argument("--run", help="pin the device to this run id (default: take part in any run)")
    p.add_argument(
        "--exit-on-end", action="store_true", default=False,
        help="exit when the pinned run ends (default: stay up for the next run)",
    )  # fmt: skip
    p.add_argument("--id", help="this device's id, its MQTT client id (default: host name)")
    p.add_argument(
        "--runtime", default="onnx", choices=RUNTIMES, help=f"one of {', '.join(RUNTIMES)}"
    )
    known = f": one of {', '.join(profiles)}" if profiles else " (e.g. rpi4)"
    p.add_argument(
        "--profile", default="", choices=("", *profiles) if profiles else None,
        help=f"device profile name it announces{known}",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of local shuffling (default 0)")
    p.add_argument(
        "--site", default="",
        help="the site whose broker it connects to (edgeleak broker --site), announced so that "
        "the coordinator books the bridge hop",
    )  # fmt: skip
    p.add_argument(
        "--max-backoff-s", type=float, default=30.0,
        help="longest wait between attempts to reach the broker (default 30 s)",
    )  # fmt: skip
    from edge.device import TaskLimits

    limits = TaskLimits()
    p.add_argument(
        "--max-epochs",
        type=int,
        default=limits.max_epochs,
        help="refuse a task with more local epochs (default %(default)s)",
    )
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=limits.max_batch_size,
        help="refuse a task with a larger batch (default %(default)s)",
    )
    p.add_argument(
        "--max-steps",
        type=int,
        default=limits.max_steps,
        help="refuse a task costing more SGD steps (default %(default)s)",
    )
    p.add_argument("--key", help="file with this device's secret key (hex), for decoy updates")
    p.add_argument("--decoy-data", help=".npz of public examples that decoy updates train on")
    p.add_argument(
        "--pki", help="secure mode (with an mqtts:// broker): PKI folder holding this device's "
        "certificate and key (`edgeleak pki enroll`, or a bundle's pki/)",
    )  # fmt: skip
    p.add_argument(
        "--verify-model-consistency", action="store_true", default=False,
        help="train only on the weights the coordinator announced to the whole run (refuses a "
        "coordinator that ships devices different models, as LOKI does)",
    )  # fmt: skip
    return p


def settings(
    argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None
) -> argparse.Namespace:
    """Command line over config file over defaults; exits naming any missing setting."""
    parser = parser or build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.config:
        path = Path(first.config).absolute()
        try:
            cfg = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            parser.error(f"--config {first.config}: expected a readable JSON object ({e})")
        if not isinstance(cfg, dict):
            parser.error(f"--config {first.config}: expected a JSON object of settings")
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
    for key in ("max_epochs", "max_batch_size", "max_steps"):
        if getattr(args, key) < 1:
            parser.error(
                f"--{key.replace('_', '-')} {getattr(args, key)}: expected an integer >= 1"
            )
    args.id = args.id or socket.gethostname()
    missing = [f"--{k}" for k in ("broker", "data", "model") if not getattr(args, k)]
    if missing:
        parser.error(f"missing {', '.join(missing)} (on the command line or in --config)")
    if args.exit_on_end and not args.run:
        parser.error("--exit-on-end needs --run (an unpinned device serves run after run)")
    if not args.max_backoff_s >= 1:
        parser.error(f"--max-backoff-s {args.max_backoff_s}: expected a number >= 1")
    from edge.wire import check_site

    try:
        if args.site:
            check_site(args.site)
    except ValueError as e:
        parser.error(f"--{e}")
    return args


def prepare(args: argparse.Namespace) -> tuple[Device, BrokerAddress]:
    """Load and check the shard, the model and the runtime; ``SetupError`` says what is wrong."""
    from edge.args import secure_broker
    from edge.backends import load_backend
    from edge.data import check_fits, load_shard
    from edge.decoy import load_key
    from edge.device import Device, TaskLimits
    from edge.manifest import ModelArtifact

    try:
        broker, credentials = secure_broker(args.broker, args.pki, args.id)
        x, y = load_shard(args.data)
        artifact = ModelArtifact.load(args.model)
        check_fits(x, y, artifact.manifest, where=str(args.data))
        key = load_key(args.key) if args.key else None
        pool = load_shard(args.decoy_data) if args.decoy_data else None
        if pool is not None:
            check_fits(*pool, artifact.manifest, where=str(args.decoy_data))
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise SetupError(str(e)) from None
    except ImportError as e:  # --pki without the cryptography package
        raise SetupError(f"--pki needs {e.name}: pip install cryptography") from None
    try:
        backend = load_backend(args.runtime, artifact)
    except (ImportError, OSError, RuntimeError, ValueError) as e:
        raise SetupError(f"runtime {args.runtime}: {e}") from None
    limits = TaskLimits(args.max_epochs, args.max_batch_size, args.max_steps)
    device = Device(
        args.id, args.run, artifact, backend, x, y, seed=args.seed, profile=args.profile,
        limits=limits, key=key, decoy_data=pool, credentials=credentials,
        verify_model=args.verify_model_consistency, site=args.site,
    )  # fmt: skip
    return device, broker


def main(
    argv: list[str] | None = None,
    *,
    prog: str = PROG,
    epilog: str | None = None,
    profiles: Sequence[str] = (),
) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from edge.codec import keep_message_buffers

    keep_message_buffers()
    if argv and argv[0] == "calibrate":
        from edge.calibrate import main as calibrate

        return calibrate(argv[1:])
    if argv and argv[0] == "aggregate":
        from edge.aggregator import main as aggregate

        return aggregate(argv[1:])
    if argv and argv[0] == "keyholder":
        from edge.he import main as keyholder

        return keyholder(argv[1:])
    import edge
    from edge.device import run_device

    args = settings(argv, build_parser(prog, epilog=epilog, profiles=profiles))
    try:
        device, broker = prepare(args)
    except SetupError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    print(
        f"device {args.id}: {len(device.y)} examples, runtime {args.runtime}, "
        f"{platform.machine()}, run {args.run or 'any'}, broker {broker.url}, "
        f"edge from {Path(edge.__file__).parent}",
        flush=True,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    run_device(
        device, broker, stop=stop, exit_on_end=args.exit_on_end,
        say=lambda line: print(line, flush=True), backoff_s=(1.0, args.max_backoff_s),
    )  # fmt: skip
    refused = ", ".join(f"{k} {v}" for k, v in sorted(device.rejected.items())) or "none"
    print(
        f"device {args.id}: stopped after {device.rounds_done} updates; refused tasks: {refused}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
