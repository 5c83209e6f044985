"""The tensor container and the wire contract: round trips, exact sizes, counted rejections."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import safetensors.numpy

from edge import wire
from edge.codec import CodecError, read_container, write_tensors
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
