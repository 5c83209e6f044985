"""Property tests over every decoder of the wire contract (issue 11, hostile input).

Any byte string given to a decoder either decodes to a valid message or raises the contract's
rejection (``WireError`` / ``CodecError`` with a reason); never another exception, and a header
that claims 2^63 bytes (or tensors of 2^62 elements) allocates nothing.
"""

from __future__ import annotations

import json
import struct
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.server import Coordinator, RoundPlan
from coordinator.store import RunStore
from edge import protect, wire
from edge.codec import CodecError, read_container, write_tensors
from edge.manifest import Manifest, ModelArtifact, ParamSpec
from edge.mqtt import BrokerAddress, Received

MANIFEST = Manifest("fuzz", (1, 4, 4), 3, (ParamSpec("w", (3, 16)), ParamSpec("b", (3,))))
W0 = {"w": np.zeros((3, 16), np.float32), "b": np.zeros(3, np.float32)}
RUN = "fz"
SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
# Reasons a decoder may give (the contract's), collected from edge.wire / edge.codec / compress.
CONTRACT_ERRORS = (wire.WireError, CodecError)


def _task(**kw: Any) -> bytes:
    base: dict[str, Any] = dict(run=RUN, round=1, device="d0", algorithm="fedsgd", lr=0.1,
                                epochs=1, batch_size=8, model_hash="m", weights=W0)  # fmt: skip
    base.update(kw)
    return wire.encode_task(wire.Task(**base))


def _update(**kw: Any) -> bytes:
    base: dict[str, Any] = dict(run=RUN, round=1, device="d0", kind="gradient", num_examples=8,
                                params=W0)  # fmt: skip
    base.update(kw)
    return wire.encode_update(wire.Update(**base))


VALID = {"task": _task(), "update": _update(), "update_int8": _update(codec="int8"),
         "update_topk": _update(codec="topk:0.5+int8")}  # fmt: skip


def _header(payload: bytes) -> tuple[dict[str, Any], bytes]:
    (hlen,) = struct.unpack_from("<Q", payload)
    return json.loads(payload[8 : 8 + hlen]), payload[8 + hlen :]


def _container(header: dict[str, Any], data: bytes) -> bytes:
    h = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(h)) + h + data


json_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=30)
)
json_value = st.recursive(
    json_scalar,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def hostile(draw: st.DrawFn) -> bytes:
    """Random bytes, or a valid message mutated: truncated, bytes flipped, metadata fields or
    tensor entries replaced by arbitrary JSON, the header length lied about."""
    kind = draw(st.sampled_from(["random", "truncate", "flip", "meta", "entry", "hlen"]))
    if kind == "random":
        return draw(st.binary(max_size=2048))
    base = VALID[draw(st.sampled_from(sorted(VALID)))]
    if kind == "truncate":
        return base[: draw(st.integers(0, len(base)))]
    if kind == "flip":
        buf = bytearray(base)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(buf) - 1))
            buf[i] = draw(st.integers(0, 255))
        return bytes(buf)
    header, data = _header(base)
    if kind == "meta":
        meta = header["__metadata__"]
        key = draw(st.sampled_from(sorted(meta) + ["protect", "extra"]))
        meta[key] = draw(st.text(max_size=40) | st.sampled_from(
            ["nan", "inf", "-1", "0", "1e308", "9" * 30, "2", "f16", "int8", "topk:2", "topk:0"]
        ))  # fmt: skip
        return _container(header, data)
    if kind == "entry":
        name = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", None]))
        if field is None:
            header[name] = draw(json_value)
        else:
            header[name][field] = draw(json_value)
        return _container(header, data)
    hlen = draw(st.sampled_from([2**63, 2**64 - 1, 2**31, len(base), 0]))
    return struct.pack("<Q", hlen) + base[8:]


def _must_be_contract(fn: Any, buf: bytes) -> object | None:
    try:
        return fn(buf)
    except CONTRACT_ERRORS as e:
        assert e.reason and isinstance(e.reason, str)
        return None


@SETTINGS
@given(hostile())
def test_decode_task_gives_a_task_or_a_reason(buf: bytes) -> None:
    task = _must_be_contract(lambda b: wire.decode_task(b, MANIFEST), buf)
    if task is not None:
        assert isinstance(task, wire.Task)
        assert all(np.isfinite(v).all() for v in task.weights.values())
        assert {k: v.shape for k, v in task.weights.items()} == MANIFEST.shapes()


@SETTINGS
@given(hostile())
def test_decode_update_gives_an_update_or_a_reason(buf: bytes) -> None:
    update = _must_be_contract(lambda b: wire.decode_update(b, MANIFEST), buf)
    if update is not None:
        assert isinstance(update, wire.Update)
        assert update.num_examples >= 1
        assert all(np.isfinite(v).all() for v in update.params.values())
        assert {k: v.shape for k, v in update.params.items()} == MANIFEST.shapes()


@SETTINGS
@given(st.binary(max_size=200) | st.sampled_from([b"hello", b"end ", b"end " + b"0" * 64]))
def test_control_end_accepts_only_the_committed_token(payload: bytes) -> None:
    token = wire.new_end_token()
    ends = wire.EndCommitments()
    ends.add(RUN, wire.end_commitment(token))
    assert ends.accepts(RUN, payload) is (payload == wire.end_payload(token))
    assert ends.accepts(RUN, wire.end_payload(token))


@SETTINGS
@given(
    st.text(max_size=120) | st.sampled_from(["dp:clip=1,sigma=nan", "dp:clip=inf", "dummy:m=-1"])
)
def test_protect_spec_parses_or_says_why(spec: str) -> None:
    try:
        steps = protect.parse(spec)
    except protect.ProtectError as e:
        assert str(e)
        return
    assert protect.parse(protect.format_spec(steps)) == steps


@pytest.fixture
def coordinator(tmp_path: Path) -> Coordinator:
    artifact = ModelArtifact(MANIFEST, tmp_path)
    plan = RoundPlan(algorithm="fedsgd", max_devices_online=50)
    # Never entered: no broker; messages are handed to its handler as the network thread would.
    return Coordinator(
        RUN, artifact, BrokerAddress("127.0.0.1", 1), RunStore(tmp_path / "run.db"), plan,
        weights=dict(W0),
    )  # fmt: skip


topics = st.sampled_from(
    [wire.update_topic(RUN, "d0"), wire.status_topic(RUN, "d0"), wire.status_topic(RUN, "p1"),
     wire.lobby_status_topic("d1"), f"edgeleak/{RUN}/update", "edgeleak/x/y/z/w", "junk"]
)  # fmt: skip
status_payloads = st.one_of(
    st.binary(max_size=300),
    json_value.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"state": json_value, "examples": json_value}).map(
        lambda v: json.dumps(v).encode()
    ),
)


@SETTINGS
@given(topic=topics, payload=hostile() | status_payloads, retain=st.booleans())
def test_coordinator_handles_any_message_with_a_counted_reason(
    coordinator: Coordinator, topic: str, payload: bytes, retain: bool
) -> None:
    """Status, update and stray topics: every message is handled (a status or a rejection with
    a contract reason), never ``internal_error``; outside a round no update is accepted."""
    before = coordinator.store.rejection_counts(RUN)
    coordinator._handle(Received(topic, payload, retain, 0.0))
    after = coordinator.store.rejection_counts(RUN)
    assert "internal_error" not in after
    new = {
        k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)
    }
    if "/update/" in topic:
        assert sum(new.values()) == 1  # no round open: every update is refused, with a reason
    assert all(isinstance(v, dict) for v in coordinator.online.values())
    assert len(coordinator.online) <= 50


def test_a_header_claiming_2_63_bytes_allocates_nothing() -> None:
    """The claimed sizes are checked against the buffer before anything is allocated."""
    header, data = _header(VALID["update"])
    header["w"] = {"dtype": "F32", "shape": [2**31, 2**31], "data_offsets": [0, 2**63]}
    lies = [
        struct.pack("<Q", 2**63) + b"{}" * 100,
        struct.pack("<Q", 2**64 - 1) + b"x" * 1000,
        _container(header, data),
        _container({**header, "w": {**header["w"], "data_offsets": [0, 4 * 48]}}, data),
    ]
    tracemalloc.start()
    try:
        for buf in lies:
            with pytest.raises(CONTRACT_ERRORS) as e:
                wire.decode_update(buf, MANIFEST)
            assert e.value.reason in ("not_container", "not_schema", "oversize", "bad_shape")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, peak  # bytes: no tensor of the claimed size was ever made
    with pytest.raises(CodecError) as c:
        read_container(struct.pack("<Q", 2**63) + b"{}")
    assert c.value.reason == "not_container"


def test_header_limit_is_a_config_value() -> None:
    """``max_header_bytes`` (a plan field) refuses a larger header as ``oversize``."""
    buf = write_tensors(dict(W0), {"pad": "x" * 5000})
    with pytest.raises(CodecError) as e:
        read_container(buf, max_header_bytes=4096)
    assert e.value.reason == "oversize"
    big = _update()
    with pytest.raises(wire.WireError) as w:
        wire.decode_update(big, MANIFEST, max_header_bytes=64)
    assert w.value.reason == "oversize"
    with pytest.raises(wire.WireError) as w:
        wire.decode_update(big, MANIFEST, max_bytes=len(big) - 1)
    assert w.value.reason == "oversize"
    assert wire.decode_update(big, MANIFEST, max_bytes=len(big)).num_examples == 8
