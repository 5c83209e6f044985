"""The ``edgeleak`` command line. Imports stay inside the subcommands: ``edgeleak device`` runs
with the base install (no torch, no rich). Every subcommand checks its inputs before heavy work;
bad input is one line on stderr and exit code 2, Ctrl-C one line and exit code 130."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

from coordinator.store import rounds_recorded
from edge.args import OneLineParser
from edgeleak import checks
from edgeleak.errors import UsageError
from export.names import MODELS as MODEL_NAMES

INTERRUPTED = 130  # the shell's code for a process ended by SIGINT


class Interrupted(Exception):
    """Ctrl-C, with a one-line account of what was completed."""


def _demo(args: argparse.Namespace) -> int:
    from edgeleak.config import ExperimentConfig

    base = ExperimentConfig.from_file(args.config).to_dict() if args.config else {}
    given = {}
    for f in dataclasses.fields(ExperimentConfig):
        if getattr(args, f.name) is not None:
            given[f.name] = getattr(args, f.name)
    if isinstance(given.get("protect"), list):  # --protect is repeatable
        given["protect"] = ";".join(given["protect"])
    point = None
    if args.resume:
        from edgeleak.experiment import load_resume

        if args.config or args.out:
            raise UsageError("--resume RUN_DIR continues in RUN_DIR with its stored config: "
                             "leave --config and --out out")  # fmt: skip
        cfg, point = load_resume(Path(args.resume), given)
    else:
        cfg = ExperimentConfig.from_dict({**base, **given})
    if args.broker:
        checks.broker(args.broker, or_else=" or leave --broker out to start one here")
    from coordinator.server import new_run_id

    run = point.run if point else new_run_id("demo")
    out = Path(args.resume or args.out or Path("runs") / run)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; expected a folder")
    created = not out.exists()
    # Secure mode: the fleet is enrolled in --pki (default: a new CA in the run folder).
    pki = Path(args.pki) if args.pki else out / "pki" if args.secure else None
    if pki is not None and args.broker and not args.broker.startswith("mqtts://"):
        raise UsageError(f"--broker {args.broker}: secure mode needs mqtts://HOST:PORT")

    from edgeleak.experiment import run_experiment
    from edgeleak.report import print_leak_table

    try:
        res = run_experiment(cfg, out, broker_url=args.broker, run=run, pki=pki, resume=point)
    except BaseException as e:
        done = rounds_recorded(out / "run.db")
        if created and done == 0:
            shutil.rmtree(out, ignore_errors=True)  # nothing worth keeping: leave no half-run
        if isinstance(e, KeyboardInterrupt):
            kept = f"partial results in {out}" if out.exists() else "nothing kept"
            raise Interrupted(f"{done} of {cfg.rounds} rounds completed; {kept}") from None
        raise
    s = res.summary
    if s.get("attack"):
        print_leak_table(s["attack"])
    for leak in s.get("decoy_leakage", []):
        best, mean = _db(leak["best_psnr_real"]), _db(leak["baseline_psnr"])
        print(
            f"decoys, {leak['attack']}: {100 * leak['real_fraction']:.0f}% of the reconstructions "
            f"are real ({leak['real_updates']}/{leak['updates']} updates); best PSNR on the "
            f"{leak['targets']} real images {best} (mean image {mean})"
        )
    print(
        f"run {res.run}: accuracy {100 * s['final_accuracy']:.2f}% after {cfg.rounds} rounds, "
        f"{s['bytes_up'] / 1e6:.2f} MB up, {s['bytes_down'] / 1e6:.2f} MB down, "
        f"{s['seconds']:.1f} s, broker {s['broker']}"
    )
    if s.get("next_word_accuracy"):  # a keyboard model
        top = s["next_word_accuracy"]
        print(f"next word: top-1 {100 * top['top1']:.2f}%, top-3 {100 * top['top3']:.2f}%")
    if s["privacy"]:
        eps = [p["epsilon"] for p in s["privacy"].values()]
        first = next(iter(s["privacy"].values()))
        print(
            f"privacy ({s['protect']}): ε per device {min(eps):.3g}..{max(eps):.3g} at "
            f"δ={first['delta']:g} over the rounds each took part in (RDP, dp-accounting)"
        )
    from edgeleak.html import write_report

    report = write_report(out)
    print(f"wrote {out}/run.db, {out}/summary.json, {out}/rounds.png, {report}")
    return 0


def _db(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} dB"


def _device_epilog() -> str:
    from devices.profiles import PROFILES

    return (
        "actions:\n"
        "  edgeleak device bundle --model M --out B ...   build a self-contained bundle "
        "(edge/, model, data, start.sh); see `edgeleak device bundle --help`\n"
        "  edgeleak device deploy ssh://user@host/path --bundle B ...   copy a bundle over SSH "
        "and start it there; see `edgeleak device deploy --help`\n"
        f"profiles: {', '.join(PROFILES)}"
    )


def _broker(args: argparse.Namespace) -> int:
    from edgeleak.broker import serve_broker

    if not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port}: expected 1..65535")
    if args.secure != bool(args.pki):
        raise UsageError("--secure needs --pki DIR (`edgeleak pki init DIR`), and --pki --secure")
    if args.persist and not args.data:
        raise UsageError("--persist saves into --data: give --data FOLDER (kept after a crash)")
    bridge = ""
    if bool(args.bridge_to) != bool(args.site):
        raise UsageError("a site broker needs both --bridge-to HOST:PORT and --site NAME")
    if args.bridge_to:
        from edgeleak.broker import bridge_conf

        bridge = bridge_conf(args.site, args.bridge_to)
    return serve_broker(
        bridge=bridge,
        port=args.port,
        bind=args.bind,
        data=Path(args.data) if args.data else None,
        password_file=Path(args.password_file) if args.password_file else None,
        pki=Path(args.pki) if args.pki else None,
        persist=args.persist,
    )


def _pki(args: argparse.Namespace) -> int:
    from edgeleak import pki

    folder = Path(args.dir)
    if args.action == "init":
        pki.init(folder, hosts=args.host or ())
        print(f"CA and broker certificate in {folder}; enrol with `edgeleak pki enroll {folder} "
              "--device ID` (and --device coordinator --role coordinator)")  # fmt: skip
    elif args.action == "enroll":
        if args.group and args.role != "aggregator":
            raise UsageError(f"--group is for --role aggregator, not {args.role}")
        for g in args.group or ():  # before anything is written
            pki.check_group_run(g)
        if not args.group or pki.role(folder, args.device) is None:
            path = pki.enroll(folder, args.device, args.role)
            print(f"enrolled {args.device} ({args.role}): {path} and its .key")
        for g in args.group or ():
            pki.serve_group(folder, args.device, g)
            print(f"{args.device} serves group run {g}; restart the broker so that its ACL says so")
    else:
        path = pki.revoke(folder, args.device)
        print(f"revoked {args.device}: {path} updated; restart the broker so that it reads it")
    return 0


def _coordinator(args: argparse.Namespace) -> int:
    from edgeleak.config import ExperimentConfig
    from edgeleak.experiment import run_coordinator

    base = ExperimentConfig.from_file(args.config).to_dict() if args.config else {}
    given = {k: getattr(args, k) for k in ("rounds", "dataset") if getattr(args, k) is not None}
    point = None
    if args.resume:
        from edgeleak.experiment import load_resume

        if args.config or args.out or args.run:
            raise UsageError("--resume RUN_DIR continues run and folder with the stored config: "
                             "leave --config, --out and --run out")  # fmt: skip
        cfg, point = load_resume(Path(args.resume), given)
    else:
        cfg = ExperimentConfig.from_dict({**base, **given})
    if args.run is not None:
        checks.run_id(args.run)
    checks.model(args.model)
    checks.broker(args.broker)
    if args.min_devices < 1:
        raise UsageError(f"--min-devices {args.min_devices}: expected an integer >= 1")
    for flag, value in (("--wait-s", args.wait_s), ("--unproven-wait-s", args.unproven_wait_s)):
        if not value > 0:
            raise UsageError(f"{flag} {value}: expected a number of seconds > 0")
    res = run_coordinator(
        cfg, broker_url=args.broker, model_dir=Path(args.model),
        out=Path(args.resume or args.out) if args.resume or args.out else None, run=args.run,
        min_devices=args.min_devices, wait_s=args.wait_s, quiet_s=args.unproven_wait_s,
        resume=point, pki=Path(args.pki) if args.pki else None,
    )  # fmt: skip
    s = res.summary
    print(
        f"run {res.run}: accuracy {100 * (s['final_accuracy'] or 0):.2f}% after "
        f"{len(s['rounds'])} rounds with {s['devices']} devices; wrote {res.out}/run.db, "
        f"{res.out}/summary.json, {res.out}/rounds.png"
    )
    return 0


def _device(rest: list[str]) -> int:
    """``device bundle|deploy|calibrate ...``, else run one device (``python -m edge``)."""
    if rest and rest[0] in ("bundle", "deploy"):
        sub = _device_tools_parser().parse_args(rest)
        return int(sub.func(sub))
    from devices.profiles import PROFILES
    from edge.__main__ import main as run_device

    return run_device(rest, prog="edgeleak device", epilog=_device_epilog(), profiles=PROFILES)


def _bundle(args: argparse.Namespace) -> int:
    from devices.deploy import build_bundle

    checks.empty_or_new(args.out, "--out")
    artifact = checks.model(args.model)
    if args.data:
        checks.shard(args.data, artifact)
    if args.broker:
        checks.broker_url(args.broker)
    if args.wheels:
        checks.folder(args.wheels, "--wheels")
    try:
        out = build_bundle(
            args.out, model_dir=args.model, runtime=args.runtime, profile=args.profile,
            data=args.data, broker=args.broker, run=args.run, device_id=args.id, seed=args.seed,
            wheels=args.wheels, pki=args.pki,
        )  # fmt: skip
    except FileNotFoundError as e:  # the model has no artifact for this runtime
        raise UsageError(str(e)) from None
    except ValueError as e:  # --pki without the device's credentials
        raise UsageError(str(e)) from None
    print(f"bundle in {out}: run ./start.sh on the device, or `edgeleak device deploy`")
    return 0


def _deploy(args: argparse.Namespace) -> int:
    from devices.deploy import deploy_ssh

    if not (Path(args.bundle) / "start.sh").is_file():
        raise UsageError(
            f"--bundle {args.bundle}: no start.sh there; build one with `edgeleak device bundle`"
        )
    if args.identity:
        checks.file(args.identity, "--identity")
    if args.broker:
        checks.broker_url(args.broker)
    checks.ssh_target(args.target)
    extra = [a for k in ("broker", "run", "id") if (v := getattr(args, k)) for a in (f"--{k}", v)]
    try:
        dep = deploy_ssh(
            args.bundle, args.target, identity=args.identity, args=extra,
            ssh_options=tuple(args.ssh_option or ()),
        )  # fmt: skip
    except RuntimeError as e:  # ssh refused (key, host key, remote shell): its own message
        raise UsageError(str(e)) from None
    print(f"started on {args.target} (pid {dep.pid}); log: device.log in the bundle folder")
    return 0


def _device_tools_parser() -> argparse.ArgumentParser:
    from devices.profiles import PROFILES
    from edge.backends import RUNTIMES

    p = OneLineParser(prog="edgeleak device")
    sub = p.add_subparsers(dest="action", required=True)
    b = sub.add_parser(
        "bundle", help="build a self-contained device bundle (edge + model + data)",
        description="Build a device bundle: edge/, the model, a data shard, config.json and "
        "start.sh, ready to copy to a Raspberry Pi or a phone.",
    )  # fmt: skip
    b.add_argument("--out", required=True, help="new (or empty) folder for the bundle")
    b.add_argument("--model", required=True, help="model folder written by `edgeleak export`")
    b.add_argument(
        "--runtime", default="onnx", choices=RUNTIMES, help=f"one of {', '.join(RUNTIMES)}"
    )
    b.add_argument(
        "--profile", default="", choices=("", *PROFILES),
        help=f"device profile it announces: one of {', '.join(PROFILES)}",
    )  # fmt: skip
    b.add_argument("--data", help=".npz shard to ship with the bundle (`edgeleak shards`)")
    b.add_argument("--broker", help="mqtt://HOST:PORT written into the bundle's config")
    b.add_argument("--run", help="run id written into the bundle's config")
    b.add_argument("--id", help="device id written into the bundle's config")
    b.add_argument("--seed", type=int, default=0, help="device seed (default 0)")
    b.add_argument("--wheels", help="folder of wheels for an offline install on the device")
    b.add_argument(
        "--pki", help="PKI folder where --id is enrolled: the bundle carries its certificate, "
        "key, the CA and the coordinator's certificate (secure mode, mqtts:// broker)",
    )  # fmt: skip
    b.set_defaults(func=_bundle)
    d = sub.add_parser(
        "deploy", help="copy a bundle over SSH and start the device there",
        description="Copy a bundle to ssh://user@host[:port]/path and start its device there "
        "in the background (log: device.log in the remote folder).",
    )  # fmt: skip
    d.add_argument("target", help="ssh://user@host[:port]/path")
    d.add_argument("--bundle", required=True, help="bundle folder (`edgeleak device bundle`)")
    d.add_argument("--identity", help="SSH private key")
    d.add_argument("--ssh-option", action="append", help="extra ssh -o option (repeatable)")
    d.add_argument("--broker", help="mqtt://HOST:PORT the device connects to (overrides)")
    d.add_argument("--run", help="run id (overrides the bundle's)")
    d.add_argument("--id", help="device id (overrides the bundle's)")
    d.set_defaults(func=_deploy)
    return p


def _attack(args: argparse.Namespace) -> int:
    """Capture a run's traffic live (--broker/--run), then attack what was captured."""
    from attacks.registry import ATTACK_NAMES

    names = checks.names(args.attack, ATTACK_NAMES, "attack")
    if not names and not args.broker:
        raise UsageError(
            f"nothing to do: give --attack (one or more of {', '.join(ATTACK_NAMES)}) "
            "and/or --broker with --run to capture"
        )
    if args.broker:
        if not args.run:
            raise UsageError("--broker needs --run (the run id to listen to)")
        broker = checks.broker(args.broker)
        if broker.tls:
            raise UsageError(
                f"--broker {args.broker}: a secure broker admits no eavesdropper (TLS, client "
                "certificates, ACL); capture from an unauthenticated mqtt:// broker"
            )
    elif not (Path(args.capture) / "capture.db").is_file():
        raise UsageError(
            f"--capture {args.capture}: no capture.db there; capture first with --broker and --run"
        )
    artifact = checks.model(args.model)
    if args.truth:
        checks.folder(args.truth, "--truth")

    from attacks.intercept import CaptureStore, Eavesdropper
    from edgeleak.leak import attack_captures, fleet_truth
    from edgeleak.report import print_leak_table

    capture = CaptureStore(args.capture)
    if args.broker:
        spy = Eavesdropper(broker, args.run, capture)
        try:
            with spy:
                print(f"listening to edgeleak/{args.run}/# on {args.broker} (until the run ends)")
                spy.ended.wait(args.seconds)
        except KeyboardInterrupt:
            raise Interrupted(f"captured {spy.captured} messages into {args.capture}") from None
        print(f"captured {spy.captured} messages into {args.capture}")
    if not names:
        return 0
    truth = fleet_truth(args.truth, args.dataset) if args.truth else None
    out = Path(args.out or Path(args.capture) / "attack")
    try:
        rows = attack_captures(
            capture, artifact, out, attacks=names, budget_s=args.budget_s,
            max_updates=args.max_updates, truth=truth, run=args.run, db=capture.db,
        )  # fmt: skip
    except KeyboardInterrupt:
        raise Interrupted(f"attacks stopped; reconstructions so far in {out}") from None
    if not rows:
        print(f"no intercepted update in {args.capture} fits {', '.join(names)}")
        return 0
    print_leak_table([dataclasses.asdict(r) for r in rows])
    if hit := sum(r.budget_hit for r in rows):
        print(f"{hit} attack(s) hit the --budget-s cap and stopped before their last iteration")
    print(f"wrote reconstructions to {out} and the leakage table to {args.capture}/capture.db")
    return 0


def _input_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected CxHxW, e.g. 1x28x28 or 3x32x32")
    return shape


def _export(args: argparse.Namespace) -> int:
    if args.format is not None or Path(args.what).is_dir():
        return _export_results(args)
    from export import TARGETS

    if args.what not in MODEL_NAMES:
        raise UsageError(
            f"{args.what!r}: expected a zoo model ({', '.join(MODEL_NAMES)}) or a sweep folder"
        )
    if args.out is None:
        raise UsageError("--out: the folder for the model's artifacts is required")
    targets = checks.names(args.targets, TARGETS, "export target")
    if not targets:
        raise UsageError(f"--targets: expected some of {', '.join(TARGETS)}")
    out = Path(args.out)
    created = not out.exists()
    from export import export_model

    try:
        art = export_model(
            args.what, out, input_shape=args.input_shape, seed=args.seed, targets=targets
        )
    except BaseException as e:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        if isinstance(e, ImportError):  # executorch not installed
            raise UsageError(f"{e}; pip install -e '.[executorch]'") from None
        raise
    m = art.manifest
    files = ", ".join(m.artifacts.values())
    print(f"exported {m.model} ({m.num_parameters} parameters) to {args.out}: {files}")
    return 0


def _export_results(args: argparse.Namespace) -> int:
    from edgeleak import results

    fmt = args.format or "csv"
    out = Path(args.out) if args.out else Path(args.what) / "export"
    files = results.export(args.what, fmt, out)
    print(f"wrote {', '.join(str(f) for f in files)}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from edgeleak import sweep as sw

    if args.preset is not None and args.file is not None:
        raise UsageError("give a sweep FILE or --preset, not both")
    if args.preset is not None:
        from edgeleak.claims import preset

        spec = preset(args.preset)
    elif args.file is not None:
        spec = sw.load(args.file)
    else:
        raise UsageError("expected a sweep FILE.toml (or --preset claims)")
    out = Path(args.out or Path("sweeps") / spec.name)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; expected a folder")
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    runner = sw.SweepRunner(spec, out, jobs=args.jobs)
    left = runner.pending()
    done_before = runner.store.counts()["done"]
    print(
        f"sweep {spec.name}: {len(spec.points)} points, {done_before} already done, "
        f"{len(left)} to run, {args.jobs} at a time; store {out / 'sweep.db'}"
    )
    cols = (
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    )  # fmt: skip
    with Progress(*cols) as bar:
        overall = bar.add_task("[bold]points", total=len(spec.points), completed=done_before)
        current: dict[str, Any] = {}

        def event(kind: str, p: sw.Point, detail: str) -> None:
            name = f"  {p.label} (seed {p.seed})"
            if kind == "start":
                current[p.id] = bar.add_task(f"{name} {detail}", total=None)
                return
            bar.remove_task(current.pop(p.id))
            if kind in ("done", "failed"):
                bar.advance(overall)
            if kind != "done":
                bar.console.print(f"{kind}: {p.label} (seed {p.seed}): {detail}")

        try:
            rep = runner.run(event)
        except KeyboardInterrupt:
            c = runner.store.counts()
            raise Interrupted(
                f"{c['done']} of {len(spec.points)} points done; rerun the same command to resume"
            ) from None
        finally:
            runner.store.close()
    if args.preset is not None:
        from edgeleak.claims import evaluate

        claims = evaluate(out, args.preset)
        if args.json:
            Path(args.json).write_text(json.dumps({"claims": claims}, indent=1))
    from edgeleak.html import write_report

    report = write_report(out)
    print(
        f"sweep {spec.name}: {rep.done} done ({rep.skipped} before this run), {rep.failed} "
        f"failed; wrote {report}"
    )
    return 1 if rep.failed else 0


def _report(args: argparse.Namespace) -> int:
    from edgeleak.html import write_report

    dest = write_report(Path(args.target), Path(args.o) if args.o else None)
    print(f"wrote {dest}")
    return 0


def _shards(args: argparse.Namespace) -> int:
    from devices.datasets import load_dataset
    from devices.partition import partition
    from edge.data import save_shard

    out = checks.empty_or_new(args.out, "--out")
    try:
        data = load_dataset(args.dataset)
    except RuntimeError as e:  # the dataset is not installed
        raise UsageError(str(e)) from None
    if args.devices > len(data.y_train):
        raise UsageError(
            f"--devices {args.devices}: {data.name} has only {len(data.y_train)} training examples"
        )
    try:
        parts = partition(
            data.y_train, args.devices, scheme=args.partition, alpha=args.alpha, seed=args.seed,
            groups=data.groups,
        )  # fmt: skip
    except (ValueError, RuntimeError) as e:
        raise UsageError(str(e)) from None
    out.mkdir(parents=True, exist_ok=True)
    for i, idx in enumerate(parts):
        save_shard(out / f"shard-{i:04d}.npz", data.x_train[idx], data.y_train[idx])
    print(f"wrote {len(parts)} shards of {data.name} to {out}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from edgeleak.report import show_run

    path = Path(args.run_dir)
    db = path if path.is_file() else path / "run.db"
    if not db.is_file():
        raise UsageError(f"{args.run_dir}: no run.db there; expected a run folder of `demo`")
    show_run(db, run=args.run)
    return 0


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ExperimentConfig field (``batch_size`` -> ``--batch-size``), default unset;
    the help names the default and, for registry fields, the allowed values."""
    from edgeleak.config import CHOICES, FIELD_HELP, ExperimentConfig

    defaults = ExperimentConfig()
    for f in dataclasses.fields(ExperimentConfig):
        value = getattr(defaults, f.name)
        if f.name == "protect":
            parser.add_argument(
                "--protect", dest="protect", action="append",
                help=f"repeatable; {FIELD_HELP['protect']}",
            )  # fmt: skip
            continue
        if f.type == "bool":
            flag = "--" + f.name.replace("_", "-")
            parser.add_argument(flag, action="store_const", const=True, help=FIELD_HELP[f.name])
            continue
        allowed = f"; one of {', '.join(CHOICES[f.name])}" if f.name in CHOICES else ""
        parser.add_argument(
            f"--{f.name.replace('_', '-')}", dest=f.name, type=type(value),
            metavar=f.name.upper(),
            help=f"{FIELD_HELP[f.name]} (default {value!r}{allowed})",
        )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    from devices.datasets import DATASETS
    from devices.partition import SCHEMES
    from edgeleak.sweep import default_jobs
    from export.names import MODELS, TARGETS

    p = OneLineParser(prog="edgeleak", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="run a federated experiment on a local (or --broker) broker")
    d.add_argument("--config", help="JSON file of ExperimentConfig fields (flags override it)")
    d.add_argument("--out", help="output folder (default runs/demo-<time>)")
    d.add_argument("--broker", help="external broker mqtt://HOST:PORT (default: start one here)")
    d.add_argument(
        "--secure", action="store_true",
        help="secure mode: TLS broker with client certificates and ACL, signed tasks and updates; "
        "the fleet is enrolled in --pki (default OUT/pki)",
    )  # fmt: skip
    d.add_argument("--pki", help="PKI folder (created if absent) for secure mode (mqtts:// broker)")
    d.add_argument(
        "--resume", metavar="RUN_DIR",
        help="continue a crashed demo from its last completed round (stored config and model)",
    )  # fmt: skip
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
    b.add_argument(
        "--secure", action="store_true",
        help="TLS with client certificates of --pki (identity = certificate CN) and the ACL",
    )  # fmt: skip
    b.add_argument("--pki", help="PKI folder (`edgeleak pki init`) for --secure")
    b.add_argument(
        "--persist", action="store_true",
        help="save sessions and queued messages to --data on every change: they survive a "
        "broker crash (README: Reliability)",
    )  # fmt: skip
    b.add_argument(
        "--bridge-to", metavar="HOST:PORT",
        help="run as a site broker: bridge device traffic to the coordinator's broker there "
        "(README: Beyond one machine)",
    )  # fmt: skip
    b.add_argument("--site", help="the site's name (with --bridge-to)")
    b.set_defaults(func=_broker)

    k = sub.add_parser("pki", help="secure mode: a CA, enrolment of identities, revocation")
    ksub = k.add_subparsers(dest="action", required=True)
    ki = ksub.add_parser("init", help="create a CA, an empty CRL and the broker's certificate")
    ki.add_argument("dir", metavar="DIR", help="new (or empty) folder")
    ki.add_argument(
        "--host", action="append",
        help="name or address devices reach the broker at (repeatable; 127.0.0.1 and "
        "localhost are always in)",
    )  # fmt: skip
    for name, what in (("enroll", "issue a key and certificate"), ("revoke", "revoke (CRL)")):
        ke = ksub.add_parser(name, help=f"{what} for an identity")
        ke.add_argument("dir", metavar="DIR", help="the PKI folder (`edgeleak pki init`)")
        ke.add_argument("--device", required=True, help="the identity: a device id, or coordinator")
        if name == "enroll":
            ke.add_argument(
                "--role", default="device", choices=("device", "coordinator", "aggregator", "keyholder"),
                help="device (default), coordinator, aggregator or keyholder",
            )  # fmt: skip
            ke.add_argument(
                "--group", action="append", metavar="RUN.GROUP",
                help="an aggregator: a group run it serves (repeatable; also for one enrolled "
                "before); the broker's ACL lets it task and read that group's devices",
            )  # fmt: skip
    k.set_defaults(func=_pki)

    c = sub.add_parser(
        "coordinator",
        help="run rounds for the devices online on a broker (they join with `edgeleak device`)",
    )
    c.add_argument(
        "--broker", required=True,
        help="mqtt://[USER:PASSWORD@]HOST:PORT, or mqtts://HOST:PORT with --pki",
    )  # fmt: skip
    c.add_argument("--pki", help="PKI folder with the coordinator's identity (mqtts:// broker)")
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
    c.add_argument(
        "--resume", metavar="RUN_DIR",
        help="continue a crashed run from its last completed round (stored config and model)",
    )  # fmt: skip
    c.set_defaults(func=_coordinator)

    v = sub.add_parser(
        "device", add_help=False,
        help="run one device (see `edgeleak device --help`), or `device bundle ...` / "
        "`device deploy ...` / `device calibrate --model DIR`",
    )  # fmt: skip
    v.add_argument("rest", nargs=argparse.REMAINDER)  # dispatched in main(): see _device

    from attacks.registry import ATTACK_NAMES

    a = sub.add_parser("attack", help="intercept a run's updates and invert them")
    a.add_argument("--capture", required=True, help="capture folder (written live, read offline)")
    a.add_argument("--model", required=True, help="the run's model folder (public artifacts)")
    a.add_argument("--broker", help="capture live from mqtt://HOST:PORT (needs --run)")
    a.add_argument("--run", help="run id to listen to / to attack")
    a.add_argument(
        "--seconds", type=checks.number(float, 0, strict=True), default=None,
        help="stop listening after S seconds (default: when the run ends)",
    )  # fmt: skip
    a.add_argument(
        "--attack", default="",
        help=f"comma-separated attacks, some of {', '.join(ATTACK_NAMES)}",
    )  # fmt: skip
    a.add_argument(
        "--budget-s", type=checks.number(float, 0, strict=True), default=30.0,
        help="cap in seconds per attack and update; schedules run on iterations (default 30)",
    )  # fmt: skip
    a.add_argument(
        "--max-updates", type=checks.number(int, 1), default=4,
        help="intercepted updates to attack (default 4)",
    )  # fmt: skip
    a.add_argument("--truth", help="the fleet's truth folder, to score reconstructions")
    a.add_argument(
        "--dataset", default="fashion-mnist", choices=DATASETS,
        help=f"the dataset the fleet trained on: one of {', '.join(DATASETS)}",
    )  # fmt: skip
    a.add_argument("--out", help="where reconstructions go (default CAPTURE/attack)")
    a.set_defaults(func=_attack)

    e = sub.add_parser(
        "export", help="export a zoo model for devices, or a sweep's tables (--format csv|parquet)"
    )
    e.add_argument(
        "what", metavar="MODEL|SWEEP",
        help=f"zoo model ({', '.join(MODELS)}), or a sweep's output folder",
    )  # fmt: skip
    e.add_argument("--out", help="model: folder for the artifacts; sweep: folder for the tables")
    e.add_argument(
        "--format", choices=("csv", "parquet"), help="sweep tables: csv (default) or parquet"
    )
    e.add_argument(
        "--input-shape", type=_input_shape, help="CxHxW, e.g. 1x28x28 (default: the model's)"
    )
    e.add_argument(
        "--targets", default="onnx", help=f"comma-separated, some of {', '.join(TARGETS)}"
    )
    e.add_argument("--seed", type=int, default=0, help="seed of the initial weights (default 0)")
    e.set_defaults(func=_export)

    sw = sub.add_parser(
        "sweep", help="run a grid of experiments over seeds (resumable); writes sweep.db + report"
    )
    sw.add_argument("file", nargs="?", metavar="FILE.toml", help="the sweep file (see README)")
    sw.add_argument("--preset", choices=("claims",), help="a built-in sweep instead of a file")
    sw.add_argument("--out", help="output folder (default sweeps/<name>); rerun to resume")
    sw.add_argument(
        "--jobs", type=checks.number(int, 1), default=default_jobs(),
        help=f"points run at once (default {default_jobs()}: one per two cores)",
    )  # fmt: skip
    sw.add_argument("--json", help="--preset claims: write the claims table here as JSON")
    sw.set_defaults(func=_sweep)

    r = sub.add_parser("report", help="write a run's or a sweep's self-contained HTML report")
    r.add_argument("target", metavar="RUN_OR_SWEEP", help="a run's or a sweep's output folder")
    r.add_argument("-o", metavar="FILE", help="output file (default <folder>/report.html)")
    r.set_defaults(func=_report)

    s = sub.add_parser("shards", help="write per-device data shards (.npz) for physical devices")
    s.add_argument(
        "--dataset", default="fashion-mnist", choices=DATASETS,
        help=f"one of {', '.join(DATASETS)}",
    )  # fmt: skip
    s.add_argument(
        "--devices", type=checks.number(int, 1), required=True, help="number of shards (>= 1)"
    )
    s.add_argument(
        "--partition", default="iid", choices=SCHEMES, help=f"one of {', '.join(SCHEMES)}"
    )
    s.add_argument(
        "--alpha", type=checks.number(float, 0, strict=True), default=0.5,
        help="Dirichlet concentration (> 0; partition dirichlet)",
    )  # fmt: skip
    s.add_argument("--seed", type=int, default=0, help="seed of the partition (default 0)")
    s.add_argument("--out", required=True, help="new (or empty) folder for shard-NNNN.npz")
    s.set_defaults(func=_shards)

    w = sub.add_parser("show", help="print a run's summary from its run.db")
    w.add_argument("run_dir", metavar="RUN_DIR", help="a demo's output folder (or its run.db)")
    w.add_argument("--run", help="run id, when the store holds several (default: the latest)")
    w.set_defaults(func=_show)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from edge.codec import keep_message_buffers

    keep_message_buffers()
    if argv[:1] == ["device"]:
        # The device's own flags belong to `python -m edge`; argparse cannot pass them through.
        logging.basicConfig(level=logging.WARNING)
        try:
            return _device(argv[1:])
        except UsageError as e:
            print(f"edgeleak device: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("edgeleak device: interrupted", file=sys.stderr)
            return INTERRUPTED
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
    except Interrupted as e:
        print(f"edgeleak {args.command}: interrupted: {e}", file=sys.stderr)
        return INTERRUPTED
    except KeyboardInterrupt:
        print(f"edgeleak {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
