"""ExecuTorch backend: runs the artifact's joint forward-backward ``.pte`` training program.

Needs ``pip install 'edgeleak[executorch]'`` (executorch 1.5.1, which needs torch at run time).
Parameters are written into the runtime's own parameter memory before every step, so one
backend serves many devices. ``logits`` runs the same training method with dummy labels (class
0) and returns its logits output, which does not depend on the labels: a ``.pte`` with a second,
inference-only method would keep its own copy of the weights and could drift from the one that
is trained. Batches larger than the program's bound (64 in ``export.executorch_export``) are
split; the loss and gradients of the parts are combined weighted by their size, which equals the
mean over the whole batch.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from edge.backends.base import Params, StepResult
from edge.manifest import Manifest, ModelArtifact

INSTALL_HINT = "pip install 'edgeleak[executorch]'  (executorch==1.5.1 with torch==2.13.0)"
METHOD = "forward"


def _import_runtime() -> tuple[Any, Any, Any]:
    """(torch, the training loader, portable_lib); ImportError naming the install command."""
    quiet = logging.getLogger("torchao")  # executorch imports torchao, which logs missing GPU libs
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        import torch
        from executorch.extension.pybindings import portable_lib
        from executorch.extension.training import _load_for_executorch_for_training
    except ImportError as e:
        raise ImportError(f"the executorch runtime is not installed: {INSTALL_HINT} ({e})") from e
    finally:
        quiet.setLevel(level)
    return torch, _load_for_executorch_for_training, portable_lib


def match_names(runtime_names: list[str], manifest_names: list[str]) -> dict[str, str]:
    """Map each manifest name to the runtime's name for it: ``runtime == prefix + manifest``.

    One common prefix (``""``, ``"model."`` or any other) must turn the manifest names into
    exactly the runtime's names; otherwise ``ValueError`` shows both lists.
    """
    have = set(runtime_names)
    if len(have) == len(manifest_names) and manifest_names:
        first = manifest_names[0]
        prefixes = {r[: len(r) - len(first)] for r in runtime_names if r.endswith(first)}
        fits = [
            p
            for p in sorted(prefixes)
            if (p == "" or p.endswith(".")) and {p + n for n in manifest_names} == have
        ]
        if len(fits) == 1:
            return {n: fits[0] + n for n in manifest_names}
    raise ValueError(
        "the .pte program's parameters do not match the manifest: expected "
        f"{manifest_names} (optionally under one prefix such as 'model.'), the program has "
        f"{sorted(runtime_names)}; re-export the model"
    )


class ExecuTorchBackend:
    """Training runtime over ``artifact.path("pte")``; one thread, parameters loaded in place."""

    name = "executorch"

    def __init__(self, artifact: ModelArtifact) -> None:
        torch, load, portable_lib = _import_runtime()
        self._torch = torch
        self.manifest: Manifest = artifact.manifest
        torch.set_num_threads(1)
        if portable_lib._threadpool_get_thread_count() != 1:
            portable_lib._unsafe_reset_threadpool(1)  # emulated devices get one thread each

        self._module = load(str(artifact.path("pte")))
        meta = self._module.model.method_meta(METHOD)
        x_meta = meta.input_tensor_meta(0)
        self.max_batch = int(x_meta.sizes()[0])
        want = (self.max_batch, *self.manifest.input_shape)
        if tuple(x_meta.sizes()) != want:
            raise ValueError(
                f"the .pte program takes x of shape {tuple(x_meta.sizes())} at most, the manifest "
                f"says {list(self.manifest.input_shape)} per example; re-export the model"
            )

        # The runtime hands out its parameter memory only after a first forward_backward.
        self._run(np.zeros((1, *self.manifest.input_shape), np.float32), np.zeros(1, np.int64))
        live = self._module.named_parameters()
        self._names = match_names(list(live), self.manifest.param_names)
        self._live = {n: live[r] for n, r in self._names.items()}
        for spec in self.manifest.params:
            shape = tuple(self._live[spec.name].shape)
            if shape != spec.shape:
                raise ValueError(
                    f"parameter {spec.name!r}: the .pte program has shape {shape}, the manifest "
                    f"{spec.shape}; re-export the model"
                )

    def _run(self, x: np.ndarray, y: np.ndarray) -> list[Any]:
        torch = self._torch
        out: list[Any] = self._module.forward_backward(
            METHOD, (torch.from_numpy(x), torch.from_numpy(y))
        )
        return out

    def _load(self, params: Params) -> None:
        """Copy ``params`` into the runtime's parameter memory (shapes checked: no broadcast)."""
        missing = [n for n in self.manifest.param_names if n not in params]
        if missing:
            raise KeyError(f"parameters missing: {missing}; expected {self.manifest.param_names}")
        torch = self._torch
        for spec in self.manifest.params:
            # Writable (decoded wire tensors are read-only views): torch.from_numpy needs it.
            w = np.require(params[spec.name], np.float32, ["C", "W"])
            if w.shape != spec.shape:
                raise ValueError(
                    f"parameter {spec.name!r} has shape {w.shape}; expected {spec.shape}"
                )
            self._live[spec.name].copy_(torch.from_numpy(w))

    def _check_x(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 1 + len(self.manifest.input_shape) or x.shape[1:] != self.manifest.input_shape:
            raise ValueError(f"x has shape {x.shape}; expected (B, *{self.manifest.input_shape})")
        if x.shape[0] == 0:
            raise ValueError("x is an empty batch; expected at least one example")
        return x

    def _check_y(self, y: np.ndarray, batch: int) -> np.ndarray:
        y = np.ascontiguousarray(y, dtype=np.int64)
        if y.shape != (batch,):
            raise ValueError(f"y has shape {y.shape}; expected ({batch},)")
        if y.size and (y.min() < 0 or y.max() >= self.manifest.num_classes):
            raise ValueError(
                f"labels must lie in [0, {self.manifest.num_classes}); got {y.min()}..{y.max()}"
            )
        return y

    def loss_and_grad(self, params: Params, x: np.ndarray, y: np.ndarray) -> StepResult:
        """Forward + backward on one batch; see the module note for batches above the bound."""
        x = self._check_x(x)
        y = self._check_y(y, x.shape[0])
        self._load(params)
        n = x.shape[0]
        if n <= self.max_batch:  # one run: the runtime's outputs as they are
            out = self._run(x, y)
            named = self._module.named_gradients()
            grads = {name: named[rname].numpy() for name, rname in self._names.items()}
            return StepResult(loss=float(out[0]), logits=out[1].numpy(), grads=grads)
        loss = 0.0
        logits: list[np.ndarray] = []
        grads = {
            name: np.zeros(shape, np.float32) for name, shape in self.manifest.shapes().items()
        }
        for start in range(0, n, self.max_batch):
            stop = min(start + self.max_batch, n)
            out = self._run(x[start:stop], y[start:stop])
            named = self._module.named_gradients()
            weight = (stop - start) / n
            loss += float(out[0]) * weight
            logits.append(out[1].numpy())
            for name, rname in self._names.items():
                grads[name] += named[rname].numpy() * np.float32(weight)
        return StepResult(loss=loss, logits=np.concatenate(logits), grads=grads)

    def logits(self, params: Params, x: np.ndarray) -> np.ndarray:
        """Forward only (the training method with dummy labels): logits [B, num_classes]."""
        x = self._check_x(x)
        self._load(params)
        parts = []
        for start in range(0, x.shape[0], self.max_batch):
            chunk = x[start : start + self.max_batch]
            parts.append(self._run(chunk, np.zeros(chunk.shape[0], np.int64))[1].numpy())
        return np.concatenate(parts)
