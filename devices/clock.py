"""The virtual clock: when emulated devices are online and when their updates would arrive.

Nothing waits: a device's round time is computed from its profile (``devices.profiles.round_time``:
compute + bytes / bandwidth + one RTT), so a fleet of 1,000 devices runs at the speed of this
machine while deadlines and stragglers follow the hardware it claims to be. The coordinator sees
this class only through its ``RoundClock`` protocol (``coordinator.server``).

Compute time is ``examples * flops_per_example / profile.train_gflops``, where ``examples`` is
the number of examples a device pushed through forward + backward in the round (FedAvg: epochs
times its data) and ``flops_per_example`` comes from the model's manifest (counted from the
exported graph): nothing is measured on this host, so the same virtual experiment gives the same
stragglers and round times on any machine. How long a round lasts from these arrivals is the
coordinator's rule (``coordinator.policy.round_length``). ``speed_scale = host_speed_scale(artifact)`` (config
``clock_base="host"``) instead scales every profile by this host's measured speed relative to
the reference core the profiles were quoted against.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from devices.profiles import HOURS, REFERENCE_GFLOPS, DeviceProfile, load_profile, round_time
from edge.calibrate import measure_gflops
from edge.codec import read_header
from edge.manifest import ModelArtifact
from edge.mqtt import QOS, Received, publish_packet_bytes
from edge.train import device_rng, examples_processed


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
    hour ``start_hour + (r - 1) * hours_per_round``); ``arrival`` is the profile's round time
    for a model of ``flops_per_example``. A device without a profile uses ``default``, or is an
    error when there is none.
    """

    profiles: Mapping[str, DeviceProfile]
    flops_per_example: float
    seed: int
    start_hour: float = 0.0
    hours_per_round: float = 1.0
    default: DeviceProfile | None = field(default=None)
    speed_scale: float = 1.0

    def __post_init__(self) -> None:
        if not self.flops_per_example > 0 or not self.speed_scale > 0:
            raise ValueError(
                f"flops_per_example={self.flops_per_example}, speed_scale={self.speed_scale}: "
                f"need both > 0 (FLOPs come from the model's manifest: re-export it)"
            )

    @classmethod
    def from_names(
        cls,
        names: Mapping[str, str],
        *,
        flops_per_example: float,
        seed: int,
        start_hour: float = 0.0,
        hours_per_round: float = 1.0,
        speed_scale: float = 1.0,
    ) -> VirtualClock:
        """A clock from device id -> profile name (``devices/profiles/<name>.json``)."""
        return cls(
            {d: load_profile(p) for d, p in names.items()},
            flops_per_example=flops_per_example,
            seed=seed,
            start_hour=start_hour,
            hours_per_round=hours_per_round,
            speed_scale=speed_scale,
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
            flops_per_example=self.flops_per_example,
            speed_scale=self.speed_scale,
        )


def hold_seconds(
    profile: DeviceProfile,
    task: Received,
    update_topic: str,
    update: bytes,
    *,
    flops_per_example: float,
    speed_scale: float = 1.0,
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
        flops_per_example=flops_per_example,
        speed_scale=speed_scale,
    )


def host_speed_scale(artifact: ModelArtifact, *, runtime: str = "onnx") -> float:
    """This host's measured training throughput for ``artifact`` over ``REFERENCE_GFLOPS``: the
    ``speed_scale`` that makes profiles relative to this host (``clock_base="host"``)."""
    return measure_gflops(artifact, runtime=runtime) / REFERENCE_GFLOPS
