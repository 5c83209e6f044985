"""Device profiles: compute, memory, links and availability of the emulated hardware.

Each profile is one JSON file in ``devices/profiles/``; every number in it carries a ``source``
(a named public benchmark, spec sheet or trace) and an ``estimate`` flag. ``train_gflops`` is the
device's training throughput on one thread (FLOP/s / 1e9), so its compute time for a round is
``examples * flops_per_example / train_gflops`` with ``flops_per_example`` counted from the
exported graph (``Manifest.flops_per_example``): the same on any host. Measure a real device
with ``edgeleak device calibrate --model DIR``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

PROFILES: tuple[str, ...] = (
    "phone-low",
    "phone-mid",
    "phone-high",
    "rpi3b",
    "rpi4",
    "rpi5",
    "orin-nano",
)

NUMBERS = ("train_gflops", "memory_mb", "downlink_mbps", "uplink_mbps", "rtt_ms")
HOURS = 24
# The reference core the relative speeds of the shipped profiles were quoted against: one thread
# of this project's development host (AMD EPYC), training the zoo's LeNet (2,499,120 FLOPs per
# example) with onnxruntime, fastest of 40 steps at batch 32: 4.1 GFLOP/s (measured 2026-11).
REFERENCE_GFLOPS = 4.1


@dataclass(frozen=True)
class Source:
    """Where a number comes from, and whether it is an estimate rather than a quoted figure."""

    text: str
    estimate: bool


@dataclass(frozen=True)
class DeviceProfile:
    """One device class. ``availability[h]``: probability of being online at local hour ``h``."""

    name: str
    description: str
    train_gflops: float
    memory_mb: float
    downlink_mbps: float
    uplink_mbps: float
    rtt_ms: float
    availability: tuple[float, ...]
    sources: dict[str, Source] = field(hash=False, repr=False)

    @property
    def mean_availability(self) -> float:
        """Probability of being online at a uniformly random hour."""
        return sum(self.availability) / len(self.availability)


def compute_seconds(
    profile: DeviceProfile, *, examples: int, flops_per_example: float, speed_scale: float = 1.0
) -> float:
    """Seconds to train on ``examples``: their FLOPs over the profile's throughput, scaled by
    ``speed_scale`` (1: the profile as cited; ``host_speed_scale``: relative to this host)."""
    if examples < 0 or not flops_per_example > 0 or not speed_scale > 0:
        raise ValueError("need examples >= 0, flops_per_example > 0 and speed_scale > 0")
    return examples * flops_per_example / (profile.train_gflops * 1e9 * speed_scale)


def round_time(
    profile: DeviceProfile,
    *,
    examples: int,
    bytes_down: int,
    bytes_up: int,
    flops_per_example: float,
    speed_scale: float = 1.0,
) -> float:
    """Seconds for one round: compute + download + upload (1 Mbit = 10^6 bit) + one RTT."""
    if min(bytes_down, bytes_up) < 0:
        raise ValueError("bytes must be >= 0")
    compute = compute_seconds(
        profile, examples=examples, flops_per_example=flops_per_example, speed_scale=speed_scale
    )
    down = bytes_down * 8 / (profile.downlink_mbps * 1e6)
    up = bytes_up * 8 / (profile.uplink_mbps * 1e6)
    return compute + down + up + profile.rtt_ms / 1e3


def _parse(name: str, d: dict[str, Any]) -> DeviceProfile:
    """Validate one profile's JSON; ``ValueError`` says which entry is wrong."""

    def bad(what: str) -> ValueError:
        return ValueError(f"device profile {name!r}: {what}")

    if d.get("name") != name:
        raise bad(f"'name' is {d.get('name')!r}; expected the file name {name!r}")
    values: dict[str, float] = {}
    sources: dict[str, Source] = {}
    for key in (*NUMBERS, "availability"):
        entry = d.get(key)
        if not isinstance(entry, dict) or not str(entry.get("source", "")).strip():
            raise bad(f"{key!r} needs a 'source' string")
        if not isinstance(entry.get("estimate"), bool):
            raise bad(f"{key!r} needs 'estimate': true or false")
        sources[key] = Source(str(entry["source"]), entry["estimate"])
        if key in NUMBERS:
            value = entry.get("value")
            if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
                raise bad(f"{key!r} needs a positive 'value'; got {value!r}")
            values[key] = float(value)
    hourly = d["availability"].get("hourly")
    if (
        not isinstance(hourly, list)
        or len(hourly) != HOURS
        or not all(isinstance(p, int | float) and 0 <= p <= 1 for p in hourly)
    ):
        raise bad(f"'availability.hourly' must be {HOURS} probabilities in [0, 1]")
    return DeviceProfile(
        name=name,
        description=str(d.get("description", "")),
        train_gflops=values["train_gflops"],
        memory_mb=values["memory_mb"],
        downlink_mbps=values["downlink_mbps"],
        uplink_mbps=values["uplink_mbps"],
        rtt_ms=values["rtt_ms"],
        availability=tuple(float(p) for p in hourly),
        sources=sources,
    )


@cache
def load_profile(name: str) -> DeviceProfile:
    """The profile ``name`` from ``devices/profiles/<name>.json``; the error lists valid names."""
    if name not in PROFILES:
        raise ValueError(f"unknown device profile {name!r}; expected one of {', '.join(PROFILES)}")
    text = resources.files("devices").joinpath("profiles", f"{name}.json").read_text()
    return _parse(name, json.loads(text))


def all_profiles() -> dict[str, DeviceProfile]:
    """Every profile, in ``PROFILES`` order."""
    return {name: load_profile(name) for name in PROFILES}
