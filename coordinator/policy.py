"""Round policy as pure functions (the MQTT plumbing is ``coordinator.server``): which devices a
round may select (``eligible``, ``choose``), which updates it admits (``admit``), when it stops
waiting (``round_over``), how long it lasted in virtual time (``round_length``) and the next
global weights (``next_weights``).

Status messages are not authenticated, so the policy trusts only what costs an impostor a live
connection, and bounds what it can cost when it has one:

- *live*: a device is selectable only after an ``online`` status that reached the coordinator
  live (not a retained copy from the past: a planted retained ``online`` has no device behind
  it). The coordinator asks every connected device to re-announce (``hello``) when it starts.
- *silent*: a selected device that sent nothing in its round is not selected again until it
  announces anew with a live status (or its late update shows it is there after all).
- *proven*: a device whose update was accepted in this run. At most
  ``max(max_unproven, number of proven devices)`` unproven devices are selected per round.
- a selected device whose *signed* update is rejected as ``FINAL_REJECTIONS`` (NaN or Inf: its
  local training diverged) is not waited for any longer in that round (``final_rejection``).
  Unsigned, the same message could come from anyone on the broker: the round keeps waiting.
- once every proven device of a round has answered, the round waits for unproven ones only
  while answers keep coming: it ends after ``quiet_s`` without one (counted from the broadcast
  while none came).

A forged ``offline`` removes a device only until its next live ``online``: devices answer a
forged ``offline`` on their own status topic, and ``hello``, with ``online``.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from coordinator import robust
from coordinator.aggregate import apply_update, central_dp_mean
from edge import protect, wire
from edge.wire import Params


@dataclass(frozen=True)
class Standing:
    """What the coordinator knows of one device that says it is online."""

    live: bool = False  # its online status arrived live, not as a retained copy
    silent: bool = False  # selected, sent nothing, and has not announced anew since


def on_status(old: Standing | None, *, online: bool, retained: bool) -> Standing | None:
    """The standing after a status message; None: not online."""
    if not online:
        return None
    base = old or Standing()
    if retained:
        return base
    return Standing(live=True, silent=False)


def eligible(standing: Mapping[str, Standing]) -> list[str]:
    """Devices a round may select: live and not silent, sorted by id."""
    return sorted(d for d, s in standing.items() if s.live and not s.silent)


def unproven_cap(max_unproven: int, proven: int) -> int | None:
    """Most unproven devices per round; None (no cap) when ``max_unproven`` is 0."""
    return None if max_unproven <= 0 else max(max_unproven, proven)


def choose(
    pool: list[str],
    proven: Collection[str],
    *,
    fraction: float,
    cap: int | None,
    rng: np.random.Generator,
) -> list[str]:
    """A seeded sample of ``fraction`` of ``pool`` (at least one), keeping only the first
    ``cap`` unproven devices of the sample; sorted."""
    if not pool:
        return []
    k = max(1, math.ceil(fraction * len(pool)))
    sample = rng.choice(pool, size=k, replace=False).tolist()
    if cap is not None:
        unproven = [d for d in sample if d not in proven]
        dropped = set(unproven[cap:])
        sample = [d for d in sample if d not in dropped]
    return sorted(sample)


def after_round(
    standing: Mapping[str, Standing], selected: Iterable[str], heard: Collection[str]
) -> dict[str, Standing]:
    """Mark the selected devices that sent nothing as silent."""
    out = dict(standing)
    for d in selected:
        if d not in heard and d in out:
            out[d] = Standing(live=out[d].live, silent=True)
    return out


# Rejections that say the device's own result is unusable (its training diverged): it will not
# send another this round.
FINAL_REJECTIONS = frozenset({"non_finite"})


def final_rejection(reason: str, *, signed: bool) -> bool:
    """Whether a rejected update ends the wait for its device in this round: a
    ``FINAL_REJECTIONS`` reason on an update whose signature verified. Unsigned, anyone on the
    broker could have sent it to knock an honest device's update out of the round."""
    return signed and reason in FINAL_REJECTIONS


def round_over(
    *,
    elapsed: float,
    deadline_s: float,
    waiting: Collection[str],
    proven: Collection[str],
    since_last_answer: float | None,
    quiet_s: float,
) -> bool:
    """Whether a round stops collecting: nobody left to wait for, the deadline passed, or only
    unproven devices are left and none answered for ``quiet_s`` (0: wait the deadline)."""
    if not waiting or elapsed >= deadline_s:
        return True
    if quiet_s <= 0 or since_last_answer is None or any(d in proven for d in waiting):
        return False
    return since_last_answer >= quiet_s


def admit(
    update: wire.Update,
    *,
    run: str,
    topic_device: str,
    device: str,
    round_: int | None,
    selected: Collection[str],
    tasked: Collection[str],
    accepted: Collection[str],
    nonces: Iterable[Collection[str]],
    kind: str,
    announced: int,
    max_examples: int,
) -> wire.WireError | None:
    """Why a decoded ``update`` of ``device`` (sent on ``topic_device``: its pseudonym with
    decoys) is refused in round ``round_`` (None: no round open), or None to admit it.
    ``tasked``: the selected devices sent their task so far (pace steering holds the others
    back); ``nonces``: those of the updates accepted in the recent rounds; ``kind``: the update
    kind the run's algorithm expects; ``announced``: the examples the device said it holds."""
    current = "none" if round_ is None else str(round_)
    if update.run != run:
        return wire.WireError("wrong_run", f"run {update.run!r}")
    if update.device != topic_device:
        return wire.WireError(
            "device_mismatch", f"metadata says {update.device!r}, topic {topic_device!r}"
        )
    if round_ is None or update.round < round_:
        return wire.WireError("stale_round", f"round {update.round}, current {current}")
    if update.round > round_:
        return wire.WireError("future_round", f"round {update.round}, current {round_}")
    if device not in selected:
        return wire.WireError("not_selected", f"{device} was not selected in round {round_}")
    if device not in tasked:
        return wire.WireError("no_task", f"{device} has not been sent its task of round {round_}")
    if any(update.nonce in seen for seen in nonces):
        return wire.WireError("replayed_nonce", update.nonce)
    if device in accepted:
        return wire.WireError("duplicate", f"{device} already answered round {round_}")
    if update.kind != kind:
        return wire.WireError("bad_kind", f"{update.kind!r} in a {_algorithm(kind)} round")
    limit = min(announced, max_examples)
    if update.num_examples > limit:
        return wire.WireError(
            "bad_examples",
            f"n={update.num_examples} > {limit} (the device announced {announced}, "
            f"max_examples {max_examples})",
        )
    return None


def _algorithm(kind: str) -> str:
    return next(a for a, k in wire.UPDATE_KIND.items() if k == kind)


def round_length(arrivals: Iterable[float], *, deadline_s: float, missing: int = 0) -> float:
    """Virtual length of a round: the slowest arrival, capped at the deadline (also when any
    selected device never answered: ``missing`` > 0)."""
    slowest = max(arrivals, default=0.0)
    return deadline_s if missing or slowest > deadline_s else slowest


class WeightsPlan(Protocol):
    """What ``next_weights`` reads of a round plan (``coordinator.server.RoundPlan``)."""

    @property
    def algorithm(self) -> str: ...
    @property
    def lr(self) -> float: ...
    @property
    def server_lr(self) -> float: ...
    @property
    def aggregator(self) -> str: ...
    @property
    def protect(self) -> str: ...


def aggregate(
    updates: Sequence[robust.Weighted],
    plan: WeightsPlan,
    *,
    selected: int,
    noise_seed: list[int],
    defence_seed: list[int],
) -> tuple[Params, robust.Defended | None]:
    """The plan's aggregate of the accepted ``updates`` ((params, examples) in device-id order,
    so that it does not depend on arrival order): under ``central_dp`` DP-FedAvg's noised mean
    over the ``selected`` devices (noise from ``noise_seed``; no defence result), else the plan's
    aggregator (a ``coordinator.robust`` defence, its randomness from ``defence_seed``) and what
    it kept. FedAvg's mean reads each update once (they may come from ``coordinator.spool``);
    the other rules get them all in memory."""
    dp = protect.dp_step(protect.parse(plan.protect))
    if isinstance(dp, protect.CentralDP):
        sigma = protect.require_sigma(dp)
        params = [p for p, _ in updates]
        noise = protect.gaussian_like(params[0], sigma * dp.clip, np.random.default_rng(noise_seed))
        return central_dp_mean(params, clip=dp.clip, noise=noise, denominator=selected), None
    if robust.parse_defence(plan.aggregator)[0] != "mean":
        updates = list(updates)
    out = robust.get_defence(plan.aggregator)(updates, np.random.default_rng(defence_seed))
    return out.params, out


def server_step(weights: Params, agg: Params, plan: WeightsPlan) -> Params:
    """``weights`` (what the devices were sent) moved by the aggregate: FedSGD
    ``w - server_lr·lr·g``, FedAvg ``w + server_lr·Δ``."""
    kind = wire.UPDATE_KIND[plan.algorithm]
    lr = plan.server_lr * (plan.lr if kind == "gradient" else 1.0)
    return apply_update(weights, agg, kind=kind, server_lr=lr)


def next_weights(
    weights: Params,
    accepted: Mapping[str, wire.Update],
    plan: WeightsPlan,
    *,
    selected: int,
    noise_seed: list[int],
    defence_seed: list[int] | None = None,
) -> Params:
    """The global weights after a round: ``server_step`` by ``aggregate`` of the accepted
    updates; no update: ``weights`` unchanged."""
    if not accepted:
        return weights
    ordered = [(accepted[d].params, accepted[d].num_examples) for d in sorted(accepted)]
    agg, _ = aggregate(
        ordered, plan, selected=selected, noise_seed=noise_seed, defence_seed=defence_seed or [0]
    )
    return server_step(weights, agg, plan)
