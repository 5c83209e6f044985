"""The victim model as the attacker rebuilds it: a functional torch model over named weights.

The same code computes, differentiably, the update (FedSGD gradient or FedAvg delta) that the
attacks match; ``attacks.truth.victim`` runs it on true images for benches and tests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from attacks.base import MAX_THREADS, AttackMetadata, AttackUpdate, Device
from edge.manifest import Manifest, ParamSpec

Weights = dict[str, torch.Tensor]


def select_device(preference: Device | None = None, threads: int = 1) -> torch.device:
    """CUDA when asked for or available (``None``), else CPU; sets torch's CPU threads."""
    torch.set_num_threads(max(1, min(MAX_THREADS, threads)))
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for, but torch sees no CUDA device")
    use_cuda = preference == "cuda" or (preference is None and torch.cuda.is_available())
    return torch.device("cuda" if use_cuda else "cpu")


def build_module(manifest: Manifest) -> nn.Module:
    """The zoo model named by ``manifest``; its parameter names must match the manifest's."""
    from export import zoo

    module = zoo.build(manifest.model, manifest.input_shape, manifest.num_classes)
    names = [n for n, _ in module.named_parameters()]
    if names != manifest.param_names:
        raise ValueError(
            f"zoo model {manifest.model!r} has parameters {names[:3]}..., the manifest "
            f"{manifest.param_names[:3]}...: the manifest was written by another version of the zoo"
        )
    return module


def manifest_for(
    name: str, module: nn.Module, input_shape: tuple[int, ...], num_classes: int
) -> Manifest:
    """A manifest (layout only, no artifacts) describing ``module``."""
    specs = tuple(ParamSpec(n, tuple(p.shape)) for n, p in module.named_parameters())
    return Manifest(name, tuple(input_shape), num_classes, specs)


def to_weights(arrays: Mapping[str, np.ndarray], device: torch.device) -> Weights:
    """Named float32 arrays as tensors on ``device`` (copies, in the given order)."""
    return {
        k: torch.tensor(np.asarray(v), dtype=torch.float32, device=device)
        for k, v in arrays.items()
    }


def to_arrays(weights: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Named tensors as float32 numpy arrays."""
    return {k: v.detach().cpu().numpy().astype(np.float32) for k, v in weights.items()}


@dataclass(frozen=True)
class InputMap:
    """The affine map from images in [0, 1] to model inputs: ``x * scale + shift`` per channel."""

    scale: torch.Tensor
    shift: torch.Tensor

    @classmethod
    def from_metadata(cls, meta: AttackMetadata, device: torch.device) -> InputMap:
        scale, shift = (torch.from_numpy(a).reshape(1, -1, 1, 1).to(device) for a in meta.affine())
        return cls(scale, shift)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images * self.scale + self.shift


class FunctionalModel:
    """A module evaluated at weights given per call, fed images in [0, 1]."""

    def __init__(self, module: nn.Module, input_map: InputMap) -> None:
        self.module = module
        self.input_map = input_map
        self.names = [n for n, _ in module.named_parameters()]

    @classmethod
    def from_metadata(cls, meta: AttackMetadata, device: torch.device) -> FunctionalModel:
        return cls(build_module(meta.manifest).to(device), InputMap.from_metadata(meta, device))

    def logits(self, weights: Mapping[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(self.module, dict(weights), (self.input_map(images),))

    def layer_input(
        self, weights: Mapping[str, torch.Tensor], images: torch.Tensor, layer: str
    ) -> torch.Tensor:
        """What submodule ``layer`` receives for ``images`` at ``weights``, flattened per example."""
        seen: list[torch.Tensor] = []
        hook = self.module.get_submodule(layer).register_forward_pre_hook(
            lambda _, args: seen.append(args[0])
        )
        try:
            self.logits(weights, images)
        finally:
            hook.remove()
        return seen[0].flatten(1)

    def loss(
        self, weights: Mapping[str, torch.Tensor], images: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """Mean cross-entropy; ``targets`` are class indices or per-class probabilities."""
        return F.cross_entropy(self.logits(weights, images), targets)

    def gradient(
        self,
        weights: Mapping[str, torch.Tensor],
        images: torch.Tensor,
        targets: torch.Tensor,
        *,
        create_graph: bool = False,
    ) -> Weights:
        """The FedSGD update: the mean cross-entropy gradient of the batch at ``weights``."""
        params = [weights[n] for n in self.names]
        loss = self.loss(weights, images, targets)
        grads = torch.autograd.grad(loss, params, create_graph=create_graph)
        return dict(zip(self.names, grads, strict=True))

    def delta(
        self,
        weights: Mapping[str, torch.Tensor],
        images: torch.Tensor,
        targets: torch.Tensor,
        *,
        lr: float,
        epochs: int,
        batch_sizes: list[int],
        orders: Sequence[Sequence[int]] = (),
        create_graph: bool = False,
    ) -> Weights:
        """The FedAvg update ``w_local - w_global`` after ``epochs`` epochs of minibatch SGD.

        Epoch e visits the examples in the order ``orders[e % len(orders)]`` (in their given
        order when ``orders`` is empty), in consecutive minibatches of ``batch_sizes``.
        """
        w = dict(weights)
        for epoch in range(epochs):
            if orders:
                idx = torch.as_tensor(orders[epoch % len(orders)], device=images.device)
                xs, ys = images[idx], targets[idx]
            else:
                xs, ys = images, targets
            start = 0
            for size in batch_sizes:
                sl = slice(start, start + size)
                g = self.gradient(w, xs[sl], ys[sl], create_graph=create_graph)
                w = {n: w[n] - lr * g[n] for n in self.names}
                start += size
        return {n: w[n] - weights[n] for n in self.names}

    def update(
        self,
        weights: Mapping[str, torch.Tensor],
        images: torch.Tensor,
        targets: torch.Tensor,
        like: AttackUpdate,
        *,
        orders: Sequence[Sequence[int]] = (),
        create_graph: bool = False,
    ) -> Weights:
        """The update of the same kind and hyper-parameters as ``like`` for this batch
        (``orders``: the local data order per epoch, see ``delta``)."""
        if like.kind == "gradient":
            return self.gradient(weights, images, targets, create_graph=create_graph)
        return self.delta(
            weights,
            images,
            targets,
            lr=like.lr,
            epochs=like.epochs,
            batch_sizes=like.local_batches,
            orders=orders,
            create_graph=create_graph,
        )
