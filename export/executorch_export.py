"""ExecuTorch target: a joint forward-backward ``.pte`` program that trains on the device.

Needs ``pip install 'edgeleak[executorch]'`` (``executorch==1.5.1``, built against torch 2.13.0).
The program's method ``forward(x, y)`` returns ``(loss, logits)`` followed by one gradient and
one parameter per trainable parameter; parameters are named ``model.<name>`` where ``<name>`` is
the name in ``model.named_parameters()``. The batch dimension is dynamic, 1 to ``MAX_BATCH``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

MAX_BATCH = 64

INSTALL_HINT = "pip install 'edgeleak[executorch]'  (executorch==1.5.1, torch==2.13.0)"


class _WithLoss(nn.Module):
    """``forward(x, y) -> (mean cross-entropy, detached logits)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        return F.cross_entropy(logits, y), logits.detach()


def _max_pool2d_backward(
    grad_output: torch.Tensor,
    self: torch.Tensor,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    ceil_mode: bool,
    indices: torch.Tensor,
) -> torch.Tensor:
    """Max-pool input gradient: scatter-add of ``grad_output`` at the pooling ``indices``.

    ``indices`` are flat positions within each (H, W) plane, so the window parameters are
    already folded into them and every pooling configuration is covered.
    """
    grad_in = torch.zeros_like(self).flatten(-2)
    grad_in = grad_in.scatter_add(-1, indices.flatten(-2), grad_output.flatten(-2))
    return grad_in.view_as(self)


def export_pte(
    model: nn.Module, example_x: torch.Tensor, example_y: torch.Tensor, path: str | Path
) -> None:
    """Write the training program of ``model`` (loss: mean cross-entropy) to ``path``.

    ``example_x`` (float32 [B, *input_shape]) and ``example_y`` (int64 [B]) fix everything but
    the batch size. ``model`` is not modified.
    """
    try:
        from executorch.exir import EdgeCompileConfig, to_edge
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"the executorch target needs executorch: {INSTALL_HINT}") from e
    from torch.export.experimental import _export_forward_backward

    x = example_x.detach().to(torch.float32)
    y = example_y.detach().to(torch.int64)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"example_x has batch {x.shape[0]} but example_y has {y.shape[0]}")
    # Only shapes matter for tracing: trace with a batch in [2, MAX_BATCH] (torch.export would
    # fix a batch of 1 as a constant, and rejects an example outside the Dim's range).
    rows = torch.arange(min(max(x.shape[0], 2), MAX_BATCH)) % x.shape[0]
    x, y = x[rows], y[rows]

    # On-device training needs the loss inside the model, as the first output.
    wrapped = _WithLoss(model)
    batch = torch.export.Dim("b", min=1, max=MAX_BATCH)
    ep = torch.export.export(wrapped, (x, y), dynamic_shapes=({0: batch}, {0: batch}), strict=True)
    ep = _export_forward_backward(ep)

    # ExecuTorch 1.5.1's max_pool2d_with_indices_backward kernel accumulates into an unzeroed
    # buffer: the gradients of the layers before a max-pool come out wrong by 1e2 to 1e3 (LeNet's
    # conv1 here), with no error. Decompose the op here, before to_edge, so that kernel never runs.
    ep = ep.run_decompositions(
        {torch.ops.aten.max_pool2d_with_indices_backward.default: _max_pool2d_backward}
    )
    left = [
        str(n.target)
        for n in ep.graph.nodes
        if n.op == "call_function" and "max_pool2d_with_indices_backward" in str(n.target)
    ]
    if left:  # pragma: no cover - guards the rule above against a torch upgrade
        raise RuntimeError(f"max-pool backward survived decomposition: {left}")

    # No XNNPACK (or any) delegate: with it the second training step already gives NaN.
    # The training graph holds ops the edge dialect does not verify (the backward ops), so the
    # IR validity check must be off.
    edge = to_edge(ep, compile_config=EdgeCompileConfig(_check_ir_validity=False))
    program = edge.to_executorch()
    Path(path).write_bytes(program.buffer)
