"""Round policy: which devices a round may select, and when a round stops waiting.

Status messages are not authenticated, so the policy trusts only what costs an impostor a live
connection, and bounds what it can cost when it has one:

- *live*: a device is selectable only after an ``online`` status that reached the coordinator
  live (not a retained copy from the past: a planted retained ``online`` has no device behind
  it). The coordinator asks every connected device to re-announce (``hello``) when it starts.
- *silent*: a selected device that sent nothing in its round is not selected again until it
  announces anew with a live status (or its late update shows it is there after all).
- *proven*: a device whose update was accepted in this run. At most
  ``max(max_unproven, number of proven devices)`` unproven devices are selected per round.
- once every proven device of a round has answered, the round waits for unproven ones only
  while answers keep coming: it ends after ``quiet_s`` without one (counted from the broadcast
  while none came).

A forged ``offline`` removes a device only until its next live ``online``: devices answer a
forged ``offline`` on their own status topic, and ``hello``, with ``online``.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

import numpy as np


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
