"""Compressed update codecs: int8 quantisation, top-k sparsification, and both; pure functions.

Codec names (the ``codec`` field of an update)::

    int8          every parameter as int8 with one float32 scale per tensor
    int8c         int8 with one float32 scale per output channel (first axis; 1-D: per tensor)
    topk:F        per tensor the k = ceil(F * size) (at least 1) entries of largest magnitude:
                  their flat indices and float32 values; F in (0, 1]
    topk:F+int8   top-k, the kept values as int8 with one float32 scale per tensor

Wire layout: tensors are packed over the parameters in sorted-name order, so a message has a
handful of tensors whatever the model (the safetensors header would otherwise outweigh a sparse
update): ``q`` (int8, all quantised values), ``scale`` (float32, one per tensor or per channel),
``idx`` (uint16 flat indices within each tensor when every tensor has at most 65,536 entries,
else int32; strictly increasing within a tensor), ``val`` (float32, kept values of ``topk:F``).
A value is ``q * scale``; ``q`` is in [-127, 127] and ``scale = max|x| / 127``.

Decoding checks every count, index and scale against the parameter shapes before it allocates the
dense result, and raises ``CompressError`` with a counted reason: ``bad_params`` (tensor names),
``bad_dtype``, ``bad_count`` (a length that does not match the shapes), ``bad_indices`` (out of
range, repeated or unordered), ``bad_scale`` (NaN, Inf or negative), ``bad_values`` (q = -128).

Error feedback (the residual a device keeps across rounds) is codec-independent and lives in
``edge.wire.Codec.compress``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # edge.wire imports this module
    from edge.wire import Params
Shapes = Mapping[str, tuple[int, ...]]

QMAX = 127
U16_MAX_SIZE = 65_536


class CompressError(ValueError):
    """A compressed payload or codec name that breaks the contract; ``reason`` is counted."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class CompressSpec:
    """A parsed codec name: top-k fraction (or None) and quantisation (``int8``, ``int8c`` or None)."""

    name: str
    fraction: float | None
    quant: str | None


def parse(name: str) -> CompressSpec:
    """Parse ``int8``, ``int8c``, ``topk:F`` or ``topk:F+int8``; ``CompressError('bad_codec')``."""
    if name in ("int8", "int8c"):
        return CompressSpec(name, None, name)
    if not name.startswith("topk:"):
        raise CompressError("bad_codec", f"{name!r} is not a compressed codec")
    body, _, quant = name[5:].partition("+")
    if quant not in ("", "int8"):
        raise CompressError("bad_codec", f"{name!r}: only 'int8' may follow '+'")
    try:
        f = float(body)
    except ValueError:
        raise CompressError("bad_codec", f"{name!r}: F={body!r} is not a number") from None
    if not (math.isfinite(f) and 0 < f <= 1):
        raise CompressError("bad_codec", f"{name!r}: F must be in (0, 1], e.g. topk:0.01")
    return CompressSpec(name, f, quant or None)


def topk_count(fraction: float, size: int) -> int:
    """Entries top-k keeps of a tensor with ``size`` entries: ceil(F * size), at least 1."""
    # round() first so that e.g. 0.07 * 100 = 7.000000000000001 keeps 7, not 8.
    return min(size, max(1, math.ceil(round(fraction * size, 9))))


def channels(shape: tuple[int, ...]) -> int:
    """Scales ``int8c`` uses for a tensor: one per output channel (first axis) of a 2-D+ tensor."""
    return shape[0] if len(shape) >= 2 and _size(shape) > 0 else 1


def index_dtype(shapes: Shapes) -> np.dtype:
    """uint16 when every tensor has at most 65,536 entries, else int32."""
    big = max((_size(s) for s in shapes.values()), default=0) > U16_MAX_SIZE
    return np.dtype("<i4") if big else np.dtype("<u2")


def _size(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64))


def _quantise(x: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """int8 values and scale of a 1-D float32 array: |x - q*scale| <= scale/2."""
    m = float(np.max(np.abs(x))) if x.size else 0.0
    scale = np.float32(m / QMAX)
    if scale == 0:
        return np.zeros(x.shape, np.int8), scale
    q = np.clip(np.rint(x / scale), -QMAX, QMAX).astype(np.int8)
    return q, scale


def _topk(x: np.ndarray, k: int) -> np.ndarray:
    """Increasing indices of the k entries of largest magnitude of a 1-D array."""
    if k >= x.size:
        return np.arange(x.size)
    return np.sort(np.argpartition(np.abs(x), x.size - k)[x.size - k :])


def encode(spec: CompressSpec, params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Wire tensors of ``params`` (float32) under ``spec``."""
    names = sorted(params)
    flat = {n: np.asarray(params[n], dtype=np.float32).reshape(-1) for n in names}
    if spec.fraction is None:
        q_parts, scales = [], []
        for n in names:
            c = channels(params[n].shape) if spec.quant == "int8c" else 1
            for row in flat[n].reshape(c, -1):
                q, s = _quantise(row)
                q_parts.append(q)
                scales.append(s)
        return {"q": np.concatenate(q_parts), "scale": np.array(scales, np.float32)}
    idx_dt = index_dtype({n: params[n].shape for n in names})
    idx_parts, val_parts, scales = [], [], []
    for n in names:
        x = flat[n]
        i = _topk(x, topk_count(spec.fraction, x.size))
        idx_parts.append(i.astype(idx_dt))
        v = x[i]
        if spec.quant == "int8":
            v, s = _quantise(v)
            scales.append(s)
        val_parts.append(v)
    out = {"idx": np.concatenate(idx_parts).astype(idx_dt)}
    if spec.quant == "int8":
        out["q"] = np.concatenate(val_parts).astype(np.int8)
        out["scale"] = np.array(scales, np.float32)
    else:
        out["val"] = np.concatenate(val_parts).astype(np.float32)
    return out


def _expect(tensors: Mapping[str, np.ndarray], want: dict[str, tuple[np.dtype, int]]) -> None:
    """Exact tensor names, dtypes and 1-D lengths, before anything is allocated."""
    if set(tensors) != set(want):
        raise CompressError(
            "bad_params", f"tensors {sorted(tensors)[:6]}; this codec sends {sorted(want)}"
        )
    for name, (dt, n) in want.items():
        t = tensors[name]
        if t.dtype != dt:
            raise CompressError("bad_dtype", f"{name}: {t.dtype}, expected {dt}")
        if t.ndim != 1 or t.shape[0] != n:
            raise CompressError("bad_count", f"{name}: shape {tuple(t.shape)}, expected ({n},)")


def _scales(s: np.ndarray) -> None:
    if not (np.isfinite(s).all() and (s >= 0).all()):
        raise CompressError("bad_scale", "a scale is NaN, Inf or negative")


def _q(q: np.ndarray) -> None:
    if q.size and int(q.min()) < -QMAX:
        raise CompressError("bad_values", f"int8 value {int(q.min())} outside [-127, 127]")


def decode(spec: CompressSpec, tensors: Mapping[str, np.ndarray], shapes: Shapes) -> Params:
    """Dense float32 parameters of a compressed message, validated against ``shapes``."""
    names = sorted(shapes)
    sizes = [_size(shapes[n]) for n in names]
    i8, f32 = np.dtype("i1"), np.dtype("<f4")
    if spec.fraction is None:
        per = [channels(shapes[n]) if spec.quant == "int8c" else 1 for n in names]
        _expect(tensors, {"q": (i8, sum(sizes)), "scale": (f32, sum(per))})
        q, scale = tensors["q"], tensors["scale"]
        _scales(scale)
        _q(q)
        out: Params = {}
        pos = spos = 0
        for n, size, c in zip(names, sizes, per, strict=True):
            rows = q[pos : pos + size].reshape(c, -1)
            s = scale[spos : spos + c].reshape(c, 1)
            out[n] = (rows.astype(np.float32) * s).reshape(shapes[n])
            pos, spos = pos + size, spos + c
        return out
    ks = [topk_count(spec.fraction, s) for s in sizes]
    total = sum(ks)
    want = {"idx": (index_dtype(shapes), total)}
    if spec.quant == "int8":
        want |= {"q": (i8, total), "scale": (f32, len(names))}
    else:
        want |= {"val": (f32, total)}
    _expect(tensors, want)
    idx = tensors["idx"]
    if spec.quant == "int8":
        _scales(tensors["scale"])
        _q(tensors["q"])
    out = {}
    pos = 0
    for j, (n, size, k) in enumerate(zip(names, sizes, ks, strict=True)):
        i = idx[pos : pos + k].astype(np.int64)
        if i.size and (int(i[0]) < 0 or int(i[-1]) >= size or not (np.diff(i) > 0).all()):
            raise CompressError(
                "bad_indices", f"{n}: indices must increase strictly within [0, {size})"
            )
        if spec.quant == "int8":
            v = tensors["q"][pos : pos + k].astype(np.float32) * tensors["scale"][j]
        else:
            v = tensors["val"][pos : pos + k]
        dense = np.zeros(size, np.float32)
        dense[i] = v
        out[n] = dense.reshape(shapes[n])
        pos += k
    return out
