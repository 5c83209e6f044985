"""Protections priced: bytes, device time, accuracy and leakage of each, in one run.

Every row is measured in the same invocation as its unprotected baseline (row ``none``), with
three real runs on one mosquitto broker (``edgeleak.experiment.run_experiment``: emulated
devices, the real wire, the real eavesdropper):

- accuracy: the default demo experiment (LeNet, FedAvg, Fashion-MNIST, ``--devices`` devices,
  ``--rounds`` rounds) with the protection: ``accuracy_delta`` (final accuracy − unprotected,
  points), ``bytes_per_update_ratio`` (MQTT packet bytes of an accepted update, times K + 1
  with K decoys of the same size, ÷ the unprotected dense f32 run's), ``device_seconds_ratio`` (median seconds a device spent on a
  task, protection, decoys and encoding included, as the devices recorded them ÷ unprotected),
  ``epsilon`` (the largest ε per device over that run at δ=1e-5, or null). The ``topk+int8``
  row trains twice the rounds (the issue allows more rounds if stated): each row states its
  ``rounds``, and ``accuracy_delta_at_base_rounds`` is the same run after the baseline's rounds;
- inversion: FedSGD, LeNetZhu, batch size 1, ``--attack-devices`` devices, one round, the
  eavesdropper running ``inverting_gradients`` (``--ig-iterations``, iteration-stopped) on
  ``--attack-devices`` intercepted updates: ``attack.ig_b1_psnr`` and ``attack.label_accuracy``
  (means over the attacked updates, each scored against the private batch of the device that
  published it), ``baseline_psnr`` (the mean training image against the same images);
- analytic: the same on the zoo's ``mlp`` with the exact ``analytic`` attack:
  ``attack.analytic_exact_fraction``.

The DP row calibrated to ε=8 gets its σ from the accuracy run's config (every device in every
round, δ=1e-5); the attack runs use that same σ. Decoy rows: the eavesdropper attacks as many
updates as the others (the first it captured), not knowing which are real; ``decoys`` in the
JSON adds its real fraction and best PSNR on the real images (``edgeleak.leak.DecoyLeak``).
The ``distributed_dp`` row runs under secure aggregation (``SECAGG``), also calibrated to ε=8:
its bytes are what a device uploads per round (all SecAgg phases); the eavesdropper finds no
update to attack (its attack fields stay null).

    python bench/protections.py --json protections.json            # full: 10 rounds
    python bench/protections.py --json protections.json --quick    # 1 round, 5 of 20 devices
"""
# ruff: noqa: E402

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder comes first on sys.path and this file would shadow the package.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import argparse
import dataclasses
import json
import os
import sqlite3
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from devices.datasets import load_dataset
from edge import protect
from edge.manifest import ModelArtifact
from edgeleak.broker import local_broker
from edgeleak.config import ExperimentConfig
from edgeleak.experiment import calibrate_protect, device_shards, run_experiment
from edgeleak.leak import device_seconds
from export import export_model

DELTA = 1e-5
EPSILON_TARGET = 8.0
SECAGG = "k=0,t=0.5,clip=1,bits=16"  # the distributed-DP row's secure aggregation


@dataclass(frozen=True)
class Case:
    """One row: a protection at one strength (``protect`` spec and uplink ``codec``)."""

    protection: str
    params: dict[str, Any] = field(default_factory=dict)
    protect: str = ""
    codec: str = "f32"
    epsilon_target: float = 0.0  # > 0: σ calibrated to this ε over the accuracy run
    rounds_factor: int = 1  # the accuracy run takes this many times the baseline's rounds
    secagg: str = ""  # secure aggregation under the row (distributed DP)


def cases(sigmas: list[float]) -> list[Case]:
    """The rows, the unprotected baseline first, then the issue's headline rows (ε = 8,
    top-k + int8, decoys), then the rest."""
    dp = [
        Case("dp", {"clip": 1.0, "sigma": s}, f"dp:clip=1,sigma={s!r}") for s in sigmas
    ]  # fmt: skip
    return [
        Case("none"),
        Case("dp", {"clip": 1.0, "epsilon": EPSILON_TARGET, "delta": DELTA}, "dp:clip=1",
             epsilon_target=EPSILON_TARGET),
        Case("topk+int8", {"codec": "topk:0.01+int8"}, codec="topk:0.01+int8", rounds_factor=2),
        Case("decoys", {"k": 3}, "decoys:k=3"),
        *dp,
        Case("central_dp", {"clip": 1.0, "sigma": 1.0}, "central_dp:clip=1,sigma=1"),
        Case("dummy", {"m": 4, "source": "noise"}, "dummy:m=4"),
        Case("int8", {"codec": "int8"}, codec="int8"),
        Case("topk", {"codec": "topk:0.01"}, codec="topk:0.01"),
        Case("dpsgd", {"clip": 1.0, "sigma": 1.0}, "dpsgd:clip=1,sigma=1"),
        Case("distributed_dp", {"clip": 1.0, "epsilon": EPSILON_TARGET, "delta": DELTA,
             "secagg": SECAGG}, "distributed_dp:clip=1", epsilon_target=EPSILON_TARGET,
             secagg=SECAGG),
    ]  # fmt: skip


def calibrated(case: Case, base: ExperimentConfig, shard_sizes: list[int]) -> Case:
    """``case`` with σ calibrated over ``base``'s run (unchanged without an ε target)."""
    if case.epsilon_target <= 0:
        return case
    cfg = dataclasses.replace(
        base,
        protect=case.protect,
        dp_epsilon=case.epsilon_target,
        dp_delta=DELTA,
        secagg=case.secagg,
    )
    spec = calibrate_protect(cfg, shard_sizes).protect
    dp = protect.dp_step(protect.parse(spec))
    assert dp is not None and dp.sigma is not None
    return dataclasses.replace(case, protect=spec, params={**case.params, "sigma": dp.sigma})


def _mean(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.fmean(got) if got else None


def _attack_rows(summary: dict[str, Any], attack: str) -> list[dict[str, Any]]:
    return [r for r in summary.get("attack", []) if r["attack"] == attack]


def measure(
    case: Case,
    configs: dict[str, ExperimentConfig],
    out: Path,
    broker: str,
    artifacts: dict[str, ModelArtifact],
) -> dict[str, Any]:
    """The three runs of one row; raw figures (ratios are taken against ``none`` later)."""
    res: dict[str, Any] = {}
    for kind, base in configs.items():
        cfg = dataclasses.replace(base, protect=case.protect, codec=case.codec, secagg=case.secagg)
        if kind == "accuracy":
            cfg = dataclasses.replace(cfg, rounds=base.rounds * case.rounds_factor)
        t0 = time.monotonic()
        r = run_experiment(
            cfg, out / kind, broker_url=broker, progress=False, artifact=artifacts[cfg.model]
        )
        s = r.summary
        res[f"{kind}_seconds"] = round(time.monotonic() - t0, 1)
        if kind == "accuracy":
            res["accuracy"] = s["final_accuracy"]
            res["rounds"] = cfg.rounds
            # the same run's accuracy after the baseline's rounds (equal to the above at factor 1)
            res["accuracy_at_base_rounds"] = s["rounds"][base.rounds - 1]["accuracy"]
            res["bytes_per_update"] = update_bytes(out / kind / "run.db", r.run) * (1 + cfg.decoys)
            res["device_seconds"] = statistics.median(device_seconds(out / kind / "truth", r.run))
            eps = [p["epsilon"] for p in s["privacy"].values()] if s["privacy"] else []
            res["epsilon"] = max(eps) if eps else None
        elif kind == "inversion":
            rows = _attack_rows(s, "inverting_gradients")
            res["ig_b1_psnr"] = _mean([x["psnr_mean"] for x in rows])
            res["label_accuracy"] = _mean([x["label_accuracy"] for x in rows])
            res["baseline_psnr"] = _mean([x["baseline_psnr"] for x in rows])
            res["ig_budget_hit"] = any(x["budget_hit"] for x in rows)
            if s.get("decoy_leakage"):
                res["decoys_inversion"] = s["decoy_leakage"]
        else:
            rows = _attack_rows(s, "analytic")
            res["analytic_exact_fraction"] = _mean([x["exact_fraction"] for x in rows])
            if s.get("decoy_leakage"):
                res["decoys_analytic"] = s["decoy_leakage"]
    return res


def update_bytes(db_path: Path, run: str) -> float:
    """Mean MQTT packet bytes of the run's accepted updates (a device's decoys have the same
    size, so a device sends (1 + decoys) times this per round); under secure aggregation, what
    a device uploads per round (keys, shares, masked input, unmask shares)."""
    db = sqlite3.connect(db_path)
    (mean,) = db.execute(
        "SELECT AVG(bytes) FROM messages WHERE run=? AND kind='update'", (run,)
    ).fetchone()
    if mean is None:
        (mean,) = db.execute(
            "SELECT SUM(bytes) * 1.0 / (SELECT COUNT(*) FROM messages WHERE run=? AND "
            "kind='secagg_masked') FROM messages WHERE run=? AND direction='up' AND kind LIKE "
            "'secagg%'", (run, run),
        ).fetchone()  # fmt: skip
    db.close()
    return float(mean)


def row(case: Case, m: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """One JSON row in the issue's shape."""
    acc, acc0 = m["accuracy"], base["accuracy"]
    same = m["accuracy_at_base_rounds"]
    return {
        "protection": case.protection,
        "params": case.params,
        "rounds": m["rounds"],
        "bytes_per_update_ratio": m["bytes_per_update"] / base["bytes_per_update"],
        "device_seconds_ratio": m["device_seconds"] / base["device_seconds"],
        "accuracy_delta": None if acc is None or acc0 is None else 100 * (acc - acc0),
        "accuracy_delta_at_base_rounds": None
        if same is None or acc0 is None
        else 100 * (same - acc0),
        "epsilon": m["epsilon"],
        "attack": {
            "ig_b1_psnr": m["ig_b1_psnr"],
            "label_accuracy": m["label_accuracy"],
            "analytic_exact_fraction": m["analytic_exact_fraction"],
        },
        "baseline_psnr": m["baseline_psnr"],
    }


def exported(model: str, folder: Path, data: Any) -> ModelArtifact:
    """``model`` exported into ``folder`` for the dataset, or the export already there."""
    if (folder / "manifest.json").exists():
        return ModelArtifact.load(folder)
    return export_model(
        model, folder, input_shape=data.input_shape, num_classes=data.num_classes, seed=0
    )


def report(
    measured: list[tuple[Case, dict[str, Any]]],
    setup: dict[str, Any],
    *,
    quick: bool,
    complete: bool,
) -> dict[str, Any]:
    """The JSON: the rows (against the first, unprotected, one), the decoy row's real fraction
    and best PSNR on the real images, and every run's raw figures."""
    base = measured[0][1]
    decoys = {
        k: v for c, m in measured for k, v in m.items() if c.protection == "decoys" and "decoys_" in k
    }  # fmt: skip
    return {
        "mode": "quick" if quick else "full",
        "complete": complete,
        "setup": setup,
        "rows": [row(c, m, base) for c, m in measured],
        "decoys": decoys,
        "runs": [{"protection": c.protection, "params": c.params, **m} for c, m in measured],
    }


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True, help="where to write the rows")
    p.add_argument(
        "--quick", action="store_true",
        help="1 round with a quarter of the devices, 3-point σ sweep, 100 IG iterations",
    )  # fmt: skip
    p.add_argument("--rounds", type=int, help="rounds of the accuracy runs (default 10; quick 1)")
    p.add_argument(
        "--fraction", type=float, help="devices selected per round (default 1; quick 0.25)"
    )
    p.add_argument("--devices", type=int, default=20, help="devices of the accuracy runs")
    p.add_argument("--attack-devices", type=int, help="devices (= updates attacked) per attack run")
    p.add_argument("--ig-iterations", type=int, help="inverting-gradients iterations per update")
    p.add_argument("--sigmas", help="comma-separated σ of the dp sweep")
    p.add_argument("--only", help="comma-separated protections to run (none always runs)")
    p.add_argument("--out", help="keep the runs here (default: a temporary folder)")
    args = p.parse_args(argv)
    quick = args.quick
    rounds = args.rounds or (1 if quick else 10)
    fraction = args.fraction or (0.25 if quick else 1.0)
    attack_devices = args.attack_devices or (2 if quick else 4)
    iterations = args.ig_iterations or (100 if quick else 2000)
    default_sigmas = "0.01,0.001,0.1" if quick else "0.0001,0.001,0.01,0.1,1"
    sigmas = [float(s) for s in (args.sigmas or default_sigmas).split(",")]
    todo = cases(sigmas)
    if args.only:
        keep = {s.strip() for s in args.only.split(",")} | {"none"}
        todo = [c for c in todo if c.protection in keep]
    acc_cfg = ExperimentConfig(devices=args.devices, rounds=rounds, fraction=fraction, seed=0)
    attack: dict[str, Any] = {
        "devices": attack_devices, "rounds": 1, "algorithm": "fedsgd", "batch_size": 1,
        "attack_max": attack_devices, "attack_budget_s": 3600.0, "seed": 0, "workers": 1,
    }  # fmt: skip
    configs = {
        "accuracy": acc_cfg,
        "inversion": ExperimentConfig(
            model="lenet_zhu", attack="inverting_gradients", attack_iterations=iterations, **attack
        ),
        "analytic": ExperimentConfig(model="mlp", attack="analytic", **attack),
    }
    data = load_dataset(acc_cfg.dataset)
    shard_sizes = [len(s) for s in device_shards(acc_cfg, data.y_train)]
    t0 = time.monotonic()
    load0 = os.getloadavg()
    setup = {
        "accuracy": {
            "model": "lenet", "algorithm": "fedavg", "devices": args.devices, "rounds": rounds,
            "fraction": fraction, "dataset": acc_cfg.dataset,
        },
        "attacks": {
            "devices": attack_devices, "updates_attacked": attack_devices,
            "ig_iterations": iterations, "inversion_model": "lenet_zhu", "analytic_model": "mlp",
            "batch_size": 1, "algorithm": "fedsgd",
        },
        "delta": DELTA,
    }  # fmt: skip
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        models = sorted({c.model for c in configs.values()})
        artifacts = {m: exported(m, out / "models" / m, data) for m in models}
        measured: list[tuple[Case, dict[str, Any]]] = []
        with local_broker("auto") as (broker, kind):
            setup["broker"] = kind
            for i, case in enumerate(todo):
                case = calibrated(case, acc_cfg, shard_sizes)
                name = f"{i:02d}-{case.protection}"
                print(f"{name}: {case.protect or case.codec} ...", flush=True)
                m = measure(case, configs, out / name, broker.url, artifacts)
                print(f"{name}: {json.dumps(m)}", flush=True)
                measured.append((case, m))
                # written after every row, so a long run can be read while it goes on
                result = report(measured, setup, quick=quick, complete=i == len(todo) - 1)
                result["seconds"] = round(time.monotonic() - t0, 1)
                result["load_average"] = {"start": load0[0], "end": os.getloadavg()[0]}
                Path(args.json).write_text(json.dumps(result, indent=2))
    rows = result["rows"]
    print(
        f"{'protection':12} {'params':38} {'bytes×':>7} {'time×':>6} {'Δacc':>6} {'ε':>9} "
        f"{'IG dB':>6} {'base':>5} {'label':>5} {'exact':>5}"
    )
    for r in rows:
        a = r["attack"]
        params = ",".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in r["params"].items())  # fmt: skip
        print(
            f"{r['protection']:12} {params:38} {r['bytes_per_update_ratio']:7.3f} "
            f"{r['device_seconds_ratio']:6.2f} {_fmt(r['accuracy_delta'], '6.2f')} "
            f"{_fmt(r['epsilon'], '9.3g')} {_fmt(a['ig_b1_psnr'], '6.1f')} "
            f"{_fmt(r['baseline_psnr'], '5.1f')} {_fmt(a['label_accuracy'], '5.2f')} "
            f"{_fmt(a['analytic_exact_fraction'], '5.2f')}"
        )
    print(f"{result['seconds']:.0f} s; wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
