"""One federated experiment end to end: export, broker, fleet, coordinator, reports."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from attacks.intercept import CaptureStore, Eavesdropper
from coordinator.evaluate import evaluate
from coordinator.server import Coordinator, RoundClock, RoundPlan, Tamper
from coordinator.store import RoundResult, RunStore
from devices.clock import VirtualClock, assign_profiles, measure_seconds_per_example
from devices.datasets import load_dataset
from devices.fleet import DeviceSpec, Fleet, FleetSpec
from devices.partition import partition
from edge.backends import load_backend
from edge.decoy import new_key, save_key
from edge.device import TaskLimits, task_steps
from edge.manifest import ModelArtifact
from edge.mqtt import BrokerAddress, parse_broker_url
from edgeleak.broker import local_broker
from edgeleak.config import ConfigError, ExperimentConfig
from edgeleak.leak import attack_captures, fleet_truth
from edgeleak.report import SUMMARY_UNITS, software_versions


@dataclass(frozen=True)
class ExperimentResult:
    run: str
    out: Path
    summary: dict[str, Any]


@contextmanager
def broker_for(url: str | None) -> Iterator[tuple[BrokerAddress, str]]:
    """The external broker at ``url``, or a local one started for the block."""
    if url:
        yield parse_broker_url(url), "external"
    else:
        with local_broker("auto") as b:
            yield b


def fleet_spec(
    cfg: ExperimentConfig,
    run: str,
    broker: BrokerAddress,
    artifact: ModelArtifact,
    labels: np.ndarray,
    truth_dir: Path | None,
    keys: dict[str, bytes] | None = None,
) -> FleetSpec:
    """Partition the training set; give each device a runtime and (with a clock) a profile,
    round-robin over the configured mixes; with ``keys`` (decoys), each device its key."""
    shards = partition(
        labels,
        cfg.devices,
        scheme=cfg.partition,
        alpha=cfg.alpha,
        seed=cfg.seed,
        min_size=cfg.batch_size or 1,
    )
    runtimes = cfg.runtimes
    profiles = assign_profiles(cfg.devices, cfg.profile_names) if cfg.clock != "none" else None
    devices = tuple(
        DeviceSpec(
            f"d{i:04d}",
            shard,
            runtimes[i % len(runtimes)],
            seed=cfg.seed * 100_003 + i,
            profile=profiles[i] if profiles else "",
            key=keys.get(f"d{i:04d}") if keys else None,
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
    base = measure_seconds_per_example(artifact) if realtime else 0.0
    return FleetSpec(
        run,
        broker.url,
        str(artifact.folder),
        cfg.dataset,
        devices,
        cfg.workers,
        str(truth_dir) if truth_dir else None,
        realtime=realtime,
        base_seconds_per_example=base,
        limits=limits,
        decoy_pool="test" if cfg.decoys else "",
    )


def enrol(cfg: ExperimentConfig, keys_dir: Path) -> dict[str, bytes] | None:
    """With decoys: a fresh secret key per device, also written to ``keys_dir/<device>.key``
    (the stand-in for enrolment: a physical device gets its file and ``--key``)."""
    if not cfg.decoys:
        return None
    keys = {f"d{i:04d}": new_key() for i in range(cfg.devices)}
    for device, key in keys.items():
        save_key(keys_dir / f"{device}.key", key)
    return keys


def virtual_clock(
    cfg: ExperimentConfig, spec: FleetSpec, artifact: ModelArtifact
) -> RoundClock | None:
    """With ``clock=virtual``: deadlines and stragglers from the devices' profiles."""
    if cfg.clock != "virtual":
        return None
    return VirtualClock.from_names(
        {d.device_id: d.profile for d in spec.devices},
        base_seconds_per_example=measure_seconds_per_example(artifact),
        seed=cfg.seed,
    )


def tamper(cfg: ExperimentConfig, artifact: ModelArtifact, x: np.ndarray) -> Tamper | None:
    """With ``malicious=imprint``: the weights a dishonest coordinator ships instead."""
    if cfg.malicious != "imprint":
        return None
    from attacks.malicious import plant_imprint

    # The server knows the data distribution's brightness statistics (public data suffices).
    brightness = x.reshape(len(x), -1).mean(axis=1)
    mean, std = float(brightness.mean()), float(brightness.std())

    def ship(_round: int, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return plant_imprint(weights, artifact.manifest, bins=cfg.imprint_bins, mean=mean, std=std)

    return ship


def run_experiment(
    cfg: ExperimentConfig,
    out: Path,
    *,
    broker_url: str | None = None,
    progress: bool = True,
    run: str | None = None,
) -> ExperimentResult:
    """Run ``cfg`` and write run.db, summary.json and rounds.png into ``out``."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from edgeleak.report import plot_rounds
    from export import export_model

    out.mkdir(parents=True, exist_ok=True)
    run = run or time.strftime("run-%Y%m%d-%H%M%S")
    data = load_dataset(cfg.dataset)
    artifact = export_model(
        cfg.model,
        out / "model",
        input_shape=data.input_shape,
        num_classes=data.num_classes,
        seed=cfg.seed,
    )
    evaluator_backend = load_backend("onnx", artifact)

    def evaluator(w: dict[str, np.ndarray]) -> tuple[float, float]:
        return evaluate(evaluator_backend, w, data.x_test, data.y_test)

    plan = RoundPlan(
        algorithm=cfg.algorithm,
        lr=cfg.lr,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        fraction=cfg.fraction,
        deadline_s=cfg.deadline_s,
        server_lr=cfg.server_lr,
        aggregator=cfg.aggregator,
        codec=cfg.codec,
        max_examples=cfg.max_examples,
        decoys=cfg.decoys,
    )
    keys = enrol(cfg, out / "keys")
    store = RunStore(out / "run.db")
    results: list[RoundResult] = []
    t_start = time.monotonic()
    cols = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
    )
    with broker_for(broker_url) as (broker, broker_kind):
        store.add_run(
            run,
            config=cfg.to_dict(),
            broker=f"{broker_kind} {broker.url}",
            runtime=cfg.runtime,
            devices=cfg.devices,
            model=cfg.model,
            model_hash=artifact.manifest.sha256,
        )
        spec = fleet_spec(cfg, run, broker, artifact, data.y_train, out / "truth", keys)
        clock = virtual_clock(cfg, spec, artifact)
        coord = Coordinator(
            run, artifact, broker, store, plan, evaluator=evaluator, seed=cfg.seed, clock=clock,
            tamper=tamper(cfg, artifact, data.x_train), keys=keys,
        )  # fmt: skip
        capture = CaptureStore(out / "capture") if cfg.attacks else None
        spy = Eavesdropper(broker, run, capture) if capture else contextlib.nullcontext()
        with spy, coord, Fleet(spec) as fleet, Progress(*cols, disable=not progress) as bar:
            coord.wait_for_devices(cfg.devices, timeout=60 + cfg.devices * 0.1)
            job = bar.add_task(
                f"{cfg.algorithm} {cfg.devices} devices", total=cfg.rounds, status=""
            )
            restarts = 0
            for r in range(1, cfg.rounds + 1):
                if fleet.restarts != restarts:  # a worker died: let its devices come back
                    restarts = fleet.restarts
                    with contextlib.suppress(TimeoutError):
                        coord.wait_for_devices(cfg.devices, timeout=60 + cfg.devices * 0.1)
                res = coord.run_round(r)
                results.append(res)
                bar.update(
                    job,
                    advance=1,
                    status=(
                        f"acc {100 * res.accuracy:.1f}%  up {res.bytes_up / 1e6:.1f} MB  "
                        f"down {res.bytes_down / 1e6:.1f} MB  {res.accepted}/{res.selected} ok"
                    ),
                )
            coord.end()
        summary = build_summary(
            cfg,
            run,
            broker_kind,
            broker,
            results,
            store,
            seconds=time.monotonic() - t_start,
            artifact=artifact,
        )
    if capture is not None:
        rows = attack_captures(
            capture, artifact, out / "attack", attacks=cfg.attacks, budget_s=cfg.attack_budget_s,
            max_updates=cfg.attack_max, truth=fleet_truth(out / "truth", cfg.dataset), run=run,
            db=store.db, progress=progress,
        )  # fmt: skip
        summary["attack"] = [asdict(r) for r in rows]
        capture.close()
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_rounds(
        summary["rounds"],
        out / "rounds.png",
        title=f"{cfg.model} · {cfg.algorithm} · {cfg.devices} devices · {cfg.dataset}",
    )
    store.close()
    return ExperimentResult(run, out, summary)


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
) -> dict[str, Any]:
    """summary.json: the run's totals and one object per round."""
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
    )
    return {
        "run": run,
        "devices": cfg.devices,
        "runtime": cfg.runtime,
        "broker": broker_kind,
        "broker_url": broker.url,
        "model": cfg.model,
        "parameters": artifact.manifest.num_parameters,
        "dataset": cfg.dataset,
        "algorithm": cfg.algorithm,
        "clock": cfg.clock,
        "bytes_up": store.ledger_bytes(run, direction="up"),
        "bytes_down": store.ledger_bytes(run, direction="down"),
        "bytes_rejected": store.ledger_bytes(run, direction="up", kinds=("rejected",)),
        "final_accuracy": results[-1].accuracy if results else None,
        "seconds": round(seconds, 3),
        "rejections": store.rejection_counts(run),
        "config": cfg.to_dict(),
        "rounds": [{k: getattr(r, k) for k in keys} for r in results],
        "units": SUMMARY_UNITS,
        "versions": software_versions(),
    }
