"""The tensor container and the wire contract: round trips, exact sizes, counted rejections."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import safetensors.numpy

from edge import codec, wire
from edge.codec import CodecError, read_container, write_tensors
from edge.device import TaskLimits, task_steps
from edge.manifest import Manifest, ParamSpec
from edge.mqtt import parse_broker_url, publish_packet_bytes, read_varint, varint_len

MANIFEST = Manifest(
    model="toy",
    input_shape=(1, 4, 4),
    num_classes=3,
    params=(ParamSpec("fc.weight", (3, 16)), ParamSpec("fc.bias", (3,))),
    sha256="abc",
)


def params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {p.name: rng.standard_normal(p.shape).astype(np.float32) for p in MANIFEST.params}


def update(**kw: object) -> wire.Update:
    base: dict[str, object] = dict(
        run="r1",
        round=3,
        device="d0001",
        kind="delta",
        num_examples=17,
        params=params(),
        train_loss=0.5,
        runtime="onnx",
    )
    base.update(kw)
    return wire.Update(**base)  # type: ignore[arg-type]


def test_container_is_safetensors_both_ways() -> None:
    t = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, -2], dtype=np.int64)}
    ours = write_tensors(t, {"k": "v"})
    theirs = safetensors.numpy.load(ours)
    for k in t:
        np.testing.assert_array_equal(theirs[k], t[k])
    back, meta = read_container(safetensors.numpy.save(t, metadata={"k": "v"}))
    assert meta == {"k": "v"}
    for k in t:
        np.testing.assert_array_equal(back[k], t[k])
    hlen = struct.unpack("<Q", ours[:8])[0]
    assert hlen % 8 == 0
    assert len(ours) == 8 + hlen + 6 * 4 + 2 * 8


@pytest.mark.parametrize(
    "buf, reason",
    [
        (b"\x01\x02", "not_container"),
        (struct.pack("<Q", 10**9) + b"{}", "not_container"),
        (struct.pack("<Q", 4) + b"nope", "not_container"),
        (struct.pack("<Q", 2) + b"[]", "not_container"),
    ],
)
def test_container_rejects_garbage(buf: bytes, reason: str) -> None:
    with pytest.raises(CodecError) as e:
        read_container(buf)
    assert e.value.reason == reason


def test_container_rejects_offsets_outside_data() -> None:
    header = json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    with pytest.raises(CodecError, match="outside the data"):
        read_container(struct.pack("<Q", len(header)) + header + b"\0" * 8)


def test_update_round_trip_is_exact() -> None:
    u = update()
    back = wire.decode_update(wire.encode_update(u), MANIFEST)
    assert (back.run, back.round, back.device, back.kind, back.num_examples, back.nonce) == (
        "r1",
        3,
        "d0001",
        "delta",
        17,
        u.nonce,
    )
    for k in u.params:
        np.testing.assert_array_equal(back.params[k], u.params[k])


def test_update_size_is_header_plus_raw_float32() -> None:
    payload = wire.encode_update(update())
    (hlen,) = struct.unpack("<Q", payload[:8])
    assert len(payload) == 8 + hlen + 4 * (3 * 16 + 3)


def test_f16_codec_halves_the_tensor_bytes() -> None:
    u32, u16 = wire.encode_update(update()), wire.encode_update(update(codec="f16"))
    h32, h16 = (struct.unpack("<Q", b[:8])[0] for b in (u32, u16))
    assert len(u32) - 8 - h32 == 2 * (len(u16) - 8 - h16)
    back = wire.decode_update(u16, MANIFEST)
    np.testing.assert_allclose(
        back.params["fc.weight"], params()["fc.weight"], rtol=1e-3, atol=1e-3
    )


def test_task_round_trip() -> None:
    t = wire.Task(
        run="r1",
        round=2,
        device="d7",
        algorithm="fedsgd",
        lr=0.1,
        epochs=1,
        batch_size=8,
        model_hash="abc",
        weights=params(1),
    )
    back = wire.decode_task(wire.encode_task(t), MANIFEST)
    assert (back.algorithm, back.lr, back.batch_size, back.model_hash) == ("fedsgd", 0.1, 8, "abc")
    np.testing.assert_array_equal(back.weights["fc.bias"], t.weights["fc.bias"])


def _meta_swap(payload: bytes, **changes: str) -> bytes:
    tensors, meta = read_container(payload)
    meta.update(changes)
    return write_tensors(dict(tensors), meta)


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda p: b"garbage", "not_schema"),
        (lambda p: write_tensors({"x": np.zeros(2, np.float32)}), "not_schema"),
        (lambda p: _meta_swap(p, edgeleak="99"), "bad_version"),
        (lambda p: _meta_swap(p, type="task"), "bad_type"),
        (lambda p: _meta_swap(p, kind="weights"), "bad_field"),
        (lambda p: _meta_swap(p, n="many"), "bad_field"),
        (lambda p: _meta_swap(p, codec="zip"), "bad_codec"),
        (
            lambda p: wire.encode_update(
                update(params={**params(), "fc.bias": np.zeros(4, np.float32)})
            ),
            "bad_shape",
        ),
        (
            lambda p: wire.encode_update(update(params={"fc.weight": params()["fc.weight"]})),
            "bad_params",
        ),
        (
            lambda p: write_tensors(
                {k: v.astype(np.float64) for k, v in params().items()}, read_container(p)[1]
            ),
            "bad_dtype",
        ),
        (
            lambda p: wire.encode_update(
                update(params={**params(), "fc.bias": np.array([0, np.nan, 0], np.float32)})
            ),
            "non_finite",
        ),
        (
            lambda p: wire.encode_update(
                update(params={**params(), "fc.bias": np.array([0, np.inf, 0], np.float32)})
            ),
            "non_finite",
        ),
    ],
)
def test_decode_rejects_with_reason(mutate: object, reason: str) -> None:
    assert callable(mutate)
    bad = mutate(wire.encode_update(update()))
    with pytest.raises(wire.WireError) as e:
        wire.decode_update(bad, MANIFEST)
    assert e.value.reason == reason


def test_oversize_rejected_before_parsing() -> None:
    with pytest.raises(wire.WireError) as e:
        wire.decode_update(wire.encode_update(update()), MANIFEST, max_bytes=100)
    assert e.value.reason == "oversize"


def test_topics() -> None:
    assert wire.update_topic("r1", "d1") == "edgeleak/r1/update/d1"
    assert wire.parse_topic("edgeleak/r1/task/d1") == ("r1", "task", "d1")
    assert wire.parse_topic("edgeleak/r1/control") == ("r1", "control", None)
    with pytest.raises(ValueError, match="must be non-empty"):
        wire.task_topic("r/1", "d")
    with pytest.raises(wire.WireError):
        wire.parse_topic("other/r1/update/d1")


def test_mqtt_packet_sizes() -> None:
    assert [varint_len(n) for n in (0, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152)] == [
        1,
        1,
        2,
        2,
        3,
        3,
        4,
    ]
    # MQTT 5, QoS 1: 1 + len(remaining) + (2 + topic + 2 + 1 props) + payload
    assert publish_packet_bytes("a/b", 10) == 1 + 1 + 2 + 3 + 2 + 1 + 10
    assert publish_packet_bytes("a/b", 10, qos=0, protocol=4) == 1 + 1 + 2 + 3 + 10
    assert publish_packet_bytes("t", 200) == 1 + 2 + 2 + 1 + 2 + 1 + 200
    assert read_varint(bytes([0x80, 0x01])) == (128, 2)
    assert parse_broker_url("mqtt://127.0.0.1:1999").port == 1999
    assert parse_broker_url("mqtt311://h").protocol == 4
    with pytest.raises(ValueError, match="expected mqtt://HOST:PORT"):
        parse_broker_url("http://h:1")


@pytest.mark.parametrize(
    "arr",
    [
        np.float32(3.0),
        np.zeros((0, 3), np.float32),
        np.ones((2, 2), np.float16),
        np.arange(12, dtype=np.float32).reshape(3, 4).T,
    ],
    ids=["scalar", "empty", "f16", "transposed"],
)
def test_container_keeps_shape_and_values(arr: np.ndarray) -> None:
    a = np.asarray(arr)
    back = read_container(write_tensors({"a": a}))[0]["a"]
    assert back.shape == a.shape and back.dtype == a.dtype
    np.testing.assert_array_equal(back, a)


# -- bounds against hostile messages (issue 7) ---------------------------------------------------


def _reshape(payload: bytes, name: str, shape: object) -> bytes:
    (hlen,) = struct.unpack_from("<Q", payload)
    header = json.loads(payload[8 : 8 + hlen])
    header[name]["shape"] = shape
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + payload[8 + hlen :]


@pytest.mark.parametrize(
    "shape", [[2**62, 4], [2**64], [True], [3, -16], [3.0, 16], ["3"], [1] * 9, 48, None]
)
def test_decoder_rejects_absurd_shapes_before_allocating(shape: object) -> None:
    bad = _reshape(wire.encode_update(update()), "fc.weight", shape)
    with pytest.raises(CodecError) as e:
        read_container(bad)
    assert e.value.reason == "bad_shape"
    with pytest.raises(wire.WireError) as w:
        wire.decode_update(bad, MANIFEST)
    assert w.value.reason == "bad_shape"


def test_header_depth_and_size_are_capped_before_parsing() -> None:
    deep = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    for levels, reason in ((100_000, "bad_header"), (9, "bad_header"), (7, "not_schema")):
        h = b'{"a":' + b"[" * levels + b"]" * levels + b"}"
        h += b" " * (-len(h) % 8)
        with pytest.raises(wire.WireError) as e:
            wire.decode_update(struct.pack("<Q", len(h)) + h, MANIFEST)
        assert e.value.reason == reason, levels
    assert codec.json_depth(deep) == 100_001
    assert codec.json_depth(b'{"s":"[[[{{\\"[[","t":[1,[2]]}') == 3  # brackets in strings
    big = wire.encode_update(update(runtime="x" * codec.MAX_HEADER_BYTES))
    with pytest.raises(wire.WireError) as e:
        wire.decode_update(big, MANIFEST)
    assert e.value.reason == "oversize"


def test_wire_tensors_are_bounded_by_the_model_for_any_codec() -> None:
    meta = read_container(wire.encode_update(update()))[1]
    huge = {"fc.weight": np.zeros(3 * 16 + 3 + 1, np.float32), "fc.bias": np.zeros(3, np.float32)}
    with pytest.raises(wire.WireError) as e:
        wire.decode_update(write_tensors(huge, meta), MANIFEST)
    assert e.value.reason == "bad_shape"
    many = {f"t{i}": np.zeros(1, np.float32) for i in range(9)}
    with pytest.raises(wire.WireError) as e:
        wire.decode_update(write_tensors(many, meta), MANIFEST)
    assert e.value.reason == "bad_params"


@pytest.mark.parametrize(
    "nonce", ["a" * 12_000, "zz" * 12, "A" * 24, "a" * 23, "a" * 25, "", " " + "a" * 23]
)
def test_nonce_is_24_lowercase_hex_digits(nonce: str) -> None:
    for payload, decode in (
        (wire.encode_update(update()), wire.decode_update),
        (wire.encode_task(task()), wire.decode_task),
    ):
        with pytest.raises(wire.WireError) as e:
            decode(_meta_swap(payload, nonce=nonce), MANIFEST)  # type: ignore[operator]
        assert e.value.reason == "bad_nonce"
    assert len(wire.new_nonce()) == wire.NONCE_HEX


@pytest.mark.parametrize(
    "n", ["1" + "0" * 400, str(2**53 + 1), "0", "-3", " 5", "5_0", "+5", "1e3", "0x10"]
)
def test_update_examples_are_a_bounded_decimal(n: str) -> None:
    with pytest.raises(wire.WireError) as e:
        wire.decode_update(_meta_swap(wire.encode_update(update()), n=n), MANIFEST)
    assert e.value.reason == "bad_field"
    ok = wire.decode_update(_meta_swap(wire.encode_update(update()), n=str(2**53)), MANIFEST)
    assert ok.num_examples == 2**53


def task(**kw: object) -> wire.Task:
    base: dict[str, object] = dict(
        run="r1", round=2, device="d7", algorithm="fedavg", lr=0.1, epochs=1, batch_size=8,
        model_hash="abc", weights=params(1),
    )  # fmt: skip
    base.update(kw)
    return wire.Task(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "field, value",
    [
        ("lr", "inf"), ("lr", "nan"), ("lr", "0"), ("lr", "-0.1"), ("lr", "1e400"), ("lr", "1001"),
        ("deadline_s", "1e400"), ("deadline_s", "0"), ("deadline_s", "1e9"),
        ("epochs", "0"), ("epochs", "10001"), ("epochs", "1" + "0" * 400), ("epochs", "true"),
        ("batch_size", "-1"), ("batch_size", str(2**31)), ("round", "-1"),
    ],
)  # fmt: skip
def test_task_fields_are_finite_and_bounded(field: str, value: str) -> None:
    with pytest.raises(wire.WireError) as e:
        wire.decode_task(_meta_swap(wire.encode_task(task()), **{field: value}), MANIFEST)
    assert e.value.reason == "bad_field"


def test_task_limits_refuse_work_over_the_configured_maximum() -> None:
    limits = TaskLimits(max_epochs=3, max_batch_size=16, max_steps=10)
    assert task_steps("fedavg", 3, 16, 50) == 12  # 3 epochs × ceil(50 / 16)
    assert task_steps("fedavg", 2, 0, 50) == 2  # batch 0: one batch per epoch
    assert task_steps("fedsgd", 9, 1, 50) == 1
    limits.check(task(epochs=3, batch_size=16), 40)  # 3 × 3 = 9 steps: fine
    for t, detail in (
        (task(epochs=4), "epochs 4 > max 3"),
        (task(batch_size=17), "batch_size 17 > max 16"),
        (task(epochs=3, batch_size=16), "12 SGD steps > max 10"),
    ):
        with pytest.raises(wire.WireError) as e:
            limits.check(t, 50)
        assert (e.value.reason, e.value.detail) == ("over_limit", detail)
    with pytest.raises(ValueError, match="max_epochs=0"):
        TaskLimits(max_epochs=0)


def test_message_buffers_come_from_the_heap_under_glibc() -> None:
    """``keep_message_buffers`` tunes glibc's malloc (and says so); elsewhere it does nothing."""
    import platform

    assert codec.keep_message_buffers() is (platform.libc_ver()[0] == "glibc")


def test_a_status_names_its_site_with_a_plain_name_or_is_refused() -> None:
    ok = wire.decode_status(wire.encode_status("online", site="north-2.a_b"))
    assert ok["site"] == "north-2.a_b"
    assert "site" not in wire.decode_status(wire.encode_status("online"))
    for site in ("", "a/b", "a b", "x" * 65, 3, None, ["a"]):
        with pytest.raises(wire.WireError) as e:
            wire.decode_status(wire.encode_status("online", site=site))
        assert e.value.reason == "bad_status", site
