"""One training step per on-device runtime: time, memory and gradient agreement with eager torch.

Each runtime (``onnx``, ``executorch``, ``torch``) runs in its own fresh Python process, so the
resident memory reported is that runtime's alone (interpreter, libraries, model). A step is
``loss_and_grad`` plus the SGD update of the parameters, on one batch, with one thread. Times are
medians over at least ``--seconds`` of steps; ``step_ratio_vs_torch`` divides by the eager torch
step of the same run. ``rss_mb`` is the process's peak resident set (VmHWM, MiB) and
``devices_per_gib`` is how many such device processes fit in 1 GiB. ``max_grad_diff`` is the
largest absolute gradient difference from eager torch at the initial parameters, same batch.

    python bench/runtimes.py --json runtimes.json [--model lenet] [--batch 8] [--seconds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

RUNTIMES = ("onnx", "executorch", "torch")
LR = 0.05
MIN_STEPS = 20
WARMUP = 5


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (VmHWM from /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM not in /proc/self/status: this benchmark needs Linux")


def run_child(runtime: str, folder: Path, batch: int, seconds: float, out: Path) -> None:
    """Time ``runtime`` on ``folder``'s model; write its figures and first gradients to ``out``."""
    from edge.backends import load_backend
    from edge.codec import write_tensors
    from edge.manifest import ModelArtifact

    art = ModelArtifact.load(folder)
    backend = load_backend(runtime, art)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, *art.manifest.input_shape)).astype(np.float32)
    y = rng.integers(0, art.manifest.num_classes, batch).astype(np.int64)
    params = art.initial_params()
    first = backend.loss_and_grad(params, x, y)
    out.with_suffix(".grads").write_bytes(write_tensors(first.grads))

    times: list[float] = []
    start = time.perf_counter()
    while len(times) < WARMUP + MIN_STEPS or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        res = backend.loss_and_grad(params, x, y)
        params = {k: v - LR * res.grads[k] for k, v in params.items()}
        times.append(time.perf_counter() - t0)
    steps = times[WARMUP:]
    figures = {
        "step_ms": statistics.median(steps) * 1e3,
        "steps": len(steps),
        "rss_mb": peak_rss_mb(),
    }
    out.write_text(json.dumps(figures))


def export(model: str, folder: Path, runtimes: list[str]) -> Path:
    """Export ``model`` into ``folder`` with the targets that ``runtimes`` need."""
    from export import export_model

    export_model(model, folder, targets=[r for r in runtimes if r != "torch"])
    return folder


def measure(runtime: str, folder: Path, batch: int, seconds: float) -> dict[str, Any]:
    """Run ``runtime`` in a fresh process; its figures plus its first gradients."""
    from edge.codec import read_tensors

    out = folder / f"bench-{runtime}.json"
    cmd = [sys.executable, __file__, "--child", runtime, "--artifact", str(folder)]
    cmd += ["--batch", str(batch), "--seconds", str(seconds), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{runtime} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    figures: dict[str, Any] = json.loads(out.read_text())
    figures["grads"] = read_tensors(out.with_suffix(".grads").read_bytes())
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--json", type=Path, help="write the results (a list, one per runtime)")
    ap.add_argument("--model", default="lenet")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=3.0, help="time spent stepping per runtime")
    ap.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    ap.add_argument("--child", choices=RUNTIMES, help=argparse.SUPPRESS)
    ap.add_argument("--artifact", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        run_child(args.child, args.artifact, args.batch, args.seconds, args.out)
        return

    runtimes = [r for r in args.runtimes if r != "torch"] + ["torch"]  # torch is the baseline
    with tempfile.TemporaryDirectory(prefix="edgeleak-bench-") as tmp:
        folder = export(args.model, Path(tmp), runtimes)
        measured = {r: measure(r, folder, args.batch, args.seconds) for r in runtimes}
    ref = measured["torch"]
    rows: list[dict[str, Any]] = []
    for runtime in RUNTIMES:
        if runtime not in measured:
            continue
        m = measured[runtime]
        diff = max(float(np.abs(m["grads"][k] - ref["grads"][k]).max()) for k in ref["grads"])
        rows.append(
            {
                "runtime": runtime,
                "model": args.model,
                "batch": args.batch,
                "step_ms": round(m["step_ms"], 4),
                "step_ratio_vs_torch": round(m["step_ms"] / ref["step_ms"], 3),
                "rss_mb": round(m["rss_mb"], 1),
                "devices_per_gib": round(1024 / m["rss_mb"], 2),
                "max_grad_diff": diff,
                "steps": m["steps"],
            }
        )

    print(f"{args.model}, batch {args.batch}, one thread, each runtime in its own process")
    print(
        f"{'runtime':<11}{'step ms':>9}{'x torch':>9}{'peak RSS MiB':>14}{'devices/GiB':>13}"
        f"{'max grad diff':>15}"
    )
    for r in rows:
        print(
            f"{r['runtime']:<11}{r['step_ms']:>9.2f}{r['step_ratio_vs_torch']:>9.2f}"
            f"{r['rss_mb']:>14.1f}{r['devices_per_gib']:>13.2f}{r['max_grad_diff']:>15.1e}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
