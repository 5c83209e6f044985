"""Back-door defences, measured: attack × defence, each a full emulated run over a real broker.

Every run is what ``edgeleak demo`` runs (``run_rounds``: mosquitto, the fleet, the coordinator;
the model exported once for all runs) with
``malicious_devices`` of the fleet poisoning (``edge.poison``) and the coordinator's aggregator
set to the defence (``coordinator.robust``); one run without attackers (aggregator ``mean``)
gives the clean accuracy to compare with. Per row:

- ``backdoor_success``: the final model's rate of classifying triggered test images of the other
  classes as the target class (``coordinator.evaluate.backdoor_success``); for flip/scale/signflip
  (no trigger) the same rate is reported, and clean accuracy is what they attack;
- ``clean_accuracy``: the final model's test accuracy; ``clean_accuracy_no_attack``: the
  no-attack run's; ``excluded``: updates of malicious / honest devices the defence left out
  (from the run store's ``anomaly`` table), ``score_malicious`` / ``score_honest``: their mean
  anomaly score.

    python bench/backdoor.py --json backdoor.json [--attacks backdoor,replace]
        [--defences 'mean;flame;norm_bound;multikrum:f=1'] [--devices 10] [--rounds 8] [--dataset mnist-digits]
"""
# ruff: noqa: E402

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder comes first on sys.path and this file would shadow the package.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import argparse
import json
import sqlite3
import tempfile
import time
from typing import Any

from coordinator.server import new_run_id
from coordinator.store import RunStore
from devices.datasets import Dataset, load_dataset
from devices.fleet import Fleet
from edge.manifest import ModelArtifact
from edgeleak.broker import local_broker
from edgeleak.config import ExperimentConfig
from edgeleak.experiment import RoundsSetup, fleet_spec, round_plan, run_rounds
from export import export_model


def _exclusions(db: Path, malicious: list[str]) -> dict[str, float | None]:
    """Excluded updates and mean anomaly scores, malicious vs honest, over the whole run."""
    con = sqlite3.connect(db)
    try:
        rows = con.execute("SELECT device, kept, score FROM anomaly").fetchall()
    finally:
        con.close()
    bad = [(k, s) for d, k, s in rows if d in malicious]
    good = [(k, s) for d, k, s in rows if d not in malicious]

    def mean(v: list[float]) -> float | None:
        return sum(v) / len(v) if v else None  # None: no such updates (JSON null)

    return {
        "excluded_malicious": sum(1 for k, _ in bad if not k),
        "updates_malicious": len(bad),
        "excluded_honest": sum(1 for k, _ in good if not k),
        "updates_honest": len(good),
        "score_malicious": mean([s for _, s in bad]),
        "score_honest": mean([s for _, s in good]),
    }


def _run(
    cfg: ExperimentConfig, artifact: ModelArtifact, data: Dataset, out: Path
) -> dict[str, Any]:
    """One demo run (``run_rounds`` with an emulated fleet on a fresh local broker) on the
    already exported ``artifact``."""
    t0 = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    run = new_run_id("backdoor")
    store = RunStore(out / "run.db")
    with local_broker("auto") as (broker, kind):
        spec = fleet_spec(cfg, run, broker, artifact, data.y_train, None)
        setup = RoundsSetup(
            run, out, broker, kind, artifact, data, round_plan(cfg, max_unproven=cfg.devices),
            cfg.devices, 600.0, fleet_size=cfg.devices,  # a safety net on a busy host
        )  # fmt: skip
        summary = run_rounds(cfg, setup, store, alongside=Fleet(spec))
    store.close()
    bd = summary["backdoor"]
    return {
        "backdoor_success": bd["success"],
        "clean_accuracy": summary["final_accuracy"],
        "malicious": bd["malicious"],
        "seconds": round(time.monotonic() - t0, 1),
        **_exclusions(out / "run.db", bd["malicious"]),
    }


def backdoor_table(
    *,
    attacks: tuple[str, ...] = ("backdoor", "replace"),
    defences: tuple[str, ...] = ("mean", "flame"),
    devices: int = 10,
    malicious: float = 0.1,
    rounds: int = 8,
    epochs: int = 2,
    dataset: str = "mnist-digits",
    model: str = "lenet",
    target: int = 0,
    seed: int = 0,
    workers: int = 1,
    out: Path | None = None,
) -> list[dict[str, Any]]:
    """One row per attack × defence (same seed, fleet and attackers), each with the no-attack
    run's clean accuracy; runs are written under ``out`` (a temporary folder by default)."""
    base = ExperimentConfig(
        devices=devices, rounds=rounds, epochs=epochs, dataset=dataset, model=model, seed=seed,
        workers=workers, backdoor_target=target,
    )  # fmt: skip
    data = load_dataset(dataset)
    with tempfile.TemporaryDirectory() as tmp:
        root = out or Path(tmp)
        artifact = export_model(
            model, root / "model", input_shape=data.input_shape, num_classes=data.num_classes,
            seed=seed,
        )  # fmt: skip
        clean = _run(base, artifact, data, root / "no-attack")
        rows = [{"attack": "none", "defence": "mean", **clean,
                 "clean_accuracy_no_attack": clean["clean_accuracy"]}]  # fmt: skip
        for attack in attacks:
            for defence in defences:
                cfg = ExperimentConfig(
                    **{**base.to_dict(), "malicious_devices": malicious, "poison": attack,
                       "aggregator": defence},
                )  # fmt: skip
                name = f"{attack}-{defence}".replace(":", "_").replace(",", "_")
                row = _run(cfg, artifact, data, root / name)
                rows.append({"attack": attack, "defence": defence, **row,
                             "clean_accuracy_no_attack": clean["clean_accuracy"]})  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True, help="write {'backdoor': [rows]} here")
    p.add_argument("--attacks", default="backdoor,replace")
    p.add_argument("--defences", default="mean,flame", help="';'-separated aggregator specs")
    p.add_argument("--devices", type=int, default=10)
    p.add_argument("--malicious", type=float, default=0.1)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--dataset", default="mnist-digits")
    p.add_argument("--model", default="lenet")
    p.add_argument("--target", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--out", help="keep the runs here (default: a temporary folder)")
    args = p.parse_args(argv)
    rows = backdoor_table(
        attacks=tuple(a for a in args.attacks.split(",") if a),
        defences=tuple(d for d in args.defences.split(";") if d),
        devices=args.devices, malicious=args.malicious, rounds=args.rounds, epochs=args.epochs,
        dataset=args.dataset, model=args.model, target=args.target, seed=args.seed,
        workers=args.workers, out=Path(args.out) if args.out else None,
    )  # fmt: skip
    Path(args.json).write_text(json.dumps({"backdoor": rows}, indent=2))
    for r in rows:
        print(
            f"{r['attack']:>9} {r['defence']:>16}: backdoor {100 * r['backdoor_success']:5.1f}%  "
            f"clean {100 * r['clean_accuracy']:5.2f}% (no attack "
            f"{100 * r['clean_accuracy_no_attack']:5.2f}%)  excluded malicious "
            f"{r['excluded_malicious']}/{r['updates_malicious']}, honest "
            f"{r['excluded_honest']}/{r['updates_honest']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
