"""Compressed codecs: exact round-trip properties, error feedback, byte counts, rejections."""

from __future__ import annotations

import numpy as np
import pytest

from edge import compress, wire
from edge.codec import write_tensors
from edge.manifest import Manifest, ParamSpec

MANIFEST = Manifest(
    model="toy",
    input_shape=(1, 4, 4),
    num_classes=3,
    params=(
        ParamSpec("fc.weight", (3, 16)),
        ParamSpec("fc.bias", (3,)),
        ParamSpec("conv.weight", (4, 1, 3, 3)),
    ),
    sha256="abc",
)
CODECS = ["int8", "int8c", "topk:0.1", "topk:0.1+int8", "topk:1", "f16", "f32"]


def params(seed: int = 0, manifest: Manifest = MANIFEST) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {p.name: rng.standard_normal(p.shape).astype(np.float32) for p in manifest.params}


def roundtrip(name: str, p: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    c = wire.get_codec(name)
    return c.decode(c.encode(p), MANIFEST)


@pytest.mark.parametrize(
    "name, fraction, quant",
    [("int8", None, "int8"), ("int8c", None, "int8c"), ("topk:0.01", 0.01, None),
     ("topk:1", 1.0, None), ("topk:0.25+int8", 0.25, "int8"), ("topk:1e-3+int8", 0.001, "int8")],
)  # fmt: skip
def test_codec_names_parse(name: str, fraction: float | None, quant: str | None) -> None:
    spec = compress.parse(name)
    assert (spec.fraction, spec.quant) == (fraction, quant)
    assert wire.check_codec(name) == name


@pytest.mark.parametrize(
    "name",
    ["topk:0", "topk:1.5", "topk:-0.1", "topk:nan", "topk:inf", "topk:", "topk:x", "topk:0.1+int4",
     "topk:0.1+int8c", "int16", "int8+topk:0.1", "gzip"],
)  # fmt: skip
def test_bad_codec_names_are_rejected(name: str) -> None:
    with pytest.raises(wire.WireError) as e:
        wire.check_codec(name)
    assert e.value.reason == "bad_codec"
    assert "topk:F" in e.value.detail  # says what is expected


def test_topk_count_is_ceil_of_fraction() -> None:
    assert [compress.topk_count(0.07, 100), compress.topk_count(0.01, 150)] == [7, 2]
    assert [compress.topk_count(0.001, 10), compress.topk_count(1.0, 48)] == [1, 48]
    assert compress.topk_count(0.5, 0) == 0


@pytest.mark.parametrize("name", ["topk:0.1", "topk:0.3"])
def test_topk_keeps_exactly_the_largest_entries(name: str) -> None:
    p = params(1)
    out = roundtrip(name, p)
    f = compress.parse(name).fraction
    assert f is not None
    for k, v in p.items():
        flat, got = v.reshape(-1), out[k].reshape(-1)
        n = compress.topk_count(f, flat.size)
        top = set(np.argsort(-np.abs(flat))[:n].tolist())
        assert set(np.flatnonzero(got).tolist()) == top
        np.testing.assert_array_equal(got[sorted(top)], flat[sorted(top)])  # values exact


@pytest.mark.parametrize("name", ["int8", "int8c", "topk:0.2+int8"])
def test_int8_error_is_at_most_half_a_step(name: str) -> None:
    p = params(2)
    c = wire.get_codec(name)
    t = c.encode(p)
    out = c.decode(t, MANIFEST)
    scales = t["scale"]
    pos = 0
    for k in sorted(p):  # packed in sorted-name order, one scale per tensor or channel
        rows = p[k].shape[0] if (name == "int8c" and p[k].ndim >= 2) else 1
        s = scales[pos : pos + rows].reshape(rows, 1)
        assert (s > 0).all()
        err = np.abs(p[k] - out[k]).reshape(rows, -1)
        if name.startswith("topk"):
            err = err * (out[k].reshape(rows, -1) != 0)  # the dropped entries are not quantised
        assert (err <= s / 2 * (1 + 1e-6)).all()
        assert np.abs(out[k]).max() == pytest.approx(np.abs(p[k]).max(), rel=1e-6)
        pos += rows
    assert pos == len(scales)


def test_int8c_is_finer_than_int8_on_uneven_channels() -> None:
    p = params(3)
    p["fc.weight"][0] *= 100  # one loud output channel
    e8 = np.abs(roundtrip("int8", p)["fc.weight"][1:] - p["fc.weight"][1:]).max()
    e8c = np.abs(roundtrip("int8c", p)["fc.weight"][1:] - p["fc.weight"][1:]).max()
    assert e8c < e8 / 20


def test_zero_update_quantises_to_zero_scale() -> None:
    z = {k: np.zeros_like(v) for k, v in params().items()}
    for name in ("int8", "int8c", "topk:0.1+int8"):
        c = wire.get_codec(name)
        t = c.encode(z)
        assert not t["scale"].any()
        assert all(not v.any() for v in c.decode(t, MANIFEST).values())


@pytest.mark.parametrize("name", CODECS)
def test_error_feedback_conserves_the_sum_of_updates(name: str) -> None:
    """sum over rounds of what was sent + the final residual == sum of the raw updates."""
    c = wire.get_codec(name)
    residual = None
    raw_sum = {k: np.zeros(v.shape, np.float64) for k, v in params().items()}
    sent_sum = {k: np.zeros(v.shape, np.float64) for k, v in params().items()}
    for r in range(6):
        u = params(10 + r)
        tensors, corrected, residual = c.compress(u, residual, MANIFEST)
        sent = c.decode(tensors, MANIFEST)
        for k in u:
            raw_sum[k] += u[k]
            sent_sum[k] += sent[k]
            if residual is not None:
                np.testing.assert_array_equal(corrected[k] - sent[k], residual[k])
    final = residual or {k: np.zeros_like(v) for k, v in raw_sum.items()}
    assert (residual is None) == (name == "f32")  # lossless: no residual kept
    for k in raw_sum:
        np.testing.assert_allclose(sent_sum[k] + final[k], raw_sum[k], rtol=0, atol=1e-5)
    if name == "topk:1":
        assert all(not v.any() for v in final.values())


def test_error_feedback_sends_what_was_held_back() -> None:
    """An entry too small for top-k is sent once its residual has grown enough."""
    c = wire.get_codec("topk:0.01")  # one entry per tensor
    u = {k: np.zeros(v.shape, np.float32) for k, v in params().items()}
    u["fc.bias"][:] = [1.0, 0.6, 0.0]
    t1, _, res = c.compress(u, None, MANIFEST)
    t2, _, res = c.compress(u, res, MANIFEST)
    assert res is not None
    sent1, sent2 = c.decode(t1, MANIFEST)["fc.bias"], c.decode(t2, MANIFEST)["fc.bias"]
    np.testing.assert_array_equal(sent1, [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(sent2, np.float32([0.0, 0.6 + 0.6, 0.0]))  # beats the new 1.0
    np.testing.assert_array_equal(res["fc.bias"], [1.0, 0.0, 0.0])


def _update_bytes(manifest: Manifest, codec: str) -> int:
    u = wire.Update(
        run="run-1", round=1, device="d0000", kind="delta", num_examples=3000,
        params=params(0, manifest), train_loss=0.5, runtime="onnx", codec=codec,
        nonce="0" * 24,
    )  # fmt: skip
    return len(wire.encode_update(u))


def lenet_manifest() -> Manifest:
    """The zoo LeNet's parameter layout (names and shapes from the torch module, no export)."""
    from export.zoo import build

    net = build("lenet")
    specs = tuple(ParamSpec(n, tuple(p.shape)) for n, p in net.named_parameters())
    return Manifest("lenet", (1, 28, 28), 10, specs, sha256="0" * 64)


def test_message_bytes_for_the_lenet_manifest() -> None:
    m = lenet_manifest()
    assert m.num_parameters == 61_706
    sizes = {c: _update_bytes(m, c) for c in ("f32", "f16", "int8", "int8c", "topk:0.01")}
    sizes["topk:0.01+int8"] = _update_bytes(m, "topk:0.01+int8")
    # Kept entries: ceil(1% of each tensor), 622 over the 10 tensors.
    kept = sum(compress.topk_count(0.01, p.size) for p in m.params)
    assert kept == 622
    # Data sections: f32 4 B per parameter; int8 1 B + a 4 B scale per tensor (10) or per
    # output channel (241); top-k 2 B uint16 index + 4 B value (or 1 B int8 + 10 scales).
    data = {
        "f32": 4 * 61_706, "f16": 2 * 61_706, "int8": 61_706 + 4 * 10, "int8c": 61_706 + 4 * 241,
        "topk:0.01": 6 * kept, "topk:0.01+int8": 3 * kept + 4 * 10,
    }  # fmt: skip
    assert sizes == {
        "f32": 247_872,
        "f16": 124_452,
        "int8": 62_114,
        "int8c": 63_038,
        "topk:0.01": 4_100,
        "topk:0.01+int8": 2_346,
    }
    # The rest is the 8-byte length and the JSON header (metadata and one entry per tensor).
    assert {c: sizes[c] - data[c] - 8 for c in sizes} == {
        "f32": 1040, "f16": 1032, "int8": 360, "int8c": 360, "topk:0.01": 360,
        "topk:0.01+int8": 432,
    }  # fmt: skip
    assert sizes["f32"] / sizes["topk:0.01+int8"] > 105


def _message(tensors: dict[str, np.ndarray], codec: str) -> bytes:
    meta = {
        "edgeleak": "1", "type": "update", "run": "r1", "round": "3", "device": "d0001",
        "kind": "delta", "n": "17", "loss": "0.5", "runtime": "onnx", "codec": codec,
        "defence": "{}", "nonce": "ab" * 12,
    }  # fmt: skip
    return write_tensors(tensors, meta)


def _good(codec: str) -> dict[str, np.ndarray]:
    return dict(wire.get_codec(codec).encode(params(4)))


def _with(codec: str, name: str, fn: object) -> bytes:
    t = _good(codec)
    t[name] = fn(t[name].copy())  # type: ignore[operator]
    return _message(t, codec)


def _set(i: int, v: float) -> object:
    def f(a: np.ndarray) -> np.ndarray:
        a[i] = v
        return a

    return f


@pytest.mark.parametrize(
    "codec, payload, reason",
    [
        ("topk:0.1", lambda: _with("topk:0.1", "idx", _set(0, 60_000)), "bad_indices"),
        ("topk:0.1", lambda: _with("topk:0.1", "idx", lambda a: a[::-1].copy()), "bad_indices"),
        ("topk:0.1", lambda: _with("topk:0.1", "idx", _set(1, 0)), "bad_indices"),  # repeated
        ("topk:0.1", lambda: _with("topk:0.1", "idx", lambda a: a[:-1]), "bad_count"),
        ("topk:0.1", lambda: _with("topk:0.1", "val", lambda a: a[:-1]), "bad_count"),
        ("topk:0.1", lambda: _with("topk:0.1", "idx", lambda a: a.astype(np.int32)), "bad_dtype"),
        ("topk:0.1", lambda: _with("topk:0.1", "val", _set(0, np.nan)), "non_finite"),
        ("topk:0.1+int8", lambda: _with("topk:0.1+int8", "scale", _set(0, np.nan)), "bad_scale"),
        ("topk:0.1+int8", lambda: _with("topk:0.1+int8", "scale", _set(1, -1.0)), "bad_scale"),
        ("topk:0.1+int8", lambda: _with("topk:0.1+int8", "q", _set(0, -128)), "bad_values"),
        ("int8", lambda: _with("int8", "scale", _set(0, np.inf)), "bad_scale"),
        ("int8", lambda: _with("int8", "q", lambda a: a[:-1]), "bad_count"),
        ("int8", lambda: _with("int8", "scale", lambda a: np.concatenate([a, a[:1]])), "bad_count"),
        ("int8", lambda: _with("int8", "q", lambda a: a.reshape(1, -1)), "bad_count"),
        ("int8c", lambda: _with("int8c", "scale", lambda a: a[:2]), "bad_count"),
        ("int8", lambda: _message({"q": _good("int8")["q"]}, "int8"), "bad_params"),
        ("int8", lambda: _message(_good("topk:0.1"), "int8"), "bad_params"),
    ],
)
def test_malformed_compressed_payloads_are_rejected_with_reasons(
    codec: str, payload: object, reason: str
) -> None:
    with pytest.raises(wire.WireError) as e:
        wire.decode_update(payload(), MANIFEST)  # type: ignore[operator]
    assert e.value.reason == reason, e.value


def test_malformed_payload_is_not_a_crash_for_every_truncation() -> None:
    """Every wrong length of every tensor is a counted reason, never an IndexError."""
    for codec in ("int8", "int8c", "topk:0.1", "topk:0.1+int8"):
        for name in _good(codec):
            for n in (0, 1, -1):  # -1: one entry short
                msg = _with(codec, name, lambda a, n=n: a[:n])  # type: ignore[misc]
                with pytest.raises(wire.WireError) as e:
                    wire.decode_update(msg, MANIFEST)
                assert e.value.reason == "bad_count"


def test_tasks_stay_dense_and_carry_the_uplink_codec() -> None:
    task = wire.Task(
        run="r", round=1, device="d0", algorithm="fedavg", lr=0.1, epochs=1, batch_size=8,
        model_hash="abc", weights=params(), uplink="topk:0.01+int8", decoys=3,
    )  # fmt: skip
    back = wire.decode_task(wire.encode_task(task), MANIFEST)
    assert (back.codec, back.uplink, back.decoys) == ("f32", "topk:0.01+int8", 3)
    with pytest.raises(wire.WireError) as e:
        wire.encode_task(wire.Task(**{**task.__dict__, "codec": "int8"}))
    assert e.value.reason == "bad_codec"
    for field, value, reason in (
        ("uplink", "topk:2", "bad_codec"),
        ("decoys", str(wire.MAX_DECOYS + 1), "bad_field"),
        ("codec", "topk:0.1", "bad_codec"),
    ):
        from edge.codec import read_container

        t, meta = read_container(wire.encode_task(task))
        meta[field] = value
        with pytest.raises(wire.WireError) as e:
            wire.decode_task(write_tensors(dict(t), meta), MANIFEST)
        assert e.value.reason == reason
