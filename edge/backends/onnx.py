"""The ``onnx`` backend: plain onnxruntime running the exported gradient and inference graphs."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from edge.backends.base import Params, StepResult
from edge.manifest import ModelArtifact


class OnnxBackend:
    """Runs ``onnx_grad`` / ``onnx_infer`` of an artifact; parameters are graph inputs."""

    name = "onnx"

    def __init__(self, artifact: ModelArtifact) -> None:
        self.artifact = artifact
        self._names = artifact.manifest.param_names
        self._sessions: dict[str, ort.InferenceSession] = {}

    def _session(self, kind: str) -> ort.InferenceSession:
        """The session for artifact ``kind``, opened on first use."""
        if kind not in self._sessions:
            opts = ort.SessionOptions()
            # One thread each: emulated devices share the host's cores.
            opts.intra_op_num_threads = 1
            opts.inter_op_num_threads = 1
            self._sessions[kind] = ort.InferenceSession(
                str(self.artifact.path(kind)), opts, providers=["CPUExecutionProvider"]
            )
        return self._sessions[kind]

    def _feed(self, params: Params, x: np.ndarray) -> dict[str, np.ndarray]:
        feed = {n: np.ascontiguousarray(params[n], dtype=np.float32) for n in self._names}
        feed["x"] = np.ascontiguousarray(x, dtype=np.float32)
        return feed

    def loss_and_grad(self, params: Params, x: np.ndarray, y: np.ndarray) -> StepResult:
        """Forward + backward on one batch (x float32 [B, *input_shape], y int64 [B])."""
        feed = self._feed(params, x)
        feed["y"] = np.ascontiguousarray(y, dtype=np.int64)
        loss, logits, *grads = self._session("onnx_grad").run(None, feed)
        return StepResult(float(loss), logits, dict(zip(self._names, grads, strict=True)))

    def logits(self, params: Params, x: np.ndarray) -> np.ndarray:
        """Forward only: logits float32 [B, num_classes]."""
        (out,) = self._session("onnx_infer").run(None, self._feed(params, x))
        return np.asarray(out)
