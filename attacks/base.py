"""The attack contract: what an eavesdropper sees, what it produces, and the one verb between.

An attack gets an intercepted update, the global model it was computed at and public metadata,
and returns a ``Reconstruction``. None of these types has a field that could carry the device's
images, labels or example indices: the truth enters only ``attacks.truth.leakage.evaluate``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

import numpy as np
from threadpoolctl import threadpool_limits

from edge.manifest import Manifest

UpdateKind = Literal["gradient", "delta"]
Algorithm = Literal["fedsgd", "fedavg"]
Device = Literal["cpu", "cuda"]
MAX_THREADS = 2


@dataclass(frozen=True)
class AttackUpdate:
    """One intercepted update, exactly as it crossed the wire.

    ``params`` maps parameter names (manifest order) to float32 arrays: the mean cross-entropy
    gradient over the batch (``kind="gradient"``, FedSGD) or ``w_local - w_global`` after local
    SGD (``kind="delta"``, FedAvg). The task's hyper-parameters come along because the task
    message that carried them is public to every subscriber.
    """

    params: Mapping[str, np.ndarray] = field(repr=False)
    kind: UpdateKind
    num_examples: int
    lr: float
    epochs: int
    batch_size: int
    algorithm: Algorithm

    def __post_init__(self) -> None:
        if self.kind not in ("gradient", "delta"):
            raise ValueError(f"kind {self.kind!r}; expected 'gradient' or 'delta'")
        if self.algorithm not in ("fedsgd", "fedavg"):
            raise ValueError(f"algorithm {self.algorithm!r}; expected 'fedsgd' or 'fedavg'")
        if self.num_examples < 1:
            raise ValueError(f"num_examples={self.num_examples}; an update covers at least one")
        bad = [k for k, v in self.params.items() if np.asarray(v).dtype != np.float32]
        if bad:
            raise ValueError(f"params must be float32 arrays; convert {bad[:3]} with .astype")

    @property
    def local_batches(self) -> list[int]:
        """Sizes of the local minibatches of one epoch (sequential, the last may be short)."""
        n, b = self.num_examples, self.batch_size if self.batch_size > 0 else self.num_examples
        return [min(b, n - i) for i in range(0, n, b)]


@dataclass(frozen=True)
class AttackMetadata:
    """Public knowledge shared by all attacks: model layout, pixel space, budget, device.

    Images live in [0, 1]. The device feeds its model ``(lo + (hi - lo) * image - mean) / std``
    per channel, with ``(lo, hi) = pixel_range``; every attack reconstructs in [0, 1] and applies
    this map inside its model wrapper (``attacks.model.InputMap``).
    """

    manifest: Manifest
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    pixel_range: tuple[float, float] = (0.0, 1.0)
    budget_s: float = 60.0
    device: Device | None = None  # None: CUDA when available, else CPU
    threads: int = 1  # torch CPU threads; 2 threads on 2 busy cores ran ~60x slower than 1

    def __post_init__(self) -> None:
        channels = self.manifest.input_shape[0]
        for name, v in (("mean", self.mean), ("std", self.std)):
            if len(v) not in (1, channels):
                raise ValueError(f"{name} has {len(v)} values; expected 1 or {channels}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std {self.std} must be positive")
        if not 1 <= self.threads <= MAX_THREADS:
            raise ValueError(f"threads={self.threads}; use 1 to {MAX_THREADS}")
        if not self.budget_s > 0:
            raise ValueError(f"budget_s={self.budget_s}; give a positive number of seconds")

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel ``(scale, shift)``, float32 [C]: model input = image * scale + shift."""
        lo, hi = self.pixel_range
        channels = self.manifest.input_shape[0]
        mean = np.broadcast_to(np.asarray(self.mean, dtype=np.float64), (channels,))
        std = np.broadcast_to(np.asarray(self.std, dtype=np.float64), (channels,))
        return ((hi - lo) / std).astype(np.float32), ((lo - mean) / std).astype(np.float32)


def inputs_to_images(
    inputs: np.ndarray, metadata: AttackMetadata, *, clip: bool = True
) -> np.ndarray:
    """Model inputs [..., C, H, W] back to image pixels (clipped to [0, 1]), float32."""
    scale, shift = metadata.affine()
    images = (inputs - shift[:, None, None]) / scale[:, None, None]
    return (np.clip(images, 0.0, 1.0) if clip else images).astype(np.float32)


@dataclass(frozen=True)
class Reconstruction:
    """What an attack recovered.

    ``images``: float32 [N, C, H, W] in [0, 1], or None for label-only attacks. ``labels``: int64
    [N] (one per recovered example, ordered like ``images``) or None. ``confidence``: float32
    [N], higher is surer; comparable within one attack only.
    """

    images: np.ndarray | None = field(repr=False)
    labels: np.ndarray | None
    confidence: np.ndarray = field(repr=False)
    seconds: float
    attack: str
    budget_hit: bool = False  # the wall-clock cap stopped the attack before its iterations ended

    def __post_init__(self) -> None:
        n = len(self.confidence)
        if self.images is not None and (self.images.ndim != 4 or len(self.images) != n):
            raise ValueError(f"images {self.images.shape}: expected [N={n}, C, H, W]")
        if self.labels is not None and self.labels.shape != (n,):
            raise ValueError(f"labels {self.labels.shape}: expected [{n}]")
        if self.images is None and self.labels is None:
            raise ValueError("a reconstruction needs images, labels or both")

    @property
    def count(self) -> int:
        return len(self.confidence)


class NotApplicable(Exception):
    """The attack cannot use this update or model (wrong kind, size or layer layout); the message
    says what it needs. Not a ``ValueError``: a bug inside an attack is not "does not apply"."""


class Attack(Protocol):
    """An attack: one class with one verb."""

    name: ClassVar[str]
    kinds: ClassVar[tuple[UpdateKind, ...]]
    config: Any

    def reconstruct(
        self,
        update: AttackUpdate,
        global_model: Mapping[str, np.ndarray],
        metadata: AttackMetadata,
    ) -> Reconstruction:
        """Invert ``update`` (computed at ``global_model``); ``metadata.budget_s`` caps the time."""
        ...


@dataclass(frozen=True)
class Recovered:
    """What ``BaseAttack.run`` found; ``reconstruct`` adds the attack's name and its time."""

    images: np.ndarray | None
    labels: np.ndarray | None
    confidence: np.ndarray
    budget_hit: bool = False


class BaseAttack:
    """The prologue every attack shares: start the clock, check the layout, check applicability.

    Subclasses declare ``kinds`` (the update kinds they invert), may add model or update needs in
    ``needs`` (raise ``NotApplicable``), and implement ``run``.
    """

    name: ClassVar[str]
    kinds: ClassVar[tuple[UpdateKind, ...]] = ("gradient", "delta")
    config: Any

    def reconstruct(
        self,
        update: AttackUpdate,
        global_model: Mapping[str, np.ndarray],
        metadata: AttackMetadata,
    ) -> Reconstruction:
        """Invert ``update`` (computed at ``global_model``); ``metadata.budget_s`` caps the time.

        Raises ``ValueError`` when update, model and manifest disagree, ``NotApplicable`` when
        this attack cannot use the update.
        """
        deadline = Deadline(metadata.budget_s)
        self.check(update, global_model, metadata)
        # BLAS threads as torch's: on busy cores an oversubscribed SVD ran 50x slower.
        with threadpool_limits(limits=metadata.threads):
            found = self.run(update, global_model, metadata, deadline)
        return self.result(found, deadline.elapsed())

    def result(self, found: Recovered, seconds: float) -> Reconstruction:
        """The ``Reconstruction`` of what ``run`` found (an attack with more to say overrides)."""
        return Reconstruction(
            found.images,
            found.labels,
            found.confidence,
            seconds,
            self.name,
            budget_hit=found.budget_hit,
        )

    def check(
        self,
        update: AttackUpdate,
        global_model: Mapping[str, np.ndarray],
        metadata: AttackMetadata,
    ) -> None:
        """The applicability check: layout, then the declared kinds, then ``needs``."""
        check_layout(update, global_model, metadata.manifest)
        if update.kind not in self.kinds:
            raise NotApplicable(
                f"{self.name} inverts {' or '.join(self.kinds)} updates, not {update.kind!r}"
            )
        self.needs(update, metadata.manifest)

    def needs(self, update: AttackUpdate, manifest: Manifest) -> None:
        """Raise ``NotApplicable`` unless the model and update have what this attack needs."""

    def run(
        self,
        update: AttackUpdate,
        global_model: Mapping[str, np.ndarray],
        metadata: AttackMetadata,
        deadline: Deadline,
    ) -> Recovered:
        raise NotImplementedError


def first_linear(manifest: Manifest) -> tuple[str, str]:
    """Names of the first parameters if they are a linear layer with bias on the flattened input."""
    specs = manifest.params
    n_in = int(np.prod(manifest.input_shape))
    if (
        len(specs) >= 2
        and len(specs[0].shape) == 2
        and specs[0].shape[1] == n_in
        and specs[1].shape == (specs[0].shape[0],)
    ):
        return specs[0].name, specs[1].name
    raise NotApplicable(
        f"model {manifest.model!r} does not start with a linear layer with bias on its "
        f"{n_in} inputs; this attack needs one (the zoo's 'mlp' has it)"
    )


def first_dense(manifest: Manifest) -> tuple[str, str] | None:
    """Names of the first linear layer's weight ``[out, in]`` and bias ``[out]``, wherever it is
    in the model (after convolutions too); ``None`` when it has no linear layer with a bias."""
    specs = manifest.params
    for w, b in zip(specs, specs[1:], strict=False):
        if len(w.shape) == 2 and b.shape == (w.shape[0],):
            return w.name, b.name
    return None


def last_layer(manifest: Manifest) -> tuple[str, str | None]:
    """Names of the classifier's weight ``[classes, features]`` and bias ``[classes]`` (or None)."""
    specs = list(manifest.params)
    for i in range(len(specs) - 1, -1, -1):
        spec = specs[i]
        if len(spec.shape) == 2 and spec.shape[0] == manifest.num_classes:
            nxt = specs[i + 1] if i + 1 < len(specs) else None
            has_bias = nxt is not None and nxt.shape == (manifest.num_classes,)
            return spec.name, nxt.name if has_bias and nxt is not None else None
    raise NotApplicable(
        f"model {manifest.model!r} has no linear layer with {manifest.num_classes} outputs: "
        "label recovery needs a classifier as the last layer"
    )


def check_layout(
    update: AttackUpdate, global_model: Mapping[str, np.ndarray], manifest: Manifest
) -> None:
    """Raise ``ValueError`` unless update and global model both match the manifest's layout."""
    shapes = manifest.shapes()
    for what, arrays in (("update", update.params), ("global model", global_model)):
        if list(arrays) != list(shapes):
            raise ValueError(
                f"{what} has parameters {list(arrays)[:4]}...; the manifest of {manifest.model!r} "
                f"expects {list(shapes)[:4]}... in manifest order"
            )
        for name, shape in shapes.items():
            if tuple(arrays[name].shape) != shape:
                raise ValueError(f"{what} {name}: shape {arrays[name].shape}, expected {shape}")


@dataclass
class Deadline:
    """A wall-clock cap: ``left()`` seconds remain; ``expired()`` once none do."""

    budget_s: float
    start: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def expired(self) -> bool:
        return self.left() <= 0
