"""Training cost of a model, counted from its exported ONNX inference graph.

The rule (stated once, used by the virtual clock): forward FLOPs are 2 x the multiply-accumulates
of the ``Conv``, ``ConvTranspose``, ``Gemm`` and ``MatMul`` nodes for one example (biases,
activations, pooling and the loss are left out: they are a few percent of a conv/dense net);
backward is about 2 x forward (one product for the input gradient, one for the weight
gradient), so one training example costs ``3 x forward`` FLOPs.
"""

from __future__ import annotations

import math
from pathlib import Path

import onnx

BACKWARD_FACTOR = 2  # backward FLOPs per forward FLOP
COUNTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _static(dims: list[int | str], what: str) -> list[int]:
    """``dims`` as integers; ``ValueError`` when any is symbolic or zero."""
    out = [d for d in dims if isinstance(d, int) and d > 0]
    if len(out) != len(dims):
        raise ValueError(f"{what}: shape {dims}; need static dimensions to count FLOPs")
    return out


def _per_example(dims: list[int | str], what: str) -> int:
    """Product of all but the leading (batch) dimension."""
    return math.prod(_static(dims[1:], what))


def forward_macs(model: onnx.ModelProto) -> int:
    """Multiply-accumulates of one example's forward pass over the counted node types."""
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    shapes: dict[str, list[int | str]] = {}
    for v in (*g.input, *g.value_info, *g.output):
        shapes[v.name] = [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
    for t in g.initializer:
        shapes[t.name] = list(t.dims)

    def shape(name: str, node: onnx.NodeProto) -> list[int | str]:
        if name not in shapes:
            raise ValueError(f"{node.op_type} node {node.name!r}: no shape for {name!r}")
        return shapes[name]

    macs = 0
    for node in g.node:
        if node.op_type not in COUNTED:
            continue
        x, w = node.input[0], node.input[1]
        if node.op_type == "Conv":  # out [B, Co, H', W'] x weight [Co, Ci/g, kh, kw][1:]
            out = _per_example(shape(node.output[0], node), node.name)
            macs += out * math.prod(_static(shape(w, node)[1:], node.name))
        elif node.op_type == "ConvTranspose":  # every input element scatters a Co/g x k kernel
            inp = _per_example(shape(x, node), node.name)
            macs += inp * math.prod(_static(shape(w, node)[1:], node.name))
        else:  # Gemm / MatMul: out [B, N] x K, the contracted dimension of A
            trans_a = any(a.name == "transA" and a.i for a in node.attribute)
            a_dims = shape(x, node)
            k = a_dims[-2] if trans_a else a_dims[-1]
            if not isinstance(k, int) or k <= 0:
                raise ValueError(f"{node.op_type} node {node.name!r}: dynamic inner dimension")
            macs += _per_example(shape(node.output[0], node), node.name) * k
    return macs


def training_flops_per_example(path: str | Path) -> int:
    """FLOPs to train on one example: ``2 * MACs`` forward, times ``1 + BACKWARD_FACTOR``."""
    return 2 * forward_macs(onnx.load(str(path))) * (1 + BACKWARD_FACTOR)
