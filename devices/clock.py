"""The virtual clock: when emulated devices are online and when their updates would arrive.

Nothing waits: a device's round time is computed from its profile (``devices.profiles.round_time``:
compute + bytes / bandwidth + one RTT), so a fleet of 1,000 devices runs at the speed of this
machine while deadlines and stragglers follow the hardware it claims to be. The coordinator sees
this class only through its ``RoundClock`` protocol (``coordinator.server``).

Compute time is ``examples * base_seconds_per_example * profile.slowdown``, where ``examples`` is
the number of examples a device pushed through forward + backward in the round (FedAvg: epochs
times its data) and the base is measured on this machine once (``measure_seconds_per_example``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from devices.profiles import HOURS, DeviceProfile, load_profile, round_time
from edge.backends import load_backend
from edge.codec import read_header
from edge.manifest import ModelArtifact
from edge.mqtt import QOS, Received, publish_packet_bytes
from edge.train import device_rng


def examples_processed(algorithm: str, *, epochs: int, reported: int) -> int:
    """Examples a device ran forward + backward: FedAvg ``epochs * n``, FedSGD ``n`` (one batch)."""
    return reported * epochs if algorithm == "fedavg" else reported


def hour_of_round(round_: int, *, start_hour: float, hours_per_round: float) -> int:
    """Local hour (0-23) at which round ``round_`` (1-based) runs."""
    return int(start_hour + (round_ - 1) * hours_per_round) % HOURS


def uniform_draw(seed: int, device: str, round_: int) -> float:
    """A reproducible number in [0, 1) for (seed, device, round), independent of fleet order."""
    return float(device_rng(seed, device, round_).random())


def is_available(profile: DeviceProfile, draw: float, hour: int) -> bool:
    """Online when the draw falls below the profile's availability at that hour."""
    return draw < profile.availability[hour % HOURS]


def assign_profiles(
    n: int, names: Sequence[str], shares: Sequence[float] | None = None
) -> list[str]:
    """Profile names for ``n`` devices: round-robin over ``names``, or in proportion to ``shares``.

    With shares, counts are rounded by largest remainder and the names are interleaved (the
    ``j``-th of ``c`` devices of a name sits at fraction ``(j + 0.5) / c`` of the fleet), so any
    prefix of the fleet is mixed too.
    """
    if not names:
        raise ValueError("need at least one profile name")
    if shares is None:
        return [names[i % len(names)] for i in range(n)]
    if len(shares) != len(names) or min(shares) < 0 or sum(shares) <= 0:
        raise ValueError(f"need one non-negative share per profile ({len(names)}), summing to > 0")
    quota = np.asarray(shares, dtype=float) / sum(shares) * n
    counts = np.floor(quota).astype(int)
    for k in np.argsort(-(quota - counts), kind="stable")[: n - int(counts.sum())]:
        counts[k] += 1
    slots = [((j + 0.5) / c, k) for k, c in enumerate(counts) for j in range(c)]
    return [names[k] for _, k in sorted(slots)]


@dataclass(frozen=True)
class VirtualClock:
    """Availability and arrival times of the devices in ``profiles`` (device id -> profile).

    ``available`` is a seeded draw against the profile's hourly availability (round ``r`` runs at
    hour ``start_hour + (r - 1) * hours_per_round``); ``arrival`` is the profile's round time.
    A device without a profile uses ``default``, or is an error when there is none.
    """

    profiles: Mapping[str, DeviceProfile]
    base_seconds_per_example: float
    seed: int
    start_hour: float = 0.0
    hours_per_round: float = 1.0
    default: DeviceProfile | None = field(default=None)

    @classmethod
    def from_names(
        cls,
        names: Mapping[str, str],
        *,
        base_seconds_per_example: float,
        seed: int,
        start_hour: float = 0.0,
        hours_per_round: float = 1.0,
    ) -> VirtualClock:
        """A clock from device id -> profile name (``devices/profiles/<name>.json``)."""
        return cls(
            {d: load_profile(p) for d, p in names.items()},
            base_seconds_per_example=base_seconds_per_example,
            seed=seed,
            start_hour=start_hour,
            hours_per_round=hours_per_round,
        )

    def profile(self, device: str) -> DeviceProfile:
        """The profile of ``device``; ``KeyError`` naming the fix when it has none."""
        p = self.profiles.get(device, self.default)
        if p is None:
            raise KeyError(
                f"device {device!r} has no profile in this virtual clock; give it one "
                f"(DeviceSpec(profile=...)) or pass VirtualClock(default=...)"
            )
        return p

    def available(self, device: str, round_: int) -> bool:
        """Whether ``device`` is online in round ``round_`` (seeded, order-independent)."""
        hour = hour_of_round(
            round_, start_hour=self.start_hour, hours_per_round=self.hours_per_round
        )
        return is_available(self.profile(device), uniform_draw(self.seed, device, round_), hour)

    def arrival(self, device: str, *, examples: int, bytes_down: int, bytes_up: int) -> float:
        """Virtual seconds from the task's broadcast until the update has arrived."""
        return round_time(
            self.profile(device),
            examples=examples,
            bytes_down=bytes_down,
            bytes_up=bytes_up,
            base_seconds_per_example=self.base_seconds_per_example,
        )


def hold_seconds(
    profile: DeviceProfile,
    task: Received,
    update_topic: str,
    update: bytes,
    *,
    base_seconds_per_example: float,
) -> float:
    """Real-time mode: seconds after a task arrived before its update may leave the device.

    Examples and bytes are read from the messages themselves (task and update headers, exact
    PUBLISH sizes), as the coordinator's virtual clock reads them from its ledger.
    """
    task_meta = read_header(task.payload)[1]
    n = int(read_header(update)[1]["n"])
    examples = examples_processed(
        task_meta["algorithm"], epochs=int(task_meta["epochs"]), reported=n
    )
    bytes_up = publish_packet_bytes(update_topic, len(update), QOS, protocol=task.protocol)
    return round_time(
        profile,
        examples=examples,
        bytes_down=task.packet_bytes,
        bytes_up=bytes_up,
        base_seconds_per_example=base_seconds_per_example,
    )


def measure_seconds_per_example(
    artifact: ModelArtifact,
    *,
    runtime: str = "onnx",
    batch_size: int = 32,
    steps: int = 20,
    seed: int = 0,
) -> float:
    """Seconds per training example (forward + backward) of this machine, one thread.

    The fastest of ``steps`` timed steps on random data of the model's input shape, after one
    warm-up step, divided by ``batch_size``: the fastest, since other load on the host (the
    emulated fleet itself) only adds time, and profiles scale a core's speed.
    """
    rng = np.random.default_rng(seed)
    m = artifact.manifest
    x = rng.random((batch_size, *m.input_shape), dtype=np.float32)
    y = rng.integers(0, m.num_classes, batch_size).astype(np.int64)
    backend = load_backend(runtime, artifact)
    w = artifact.initial_params()
    backend.loss_and_grad(w, x, y)
    times: list[float] = []
    for _ in range(steps):
        t0 = time.perf_counter()
        backend.loss_and_grad(w, x, y)
        times.append(time.perf_counter() - t0)
    return min(times) / batch_size


def predicted_round(arrivals: Iterable[float], *, deadline_s: float, missing: int = 0) -> float:
    """Virtual length of a round: the slowest arrival, capped at the deadline (also when any
    selected device never answered)."""
    slowest = max(arrivals, default=0.0)
    return deadline_s if missing or slowest > deadline_s else slowest
