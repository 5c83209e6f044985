"""Client-side protections: named, parametrised steps a device applies to its local training.

A run's protections are one spec string, steps separated by ``;``, each ``name:key=value,...``
(a bare value sets the first parameter: ``dummy:4``)::

    dp:clip=1,sigma=0.8              update-level (local) DP: clip the update, add N(0, σ²C²)
    dpsgd:clip=1,sigma=1.1           DP-SGD: per-example clipping + noise in every local step
    central_dp:clip=1,sigma=1        DP-FedAvg: the device clips, the coordinator adds the noise
    distributed_dp:clip=1,sigma=1    distributed DP under secagg: each of n devices adds 1/n of
                                     the noise variance, so only the secure sum carries N(0, σ²C²)
    dummy:m=4,source=noise           m synthetic examples mixed into every local batch
    decoys:k=3                       k decoy updates published beside the real one (edge.decoy)

The coordinator sends the spec in every task; the device parses it, applies the steps in the
fixed stage order (batch → step → result → publish: ``dummy``, then ``dpsgd``, then
``dp``/``central_dp``/``distributed_dp``, then ``decoys``)
and writes what it applied into the update's ``defence`` field (``defence_json``). At most one
differential-privacy step (``dp``, ``dpsgd``, ``central_dp``, ``distributed_dp``) per run: ε is
accounted for one.

Noise comes from the ``numpy.random.Generator`` the caller passes (the device seeds it from its
seed and the round, so runs are reproducible and every runtime draws the same noise).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from edge.backends.base import Backend, Params, StepResult
from edge.train import LocalResult, Sampler, StepFn, fedavg, fedsgd
from edge.wire import MAX_DECOYS

# Stages in the order they apply: to the batch, to the gradient step, to the finished update, to
# what is published.
STAGES = ("batch", "step", "result", "publish")
DP_NAMES = ("dp", "dpsgd", "central_dp", "distributed_dp")


class ProtectError(ValueError):
    """A protection spec that cannot be parsed or applied; the message lists what is valid."""


@dataclass(frozen=True)
class DP:
    """Update-level (local) DP: clip the whole update to L2 norm ``clip``, add N(0, σ²·clip²)."""

    name: ClassVar[str] = "dp"
    stage: ClassVar[str] = "result"
    clip: float
    sigma: float | None = None  # None: calibrated from --dp-epsilon before the run


@dataclass(frozen=True)
class DPSGD:
    """DP-SGD (Abadi et al. 2016): Poisson-sampled batches (rate batch_size/n), each example's
    gradient clipped to ``clip``, N(0, σ²·clip²) added to the sum, divided by batch_size."""

    name: ClassVar[str] = "dpsgd"
    stage: ClassVar[str] = "step"
    clip: float
    sigma: float | None = None


@dataclass(frozen=True)
class CentralDP:
    """DP-FedAvg (McMahan et al. 2018): the device clips its update to ``clip``; the coordinator
    adds N(0, σ²·clip²) once to the sum of the updates."""

    name: ClassVar[str] = "central_dp"
    stage: ClassVar[str] = "result"
    clip: float
    sigma: float | None = None


@dataclass(frozen=True)
class DistributedDP:
    """Distributed DP (the Gaussian form of Kairouz et al. 2021) under secure aggregation: the
    device clips its update to L2 norm ``clip`` and adds N(0, σ²·clip²/``shares``), so the sum of
    ``shares`` devices' updates carries N(0, σ²·clip²) and no single update is more than weakly
    noised. ``shares`` (the round's selected devices) is set by the coordinator in every task;
    a device refuses the step without it, or without secure aggregation."""

    name: ClassVar[str] = "distributed_dp"
    stage: ClassVar[str] = "result"
    clip: float
    sigma: float | None = None
    shares: int | None = None


@dataclass(frozen=True)
class Dummy:
    """``m`` synthetic examples appended to every local batch: uniform noise images in the range
    of the device's data with uniform random labels (``noise``), or examples drawn from a public
    set the device holds (``public``)."""

    name: ClassVar[str] = "dummy"
    stage: ClassVar[str] = "batch"
    m: int
    source: str = "noise"


@dataclass(frozen=True)
class Decoys:
    """``k`` decoy updates published beside the real one under keyed pseudonyms (``edge.decoy``):
    the same training on public examples; the coordinator keeps only the real one. The task's
    ``decoys`` field carries ``k``; the device refuses a task whose two disagree."""

    name: ClassVar[str] = "decoys"
    stage: ClassVar[str] = "publish"
    k: int


Protection = DP | DPSGD | CentralDP | DistributedDP | Dummy | Decoys
DPStep = DP | DPSGD | CentralDP | DistributedDP
REGISTRY: dict[str, type[Any]] = {
    c.name: c for c in (DP, DPSGD, CentralDP, DistributedDP, Dummy, Decoys)
}
SOURCES = ("noise", "public")


def _check(p: Protection) -> Protection:
    """Range checks of one protection's parameters."""
    if isinstance(p, DPStep):
        if not (math.isfinite(p.clip) and p.clip > 0):
            raise ProtectError(f"{p.name}: clip={p.clip!r}; expected a number > 0")
        if p.sigma is not None and not (math.isfinite(p.sigma) and p.sigma >= 0):
            raise ProtectError(f"{p.name}: sigma={p.sigma!r}; expected a number >= 0")
        if isinstance(p, DistributedDP) and p.shares is not None and p.shares < 1:
            raise ProtectError(f"{p.name}: shares={p.shares!r}; expected an integer >= 1")
    elif isinstance(p, Dummy):
        if p.m < 1:
            raise ProtectError(f"dummy: m={p.m!r}; expected an integer >= 1")
        if p.source not in SOURCES:
            raise ProtectError(f"dummy: source={p.source!r}; expected one of {', '.join(SOURCES)}")
    elif isinstance(p, Decoys) and not 1 <= p.k <= MAX_DECOYS:
        raise ProtectError(f"decoys: k={p.k!r}; expected an integer in 1..{MAX_DECOYS}")
    return p


def _convert(cls: type[Any], key: str, raw: str) -> Any:
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    kind = str(types[key])
    try:
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
    except ValueError:
        raise ProtectError(f"{cls.name}: {key}={raw!r}; expected {kind.split(' ')[0]}") from None
    return raw


def parse_one(spec: str) -> Protection:
    """One ``name:key=value,...`` step; the error lists the valid names or keys."""
    name, _, args = spec.strip().partition(":")
    name = name.strip()
    if name not in REGISTRY:
        raise ProtectError(f"unknown protection {name!r}; expected one of {', '.join(REGISTRY)}")
    cls = REGISTRY[name]
    keys = [f.name for f in dataclasses.fields(cls)]
    values: dict[str, Any] = {}
    for i, item in enumerate(a.strip() for a in args.split(",") if a.strip()):
        key, eq, raw = item.partition("=")
        if not eq:
            if i > 0:
                raise ProtectError(
                    f"{name}: {item!r}; expected key=value (keys: {', '.join(keys)})"
                )
            key, raw = keys[0], item
        key = key.strip()
        if key not in keys:
            raise ProtectError(f"{name}: unknown parameter {key!r}; expected {', '.join(keys)}")
        if key in values:
            raise ProtectError(f"{name}: {key} given twice")
        values[key] = _convert(cls, key, raw.strip())
    required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
    if missing := [k for k in required if k not in values]:
        raise ProtectError(f"{name}: missing {', '.join(missing)} (e.g. {name}:{keys[0]}=1)")
    return _check(cls(**values))


def parse(spec: str) -> tuple[Protection, ...]:
    """A run's protections (``;``-separated steps), sorted into the order they apply."""
    steps = [parse_one(s) for s in spec.split(";") if s.strip()]
    names = [s.name for s in steps]
    if dup := sorted({n for n in names if names.count(n) > 1}):
        raise ProtectError(f"protection {dup[0]!r} given twice; give each at most once")
    if len(dps := [n for n in names if n in DP_NAMES]) > 1:
        raise ProtectError(f"{' and '.join(dps)}: at most one DP protection per run")
    return tuple(sorted(steps, key=lambda s: STAGES.index(s.stage)))


def format_spec(steps: Sequence[Protection]) -> str:
    """The spec string of ``steps`` (parses back to the same steps)."""
    parts = []
    for s in steps:
        kv = [f"{k}={v!r}" if isinstance(v, float) else f"{k}={v}" for k, v in _params(s).items()]
        parts.append(f"{s.name}:{','.join(kv)}")
    return ";".join(parts)


def _params(s: Protection) -> dict[str, Any]:
    return {
        f.name: getattr(s, f.name) for f in dataclasses.fields(s) if getattr(s, f.name) is not None
    }


def defence_json(steps: Sequence[Protection]) -> str:
    """The update's ``defence`` field: the steps as applied, in order (``{}`` for none)."""
    if not steps:
        return "{}"
    return json.dumps({"protect": [{"name": s.name, **_params(s)} for s in steps]})


def dp_step(steps: Sequence[Protection]) -> DPStep | None:
    """The run's DP protection, if any."""
    return next((s for s in steps if isinstance(s, DPStep)), None)


def with_shares(spec: str, shares: int) -> str:
    """``spec`` with its ``distributed_dp`` step's noise split over ``shares`` devices (what the
    coordinator sends in a round of ``shares`` selected devices); unchanged without that step."""
    steps = parse(spec)
    if not any(isinstance(s, DistributedDP) for s in steps):
        return spec
    return format_spec(
        [dataclasses.replace(s, shares=shares) if isinstance(s, DistributedDP) else s
         for s in steps]
    )  # fmt: skip


def decoy_count(steps: Sequence[Protection]) -> int:
    """Decoy updates per device and round (0 without a ``decoys`` step)."""
    return next((s.k for s in steps if isinstance(s, Decoys)), 0)


def with_decoys(spec: str, k: int) -> str:
    """``spec`` with ``decoys:k=K`` folded in (the ``decoys`` alias of config, plan and CLI);
    unchanged for ``k`` 0 or when it already says ``k``; ``ProtectError`` when it says another."""
    steps = parse(spec)
    have = decoy_count(steps)
    if k == 0 or have == k:
        return spec
    if have:
        raise ProtectError(f"decoys={k} and protect decoys:k={have} disagree; give one of them")
    return format_spec(parse(f"{spec};decoys:k={k}"))


def require_secagg(steps: Sequence[Protection], *, secagg: bool) -> None:
    """``distributed_dp`` only with secure aggregation (``ProtectError``): alone, an update
    carries 1/√shares of the noise, which protects it from no one."""
    if not secagg and any(isinstance(s, DistributedDP) for s in steps):
        raise ProtectError(
            "distributed_dp needs secagg: each update carries only 1/sqrt(shares) of the noise, "
            "so without the secure sum it is all but unprotected"
        )


def check_task(steps: Sequence[Protection], *, secagg: bool) -> None:
    """What a device checks of a task's steps before training (``ProtectError``): the secure
    aggregation ``distributed_dp`` needs, and the ``shares`` the coordinator must have set."""
    require_secagg(steps, secagg=secagg)
    for s in steps:
        if isinstance(s, DistributedDP):
            require_shares(s)


def require_sigma(s: DPStep) -> float:
    if s.sigma is None:
        raise ProtectError(f"{s.name}: sigma is not set; give sigma=... or calibrate it")
    return s.sigma


def require_shares(s: DistributedDP) -> int:
    if s.shares is None:
        raise ProtectError("distributed_dp: shares is not set (the coordinator sets it per round)")
    return s.shares


def device_noise_std(s: DP | DistributedDP) -> float:
    """Std of the Gaussian noise a device adds to its clipped update: σ·C under ``dp``,
    σ·C/√shares under ``distributed_dp``."""
    if isinstance(s, DP):
        return require_sigma(s) * s.clip
    return require_sigma(s) * s.clip / math.sqrt(require_shares(s))


# -- math: pure functions over named arrays ------------------------------------------------------


def l2_norm(params: Params) -> float:
    """L2 norm of all arrays together (float64)."""
    return math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in params.values()))


def clip_l2(params: Params, clip: float) -> Params:
    """``params · min(1, clip / ‖params‖₂)``, float32."""
    factor = min(1.0, clip / max(l2_norm(params), 1e-300))
    return {k: (v.astype(np.float64) * factor).astype(np.float32) for k, v in params.items()}


def gaussian_like(params: Params, std: float, rng: np.random.Generator) -> Params:
    """N(0, std²) arrays shaped like ``params``, drawn in the mapping's order (float64)."""
    return {k: rng.normal(0.0, std, size=np.shape(v)) for k, v in params.items()}


def add_noise(params: Params, noise: Params) -> Params:
    return {k: (v.astype(np.float64) + noise[k]).astype(np.float32) for k, v in params.items()}


# -- per-example gradients -----------------------------------------------------------------------


@runtime_checkable
class PerExampleBackend(Protocol):
    """A backend with a batched per-example gradient path (the torch reference: vmap(grad))."""

    def per_example_grads(
        self, params: Params, x: np.ndarray, y: np.ndarray
    ) -> tuple[np.ndarray, Params]: ...


def per_example_grads(
    backend: Backend, params: Params, x: np.ndarray, y: np.ndarray
) -> tuple[np.ndarray, Params]:
    """(loss of each example [B], gradient of each example {name: [B, *shape]}): the backend's
    own batched path if it has one, else one gradient-graph run per example (batch of 1)."""
    if isinstance(backend, PerExampleBackend):
        return backend.per_example_grads(params, x, y)
    steps = [backend.loss_and_grad(params, x[i : i + 1], y[i : i + 1]) for i in range(len(x))]
    losses = np.array([s.loss for s in steps], dtype=np.float64)
    grads = {k: np.stack([s.grads[k] for s in steps]) for k in params}
    return losses, grads


def dpsgd_gradient(
    backend: Backend,
    params: Params,
    x: np.ndarray,
    y: np.ndarray,
    *,
    clip: float,
    sigma: float,
    denominator: float,
    rng: np.random.Generator,
) -> StepResult:
    """(Σᵢ clip(gᵢ, C) + N(0, σ²C²)) / denominator; an empty batch gives noise alone."""
    names = list(params)
    total = {k: np.zeros(np.shape(params[k]), np.float64) for k in names}
    loss = float("nan")
    if len(x):
        losses, grads = per_example_grads(backend, params, x, y)
        loss = float(losses.mean())
        flat = np.concatenate([grads[k].reshape(len(x), -1).astype(np.float64) for k in names], 1)
        factors = np.minimum(1.0, clip / np.maximum(np.linalg.norm(flat, axis=1), 1e-300))
        for k in names:
            g = grads[k].astype(np.float64)
            total[k] = np.tensordot(factors, g, axes=1)
    noise = gaussian_like(params, sigma * clip, rng)
    out = {k: ((total[k] + noise[k]) / denominator).astype(np.float32) for k in names}
    return StepResult(loss, np.zeros((len(x), 0), np.float32), out)


# -- dummy examples ------------------------------------------------------------------------------


def dummy_examples(
    m: int,
    source: str,
    rng: np.random.Generator,
    *,
    like: np.ndarray,
    num_classes: int,
    public: tuple[np.ndarray, np.ndarray] | None,
    shape: tuple[int, ...] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``m`` dummy examples: uniform noise in [min, max] of ``like`` with uniform labels, or ``m``
    examples drawn without replacement from ``public``; ``shape``: one example's shape (default
    ``like.shape[1:]``)."""
    if source == "public":
        if public is None or len(public[0]) < m:
            have = 0 if public is None else len(public[0])
            raise ProtectError(
                f"dummy:source=public needs >= {m} public examples; device has {have}"
            )
        idx = rng.choice(len(public[0]), size=m, replace=False)
        return public[0][idx].astype(np.float32), public[1][idx].astype(np.int64)
    lo, hi = float(like.min()), float(like.max())
    x = rng.uniform(lo, hi, size=(m, *(shape or like.shape[1:]))).astype(np.float32)
    return x, rng.integers(0, num_classes, size=m).astype(np.int64)


# -- the pipeline --------------------------------------------------------------------------------


def dpsgd_sampling(algorithm: str, n: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """(Poisson sampling rate q, sampled steps per round) of DP-SGD on ``n`` examples: q =
    batch_size/n (1 for batch_size 0 or >= n); one step for FedSGD, epochs·⌈1/q⌉ for FedAvg."""
    q = 1.0 if batch_size <= 0 or batch_size >= n else batch_size / n
    return q, (1 if algorithm == "fedsgd" else epochs * math.ceil(1 / q))


def poisson_sampler(q: float, count: int) -> Sampler:
    """``count`` batches, each example in each batch independently with probability ``q``."""

    def sample(n: int, rng: np.random.Generator) -> list[np.ndarray]:
        return [np.flatnonzero(rng.random(n) < q) for _ in range(count)]

    return sample


def with_dummies(
    inner: StepFn, d: Dummy, rng: np.random.Generator, *, like: np.ndarray, num_classes: int,
    public: tuple[np.ndarray, np.ndarray] | None,
) -> StepFn:  # fmt: skip
    """``inner`` on every batch with ``d.m`` fresh dummy examples appended."""

    def step(params: Params, x: np.ndarray, y: np.ndarray) -> StepResult:
        dx, dy = dummy_examples(
            d.m, d.source, rng, like=like, num_classes=num_classes, public=public
        )
        return inner(params, np.concatenate([x, dx]), np.concatenate([y, dy]))

    return step


@dataclass(frozen=True)
class LocalPlan:
    """What local training does, from the task: algorithm and SGD settings."""

    algorithm: str
    epochs: int
    batch_size: int
    lr: float


def protected_training(
    steps: Sequence[Protection],
    backend: Backend,
    weights: Params,
    x: np.ndarray,
    y: np.ndarray,
    plan: LocalPlan,
    *,
    rng: np.random.Generator,
    noise_rng: np.random.Generator,
    num_classes: int,
    public: tuple[np.ndarray, np.ndarray] | None = None,
) -> LocalResult:
    """Local FedSGD/FedAvg with ``steps`` applied in stage order: dummies join every batch,
    DP-SGD replaces each step's gradient, then ``dp`` clips and noises / ``central_dp`` clips /
    ``distributed_dp`` clips and adds its share of the noise to the finished update. Batches
    come from ``rng``, noise and dummies from ``noise_rng``."""
    step_fn: StepFn = backend.loss_and_grad
    sampler: Sampler | None = None
    reported: int | None = None
    m = sum(s.m for s in steps if isinstance(s, Dummy))
    for s in steps:
        if isinstance(s, DPSGD):
            q, count = dpsgd_sampling(plan.algorithm, len(x), plan.batch_size, plan.epochs)
            sampler = poisson_sampler(q, count)
            expected = q * len(x)
            step_fn = _dpsgd_step(backend, s, expected + m, noise_rng)
            reported = max(1, round(expected)) if plan.algorithm == "fedsgd" else None
    for s in steps:
        if isinstance(s, Dummy):
            step_fn = with_dummies(
                step_fn, s, noise_rng, like=x, num_classes=num_classes, public=public
            )
    if plan.algorithm == "fedsgd":
        result = fedsgd(
            backend, weights, x, y, plan.batch_size, rng, step_fn=step_fn, sampler=sampler
        )
    else:
        result = fedavg(
            backend, weights, x, y, epochs=plan.epochs, batch_size=plan.batch_size, lr=plan.lr,
            rng=rng, step_fn=step_fn, sampler=sampler,
        )  # fmt: skip
    if reported is not None:
        result = dataclasses.replace(result, num_examples=reported)
    for s in steps:
        if isinstance(s, DP | DistributedDP):
            clipped = clip_l2(result.params, s.clip)
            noise = gaussian_like(clipped, device_noise_std(s), noise_rng)
            result = dataclasses.replace(result, params=add_noise(clipped, noise))
        elif isinstance(s, CentralDP):
            result = dataclasses.replace(result, params=clip_l2(result.params, s.clip))
    return result


def _dpsgd_step(backend: Backend, s: DPSGD, denominator: float, rng: np.random.Generator) -> StepFn:
    sigma = require_sigma(s)

    def step(params: Params, x: np.ndarray, y: np.ndarray) -> StepResult:
        return dpsgd_gradient(
            backend, params, x, y, clip=s.clip, sigma=sigma, denominator=denominator, rng=rng
        )

    return step
