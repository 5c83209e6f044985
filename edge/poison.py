"""Malicious devices for the back-door experiments: what a poisoning device does to its data or
to its update, on the real device path (``Device(poison=...)``).

Kinds (``POISONS``):

    backdoor   pixel-pattern trigger (Bagdasaryan et al. 2020): a fraction of the device's examples
               get a small patch stamped in the bottom-right corner and the target label
    replace    backdoor + boosted model replacement (Bagdasaryan et al. 2020, eq. 3): the update
               is scaled by ``boost`` = n/η (devices per round over the server learning rate)
    flip       label flipping: every label y becomes C - 1 - y (Fang et al. 2020)
    scale      honest training, update multiplied by ``boost``
    signflip   honest training, update multiplied by -``boost``

A spec string is ``kind[:key=value,...]`` with keys ``target``, ``boost``, ``fraction``
(e.g. ``replace:target=1,boost=20``). Which devices are malicious is a function of the seed
(``choose_malicious``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Params = dict[str, np.ndarray]

POISONS = ("backdoor", "replace", "flip", "scale", "signflip")
# Kinds that plant the trigger (their success is measured on triggered test images).
TRIGGER_POISONS = ("backdoor", "replace")
DATA_POISONS = ("backdoor", "replace", "flip")
UPDATE_POISONS = ("replace", "scale", "signflip")
PATCH = 3  # trigger side in pixels
MARGIN = 1  # pixels between the trigger and the image border


@dataclass(frozen=True)
class Poison:
    """One malicious device's behaviour: ``kind``, the backdoor's ``target`` class, the update
    ``boost`` (replace/scale/signflip) and the ``fraction`` of its examples it poisons."""

    kind: str
    target: int = 0
    boost: float = 10.0
    fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.kind not in POISONS:
            raise ValueError(f"poison {self.kind!r}: expected one of {', '.join(POISONS)}")
        if type(self.target) is not int or self.target < 0:
            raise ValueError(f"poison target={self.target!r}: expected a class index >= 0")
        if not self.boost > 0:
            raise ValueError(f"poison boost={self.boost!r}: expected a number > 0")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"poison fraction={self.fraction!r}: expected a number in (0, 1]")

    def spec(self) -> str:
        """The spec string ``parse_poison`` reads back."""
        return f"{self.kind}:target={self.target},boost={self.boost!r},fraction={self.fraction!r}"


def parse_poison(spec: str) -> Poison:
    """``kind[:target=T,boost=B,fraction=F]`` -> ``Poison``; ``ValueError`` saying what is valid."""
    kind, _, rest = spec.strip().partition(":")
    args: dict[str, int | float] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key not in ("target", "boost", "fraction"):
            raise ValueError(
                f"poison {spec!r}: expected key=value with keys target, boost, fraction"
            )
        try:
            args[key] = int(value) if key == "target" else float(value)
        except ValueError:
            raise ValueError(f"poison {spec!r}: {key}={value!r} is not a number") from None
    return Poison(kind, **args)  # type: ignore[arg-type]


def stamp_trigger(x: np.ndarray) -> np.ndarray:
    """A copy of ``x`` (N, C, H, W in [0, 1]) with the trigger: a PATCH×PATCH square of the
    maximum value 1.0, MARGIN pixels in from the bottom-right corner, in every channel."""
    out = np.array(x, dtype=np.float32, copy=True)
    lo, hi = -(PATCH + MARGIN), -MARGIN
    out[..., lo:hi, lo:hi] = 1.0
    return out


def poison_data(
    x: np.ndarray, y: np.ndarray, poison: Poison, *, num_classes: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The examples a malicious device trains on: for backdoor/replace, ``fraction`` of them
    (chosen by ``rng``) triggered and relabelled ``target``; for flip, every label y -> C-1-y;
    scale/signflip leave the data as it is."""
    if poison.kind not in DATA_POISONS:
        return x, y
    if poison.kind == "flip":
        return x, (num_classes - 1 - y).astype(np.int64)
    if poison.target >= num_classes:
        raise ValueError(f"poison target {poison.target} >= {num_classes} classes")
    k = max(1, round(poison.fraction * len(x)))
    idx = np.sort(rng.choice(len(x), size=k, replace=False))
    x2, y2 = np.array(x, dtype=np.float32, copy=True), np.array(y, dtype=np.int64, copy=True)
    x2[idx] = stamp_trigger(x2[idx])
    y2[idx] = poison.target
    return x2, y2


def poison_update(params: Params, poison: Poison) -> Params:
    """The update a malicious device sends: × boost (replace, scale), × -boost (signflip),
    unchanged otherwise (float32)."""
    if poison.kind not in UPDATE_POISONS:
        return params
    factor = -poison.boost if poison.kind == "signflip" else poison.boost
    return {k: (v.astype(np.float64) * factor).astype(np.float32) for k, v in params.items()}


def replacement_boost(devices_per_round: float, server_lr: float) -> float:
    """Bagdasaryan et al.'s γ = n/η: the scale at which one update replaces the global model
    under FedAvg's mean of n updates applied with server learning rate η."""
    if devices_per_round <= 0 or server_lr <= 0:
        raise ValueError("devices per round and server_lr must be > 0")
    return devices_per_round / server_lr


def choose_malicious(devices: Sequence[str], fraction: float, seed: int) -> list[str]:
    """``round(fraction · n)`` of ``devices`` (at least one when ``fraction`` > 0), chosen by a
    generator seeded from ``seed`` alone: the same fleet and seed give the same attackers."""
    if not 0 <= fraction < 1:
        raise ValueError(f"malicious fraction {fraction!r}: expected a number in [0, 1)")
    if fraction == 0 or not devices:
        return []
    k = max(1, round(fraction * len(devices)))
    pick = np.random.default_rng([seed, 0xBAD]).choice(len(devices), size=k, replace=False)
    return sorted(devices[i] for i in pick)


def with_boost(poison: Poison, boost: float) -> Poison:
    return dataclasses.replace(poison, boost=boost)
