"""Privacy accounting: ε(δ) per device with Google's ``dp-accounting`` (RDP accountant).

What is accounted, per round a device took part in (its update was accepted):

- ``dp`` (update-level, local) and ``central_dp`` (DP-FedAvg): one Gaussian mechanism with noise
  multiplier σ on the device's clipped update (sensitivity C: the update against no update,
  user-level add/remove). No amplification by client sampling is claimed: the coordinator picks a
  fixed number of devices (not Poisson) and an eavesdropper sees who was picked.
- ``distributed_dp`` (under secure aggregation): one Gaussian mechanism on the secure sum, whose
  noise multiplier is σ·√(s/n) when s of the n devices that split the noise survive
  (``distributed_sigma``): devices that dropped took their share of the noise with them. The
  accountant treats the sum as continuous; the fixed-point rounding of each noised update
  (2^-bits per value) is outside the bound (the distributed *discrete* Gaussian of Kairouz et
  al. 2021 closes that gap; not implemented).
- ``dpsgd``: the device's local steps, each a Poisson-sampled Gaussian mechanism with rate
  q = batch_size / n (n: the device's examples) and noise multiplier σ, ``edge.protect
  .dpsgd_sampling`` steps per round (example-level add/remove).

ε is the RDP accountant's bound over the orders ``ORDERS`` (Opacus's default orders, so the two
accountants can be compared on the same mechanism).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import dp_accounting
from dp_accounting import rdp

from edge.protect import DPSGD, DPStep, dpsgd_sampling

ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
SIGMA_MAX = 100.0  # noise beyond 100× the clip norm: the update carries nothing; refuse instead


def distributed_sigma(sigma: float, *, survivors: int, shares: int) -> float:
    """The secure sum's noise multiplier under ``distributed_dp``: ``survivors`` devices each added
    N(0, σ²C²/``shares``), so the sum carries σ·√(survivors/shares) times the clip norm."""
    if not 1 <= survivors <= shares:
        raise ValueError(f"survivors={survivors} of shares={shares}: expected 1..shares")
    return sigma * math.sqrt(survivors / shares)


def round_event(
    step: DPStep, *, sigma: float, algorithm: str, examples: int, batch_size: int, epochs: int
) -> dp_accounting.DpEvent:
    """The DP event of one round a device with ``examples`` examples took part in."""
    if isinstance(step, DPSGD):
        q, steps = dpsgd_sampling(algorithm, examples, batch_size, epochs)
        gauss = dp_accounting.GaussianDpEvent(sigma)
        sampled = gauss if q >= 1 else dp_accounting.PoissonSampledDpEvent(q, gauss)
        return dp_accounting.SelfComposedDpEvent(sampled, steps)
    return dp_accounting.GaussianDpEvent(sigma)


def epsilon(events: Sequence[dp_accounting.DpEvent], delta: float) -> float:
    """ε at ``delta`` of the composition of ``events`` (RDP); ``inf`` when σ is 0."""
    if not events:
        return 0.0
    acc = rdp.RdpAccountant(orders=list(ORDERS))
    acc.compose(dp_accounting.ComposedDpEvent(list(events)))
    return float(acc.get_epsilon(delta))


def run_epsilon(
    step: DPStep,
    sigma: float,
    delta: float,
    *,
    rounds: int,
    algorithm: str,
    shard_sizes: Sequence[int],
    batch_size: int,
    epochs: int,
) -> float:
    """ε of a device that takes part in all ``rounds``, the largest over the shard sizes."""
    return max(
        epsilon(
            [
                round_event(
                    step,
                    sigma=sigma,
                    algorithm=algorithm,
                    examples=n,
                    batch_size=batch_size,
                    epochs=epochs,
                )
            ]
            * rounds,
            delta,
        )  # fmt: skip
        for n in sorted(set(shard_sizes))
    )


def calibrate_sigma(
    run_eps: Callable[[float], float],
    target_epsilon: float,
    delta: float,
    *,
    sigma_max: float = SIGMA_MAX,
    rel_tol: float = 1e-4,
) -> float:
    """The smallest σ (to ``rel_tol``) with ``run_eps(σ)`` <= target (ε at ``delta``), by
    bisection; ``ValueError`` when even ``sigma_max`` cannot meet it."""
    if not (target_epsilon > 0 and 0 < delta < 1):
        raise ValueError(f"need ε > 0 and 0 < δ < 1; got ε={target_epsilon}, δ={delta}")
    if run_eps(sigma_max) > target_epsilon:
        raise ValueError(
            f"ε={target_epsilon} at δ={delta} needs σ > {sigma_max} (noise over {sigma_max:g}× "
            "the clip norm)"
        )
    lo, hi = 0.0, sigma_max
    while hi - lo > rel_tol * hi:
        mid = (lo + hi) / 2
        if mid > 0 and run_eps(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi


@dataclass(frozen=True)
class DeviceBudget:
    """A device's cumulative privacy after some round."""

    device: str
    mechanism: str
    sigma: float
    rounds: int  # rounds it took part in
    epsilon: float
    delta: float


@dataclass
class PrivacyLedger:
    """The DP events of every device so far (state); ε computed from them on demand."""

    step: DPStep
    sigma: float
    delta: float
    events: dict[str, list[dp_accounting.DpEvent]] = field(default_factory=dict)
    sigmas: dict[str, list[float]] = field(default_factory=dict)

    def record(
        self, device: str, *, algorithm: str, examples: int, batch_size: int, epochs: int,
        sigma: float | None = None,
    ) -> None:  # fmt: skip
        """One more round of ``device``, with the run's σ or (``distributed_dp``) this round's."""
        s = self.sigma if sigma is None else sigma
        ev = round_event(
            self.step, sigma=s, algorithm=algorithm, examples=examples,
            batch_size=batch_size, epochs=epochs,
        )  # fmt: skip
        self.events.setdefault(device, []).append(ev)
        self.sigmas.setdefault(device, []).append(s)

    def budgets(self) -> list[DeviceBudget]:
        """Every device that took part so far, by id; ``sigma``: its weakest round's."""
        return [
            DeviceBudget(
                d,
                self.step.name,
                min(self.sigmas[d]),
                len(evs),
                epsilon(evs, self.delta),
                self.delta,
            )  # fmt: skip
            for d, evs in sorted(self.events.items())
        ]
