"""Training runtimes by name: ``onnx`` (plain onnxruntime gradient graph), ``torch`` (eager
reference, needs torch), ``executorch`` (on-device training program, needs executorch)."""

from __future__ import annotations

from edge.backends.base import Backend, Params, StepResult
from edge.manifest import ModelArtifact

RUNTIMES = ("onnx", "torch", "executorch")


def load_backend(runtime: str, artifact: ModelArtifact) -> Backend:
    """Open ``artifact`` with the named runtime; the error lists the valid names."""
    if runtime == "onnx":
        from edge.backends.onnx import OnnxBackend

        return OnnxBackend(artifact)
    if runtime == "torch":
        from edge.backends.torch_ref import TorchBackend

        return TorchBackend(artifact)
    if runtime == "executorch":
        from edge.backends.executorch import ExecuTorchBackend

        return ExecuTorchBackend(artifact)
    raise ValueError(f"unknown runtime {runtime!r}; expected one of {', '.join(RUNTIMES)}")


__all__ = ["RUNTIMES", "Backend", "Params", "StepResult", "load_backend"]
