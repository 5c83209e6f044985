"""The ``torch`` backend: eager autograd through the exported ``pt2`` program (needs torch).

The program is ``(*params, x, y) -> (loss, logits)`` in manifest order, so nothing of the
exporter is imported here. It is the reference that every other runtime is checked against.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from edge.backends.base import Params, StepResult
from edge.manifest import ModelArtifact

if TYPE_CHECKING:
    import torch


class TorchBackend:
    """Loss and gradients by eager PyTorch autograd; torch is imported on construction."""

    name = "torch"

    def __init__(self, artifact: ModelArtifact) -> None:
        try:
            import torch
        except ImportError:
            raise ImportError(
                "the torch backend needs torch: pip install torch==2.13.0 (or use runtime 'onnx')"
            ) from None
        torch.set_num_threads(1)  # emulated devices share the host's cores
        self.artifact = artifact
        self._names = artifact.manifest.param_names
        self._program: torch.nn.Module | None = None

    def _run(
        self, params: Params, x: np.ndarray, y: np.ndarray, *, grad: bool
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(loss, logits, parameter tensors) of one forward pass."""
        import torch

        if self._program is None:
            self._program = torch.export.load(self.artifact.path("pt2")).module()
        ps = [
            torch.tensor(np.asarray(params[n], dtype=np.float32), requires_grad=grad)
            for n in self._names
        ]
        xt = torch.tensor(np.asarray(x, dtype=np.float32))
        yt = torch.tensor(np.asarray(y, dtype=np.int64))
        with torch.set_grad_enabled(grad):
            loss, logits = self._program(*ps, xt, yt)
        return loss, logits, ps

    def loss_and_grad(self, params: Params, x: np.ndarray, y: np.ndarray) -> StepResult:
        """Forward + backward on one batch (x float32 [B, *input_shape], y int64 [B])."""
        import torch

        loss, logits, ps = self._run(params, x, y, grad=True)
        grads = torch.autograd.grad(loss, ps)
        return StepResult(
            float(loss.detach()),
            logits.detach().numpy(),
            {n: g.numpy() for n, g in zip(self._names, grads, strict=True)},
        )

    def per_example_grads(
        self, params: Params, x: np.ndarray, y: np.ndarray
    ) -> tuple[np.ndarray, Params]:
        """(loss of each example [B], its gradient {name: [B, *shape]}) by
        ``torch.func.vmap(grad)`` over the batch, each example as a batch of one."""
        import torch

        if self._program is None:
            self._program = torch.export.load(self.artifact.path("pt2")).module()
        program = self._program
        ps = tuple(torch.tensor(np.asarray(params[n], dtype=np.float32)) for n in self._names)

        def loss_one(ps: tuple[torch.Tensor, ...], xi: torch.Tensor, yi: torch.Tensor) -> Any:
            loss = program(*ps, xi[None], yi[None])[0]
            return loss, loss

        xt = torch.tensor(np.asarray(x, dtype=np.float32))
        yt = torch.tensor(np.asarray(y, dtype=np.int64))
        grads, losses = torch.func.vmap(
            torch.func.grad(loss_one, has_aux=True), in_dims=(None, 0, 0)
        )(ps, xt, yt)
        return (
            losses.detach().numpy().astype(np.float64),
            {n: g.detach().numpy() for n, g in zip(self._names, grads, strict=True)},
        )

    def logits(self, params: Params, x: np.ndarray) -> np.ndarray:
        """Forward only: logits float32 [B, num_classes] (the loss on dummy labels is dropped)."""
        _, logits, _ = self._run(params, x, np.zeros(len(x), dtype=np.int64), grad=False)
        return logits.numpy()
