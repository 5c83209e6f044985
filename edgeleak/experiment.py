"""One federated experiment end to end: export, broker, fleet, coordinator, reports."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from attacks.intercept import CaptureStore, Eavesdropper
from coordinator.evaluate import backdoor_success, evaluate, predict, top_k_accuracy
from coordinator.resume import ResumeError, ResumePoint, resume_point, save_model
from coordinator.server import Coordinator, RoundClock, RoundPlan, Tamper, new_run_id
from coordinator.store import RoundResult, RunStore
from devices.clock import VirtualClock, assign_profiles, host_speed_scale
from devices.datasets import Dataset, load_dataset
from devices.fleet import DeviceSpec, Fleet, FleetSpec
from devices.partition import partition
from devices.ray_fleet import RayFleet
from edge import protect
from edge.backends import Backend, load_backend
from edge.decoy import new_key, save_key
from edge.device import TaskLimits, task_steps
from edge.he import KEYHOLDER
from edge.manifest import ModelArtifact
from edge.mqtt import BrokerAddress, parse_broker_url, with_pki
from edge.poison import Poison, choose_malicious, replacement_boost
from edgeleak import checks
from edgeleak.broker import local_broker
from edgeleak.config import ConfigError, ExperimentConfig
from edgeleak.errors import UsageError
from edgeleak.hierarchy import GroupedFleet, aggregator_ids, groups, keyholder
from edgeleak.leak import attack_captures, decoy_leaks, fleet_truth
from edgeleak.report import SUMMARY_UNITS, software_versions

PUBLIC_IMAGES = 2000  # test-split images a dishonest coordinator calibrates on (malicious=permute)


@dataclass(frozen=True)
class ExperimentResult:
    run: str
    out: Path
    summary: dict[str, Any]


@contextmanager
def broker_for(url: str | None, pki: Path | None = None) -> Iterator[tuple[BrokerAddress, str]]:
    """The external broker at ``url``, or a local one started for the block; with ``pki``,
    secure mode (``mqtts://`` URL, or a local mosquitto with TLS and the ACL)."""
    if url:
        try:
            yield with_pki(parse_broker_url(url), str(pki) if pki else None), "external"
        except ValueError as e:
            raise UsageError(str(e)) from None
    else:
        with local_broker("mosquitto" if pki else "auto", pki=pki) as b:
            yield b


def fleet_spec(
    cfg: ExperimentConfig,
    run: str,
    broker: BrokerAddress,
    artifact: ModelArtifact,
    labels: np.ndarray,
    truth_dir: Path | None,
    keys: dict[str, bytes] | None = None,
    groups: np.ndarray | None = None,
) -> FleetSpec:
    """Partition the training set; give each device a runtime and (with a clock) a profile,
    round-robin over the configured mixes; with ``keys`` (decoys), each device its key."""
    shards = device_shards(cfg, labels, groups)
    runtimes = cfg.runtimes
    profiles = assign_profiles(cfg.devices, cfg.profile_names) if cfg.clock != "none" else None
    poisons = poison_specs(cfg)
    devices = tuple(
        DeviceSpec(
            f"d{i:04d}",
            shard,
            runtimes[i % len(runtimes)],
            seed=cfg.seed,  # Device.train draws from (seed, device id, round)
            profile=profiles[i] if profiles else "",
            key=keys.get(f"d{i:04d}") if keys else None,
            poison=poisons.get(f"d{i:04d}", ""),
        )
        for i, shard in enumerate(shards)
    )
    limits = TaskLimits(cfg.max_epochs, cfg.max_batch_size, cfg.max_steps)
    steps = task_steps(cfg.algorithm, cfg.epochs, cfg.batch_size, max(len(s) for s in shards))
    if steps > limits.max_steps:
        raise ConfigError(
            f"a round costs the largest device {steps} SGD steps, above max_steps="
            f"{limits.max_steps}: raise max_steps, or use fewer epochs or a larger batch_size"
        )
    realtime = cfg.clock == "real"
    return FleetSpec(
        run,
        broker.secret_url,
        str(artifact.folder),
        cfg.dataset,
        devices,
        cfg.workers,
        str(truth_dir) if truth_dir else None,
        realtime=realtime,
        flops_per_example=artifact.manifest.flops_per_example,
        speed_scale=speed_scale(cfg, artifact) if realtime else 1.0,
        limits=limits,
        decoy_pool="test" if cfg.decoys else "",
        verify_model=cfg.verify_model_consistency,
    )


def poison_specs(cfg: ExperimentConfig) -> dict[str, str]:
    """The malicious devices (``malicious_devices`` of the fleet, chosen from the seed) and the
    ``edge.poison`` spec each runs; boost 0 means n/η with n the devices selected per round."""
    ids = [f"d{i:04d}" for i in range(cfg.devices)]
    n = max(1, round(cfg.fraction * cfg.devices))
    boost = cfg.poison_boost or replacement_boost(n, cfg.server_lr)
    spec = Poison(cfg.poison, target=cfg.backdoor_target, boost=boost).spec()
    return {d: spec for d in choose_malicious(ids, cfg.malicious_devices, cfg.seed)}


def enrol(cfg: ExperimentConfig, keys_dir: Path) -> dict[str, bytes] | None:
    """With decoys: a fresh secret key per device, also written to ``keys_dir/<device>.key``
    (the stand-in for enrolment: a physical device gets its file and ``--key``)."""
    if not cfg.decoys:
        return None
    keys = {f"d{i:04d}": new_key() for i in range(cfg.devices)}
    for device, key in keys.items():
        save_key(keys_dir / f"{device}.key", key)
    return keys


def speed_scale(cfg: ExperimentConfig, artifact: ModelArtifact) -> float:
    """1 with ``clock_base="flops"`` (profiles as cited, any host alike); this host's measured
    speed over the profiles' reference core with ``clock_base="host"``."""
    return host_speed_scale(artifact) if cfg.clock_base == "host" else 1.0


def device_shards(
    cfg: ExperimentConfig, labels: np.ndarray, groups: np.ndarray | None = None
) -> list[np.ndarray]:
    """Each device's example indices (deterministic in the config); ``groups``: each
    example's source, for ``partition="source"``."""
    return partition(
        labels,
        cfg.devices,
        scheme=cfg.partition,
        alpha=cfg.alpha,
        seed=cfg.seed,
        min_size=cfg.batch_size or 1,
        groups=groups,
    )


def calibrate_protect(cfg: ExperimentConfig, shard_sizes: list[int]) -> ExperimentConfig:
    """With ``dp_epsilon``: the config whose DP protection has the smallest σ that keeps every
    device within (ε, δ) if it takes part in every round; ``ConfigError`` naming the fix when
    no σ up to ``SIGMA_MAX`` can."""
    steps = protect.parse(cfg.protect)
    dp = protect.dp_step(steps)
    if cfg.dp_epsilon <= 0 or dp is None:
        return cfg
    from coordinator.accounting import SIGMA_MAX, calibrate_sigma, run_epsilon

    def eps(sigma: float) -> float:
        return run_epsilon(
            dp, sigma, cfg.dp_delta, rounds=cfg.rounds, algorithm=cfg.algorithm,
            shard_sizes=shard_sizes, batch_size=cfg.batch_size, epochs=cfg.epochs,
        )  # fmt: skip

    try:
        sigma = calibrate_sigma(eps, cfg.dp_epsilon, cfg.dp_delta)
    except ValueError as e:
        raise ConfigError(
            f"{dp.name} over {cfg.rounds} rounds: {e}; ask for fewer --rounds or a larger "
            f"--dp-epsilon (ε with σ={SIGMA_MAX:g}: {eps(SIGMA_MAX):.3g})"
        ) from None
    calibrated = [dataclasses.replace(s, sigma=sigma) if s is dp else s for s in steps]
    return dataclasses.replace(cfg, protect=protect.format_spec(calibrated), dp_epsilon=0.0)


def virtual_clock(
    cfg: ExperimentConfig, spec: FleetSpec, artifact: ModelArtifact
) -> RoundClock | None:
    """With ``clock=virtual``: deadlines and stragglers from the devices' profiles and the
    model's FLOPs per example (host-independent unless ``clock_base="host"``)."""
    if cfg.clock != "virtual":
        return None
    return VirtualClock.from_names(
        {d.device_id: d.profile for d in spec.devices},
        flops_per_example=artifact.manifest.flops_per_example,
        seed=cfg.seed,
        speed_scale=speed_scale(cfg, artifact),
    )


def tamper(cfg: ExperimentConfig, artifact: ModelArtifact, data: Dataset) -> Tamper | None:
    """With ``malicious`` set: the weights a dishonest coordinator ships instead."""
    if cfg.malicious == "none":
        return None
    from attacks.malicious import plant_imprint, plant_permutation

    if cfg.malicious == "permute":
        # Calibrated on public images (the test split, which no device trains on): a unit
        # fires for about one example of a batch.
        public = data.x_test[:PUBLIC_IMAGES]
        fire = 1.0 / max(2, cfg.batch_size)

        def permute(_round: int, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return plant_permutation(
                weights, artifact.manifest, public=public, fire=fire, seed=cfg.seed
            )

        return permute
    # The server knows the data distribution's brightness statistics (public data suffices).
    x = data.x_train
    brightness = x.reshape(len(x), -1).mean(axis=1)
    mean, std = float(brightness.mean()), float(brightness.std())

    def ship(_round: int, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return plant_imprint(weights, artifact.manifest, bins=cfg.imprint_bins, mean=mean, std=std)

    return ship


def round_plan(cfg: ExperimentConfig, *, max_unproven: int = 0, quiet_s: float = 0.0) -> RoundPlan:
    """The coordinator's round plan from the config (every plan field the config also has,
    by name) and the admission policy's knobs."""
    shared = {f.name for f in dataclasses.fields(ExperimentConfig)}
    return RoundPlan(
        **{f.name: getattr(cfg, f.name) for f in dataclasses.fields(RoundPlan) if f.name in shared},
        max_unproven=max_unproven,
        unproven_quiet_s=quiet_s,
    )


@dataclass(frozen=True)
class RoundsSetup:
    """Everything ``run_rounds`` needs besides the config: where, what, and how long to wait."""

    run: str
    out: Path
    broker: BrokerAddress
    broker_kind: str  # "mosquitto", "amqtt" or "external"
    artifact: ModelArtifact
    data: Dataset
    plan: RoundPlan
    min_devices: int  # each round waits until this many devices are eligible
    wait_s: float  # ... for at most this long
    clock: RoundClock | None = None
    tamper: Tamper | None = None
    fleet_size: int | None = None  # the demo's emulated fleet; None: whoever shows up
    keys: dict[str, bytes] | None = None  # every device's secret key (decoys, ``enrol``)
    resume: ResumePoint | None = None  # continue a crashed run (``coordinator.resume``)


def run_rounds(
    cfg: ExperimentConfig,
    setup: RoundsSetup,
    store: RunStore,
    *,
    alongside: contextlib.AbstractContextManager[object] | None = None,
    restarts: Callable[[], int] = lambda: 0,
    on_round: Callable[[RoundResult], None] = lambda _r: None,
) -> dict[str, Any]:
    """The coordinator side of a run, for the demo and ``edgeleak coordinator`` alike: record the
    run, run ``cfg.rounds`` rounds with whatever devices are online (each round waits for
    ``setup.min_devices``; with an emulated fleet, the first), evaluate, end the run (also when interrupted); returns the summary.

    ``alongside`` is entered after the coordinator subscribed (the demo's fleet and
    eavesdropper); ``restarts`` counts the fleet's restarted workers: after one, the next round
    waits (up to ``setup.wait_s``) for their devices to come back."""
    data, artifact = setup.data, setup.artifact
    evaluator_backend = load_backend("onnx", artifact)

    final: list[dict[str, np.ndarray]] = []  # the last evaluated weights (text: top-k below)

    def evaluator(w: dict[str, np.ndarray]) -> tuple[float, float]:
        final[:] = [w]
        return evaluate(evaluator_backend, w, data.x_test, data.y_test)

    resume = setup.resume
    if resume is None:
        store.add_run(
            setup.run,
            config=cfg.to_dict(),
            broker=f"{setup.broker_kind} {setup.broker.url}",
            runtime=cfg.runtime,
            devices=setup.fleet_size or setup.min_devices,
            model=artifact.manifest.model,
            model_hash=artifact.manifest.sha256,
        )
    credentials = None
    if setup.broker.pki:  # secure mode: the coordinator's own identity signs its tasks
        from edge.sign import COORDINATOR, Credentials

        credentials = Credentials.load(setup.broker.pki, COORDINATOR)
    coord = Coordinator(
        setup.run, artifact, setup.broker, store, setup.plan, evaluator=evaluator, seed=cfg.seed,
        clock=setup.clock, tamper=setup.tamper, keys=setup.keys, credentials=credentials,
        weights=resume.weights if resume else None,
    )  # fmt: skip
    if resume is not None:
        coord.proven |= resume.proven
    results: list[RoundResult] = list(resume.results) if resume else []
    first = resume.round + 1 if resume else 1
    t_start = time.monotonic()
    with coord, alongside or contextlib.nullcontext():
        try:
            restarted = 0
            for r in range(first, cfg.rounds + 1):
                if restarts() != restarted:  # a fleet worker died: let its devices come back
                    restarted = restarts()
                    with contextlib.suppress(TimeoutError):
                        coord.wait_for_devices(setup.min_devices, timeout=setup.wait_s)
                try:
                    if r == first or setup.fleet_size is None:  # an emulated fleet is there already
                        coord.wait_for_devices(setup.min_devices, timeout=setup.wait_s)
                except TimeoutError as e:
                    raise UsageError(
                        f"{e}: start devices with `edgeleak device --broker "
                        f"{setup.broker.url} ...` or lower --min-devices"
                    ) from None
                res = coord.run_round(r)
                save_model(setup.out, setup.run, r, coord.weights, artifact.manifest.param_names)
                results.append(res)
                on_round(res)
        finally:
            coord.end()
    summary = build_summary(
        cfg, setup.run, setup.broker_kind, setup.broker, results, store,
        seconds=time.monotonic() - t_start, artifact=artifact,
        devices=setup.fleet_size or len(coord.proven),
    )  # fmt: skip
    if data.vocab and final:  # a keyboard model: next-word accuracy of the final model
        logits = predict(evaluator_backend, final[0], data.x_test)
        summary["next_word_accuracy"] = {
            f"top{k}": top_k_accuracy(logits, data.y_test, k) for k in (1, 3)
        }
    if not data.vocab:  # images: the backdoor's trigger rate on the final model
        summary["backdoor"] = backdoor_summary(cfg, evaluator_backend, coord.weights, data)
    return summary


def backdoor_summary(
    cfg: ExperimentConfig, backend: Backend, weights: dict[str, np.ndarray], data: Dataset
) -> dict[str, Any]:
    """The final model's backdoor success on triggered test images (``backdoor_success``; in a
    run without attackers, the rate at which the trigger alone gives the target class) and who
    poisoned."""
    rate = backdoor_success(backend, weights, data.x_test, data.y_test, target=cfg.backdoor_target)
    malicious = sorted(poison_specs(cfg)) if cfg.malicious_devices else []
    return {"target": cfg.backdoor_target, "success": rate, "poison": cfg.poison,
            "malicious": malicious}  # fmt: skip


@contextmanager
def _spy_and_fleet(
    broker: BrokerAddress,
    run: str,
    capture: CaptureStore | None,
    fleet: Fleet | GroupedFleet | RayFleet,
    he: ModelArtifact | None = None,
) -> Iterator[None]:
    """With ``he`` (the model), the run's key holder process comes first."""
    with keyholder(broker, run, he) if he else contextlib.nullcontext():
        with Eavesdropper(broker, run, capture) if capture else contextlib.nullcontext(), fleet:
            yield


def round_line(res: RoundResult) -> str:
    """One printed line per round."""
    return (
        f"round {res.round}: {res.accepted}/{res.selected} accepted, {res.rejected} rejected, "
        f"accuracy {100 * res.accuracy:.2f}%, {res.bytes_up / 1e6:.2f} MB up, "
        f"{res.bytes_down / 1e6:.2f} MB down, {res.seconds:.1f} s"
    )


def write_outputs(out: Path, summary: dict[str, Any], title: str) -> None:
    """summary.json and rounds.png of a finished run."""
    from edgeleak.report import plot_rounds

    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_rounds(summary["rounds"], out / "rounds.png", title=title)


def run_coordinator(
    cfg: ExperimentConfig,
    *,
    broker_url: str,
    model_dir: Path,
    out: Path | None = None,
    run: str | None = None,
    min_devices: int = 1,
    wait_s: float = 300.0,
    quiet_s: float = 60.0,
    say: Callable[[str], None] = print,
    pki: Path | None = None,
    resume: ResumePoint | None = None,
) -> ExperimentResult:
    """``edgeleak coordinator``: rounds for the devices on an external broker; writes run.db,
    summary.json and rounds.png into ``out`` (default ``runs/<run id>``); ``pki``: secure mode
    (an ``mqtts://`` broker, the coordinator's identity enrolled there)."""
    try:
        broker = with_pki(parse_broker_url(broker_url), str(pki) if pki else None)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if cfg.dp_epsilon > 0:
        raise UsageError(
            "--dp-epsilon calibrates σ from the fleet's shard sizes, which a coordinator of real "
            "devices does not know: give σ in the protection (e.g. dp:clip=1,sigma=0.8)"
        )
    if cfg.decoys:
        raise UsageError(
            "decoys need every device's key, which `edgeleak coordinator` does not hold (there "
            "is no enrolment service yet): run decoys with `edgeleak demo`"
        )
    run = checks.run_id(resume.run if resume else run or new_run_id("run"))
    try:
        artifact = ModelArtifact.load(model_dir)
    except (OSError, ValueError) as e:
        raise UsageError(f"--model {model_dir}: {e}") from None
    check_resume_model(resume, artifact)
    data = load_dataset(cfg.dataset)
    if artifact.manifest.input_shape != data.input_shape:
        raise UsageError(
            f"--model {model_dir} takes inputs of shape {artifact.manifest.input_shape}, "
            f"dataset {cfg.dataset} has {data.input_shape}: pass the model's --dataset"
        )
    out = out or Path("runs") / run
    out.mkdir(parents=True, exist_ok=True)
    store = RunStore(out / "run.db")
    setup = RoundsSetup(
        run, out, broker, "external", artifact, data,
        round_plan(cfg, max_unproven=min_devices, quiet_s=quiet_s), min_devices, wait_s,
        resume=resume,
    )  # fmt: skip
    say(f"run {run}: coordinator on {broker.url}, waiting for {min_devices} device(s)")
    try:
        summary = run_rounds(cfg, setup, store, on_round=lambda r: say(round_line(r)))
    except OSError as e:
        raise UsageError(f"broker {broker.url} not reachable: {e}") from None
    write_outputs(out, summary, f"{artifact.manifest.model} · {cfg.algorithm} · {run}")
    store.close()
    return ExperimentResult(run, out, summary)


def run_experiment(
    cfg: ExperimentConfig,
    out: Path,
    *,
    broker_url: str | None = None,
    progress: bool = True,
    run: str | None = None,
    pki: Path | None = None,
    resume: ResumePoint | None = None,
    artifact: ModelArtifact | None = None,
) -> ExperimentResult:
    """The demo: a broker (unless ``broker_url``), an emulated fleet and ``run_rounds``; writes
    run.db, summary.json and rounds.png into ``out``. ``pki``: secure mode, with the coordinator
    and every device enrolled there first (the CA is created if the folder has none).
    ``artifact``: ``cfg.model`` exported before for the dataset and seed (benchmarks reuse one
    export over many runs)."""
    if pki is not None:
        _check_secure(cfg)
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from export.cache import cached_export

    data = load_dataset(cfg.dataset)
    if cfg.backdoor_target >= data.num_classes:
        raise ConfigError(
            f"backdoor_target={cfg.backdoor_target}: {cfg.dataset} has {data.num_classes} classes"
        )
    asked = cfg
    shard_sizes = [len(s) for s in device_shards(cfg, data.y_train, data.groups)]
    cfg = calibrate_protect(cfg, shard_sizes)
    out.mkdir(parents=True, exist_ok=True)
    run = resume.run if resume else run or new_run_id("demo")
    if artifact is None or artifact.manifest.model != cfg.model:
        artifact = cached_export(
            cfg.model,
            out / "model",
            input_shape=data.input_shape,
            num_classes=data.num_classes,
            seed=cfg.seed,
            vocab=data.vocab,
        )
    check_resume_model(resume, artifact)
    keys = enrol(cfg, out / "keys")
    if pki is not None:
        from edgeleak.pki import ensure_fleet

        ensure_fleet(
            pki, [f"d{i:04d}" for i in range(cfg.devices)],
            keyholder=KEYHOLDER if cfg.he else None,
            groups=aggregator_ids(run, cfg.devices, cfg.aggregators) if cfg.aggregators else None,
        )  # fmt: skip
    store = RunStore(out / "run.db")
    cols = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
    )
    with broker_for(broker_url, pki) as (broker, broker_kind):
        spec = fleet_spec(
            cfg, run, broker, artifact, data.y_train, out / "truth", keys, data.groups
        )
        clients = len(groups(cfg.devices, cfg.aggregators)) if cfg.aggregators else cfg.devices
        setup = RoundsSetup(
            run, out, broker, broker_kind, artifact, data,
            round_plan(cfg, max_unproven=cfg.devices), clients, 60 + cfg.devices * 0.1,
            clock=virtual_clock(cfg, spec, artifact), tamper=tamper(cfg, artifact, data),
            fleet_size=clients, keys=keys, resume=resume,
        )  # fmt: skip
        capture = CaptureStore(out / "capture") if cfg.attacks else None
        fleet: Fleet | GroupedFleet | RayFleet = Fleet(spec)
        if cfg.engine == "ray":
            fleet = RayFleet(spec, cfg.ray_address or "local")
        if cfg.aggregators:
            fleet = GroupedFleet(spec, cfg.aggregators, artifact, broker)
        with Progress(*cols, disable=not progress) as bar:
            job = bar.add_task(
                f"{cfg.algorithm} {cfg.devices} devices",
                total=cfg.rounds,
                status="",
                completed=resume.round if resume else 0,
            )

            def advance(res: RoundResult) -> None:
                bar.update(
                    job,
                    advance=1,
                    status=(
                        f"acc {100 * res.accuracy:.1f}%  up {res.bytes_up / 1e6:.1f} MB  "
                        f"down {res.bytes_down / 1e6:.1f} MB  {res.accepted}/{res.selected} ok"
                    ),
                )

            summary = run_rounds(
                cfg, setup, store,
                alongside=_spy_and_fleet(broker, run, capture, fleet, artifact if cfg.he else None),
                restarts=lambda: fleet.restarts, on_round=advance,
            )  # fmt: skip
    if asked.dp_epsilon > 0:
        summary["dp_calibration"] = {
            "epsilon": asked.dp_epsilon, "delta": asked.dp_delta, "protect": cfg.protect,
        }  # fmt: skip
    if capture is not None:
        rows = attack_captures(
            capture, artifact, out / "attack", attacks=cfg.attacks, budget_s=cfg.attack_budget_s,
            max_updates=cfg.attack_max, run=run, db=store.db, progress=progress,
            from_round=cfg.attack_round,
            iterations=cfg.attack_iterations,
            truth=fleet_truth(out / "truth", cfg.dataset, keys_dir=out / "keys", decoys=cfg.decoys),
        )  # fmt: skip
        summary["attack"] = [asdict(r) for r in rows]
        if cfg.decoys:
            summary["decoy_leakage"] = decoy_leaks(store.db, run)
        capture.close()
    write_outputs(
        out, summary, f"{cfg.model} · {cfg.algorithm} · {cfg.devices} devices · {cfg.dataset}"
    )
    store.close()
    return ExperimentResult(run, out, summary)


def _check_secure(cfg: ExperimentConfig) -> None:
    """Secure mode refuses what needs the unauthenticated broker."""
    if cfg.attacks:
        raise UsageError(
            "--attack eavesdrops on the broker, which secure mode shuts out (TLS, client "
            "certificates, ACL): leave out --secure/--pki for the eavesdropper experiment"
        )
    if cfg.decoys:
        raise UsageError("decoys publish under pseudonyms, which secure mode's ACL refuses")


def build_summary(
    cfg: ExperimentConfig,
    run: str,
    broker_kind: str,
    broker: BrokerAddress,
    results: list[RoundResult],
    store: RunStore,
    *,
    seconds: float,
    artifact: ModelArtifact,
    devices: int,
) -> dict[str, Any]:
    """summary.json: the run's totals and one object per round; ``devices``: how many took
    part (the demo: its fleet; the coordinator service: those with an accepted update)."""
    keys = (
        "round",
        "accuracy",
        "loss",
        "train_loss",
        "bytes_up",
        "bytes_down",
        "bytes_rejected",
        "selected",
        "accepted",
        "rejected",
        "seconds",
        "virtual_seconds",
        "model_sha256",
    )
    return {
        "run": run,
        "devices": devices,
        "runtime": cfg.runtime,
        "broker": broker_kind,
        "broker_url": broker.url,
        "model": artifact.manifest.model,
        "parameters": artifact.manifest.num_parameters,
        "dataset": cfg.dataset,
        "algorithm": cfg.algorithm,
        "clock": cfg.clock,
        "flops_per_example": artifact.manifest.flops_per_example,
        "bytes_up": store.ledger_bytes(run, direction="up"),
        "bytes_down": store.ledger_bytes(run, direction="down"),
        "bytes_rejected": store.ledger_bytes(run, direction="up", kinds=("rejected",)),
        "final_accuracy": results[-1].accuracy if results else None,
        "seconds": round(seconds, 3),
        "rejections": store.rejection_counts(run),
        "protect": cfg.protect,
        "privacy": store.privacy(run),
        "config": cfg.to_dict(),
        "rounds": [{k: getattr(r, k) for k in keys} for r in results],
        "units": SUMMARY_UNITS,
        "versions": software_versions(),
    }


def load_resume(run_dir: Path, overrides: dict[str, Any]) -> tuple[ExperimentConfig, ResumePoint]:
    """``--resume RUN_DIR``: the run's stored config (``overrides``, e.g. more rounds, on top)
    and where it continues; ``UsageError`` when it cannot be resumed."""
    try:
        point = resume_point(run_dir)
        cfg = ExperimentConfig.from_dict({**point.config, **overrides})
    except (ResumeError, ConfigError) as e:
        raise UsageError(f"--resume {run_dir}: {e}") from None
    if protect.dp_step(protect.parse(cfg.protect)) is not None:
        raise UsageError(
            f"--resume {run_dir}: the run has a DP protection ({cfg.protect}) and a resumed "
            "coordinator would restart its privacy accountant; start a new run instead"
        )
    return cfg, point


def check_resume_model(resume: ResumePoint | None, artifact: ModelArtifact) -> None:
    """A resumed run must train the model it started with (manifest hash)."""
    if resume is not None and artifact.manifest.sha256 != resume.model_hash:
        raise UsageError(
            f"the model {artifact.folder} (manifest {artifact.manifest.sha256[:16]}…) is not the "
            f"one run {resume.run} started with ({resume.model_hash[:16]}…)"
        )
