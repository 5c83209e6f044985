"""Optimisation attacks: find images whose update matches the intercepted one.

- ``dlg`` (Zhu et al. 2019): squared L2 distance between updates, L-BFGS.
- ``inverting_gradients`` (Geiping et al. 2020): cosine distance between updates plus a
  total-variation prior, Adam on the sign of the image gradient (lr 0.1, step decay by 10 at 3/8,
  5/8 and 7/8 of the run), box constraint to [0, 1], restarts; labels come from
  ``attacks.labels`` (iDLG for one example, counts for a batch) or are given
  (``labels="given"``). Two departures, both settings chosen on a tuning split of images
  (``bench/tune_ig.py``): one example is matched with a per-layer cosine and the TV weight is
  1e-4 (``IGConfig.cosine``, ``tv_weight``); and a feature term (``IGConfig.feature_weight``)
  pulls each dummy's input to a linear layer towards what the gradient says that layer
  received: exactly, for one example (the first linear layer, as in the analytic attack), and
  for a batch from the classifier's gradient and the labels (``analytic.classifier_inputs``).
  Examples that share a label are pulled only as a group (their summed inputs): the gradient
  fixes that sum exactly and each alone only to ~1e-3 in float32. Such examples are the
  weak spot of batch inversion: the summed gradient of two images of one class barely tells
  them from two blends of them (a cosine of ~5e-10 apart on an untrained LeNetZhu, B=8), and
  the TV prior prefers the blends. IG and ``fedavg`` end with a polish (``polish_iterations``):
  L-BFGS in float64 on the update distance alone, from the kept images (``lbfgs_polish``).
  Signed Adam in float32 stops far from the optimum: on a batch of 8 Fashion-MNIST images the
  gradient's cosine distance was 7e-9 where the true images give 4e-15, and 2,000 polish steps
  bring it to 3e-12 and the examples with a label of their own from 34-39 dB to 52-56 dB.
  With ``IGConfig.surrogate`` the search differentiates the model's gradient through ReLUs and
  max-pools with surrogate second derivatives (``attacks.surrogate``): the exact derivative of
  their step and of a window's choice of maximum is zero, so plain gradient matching never learns
  which units would switch; the model's gradient itself stays exact.
- ``fedavg`` (Geiping et al. 2020 §6, Dimitrov et al. 2022): the same objective on a FedAvg weight
  delta, with the client's local SGD steps simulated differentiably on the dummy images. The
  local data order is an assumption (``FedAvgConfig.epoch_orders``; default: the same
  consecutive minibatches every epoch, no shuffle), or, with ``FedAvgConfig.shuffled``, unknown
  and fitted: the optimisation starts from the given order and, at ``order_fits`` evenly spaced
  points of its schedule, re-fits each epoch's order to the current images (coordinate descent
  over the epochs' distinct minibatch partitions). The order matters when an epoch has several
  minibatches and it changes between epochs: with 4 images in minibatches of 2, the delta of
  the true images in the wrong order can be off by a cosine of 0.007, far more than the match
  the optimisation needs. The dummies are interchangeable, so an order is fitted only up to
  their relabelling.

Schedules run on iterations only (progress = iteration / ``max_iterations``), so the same update
gives the same reconstruction on any machine. ``metadata.budget_s`` is a wall-clock cap over all
restarts: when it runs out the attack stops where it is and the result says so
(``Reconstruction.budget_hit``); its schedule is then cut short, not compressed.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch

from attacks.analytic import classifier_inputs, linear_input
from attacks.base import (
    AttackMetadata,
    AttackUpdate,
    BaseAttack,
    Deadline,
    NotApplicable,
    Recovered,
    UpdateKind,
    first_dense,
    last_layer,
)
from attacks.labels import recover_labels
from attacks.model import FunctionalModel, select_device, to_weights
from attacks.surrogate import with_surrogate_derivatives

Init = Literal["uniform", "gray", "randn"]
LabelSource = Literal["recover", "given"]
Objective = Callable[[torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]
"""(images, progress in [0, 1]) -> (loss to minimise, update distance alone)."""


# -- pure pieces --------------------------------------------------------------------------------


def cosine_distance(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """``1 - <a, b> / (|a| |b|)`` over all tensors flattened into one vector, computed as
    ``|a/|a| - b/|b||^2 / 2``: no cancellation near 0, where ``1 - cos`` in float32 stops at
    ~1e-7 (gradients that differ by ~5e-4 relative would look equal)."""
    na = torch.as_tensor(sum(x.pow(2).sum() for x in a)).sqrt().clamp_min(1e-30)
    nb = torch.as_tensor(sum(y.pow(2).sum() for y in b)).sqrt().clamp_min(1e-30)
    return (
        torch.as_tensor(sum((x / na - y / nb).pow(2).sum() for x, y in zip(a, b, strict=True))) / 2
    )


def rebuild(
    update: AttackUpdate,
    global_model: Mapping[str, np.ndarray],
    metadata: AttackMetadata,
    dtype: torch.dtype = torch.float32,
) -> tuple[FunctionalModel, dict[str, torch.Tensor], list[torch.Tensor]]:
    """The attacker's copy of the model, its global weights (requiring grad) and the observed
    update's tensors, in ``dtype`` on the metadata's device."""
    device = select_device(metadata.device, metadata.threads)
    model = FunctionalModel.from_metadata(metadata, device)
    weights = {
        k: v.to(dtype).requires_grad_(True) for k, v in to_weights(global_model, device).items()
    }
    observed = [v.to(dtype) for v in to_weights(update.params, device).values()]
    return model, weights, observed


def global_mismatch(
    candidates: Sequence[np.ndarray],
    labels: np.ndarray,
    update: AttackUpdate,
    global_model: Mapping[str, np.ndarray],
    metadata: AttackMetadata,
) -> list[float]:
    """Per candidate batch of images [B, C, H, W] with ``labels`` [B]: one cosine distance over
    the whole update between ``update`` and the update those images give on ``global_model``."""
    model, weights, observed = rebuild(update, global_model, metadata)
    device = observed[0].device
    targets = torch.as_tensor(labels, device=device)
    out = []
    for images in candidates:
        dummy = model.update(weights, torch.as_tensor(images, device=device), targets, update)
        out.append(float(cosine_distance(list(dummy.values()), observed).detach()))
    return out


def l2_distance(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum of squared differences over all tensors."""
    return torch.as_tensor(sum((x - y).pow(2).sum() for x, y in zip(a, b, strict=True)))


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of vertical plus horizontal neighbours."""
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    return dx + dy


def group_feature_distance(
    features: torch.Tensor, target: torch.Tensor, groups: torch.Tensor
) -> torch.Tensor:
    """Squared distance of each group's summed ``features`` [B, D] from its summed ``target``,
    relative to the target's, times the group's size, summed (``groups[b]``: example b's group).
    Examples that share a label are one group: a batch gradient fixes the sum of their
    classifier inputs exactly but each alone only to ~1e-3 in float32."""
    n = int(groups.max()) + 1
    sums = features.new_zeros(n, features.shape[1]).index_add(0, groups, features)
    goal = target.new_zeros(n, target.shape[1]).index_add(0, groups, target)
    sizes = torch.bincount(groups, minlength=n).to(features.dtype)
    rel = (sums - goal).square().sum(dim=1) / goal.square().sum(dim=1).clamp_min(1e-30)
    return (rel * sizes).sum()


def step_decay(progress: float, *, milestones: Sequence[float] = (3 / 8, 5 / 8, 7 / 8)) -> float:
    """The learning-rate factor at ``progress`` in [0, 1]: 0.1 per milestone passed."""
    return 0.1 ** sum(progress >= m for m in milestones)


def initial_images(shape: tuple[int, ...], init: Init, seed: int) -> torch.Tensor:
    """Starting images in [0, 1]: uniform noise, flat gray, or clipped N(0.5, 0.5^2)."""
    gen = torch.Generator().manual_seed(seed)
    if init == "uniform":
        return torch.rand(shape, generator=gen)
    if init == "gray":
        return torch.full(shape, 0.5)
    return (0.5 + 0.5 * torch.randn(shape, generator=gen)).clamp(0, 1)


# -- optimisers ---------------------------------------------------------------------------------


def signed_adam(
    objective: Objective,
    x0: torch.Tensor,
    *,
    lr: float,
    max_iterations: int,
    deadline: Deadline,
    signed: bool = True,
    boxed: bool = True,
    checkpoints: Sequence[int] = (),
    on_checkpoint: Callable[[torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, bool]:
    """Minimise ``objective`` over images from ``x0`` with (signed-gradient) Adam and step decay
    on the iteration count; returns (images, whether ``deadline`` stopped the run early).
    ``on_checkpoint(images)`` runs before each iteration listed in ``checkpoints``."""
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    for it in range(max_iterations):
        if deadline.expired():
            return x.detach(), True
        if on_checkpoint is not None and it in checkpoints:
            on_checkpoint(x.detach())
        progress = it / max_iterations
        for group in opt.param_groups:
            group["lr"] = lr * step_decay(progress)
        total, _ = objective(x, progress)
        (grad,) = torch.autograd.grad(total, [x])
        x.grad = grad.sign() if signed else grad
        opt.step()
        if boxed:
            with torch.no_grad():
                x.clamp_(0, 1)
    return x.detach(), False


def lbfgs(
    objective: Objective,
    x0: torch.Tensor,
    *,
    max_iterations: int,
    deadline: Deadline,
    boxed: bool = False,
) -> tuple[torch.Tensor, bool]:
    """Minimise ``objective`` with L-BFGS (strong-Wolfe line search), 20 evaluations a step;
    returns (images, whether ``deadline`` stopped the run early)."""
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [x], lr=1.0, max_iter=20, history_size=100, line_search_fn="strong_wolfe"
    )
    step = 0

    def closure() -> torch.Tensor:
        total, _ = objective(x, step / max_iterations)
        (x.grad,) = torch.autograd.grad(total, [x])
        return total.detach()

    for step in range(max_iterations):  # noqa: B007 (read by the closure)
        if deadline.expired():
            return x.detach(), True
        opt.step(closure)
        if boxed:
            with torch.no_grad():
                x.clamp_(0, 1)
    return x.detach(), False


def lbfgs_polish(
    distance: Callable[[torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    *,
    iterations: int,
    deadline: Deadline,
    chunk: int = 50,
    margin: float = 1e-4,
) -> tuple[torch.Tensor, bool]:
    """Minimise ``distance(images)`` from ``x0`` with L-BFGS (strong-Wolfe line search) over
    ``sigmoid(z)``, images kept in (0, 1) and started from ``x0`` clamped to ``[margin,
    1 - margin]``; the distance is divided by its value at ``x0``, and no tolerance ends the run
    early: it runs ``iterations`` steps (the deadline is checked every ``chunk``). Returns
    (images, whether ``deadline`` stopped it); ``x0`` when the result is farther or not finite."""
    z = torch.logit(x0.clamp(margin, 1 - margin)).requires_grad_(True)
    start = distance(x0).detach().clamp_min(1e-300)
    opt = torch.optim.LBFGS(
        [z], lr=1.0, max_iter=chunk, history_size=100, tolerance_grad=0.0,
        tolerance_change=0.0, line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure() -> torch.Tensor:
        loss = distance(torch.sigmoid(z)) / start
        (z.grad,) = torch.autograd.grad(loss, [z])
        return loss.detach()

    done = 0
    while done < iterations:
        if deadline.expired():
            break
        opt.param_groups[0]["max_iter"] = min(chunk, iterations - done)
        opt.step(closure)
        done += chunk
    found = torch.sigmoid(z).detach()
    if not float(distance(found).detach()) <= float(start):
        found = x0
    return found, done < iterations


# -- attacks ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DLGConfig:
    """DLG: ``max_iterations`` L-BFGS steps (up to 20 evaluations each) per restart.

    ``labels``: ``"recover"`` takes them from the update (``attacks.labels``); ``"given"`` uses
    ``given_labels`` (one per example, update order): the attacker is told them, which benchmarks
    the optimisation alone.
    """

    max_iterations: int = 300
    restarts: int = 1
    init: Init = "uniform"
    seed: int = 0
    labels: LabelSource = "recover"
    given_labels: tuple[int, ...] = ()


@dataclass(frozen=True)
class IGConfig:
    """Inverting Gradients: signed Adam at ``lr`` with step decay, TV prior, restarts.

    ``cosine``: ``"global"`` is one cosine distance over the whole update (Geiping et al.);
    ``"per_layer"`` averages one per parameter tensor; ``"auto"`` takes per-layer for a single
    example and global for a batch. Measured on the untrained sigmoid LeNet, 10 s on one core:
    B=1 global ~15 dB (the classifier dominates), per-layer ~70 dB; B=8 global ~21 dB,
    per-layer ~12 dB. ``tv_decay`` scales the TV weight with the learning rate (the prior then
    shapes only the start of the run); off by default since ``bench/tune_ig.py`` on the tuning
    photos (LeNetZhu, B=1, 1,000 iterations, labels given): per-layer, TV 1e-4, 24.5 dB without
    decay, 17.7 dB with it, 16.1 dB for plain IG (global cosine, TV 0.1). ``feature_weight``
    (FedSGD gradients only; 0 turns it off) weighs each example's feature distance, summed over
    the batch (``group_feature_distance``). On the tuning images it lifts photos on LeNetZhu
    from 26.4 to 31.8 dB (B=1, 1,000 iterations), batches of 4 digits from 13.9 to 49.2 dB
    (1,000 iterations) and batches of 8 digits to 47.3 dB (2,000 iterations). Tried as a mean
    over the batch, the best weight was 3e3 at B=1, 1e4 at B=4 and 3e4 at B=8 (1e2 to 3e4
    tried), about 3e3 per example, hence the sum. It drops the ReLU LeNet at B=1 from 16.6 to
    about 10 dB (weights 1e2 and 1e3; its first linear layer sees max-pooled features): turn
    it off there. For a batch the term applies only where the classifier's inputs number at
    least ``feature_min_ratio`` of an example's input values: on the bundled photo crops
    (LeNetZhu, 3x32x32: 768 inputs for 3,072 values, ratio 0.25), B=8, 500 iterations, it
    drops IG from 16.8 to 8.7 dB (12.9 at an eighth of the weight; 15.9 to 9.1 with distinct
    labels), where on 28x28 digits (588 for 784, ratio 0.75) it lifts B=8 from 11.7 to 47.3 dB.
    ``plain_restart`` (the FedSGD gradient of one example): one more run with plain IG's recipe
    (``PLAIN_RECIPE``) and the same labels, keeping whichever result's gradient is nearer the
    observed one in one global cosine distance (``global_mismatch``; each recipe's own objective
    would favour itself). On a flat held-out photo (dark sky) the defaults leave noise at 21.5
    dB where plain IG reaches 34.2 dB, and plain IG matches the gradient slightly better
    (3.32e-9 against 3.48e-9); on the 13 other held-out and tuning photos the defaults match it
    10 to 1,000 times better and are kept. It doubles the time; skipped when the recipe is plain
    IG's, and for batches (held-out batches of 4 digits: 59.9 dB against plain IG's 13.4).
    ``polish_iterations``: L-BFGS steps in float64 on the update distance alone after the
    restarts (at most ``max_iterations``; 0 turns it off); with the plain restart, both results
    get the first fifth and the nearer one the rest. On the tuning images (labels given, 1,000
    iterations before): photos at B=1 with the plain restart 31.0 -> 47.7 dB (500 steps; 16.5
    -> 24.3 s per image alone; polishing only the result chosen before it: 38.4 dB), the recipe
    alone 31.0 -> 36.1 (300) and 43.4 dB (1,000); Fashion-MNIST batches of 8 (2,000 before)
    26.8 -> 33.2 (500) and 35.8 dB (2,000); photo batches of 8 15.0 -> 15.4 dB; the ReLU LeNet
    unchanged (23.6 dB: its gradient is piecewise in the image, L-BFGS stalls at the kinks).
    ``surrogate`` (0 turns it off): the search differentiates the model's gradient through ReLUs
    and max-pools with surrogate second derivatives of relative width ``surrogate``
    (``attacks.surrogate``; the polish stays exact). ReLU LeNet, tuning digits, one restart,
    1,000 iterations, 12 digits: off 22.0 dB, width 3 25.8, 10 23.7, 5 annealed to 0.5 24.6; 6
    digits: 0.1 17.4, 0.3 23.4, 1 25.8, 3 26.1, 5 26.2. An iteration takes about a third longer.
    Tuning Fashion-MNIST on the ReLU LeNet (``IG_RELU``, 6 images): 16.2 -> 17.1 dB; the ResNet
    (2 tuning photos, 300 iterations): 6.2 -> 6.1 dB. Off by default; ``bench/attacks.py``'s
    ``IG_RELU`` turns it on.
    """

    max_iterations: int = 24_000
    restarts: int = 1
    lr: float = 0.1
    tv_weight: float = 1e-4
    tv_decay: bool = False
    cosine: Literal["auto", "global", "per_layer"] = "auto"
    signed: bool = True
    init: Init = "randn"
    seed: int = 0
    labels: LabelSource = "recover"
    given_labels: tuple[int, ...] = ()
    feature_weight: float = 3000.0
    feature_min_ratio: float = 0.5
    plain_restart: bool = True
    polish_iterations: int = 500
    surrogate: float = 0.0

    @property
    def polish_steps(self) -> int:
        """The polish's length: ``polish_iterations``, at most ``max_iterations``."""
        return min(self.polish_iterations, self.max_iterations)


PLAIN_RECIPE: dict[str, object] = {
    "cosine": "global", "tv_weight": 0.1, "tv_decay": False, "feature_weight": 0.0,
    "surrogate": 0.0,
}  # fmt: skip
"""Geiping et al.'s recipe as inversefed ships it: one cosine distance over the whole update,
TV 0.1 throughout, no feature term, exact second derivatives."""


@dataclass(frozen=True)
class FedAvgConfig(IGConfig):
    """Inverting Gradients settings for FedAvg deltas, plus the assumed local data order:
    ``epoch_orders[e % len]`` is the permutation of the batch that epoch e visits (empty: the
    given order every epoch); ``shuffled``: the order is unknown (a fresh permutation per epoch,
    excludes ``epoch_orders``) and fitted ``order_fits`` times per run, each fit at most
    ``order_sweeps`` passes over the epochs, each epoch choosing among at most
    ``order_candidates`` distinct orders."""

    epoch_orders: tuple[tuple[int, ...], ...] = ()
    shuffled: bool = False
    order_fits: int = 4
    order_sweeps: int = 2
    order_candidates: int = 64


class _UpdateMatching(BaseAttack):
    """Shared driver: rebuild the model, recover labels, run restarts, keep the best match."""

    name: ClassVar[str]
    config: DLGConfig | IGConfig

    def run(
        self,
        update: AttackUpdate,
        global_model: Mapping[str, np.ndarray],
        metadata: AttackMetadata,
        deadline: Deadline,
    ) -> Recovered:
        found = self.search(update, global_model, metadata, deadline)
        return self.polish(found, update, global_model, metadata, deadline)

    def search(
        self,
        update: AttackUpdate,
        global_model: Mapping[str, np.ndarray],
        metadata: AttackMetadata,
        deadline: Deadline,
    ) -> Recovered:
        """The restarts of the optimisation; the best match."""
        model, weights, observed = rebuild(update, global_model, metadata)
        model = self.searched_model(model)
        device = observed[0].device
        labels = self.labels(update, global_model, metadata)
        targets = torch.tensor(labels, device=device)
        shape = (update.num_examples, *metadata.manifest.input_shape)

        feature = self.feature_match(model, weights, update, metadata, labels)

        def objective(x: torch.Tensor, progress: float) -> tuple[torch.Tensor, torch.Tensor]:
            dummy = model.update(
                weights, x, targets, update, orders=self.orders(update), create_graph=True
            )
            match = self.distance(list(dummy.values()), observed, update.num_examples)
            total = match + self.prior(x, progress)
            return (total if feature is None else total + feature(x)), match

        cfg = self.config
        best: tuple[float, torch.Tensor] | None = None
        hit = False
        for r in range(cfg.restarts):
            x0 = initial_images(shape, cfg.init, cfg.seed + r).to(device)
            x, hit = self.optimize(objective, x0, deadline, update)
            score = float(objective(x.requires_grad_(True), 1.0)[1].detach())
            if best is None or not math.isfinite(best[0]) or score < best[0]:
                best = (score, x.detach())
            if hit:
                break
        assert best is not None
        score, x = best
        images = x.clamp(0, 1).cpu().numpy().astype(np.float32)
        conf = np.full(len(images), self.confidence(score), dtype=np.float32)
        return Recovered(images, labels, conf, budget_hit=hit)

    def labels(
        self,
        update: AttackUpdate,
        global_model: Mapping[str, np.ndarray],
        metadata: AttackMetadata,
    ) -> np.ndarray:
        """The labels to optimise with: recovered from the update, or the given ones."""
        cfg = self.config
        if cfg.labels == "recover":
            return recover_labels(update, global_model, metadata)[0]
        if cfg.labels != "given":
            raise ValueError(f"labels={cfg.labels!r}; expected 'recover' or 'given'")
        given = np.asarray(cfg.given_labels, dtype=np.int64)
        classes = metadata.manifest.num_classes
        if given.shape != (update.num_examples,) or not ((given >= 0) & (given < classes)).all():
            raise ValueError(
                f"given_labels={cfg.given_labels}; expected {update.num_examples} class indices "
                f"in 0..{classes - 1} (one per example, in update order)"
            )
        return given

    def searched_model(self, model: FunctionalModel) -> FunctionalModel:
        """The model the search differentiates (the attacker's copy as it is, here)."""
        return model

    def distance(
        self, a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], batch: int
    ) -> torch.Tensor:
        raise NotImplementedError

    def prior(self, x: torch.Tensor, progress: float) -> torch.Tensor:
        return x.new_zeros(())

    def feature_match(
        self,
        model: FunctionalModel,
        weights: Mapping[str, torch.Tensor],
        update: AttackUpdate,
        metadata: AttackMetadata,
        labels: np.ndarray,
    ) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """An extra term of the objective over the dummy images, or ``None``."""
        return None

    def orders(self, update: AttackUpdate) -> tuple[tuple[int, ...], ...]:
        return ()

    def polish(
        self,
        found: Recovered,
        update: AttackUpdate,
        global_model: Mapping[str, np.ndarray],
        metadata: AttackMetadata,
        deadline: Deadline,
        steps: int | None = None,
    ) -> Recovered:
        """A last refinement of the kept result, ``steps`` long (none here)."""
        return found

    def confidence(self, score: float) -> float:
        raise NotImplementedError

    def optimize(
        self, objective: Objective, x0: torch.Tensor, deadline: Deadline, update: AttackUpdate
    ) -> tuple[torch.Tensor, bool]:
        raise NotImplementedError


class DLG(_UpdateMatching):
    """Deep Leakage from Gradients with iDLG/count labels: L2 update distance, L-BFGS."""

    name = "dlg"
    config: DLGConfig

    def __init__(self, config: DLGConfig | None = None) -> None:
        self.config = config or DLGConfig()

    def distance(
        self, a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], batch: int
    ) -> torch.Tensor:
        return l2_distance(a, b)

    def confidence(self, score: float) -> float:
        return 1.0 / (1.0 + score)

    def optimize(
        self, objective: Objective, x0: torch.Tensor, deadline: Deadline, update: AttackUpdate
    ) -> tuple[torch.Tensor, bool]:
        return lbfgs(objective, x0, max_iterations=self.config.max_iterations, deadline=deadline)


class InvertingGradients(_UpdateMatching):
    """Inverting Gradients on a FedSGD gradient (see the module docstring)."""

    name = "inverting_gradients"
    kinds: ClassVar[tuple[UpdateKind, ...]] = ("gradient",)
    config: IGConfig

    def __init__(self, config: IGConfig | None = None) -> None:
        self.config = config or IGConfig()

    def run(
        self,
        update: AttackUpdate,
        global_model: Mapping[str, np.ndarray],
        metadata: AttackMetadata,
        deadline: Deadline,
    ) -> Recovered:
        cfg = self.config
        plain = all(getattr(cfg, k) == v for k, v in PLAIN_RECIPE.items())
        single = update.kind == "gradient" and update.num_examples == 1
        if not cfg.plain_restart or plain or not single:
            return super().run(update, global_model, metadata, deadline)
        found = self.search(update, global_model, metadata, deadline)
        if found.budget_hit:
            return found
        assert found.labels is not None
        recipe = dataclasses.replace(
            cfg,
            **PLAIN_RECIPE,  # type: ignore[arg-type]
            restarts=1,
            plain_restart=False,
            labels="given",
            given_labels=tuple(int(v) for v in found.labels),
        )
        rival = type(self)(recipe)
        other = rival.search(update, global_model, metadata, deadline)
        steps = cfg.polish_steps
        first = steps // 5  # both polished this far, then the nearer one the rest of the way
        found = self.polish(found, update, global_model, metadata, deadline, first)
        other = rival.polish(other, update, global_model, metadata, deadline, first)
        assert found.images is not None and other.images is not None and found.labels is not None
        mine, theirs = global_mismatch(
            [found.images, other.images], found.labels, update, global_model, metadata
        )
        if theirs < mine:
            return rival.polish(other, update, global_model, metadata, deadline, steps - first)
        found = dataclasses.replace(found, budget_hit=other.budget_hit)
        return self.polish(found, update, global_model, metadata, deadline, steps - first)

    def searched_model(self, model: FunctionalModel) -> FunctionalModel:
        """With ``surrogate``: the model with surrogate second derivatives for its ReLUs and
        max-pools (``attacks.surrogate``); the same values and gradients."""
        tau = self.config.surrogate
        if tau <= 0:
            return model
        return FunctionalModel(with_surrogate_derivatives(model.module, tau), model.input_map)

    def distance(
        self, a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], batch: int
    ) -> torch.Tensor:
        cosine = self.config.cosine
        if cosine == "global" or (cosine == "auto" and batch > 1):
            return cosine_distance(a, b)
        return torch.stack([cosine_distance([u], [v]) for u, v in zip(a, b, strict=True)]).mean()

    def prior(self, x: torch.Tensor, progress: float) -> torch.Tensor:
        decay = step_decay(progress) if self.config.tv_decay else 1.0
        return self.config.tv_weight * decay * total_variation(x)

    def feature_match(
        self,
        model: FunctionalModel,
        weights: Mapping[str, torch.Tensor],
        update: AttackUpdate,
        metadata: AttackMetadata,
        labels: np.ndarray,
    ) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """For a FedSGD gradient: ``feature_weight`` times the dummies' squared distance,
        relative to the target's, from what a linear layer received, as its gradients give it
        (``group_feature_distance``: per label, summed over the batch). One example: the first
        linear layer's input, exact (``attacks.analytic.linear_input``); a batch: the
        classifier's inputs, where they are determined (``attacks.analytic.classifier_inputs``)."""
        if self.config.feature_weight <= 0 or update.kind != "gradient":
            return None
        manifest, params = metadata.manifest, update.params
        found: np.ndarray | None = None
        dense = first_dense(manifest)
        w_name, b_name = last_layer(manifest)
        if update.num_examples == 1 and dense is not None:
            w_name, b_name = dense
            try:
                found = linear_input(params[w_name], params[b_name])[None]
            except NotApplicable:  # no signal reached the layer
                return None
        elif b_name is not None:
            w, c = (weights[k].detach().cpu().numpy() for k in (w_name, b_name))
            if w.shape[1] < self.config.feature_min_ratio * math.prod(manifest.input_shape):
                return None
            found = classifier_inputs(params[w_name], params[b_name], w, c, labels)
        if found is None:
            return None
        device = weights[w_name].device
        groups = torch.as_tensor(np.unique(labels, return_inverse=True)[1], device=device)
        target = torch.tensor(found, dtype=torch.float32, device=device)
        layer, weight = w_name.rsplit(".", 1)[0], self.config.feature_weight
        return lambda x: (
            weight * group_feature_distance(model.layer_input(weights, x, layer), target, groups)
        )

    def polish(
        self,
        found: Recovered,
        update: AttackUpdate,
        global_model: Mapping[str, np.ndarray],
        metadata: AttackMetadata,
        deadline: Deadline,
        steps: int | None = None,
    ) -> Recovered:
        """``steps`` (default ``polish_iterations``, at most ``max_iterations``) L-BFGS steps in
        float64 on the update distance alone (no prior, no feature term) from the kept images
        (``lbfgs_polish``); skipped when the deadline has hit."""
        if steps is None:
            steps = self.config.polish_steps
        if steps <= 0 or found.budget_hit or found.images is None or found.labels is None:
            return found
        model, weights, observed = rebuild(update, global_model, metadata, torch.float64)
        device = observed[0].device
        targets = torch.as_tensor(found.labels, device=device)
        orders = self.orders(update)

        def distance(images: torch.Tensor) -> torch.Tensor:
            dummy = model.update(weights, images, targets, update, orders=orders, create_graph=True)
            return self.distance(list(dummy.values()), observed, update.num_examples)

        x0 = torch.as_tensor(found.images, dtype=torch.float64, device=device)
        x, hit = lbfgs_polish(distance, x0, iterations=steps, deadline=deadline)
        images = x.clamp(0, 1).cpu().numpy().astype(np.float32)
        return dataclasses.replace(found, images=images, budget_hit=hit)

    def confidence(self, score: float) -> float:
        return 1.0 - score

    def optimize(
        self, objective: Objective, x0: torch.Tensor, deadline: Deadline, update: AttackUpdate
    ) -> tuple[torch.Tensor, bool]:
        c = self.config
        return signed_adam(
            objective,
            x0,
            lr=c.lr,
            max_iterations=c.max_iterations,
            deadline=deadline,
            signed=c.signed,
        )


class FedAvgInversion(InvertingGradients):
    """Invert a FedAvg weight delta by simulating the client's local SGD on the dummy images."""

    name = "fedavg"
    kinds: ClassVar[tuple[UpdateKind, ...]] = ("delta",)
    config: FedAvgConfig

    def __init__(self, config: FedAvgConfig | None = None) -> None:
        self.config = config or FedAvgConfig()
        self._fitted: list[tuple[int, ...]] = []  # shuffled: the order hypothesis, per epoch

    def orders(self, update: AttackUpdate) -> tuple[tuple[int, ...], ...]:
        n = update.num_examples
        cfg = self.config
        if cfg.shuffled:
            if cfg.epoch_orders:
                raise ValueError("shuffled=True means the order is unknown; drop epoch_orders")
            return tuple(self._fitted)
        for order in cfg.epoch_orders:
            if sorted(order) != list(range(n)):
                raise ValueError(f"epoch order {order} is not a permutation of 0..{n - 1}")
        return cfg.epoch_orders

    def optimize(
        self, objective: Objective, x0: torch.Tensor, deadline: Deadline, update: AttackUpdate
    ) -> tuple[torch.Tensor, bool]:
        c = self.config
        if not c.shuffled:
            return super().optimize(objective, x0, deadline, update)
        n = update.num_examples
        self._fitted = [tuple(range(n))] * update.epochs  # start: the given order every epoch
        candidates = epoch_orders(n, update.local_batches, c.order_candidates, c.seed)
        every = max(1, c.max_iterations // (c.order_fits + 1))
        return signed_adam(
            objective,
            x0,
            lr=c.lr,
            max_iterations=c.max_iterations,
            deadline=deadline,
            signed=c.signed,
            checkpoints=range(every, c.max_iterations, every),
            on_checkpoint=lambda x: self._fit_orders(objective, x, candidates),
        )

    def _fit_orders(
        self, objective: Objective, x: torch.Tensor, candidates: Sequence[tuple[int, ...]]
    ) -> None:
        """Re-fit the order hypothesis to images ``x`` (``fit_orders``)."""

        def match(orders: Sequence[tuple[int, ...]]) -> float:
            self._fitted = list(orders)
            return float(objective(x.requires_grad_(True), 1.0)[1].detach())

        fitted = fit_orders(match, self._fitted, candidates, sweeps=self.config.order_sweeps)
        self._fitted = list(fitted)


def fit_orders(
    match: Callable[[Sequence[tuple[int, ...]]], float],
    start: Sequence[tuple[int, ...]],
    candidates: Sequence[tuple[int, ...]],
    *,
    sweeps: int,
) -> tuple[tuple[int, ...], ...]:
    """Coordinate descent over per-epoch orders: each epoch in turn takes the candidate with the
    lowest ``match(orders)``, the other epochs fixed, until a sweep changes nothing (at most
    ``sweeps`` sweeps). Starts from ``start``; never ends worse than it."""
    orders = list(start)
    best = match(orders)
    for _ in range(sweeps):
        changed = False
        for e in range(len(orders)):
            kept = orders[e]
            for order in candidates:
                if order == kept:
                    continue
                orders[e] = order
                if (score := match(orders)) < best:
                    best, kept, changed = score, order, True
            orders[e] = kept
        if not changed:
            break
    return tuple(orders)


def epoch_orders(n: int, batches: Sequence[int], limit: int, seed: int) -> list[tuple[int, ...]]:
    """Orders of ``0..n-1`` that give distinct epochs with minibatches of sizes ``batches``
    (orders within a minibatch give the same mean gradient): all of them, identity first, when
    there are at most ``limit``; else the identity and ``limit - 1`` drawn at random (seeded)."""

    def canonical(order: Sequence[int]) -> tuple[int, ...]:
        out: list[int] = []
        start = 0
        for size in batches:
            out += sorted(order[start : start + size])
            start += size
        return tuple(out)

    identity = tuple(range(n))
    if math.factorial(n) <= 40_320:  # n <= 8: enumerate
        distinct = dict.fromkeys(canonical(p) for p in itertools.permutations(identity))
        if len(distinct) <= limit:
            return list(distinct)
    rng = np.random.default_rng(seed)
    found = {identity: None}
    for _ in range(limit * 100):
        if len(found) >= limit:
            break
        found.setdefault(canonical([int(i) for i in rng.permutation(n)]), None)
    return list(found)
