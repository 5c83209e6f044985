"""``python -m edge calibrate`` (``edgeleak device calibrate``): measure this device's training
throughput for a model and print it as a device-profile entry.

Torch-free (numpy + onnxruntime), so it runs from a deployment bundle on the device itself:

    python -m edge calibrate --model model/ [--runtime onnx] [--batch-size 32] [--steps 20]

Throughput = the manifest's ``flops_per_example`` (counted from the graph at export) divided by
the fastest measured seconds per example, one thread.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

from edge.backends import load_backend
from edge.manifest import ModelArtifact


def measure_seconds_per_example(
    artifact: ModelArtifact,
    *,
    runtime: str = "onnx",
    batch_size: int = 32,
    steps: int = 20,
    seed: int = 0,
) -> float:
    """Seconds per training example (forward + backward) of this machine, one thread.

    The fastest of ``steps`` timed steps on random data of the model's input shape, after one
    warm-up step, divided by ``batch_size``: the fastest, since other load on the host only adds
    time.
    """
    rng = np.random.default_rng(seed)
    m = artifact.manifest
    x = rng.random((batch_size, *m.input_shape), dtype=np.float32)
    y = rng.integers(0, m.num_classes, batch_size).astype(np.int64)
    backend = load_backend(runtime, artifact)
    w = artifact.initial_params()
    backend.loss_and_grad(w, x, y)
    times: list[float] = []
    for _ in range(steps):
        t0 = time.perf_counter()
        backend.loss_and_grad(w, x, y)
        times.append(time.perf_counter() - t0)
    return min(times) / batch_size


def flops_per_example(artifact: ModelArtifact) -> int:
    """The manifest's training FLOPs per example; ``ValueError`` naming the fix when absent."""
    f = artifact.manifest.flops_per_example
    if f <= 0:
        raise ValueError(
            f"{artifact.folder}: the manifest counts no FLOPs per example; re-export the model "
            f"with `edgeleak export` (ONNX target) to get them"
        )
    return f


def measure_gflops(artifact: ModelArtifact, *, runtime: str = "onnx", **kw: int) -> float:
    """This machine's training throughput for ``artifact`` (GFLOP/s, one thread)."""
    return (
        flops_per_example(artifact)
        / measure_seconds_per_example(artifact, runtime=runtime, **kw)
        / 1e9
    )


def profile_snippet(gflops: float, artifact: ModelArtifact, runtime: str) -> dict[str, object]:
    """The ``train_gflops`` entry of a device profile, with where the number comes from."""
    return {
        "train_gflops": {
            "value": round(gflops, 3),
            "source": (
                f"Measured with `edgeleak device calibrate` on this device ({platform.machine()}, "
                f"{platform.platform(terse=True)}): model {artifact.manifest.model} "
                f"({artifact.manifest.flops_per_example:,} FLOPs per training example), "
                f"runtime {runtime}, one thread, fastest step, {time.strftime('%Y-%m-%d')}."
            ),
            "estimate": False,
        }
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="edgeleak device calibrate",
        description="measure this device's training throughput and print a profile entry",
    )
    p.add_argument("--model", required=True, help="model folder with manifest.json")
    p.add_argument("--runtime", default="onnx", help="onnx, executorch or torch")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.steps < 1:
        p.error("--batch-size and --steps must be >= 1")
    artifact = ModelArtifact.load(args.model)
    try:
        gflops = measure_gflops(
            artifact, runtime=args.runtime, batch_size=args.batch_size, steps=args.steps
        )
    except ValueError as e:
        p.error(str(e))
    print(json.dumps(profile_snippet(gflops, artifact, args.runtime), indent=2))
    return 0
