"""Export a zoo model to device artifacts and a manifest.

One straight-line function per target writes its files and returns its manifest entries:

- ``onnx``: ``grad.onnx`` (inputs ``*params, x, y``; outputs ``loss, logits, grad.<param>...``)
  and ``infer.onnx`` (inputs ``*params, x``; output ``logits``) for plain onnxruntime;
- ``executorch``: ``model.pte``, the joint forward-backward training program
  (``export.executorch_export``; needs executorch);
- always: ``init.safetensors`` (the seeded initial parameters) and ``model.pt2`` (the forward with
  loss as a ``torch.export`` program, parameters as inputs: the torch reference backend
  differentiates it with eager autograd and needs nothing from this package).

Every graph takes the parameters as inputs, in manifest order, rather than baking them in as
initializers: one loaded session then serves every device and every round, and the coordinator's
weights go in with each call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch._decomp import core_aten_decompositions, decomposition_table
from torch.func import functional_call, grad_and_value
from torch.fx import GraphModule
from torch.fx.experimental.proxy_tensor import make_fx

from edge.codec import write_tensors
from edge.manifest import MANIFEST_FILE, Manifest, ModelArtifact, ParamSpec, content_hash
from edge.text import VOCAB_FILE, save_vocab
from export import zoo
from export.flops import training_flops_per_example
from export.names import TARGETS

GRAD_FILE = "grad.onnx"
INFER_FILE = "infer.onnx"
INIT_FILE = "init.safetensors"
PT2_FILE = "model.pt2"
PTE_FILE = "model.pte"
OPSET = 20
MAX_BATCH = 65536

aten = torch.ops.aten
Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class _Traced:
    """A model as a pure function of ``(*params, x[, y])`` plus example inputs to trace it with."""

    model: nn.Module
    names: list[str]
    params: list[torch.Tensor]
    x: torch.Tensor
    y: torch.Tensor

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        """Logits of ``x`` under the given parameters: ``args = (*params, x)``."""
        *ps, x = args
        out: torch.Tensor = functional_call(
            self.model, dict(zip(self.names, ps, strict=True)), (x,)
        )
        return out

    def logits(self, *args: torch.Tensor) -> tuple[torch.Tensor]:
        """(logits,): ``args = (*params, x)``; graphs return tuples."""
        return (self.forward(*args),)

    def forward_with_loss(self, *args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean cross-entropy, logits): ``args = (*params, x, y)``."""
        logits = self.forward(*args[:-1])
        return F.cross_entropy(logits, args[-1]), logits

    def loss_logits_grads(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(loss, logits, *one gradient per parameter): ``args = (*params, x, y)``."""
        *ps, x, y = args

        def loss_fn(p: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
            loss, logits = self.forward_with_loss(*p, x, y)
            return loss, logits.detach()

        grads, (loss, logits) = grad_and_value(loss_fn, has_aux=True)(tuple(ps))
        return (loss, logits, *grads)


class _GraphModule(nn.Module):
    """A parameter-free module around a traced graph, so that its inputs are only the graph's."""

    def __init__(self, gm: GraphModule) -> None:
        super().__init__()
        self.gm = gm

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out: tuple[torch.Tensor, ...] = self.gm(*args)
        return out


def _conv_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias_sizes: Sequence[int] | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    transposed: bool,
    output_padding: Sequence[int],
    groups: int,
    output_mask: Sequence[bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``aten.convolution_backward`` as forward convolutions (torch ships no decomposition)."""
    if transposed or groups != 1:
        raise NotImplementedError(
            f"convolution backward is decomposed for groups=1, non-transposed convolutions only "
            f"(got groups={groups}, transposed={transposed}); extend export/onnx_export.py"
        )
    k = weight.shape[2:]
    spatial = range(len(k))
    grad_x = grad_w = grad_b = None
    if output_mask[0]:
        # Input gradient: the transposed convolution; for strided convolutions output_padding
        # restores the rows and columns that the forward's floor division dropped.
        extra = [
            x.shape[2 + i]
            - (
                (grad_out.shape[2 + i] - 1) * stride[i]
                - 2 * padding[i]
                + dilation[i] * (k[i] - 1)
                + 1
            )
            for i in spatial
        ]
        grad_x = aten.convolution(grad_out, weight, None, stride, padding, dilation, True, extra, 1)
    if output_mask[1]:
        # Weight gradient: convolve the input (batch as channels) with the output gradient, stride
        # and dilation swapped, then crop to the kernel size.
        full = aten.convolution(
            x.transpose(0, 1), grad_out.transpose(0, 1), None, dilation, padding, stride, False,
            [0] * len(k), 1,
        )  # fmt: skip
        for i in spatial:
            full = full.narrow(2 + i, 0, k[i])
        grad_w = full.transpose(0, 1)
    if output_mask[2]:
        grad_b = grad_out.sum([0, *(2 + i for i in spatial)])
    return grad_x, grad_w, grad_b


def _decompositions() -> dict[Any, Callable[..., Any]]:
    """Core ATen plus the two backward ops that onnxruntime must never see.

    Everything is decomposed to core ATen *before* the ONNX exporter runs: its own translations
    of backward ops are not trustworthy (``nll_loss_backward`` gave wrong gradients for batch > 1
    with torch 2.13 / onnxscript 0.7, while the loss stayed right).
    """
    table = dict(core_aten_decompositions())
    table[aten.convolution_backward.default] = _conv_backward
    mp_bwd = aten.max_pool2d_with_indices_backward.default
    table[mp_bwd] = decomposition_table[mp_bwd]  # scatter-add at the pooling indices
    return table


def _trace(fn: Callable[..., Any], args: Sequence[torch.Tensor], decompose: bool) -> GraphModule:
    """``fn`` as an FX graph with symbolic shapes (so the batch dimension stays free)."""
    table = _decompositions() if decompose else {}
    gm = make_fx(fn, tracing_mode="symbolic", decomposition_table=table)(*args)
    if decompose:
        # A new layer type must fail here, at export, not silently on the device.
        left = sorted({str(n.target) for n in gm.graph.nodes if "backward" in str(n.target)})
        if left:
            raise NotImplementedError(f"no decomposition for {left}; add one to _decompositions()")
    return gm


def _example(name: str, input_shape: Shape | None, num_classes: int, seed: int) -> _Traced:
    """The seeded model and example inputs (zeros: symbolic tracing reads only shapes)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = zoo.build(name, input_shape, num_classes)
    named = [(n, p.detach()) for n, p in model.named_parameters()]
    shape = tuple(input_shape or zoo.default_input_shape(name))
    # Symbolic tracing gives equal sizes one symbol: the batch must equal no other dimension.
    used = {*shape, num_classes, *(d for _, p in named for d in p.shape)}
    batch = next(b for b in range(2, MAX_BATCH) if b not in used)
    return _Traced(
        model=model,
        names=[n for n, _ in named],
        params=[p for _, p in named],
        x=torch.zeros(batch, *shape),
        y=torch.zeros(batch, dtype=torch.int64),
    )


def _dynamic_shapes(n_params: int, n_batched: int) -> tuple[tuple[Any, ...]]:
    """Static parameter shapes; dimension 0 of every batched input is ``batch``."""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    return ((*([None] * n_params), *([{0: batch}] * n_batched)),)


def _to_onnx(
    gm: GraphModule, t: _Traced, path: Path, inputs: list[str], outputs: list[str]
) -> None:
    """Write ``gm`` as one self-contained ONNX file with a dynamic batch dimension."""
    n_batched = len(inputs) - len(t.names)
    args = (*t.params, t.x, t.y)[: len(inputs)]
    torch.onnx.export(
        _GraphModule(gm).eval(),
        args,
        str(path),
        dynamo=True,
        external_data=False,
        opset_version=OPSET,
        input_names=inputs,
        output_names=outputs,
        dynamic_shapes=_dynamic_shapes(len(t.names), n_batched),
        verbose=False,
    )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's chatter (absent torchvision ops, axis renames, deprecations)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", (UserWarning, FutureWarning, DeprecationWarning))
            yield
    finally:
        logger.setLevel(level)


def _export_onnx(t: _Traced, out_dir: Path) -> dict[str, str]:
    """Target ``onnx``: the gradient graph and the inference graph for plain onnxruntime."""
    # Plain onnxruntime has no autograd, so the backward pass is traced into the graph itself:
    # make_fx of grad_and_value, decomposed to standard ops. (Exporting autograd.grad inside
    # forward fails; exporting torch.export's joint program drops the gradients silently.)
    grad = _trace(t.loss_logits_grads, (*t.params, t.x, t.y), decompose=True)
    grad_outputs = ["loss", "logits", *(f"grad.{n}" for n in t.names)]
    _to_onnx(grad, t, out_dir / GRAD_FILE, [*t.names, "x", "y"], grad_outputs)
    infer = _trace(t.logits, (*t.params, t.x), decompose=True)
    _to_onnx(infer, t, out_dir / INFER_FILE, [*t.names, "x"], ["logits"])
    return {"onnx_grad": GRAD_FILE, "onnx_infer": INFER_FILE}


def _export_pt2(t: _Traced, out_dir: Path) -> dict[str, str]:
    """The torch reference: forward with loss, ``(*params, x, y) -> (loss, logits)``."""
    # No decompositions here: eager autograd must differentiate torch's own operators, so that
    # this stays an independent reference for the decomposed graphs.
    args = (*t.params, t.x, t.y)
    gm = _trace(t.forward_with_loss, args, decompose=False)
    ep = torch.export.export(
        _GraphModule(gm), args, dynamic_shapes=_dynamic_shapes(len(t.names), 2)
    )
    torch.export.save(ep, out_dir / PT2_FILE)
    return {"pt2": PT2_FILE}


def _export_init(t: _Traced, out_dir: Path) -> dict[str, str]:
    """The seeded initial parameters, in manifest order."""
    tensors = {n: p.numpy() for n, p in zip(t.names, t.params, strict=True)}
    (out_dir / INIT_FILE).write_bytes(write_tensors(tensors))
    return {"init": INIT_FILE}


def _export_executorch(t: _Traced, out_dir: Path) -> dict[str, str]:
    """Target ``executorch``: the joint forward-backward training program (needs executorch)."""
    from export.executorch_export import export_pte

    export_pte(t.model, t.x, t.y, out_dir / PTE_FILE)
    return {"pte": PTE_FILE}


_TARGETS: dict[str, Callable[[_Traced, Path], dict[str, str]]] = {
    "onnx": _export_onnx,
    "executorch": _export_executorch,
}
if tuple(_TARGETS) != TARGETS:  # export.names is the list that --help reads
    raise ImportError(f"export.names.TARGETS {TARGETS} differs from {tuple(_TARGETS)}")


def export_model(
    name: str,
    out_dir: str | Path,
    *,
    input_shape: Shape | None = None,
    num_classes: int = 10,
    seed: int = 0,
    targets: Sequence[str] = ("onnx",),
    vocab: Sequence[str] = (),
) -> ModelArtifact:
    """Export zoo model ``name`` into ``out_dir`` and return the verified artifact.

    ``targets`` picks the on-device runtimes; the initial parameters and the torch reference
    (``pt2``) are always written. A text model's ``vocab`` (one word per class) is shipped as
    the ``vocab`` artifact (``edge.text.VOCAB_FILE``). The global torch RNG is left as it was.
    """
    if vocab and len(vocab) != num_classes:
        raise ValueError(f"a vocabulary of {len(vocab)} words for {num_classes} classes")
    unknown = [tg for tg in targets if tg not in _TARGETS]
    if unknown:
        raise ValueError(f"unknown export targets {unknown}; expected some of {', '.join(TARGETS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t = _example(name, input_shape, num_classes, seed)
    with _quiet():
        artifacts = {**_export_init(t, out), **_export_pt2(t, out)}
        for target in targets:
            artifacts.update(_TARGETS[target](t, out))
    if vocab:
        save_vocab(out / VOCAB_FILE, vocab)
        artifacts["vocab"] = VOCAB_FILE
    manifest = Manifest(
        model=name,
        input_shape=tuple(t.x.shape[1:]),
        num_classes=num_classes,
        params=tuple(ParamSpec(n, tuple(p.shape)) for n, p in zip(t.names, t.params, strict=True)),
        artifacts=artifacts,
        flops_per_example=(
            training_flops_per_example(out / artifacts["onnx_infer"])
            if "onnx_infer" in artifacts
            else 0
        ),
    )
    manifest = dataclasses.replace(manifest, sha256=content_hash(manifest, out))
    (out / MANIFEST_FILE).write_text(manifest.to_json())
    return ModelArtifact.load(out)
