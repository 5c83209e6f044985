"""The coordinator's round policy as pure functions: exact values, no broker."""

from __future__ import annotations

import dataclasses

import numpy as np

from coordinator import dropout, policy
from coordinator.server import RoundPlan
from edge import protect, wire


def upd(device: str = "d1", **kw: object) -> wire.Update:
    base: dict[str, object] = {
        "run": "r", "round": 3, "device": device, "kind": "delta", "num_examples": 10,
        "params": {"w": np.array([1.0, 2.0], np.float32)}, "nonce": "a" * 24,
    }  # fmt: skip
    base.update(kw)
    return wire.Update(**base)  # type: ignore[arg-type]


ADMIT = {
    "run": "r", "topic_device": "d1", "device": "d1", "round_": 3, "selected": {"d1", "d2"},
    "tasked": {"d1", "d2"}, "accepted": set(), "nonces": [{"b" * 24}], "kind": "delta",
    "announced": 20, "max_examples": 15,
}  # fmt: skip


def reason(update: wire.Update, **kw: object) -> str | None:
    err = policy.admit(update, **{**ADMIT, **kw})  # type: ignore[arg-type]
    return None if err is None else err.reason


def test_admit_accepts_a_good_update_and_names_each_rejection() -> None:
    assert reason(upd()) is None
    assert reason(upd(run="other")) == "wrong_run"
    assert reason(upd(device="d2")) == "device_mismatch"
    assert reason(upd(), round_=None) == "stale_round"
    assert reason(upd(round=2)) == "stale_round"
    assert reason(upd(round=4)) == "future_round"
    assert reason(upd(), device="d3") == "not_selected"
    assert reason(upd(), tasked={"d2"}) == "no_task"  # selected, its task not sent yet
    assert reason(upd(nonce="b" * 24)) == "replayed_nonce"
    assert reason(upd(), accepted={"d1"}) == "duplicate"
    assert reason(upd(kind="gradient")) == "bad_kind"
    assert reason(upd(num_examples=16)) == "bad_examples"  # above max_examples 15
    assert reason(upd(num_examples=15)) is None
    assert reason(upd(num_examples=6), announced=5) == "bad_examples"  # above what it announced


def test_admit_checks_in_a_fixed_order_and_says_why() -> None:
    # wrong run and wrong kind at once: the run is checked first
    err = policy.admit(upd(run="x", kind="gradient"), **ADMIT)  # type: ignore[arg-type]
    assert err is not None and (err.reason, err.detail) == ("wrong_run", "run 'x'")
    err = policy.admit(upd(kind="gradient"), **ADMIT)  # type: ignore[arg-type]
    assert err is not None and err.detail == "'gradient' in a fedavg round"
    err = policy.admit(upd(num_examples=16), **ADMIT)  # type: ignore[arg-type]
    assert err is not None and err.detail == "n=16 > 15 (the device announced 20, max_examples 15)"
    # with decoys the topic carries the pseudonym, the owner is the selected device
    assert reason(upd(device="p0"), topic_device="p0", device="d2") is None


def test_round_length_is_the_slowest_arrival_capped_at_the_deadline() -> None:
    assert policy.round_length([0.5, 2.0], deadline_s=3.0) == 2.0
    assert policy.round_length([0.5, 4.0], deadline_s=3.0) == 3.0
    assert policy.round_length([0.5], deadline_s=3.0, missing=1) == 3.0
    assert policy.round_length([], deadline_s=3.0) == 0.0


def w(*v: float) -> dict[str, np.ndarray]:
    return {"w": np.array(v, np.float32)}


def test_next_weights_fedavg_fedsgd_and_order_independence() -> None:
    plan = RoundPlan(algorithm="fedavg", server_lr=0.5)
    ups = {
        "b": upd("b", params=w(4, 8), num_examples=3),
        "a": upd("a", params=w(1, 2), num_examples=1),
    }
    out = policy.next_weights(w(10, 10), ups, plan, selected=2, noise_seed=[0])
    # weighted mean (1·[1,2] + 3·[4,8]) / 4 = [3.25, 6.5]; w + 0.5 · mean
    np.testing.assert_array_equal(out["w"], np.array([11.625, 13.25], np.float32))
    rev = policy.next_weights(
        w(10, 10), dict(reversed(ups.items())), plan, selected=2, noise_seed=[0]
    )
    np.testing.assert_array_equal(out["w"], rev["w"])
    sgd = dataclasses.replace(plan, algorithm="fedsgd", lr=0.1, server_lr=1.0)
    grads = {d: dataclasses.replace(u, kind="gradient") for d, u in ups.items()}
    out = policy.next_weights(w(10, 10), grads, sgd, selected=2, noise_seed=[0])
    np.testing.assert_allclose(out["w"], np.array([9.675, 9.35], np.float32), rtol=1e-6)
    assert policy.next_weights(w(1, 2), {}, plan, selected=2, noise_seed=[0])["w"].tolist() == [
        1,
        2,
    ]
    med = dataclasses.replace(plan, aggregator="median", server_lr=1.0)
    three = {**ups, "c": upd("c", params=w(100, 100))}
    np.testing.assert_array_equal(
        policy.next_weights(w(0, 0), three, med, selected=3, noise_seed=[0])["w"], [4, 8]
    )


def test_next_weights_central_dp_adds_the_seeded_noise_once_over_the_selected() -> None:
    plan = RoundPlan(algorithm="fedavg", protect="central_dp:clip=1,sigma=0.5")
    ups = {"a": upd("a", params=w(3, 4)), "b": upd("b", params=w(0.3, 0.4))}
    out = policy.next_weights(w(0, 0), ups, plan, selected=4, noise_seed=[7, 1, 2])
    noise = protect.gaussian_like(w(0, 0), 0.5, np.random.default_rng([7, 1, 2]))["w"]
    # [3,4] clipped to norm 1 = [0.6, 0.8]; plus [0.3, 0.4]; plus noise; over 4 selected
    expect = (np.array([0.9, 1.2]) + noise) / 4
    np.testing.assert_allclose(out["w"], expect.astype(np.float32), rtol=1e-6)


def test_update_kinds_live_in_the_wire_contract() -> None:
    assert wire.UPDATE_KIND == {"fedsgd": "gradient", "fedavg": "delta"}
    assert wire.UPDATE_KINDS == ("gradient", "delta")


def test_dropouts_name_one_reason_per_missing_device_in_order_of_precedence() -> None:
    rows = dropout.dropouts(
        ["a", "b", "c", "d", "e", "f"], {"a"}, heard={"b", "c"}, lost={"c", "d", "e"},
        late={"b"}, untasked={"e", "f"},
    )  # fmt: skip
    assert rows == [
        ("b", "straggler"), ("c", "rejected"), ("d", "offline"), ("e", "offline"),
        ("f", "not_sent"),
    ]  # fmt: skip
    assert {why for _, why in rows} <= set(dropout.REASONS)
