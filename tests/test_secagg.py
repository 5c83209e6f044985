"""Secure aggregation (SecAgg / SecAgg+): primitives, the protocol in memory, and over mosquitto."""

from __future__ import annotations

import secrets

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.secagg import SecAggRound, SecAggService, local_round
from coordinator.store import RunStore
from devices.secagg_fleet import LightDevice, LightSecAggFleet
from edge import secagg as sa
from edge.mqtt import BrokerAddress

# -- primitives ---------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    secret=st.integers(0, 2**256 - 1),
    n=st.integers(1, 12),
    data=st.data(),
)
def test_shamir_any_t_shares_rebuild_the_secret(secret: int, n: int, data: st.DataObject) -> None:
    t = data.draw(st.integers(1, n))
    xs = data.draw(st.lists(st.integers(1, 10**6), min_size=n, max_size=n, unique=True))
    shares = sa.shamir_split(secret, xs, t)
    pick = data.draw(st.lists(st.sampled_from(xs), min_size=t, max_size=n, unique=True))
    assert sa.shamir_combine({x: shares[x] for x in pick}) == secret


@settings(max_examples=40, deadline=None)
@given(secret=st.integers(0, 2**256 - 1), n=st.integers(3, 10), data=st.data())
def test_shamir_fewer_than_t_shares_say_nothing(secret: int, n: int, data: st.DataObject) -> None:
    """t-1 shares are consistent with every secret: the one they interpolate is not the secret
    (but for a 2^-256 chance)."""
    t = data.draw(st.integers(2, n))
    xs = list(range(1, n + 1))
    shares = sa.shamir_split(secret, xs, t)
    assert sa.shamir_combine({x: shares[x] for x in xs[: t - 1]}) != secret


def test_shamir_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="distinct non-zero"):
        sa.shamir_split(5, [1, 1, 2], 2)
    with pytest.raises(ValueError, match="out of the field"):
        sa.shamir_split(sa.PRIME, [1, 2], 2)
    assert sa.PRIME > 2**256  # every 32-byte secret is one field element


def test_prg_is_chacha20_keystream_of_the_full_seed() -> None:
    seed = bytes(range(32))
    a = sa.prg(seed, 1000)
    assert a.dtype == np.uint32 and a.shape == (1000,)
    assert np.array_equal(a[:10], sa.prg(seed, 10))
    # a change in the last byte of the 256-bit seed changes the stream (no folding to 32 bits)
    other = sa.prg(seed[:31] + b"\x00", 1000)
    assert np.mean(a == other) < 0.01
    with pytest.raises(ValueError, match="expected 32"):
        sa.prg(seed[:4], 10)


def test_fixed_point_exact_and_clipped() -> None:
    x = np.array([0.5, -0.25, 3.0, -3.0, 1e-6])
    enc = sa.encode_fixed(x, clip=1.0, bits=16)
    assert enc.dtype == np.uint32
    assert enc.view(np.int32).tolist() == [32768, -16384, 65536, -65536, 0]
    assert sa.decode_fixed(enc, 16).tolist() == [0.5, -0.25, 1.0, -1.0, 0.0]


def test_spec_parsing_and_capacity() -> None:
    spec = sa.parse_spec("k=8,t=0.6,clip=0.5,bits=12")
    assert spec == sa.SecAggSpec(k=8, t=0.6, clip=0.5, bits=12)
    assert sa.parse_spec(spec.text) == spec
    assert spec.degree(100) == 8 and spec.threshold(100) == 5
    assert sa.SecAggSpec().degree(10) == 9
    for bad, msg in (("k=3", "even"), ("t=0.2", r"\[0.5, 1\]"), ("z=1", "expected k=INT"),
                     ("clip=x", "not a number")):  # fmt: skip
        with pytest.raises(ValueError, match=msg):
            sa.parse_spec(bad)
    with pytest.raises(ValueError, match="overflows"):
        sa.SecAggSpec(clip=1.0, bits=16).check_capacity(40_000)


def test_neighbours_is_a_regular_symmetric_graph_from_the_public_seed() -> None:
    devices = [f"d{i:03d}" for i in range(50)]
    seed = bytes(32)
    g = sa.neighbours(devices, 6, seed)
    assert g == sa.neighbours(devices, 6, seed)
    assert g != sa.neighbours(devices, 6, b"\x01" * 32)
    assert all(len(p) == 6 and d not in p for d, p in g.items())
    assert all(d in g[p] for d, peers in g.items() for p in peers)
    assert sa.neighbours(devices[:5], 6, seed)["d000"] == ["d001", "d002", "d003", "d004"]


def test_failure_bound() -> None:
    # one device, two neighbours, both needed: fails unless both stay (1 - 0.9^2)
    assert sa.failure_bound(1, 2, 2, 0.1) == pytest.approx(0.19)
    from scipy.stats import binom

    want = 1000 * binom.cdf(19, 40, 0.9)  # some device keeps at most 19 of 40
    assert sa.failure_bound(1000, 40, 20, 0.1) == pytest.approx(want, rel=1e-9)


# -- the protocol in memory ---------------------------------------------------------------------


def _in_memory(
    n: int, m: int, spec: sa.SecAggSpec, vanish: dict[str, str]
) -> tuple[SecAggRound, dict[str, np.ndarray]]:
    """Run one round with the device state machines called directly (no broker)."""
    rng = np.random.default_rng(1)
    xs = {f"d{i:03d}": rng.normal(0, 0.3, m) for i in range(n)}
    rnd, _ = local_round("r", 3, xs, spec, vanish=vanish, graph_seed=bytes(32))
    return rnd, xs


def _plain_sum(xs: dict[str, np.ndarray], who: tuple[str, ...], spec: sa.SecAggSpec) -> np.ndarray:
    enc = [sa.encode_fixed(xs[d], spec.clip, spec.bits).view(np.int32) for d in who]
    return np.sum(np.stack(enc).astype(np.int64), axis=0)


@pytest.mark.parametrize("k", [0, 4])
def test_in_memory_round_with_dropouts_at_every_phase(k: int) -> None:
    spec = sa.SecAggSpec(k=k, t=0.5, clip=1.0, bits=16)
    vanish = {"d002": "advertise", "d005": "share", "d009": "masked"}
    rnd, xs = _in_memory(14, 64, spec, vanish)
    out = rnd.outcome
    assert out is not None and out.aborted == "", out
    assert "d002" in rnd.keys and "d002" not in rnd.cts  # advertised, never shared: not masked with
    assert out.dropped == ("d005",)
    assert "d009" in out.survivors and len(out.survivors) == 12
    assert np.array_equal(
        out.total.view(np.int32).astype(np.int64), _plain_sum(xs, out.survivors, spec)
    )


# -- over the real broker -----------------------------------------------------------------------


def _over_mqtt(
    broker: BrokerAddress,
    n: int,
    spec: sa.SecAggSpec,
    vanish: dict[str, str],
    store: RunStore | None = None,
    m: int = 200,
) -> tuple[SecAggRound, dict[str, np.ndarray], LightSecAggFleet]:
    rng = np.random.default_rng(7)
    xs = {f"d{i:03d}": rng.normal(0, 0.3, m) for i in range(n)}
    run = f"sa-{secrets.token_hex(4)}"
    devices = [LightDevice(d, x, vanish.get(d, "")) for d, x in xs.items()]
    with (
        LightSecAggFleet(run, broker, devices) as fleet,
        SecAggService(run, broker, store=store) as svc,
    ):
        rnd = svc.run_round(1, xs, spec, m, deadline_s=300.0, graph_seed=bytes(32))
    return rnd, xs, fleet


def _vanishing(n: int, fraction: float, phase: str) -> dict[str, str]:
    picked = np.random.default_rng(3).choice(n, int(round(n * fraction)), replace=False)
    return {f"d{i:03d}": phase for i in sorted(picked)}


def test_100_devices_30pct_vanish_after_masked_input_exact(
    mosquitto: BrokerAddress, tmp_path
) -> None:
    """Classic SecAgg (all pairs), t = 65 of 99 neighbours: 30 devices send their masked input and
    vanish; their self masks are rebuilt from the 70 survivors' shares; the sum is exact."""
    spec = sa.SecAggSpec(k=0, t=0.65, clip=1.0, bits=16)
    vanish = _vanishing(100, 0.3, "masked")
    store = RunStore(tmp_path / "run.db")
    rnd, xs, fleet = _over_mqtt(mosquitto, 100, spec, vanish, store)
    out = rnd.outcome
    assert out is not None and out.aborted == "", out
    assert fleet.errors == {}
    assert len(out.survivors) == 100 and out.dropped == ()
    assert len(rnd.reveals) == 70
    assert np.array_equal(
        out.total.view(np.int32).astype(np.int64), _plain_sum(xs, out.survivors, spec)
    )
    # The coordinator never held an unmasked input: each masked input it received differs from
    # its device's encoded input in (almost) every word, and looks uniform.
    masked = [m for m in rnd.received if m.phase == "masked"]
    assert len(masked) == 100
    # Every encoded input lies within ±clip·2^bits of 0 (mod 2^32); a uniform word does so with
    # probability 2^17 / 2^32 ≈ 3e-5. Pooled over the 20,000 masked words:
    near = np.concatenate([np.abs(m.tensors["y"].astype(np.int64)) <= 2**16 for m in masked])
    assert near.mean() < 1e-3
    for msg in masked:
        y = msg.tensors["y"].view(np.uint32)
        x = sa.encode_fixed(xs[msg.device], spec.clip, spec.bits)
        assert np.mean(y == x) < 0.01
    # Every message is in the ledger by phase, both directions.
    kinds = dict(
        store.db.execute("SELECT kind || '/' || direction, COUNT(*) FROM messages GROUP BY 1")
    )
    assert kinds == {
        "secagg_begin/down": 100, "secagg_advertise/up": 100, "secagg_keys/down": 100,
        "secagg_share/up": 100, "secagg_shares/down": 100, "secagg_masked/up": 100,
        "secagg_unmask/down": 100, "secagg_unmask/up": 70,
    }  # fmt: skip


def test_100_devices_secagg_plus_30pct_vanish_before_masked_input(mosquitto: BrokerAddress) -> None:
    """SecAgg+ with k = 20 neighbours, t = 10: 30 devices vanish after sharing keys; their pairwise
    masks are removed with their rebuilt mask keys; the sum of the 70 survivors is exact."""
    spec = sa.SecAggSpec(k=20, t=0.5, clip=1.0, bits=16)
    vanish = _vanishing(100, 0.3, "share")
    rnd, xs, fleet = _over_mqtt(mosquitto, 100, spec, vanish)
    out = rnd.outcome
    assert out is not None and out.aborted == "", out
    assert fleet.errors == {}
    assert set(out.dropped) == set(vanish) and len(out.survivors) == 70
    assert np.array_equal(
        out.total.view(np.int32).astype(np.int64), _plain_sum(xs, out.survivors, spec)
    )


@pytest.mark.parametrize(
    "phase,reason", [("masked", "too_few_reveals"), ("share", "too_few_survivors")]
)
def test_100_devices_40pct_gone_aborts_with_reason(
    mosquitto: BrokerAddress, phase: str, reason: str
) -> None:
    """With t = 65 of 99, 40 gone leaves 59 or 60 < 65 holders of a secret: the round aborts."""
    spec = sa.SecAggSpec(k=0, t=0.65, clip=1.0, bits=16)
    rnd, _, _ = _over_mqtt(mosquitto, 100, spec, _vanishing(100, 0.4, phase))
    out = rnd.outcome
    assert out is not None and out.total is None
    assert out.aborted == reason, out
    assert "t=65" in out.detail


def test_next_round_goes_on_after_an_abort(mosquitto: BrokerAddress) -> None:
    """The same devices and coordinator: round 1 aborts (too many gone), round 2 completes."""
    spec = sa.SecAggSpec(k=0, t=0.5, clip=1.0, bits=16)
    run = f"sa-{secrets.token_hex(4)}"
    rng = np.random.default_rng(2)
    xs = {f"d{i:03d}": rng.normal(0, 0.3, 20) for i in range(6)}
    with SecAggService(run, mosquitto) as svc:
        gone = [LightDevice(d, x, "share" if d < "d004" else "") for d, x in xs.items()]
        with LightSecAggFleet(run, mosquitto, gone):
            first = svc.run_round(1, xs, spec, 20, deadline_s=300.0)
        with LightSecAggFleet(run, mosquitto, [LightDevice(d, x) for d, x in xs.items()]):
            second = svc.run_round(2, xs, spec, 20, deadline_s=300.0)
    assert first.outcome is not None and first.outcome.aborted == "too_few_survivors"
    assert second.outcome is not None and second.outcome.aborted == ""
    assert np.array_equal(
        second.outcome.total.view(np.int32).astype(np.int64),
        _plain_sum(xs, tuple(sorted(xs)), spec),
    )
