"""Tensor container: the safetensors layout (8-byte header length, JSON header, raw LE tensors).

Written and read with numpy alone, so a device needs no extra library, and every read validates
the header before it touches the data: a malformed buffer raises ``CodecError`` with the reason.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import re
import struct
from typing import NamedTuple

import numpy as np

# safetensors dtype tags <-> numpy dtypes (little-endian on the wire).
_DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "F64": np.dtype("<f8"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "I16": np.dtype("<i2"),
    "U16": np.dtype("<u2"),
    "I32": np.dtype("<i4"),
    "I64": np.dtype("<i8"),
}
_TAGS: dict[np.dtype, str] = {dt: tag for tag, dt in _DTYPES.items()}

# A header holds tensor entries and string metadata: a large model's is tens of KB, and its JSON
# is 3 levels deep (object, entry, shape). Both are checked before the JSON is parsed.
MAX_HEADER_BYTES = 1024 * 1024
MAX_HEADER_DEPTH = 8
MAX_RANK = 8
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NESTING = np.zeros(256, dtype=np.int64)  # +1 opens, -1 closes a JSON array or object
_NESTING[[ord("["), ord("{")]] = 1
_NESTING[[ord("]"), ord("}")]] = -1
_OPENS = frozenset(b"[{")
_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")


class CodecError(ValueError):
    """A buffer that is not a valid tensor container; ``reason`` is a short counted code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def dtype_tag(dtype: np.dtype) -> str:
    """The safetensors tag of a numpy dtype (native byte order accepted)."""
    tag = _TAGS.get(dtype)
    if tag is not None:
        return tag
    dt = np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).itemsize > 1 else np.dtype(dtype)
    if dt not in _TAGS:
        raise CodecError("bad_dtype", f"{dtype} cannot be encoded; use one of {sorted(_DTYPES)}")
    return _TAGS[dt]


def write_tensors(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    """Serialise ``tensors`` (in insertion order) with string ``metadata`` into one buffer."""
    header: dict[str, object] = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(v, str)]
        if bad:
            raise TypeError(f"metadata values must be str; not for {bad}")
        header["__metadata__"] = dict(metadata)
    offset = 0
    chunks: list[bytes | memoryview] = []
    for name, arr in tensors.items():
        a = np.asarray(arr)
        tag = dtype_tag(a.dtype)
        a = np.asarray(a, dtype=_DTYPES[tag], order="C")  # keeps 0-d shapes
        header[name] = {
            "dtype": tag,
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        offset += a.nbytes
        chunks.append(memoryview(a.reshape(-1)).cast("B") if a.size else b"")  # type: ignore[arg-type]
    hjson = json.dumps(header, separators=(",", ":")).encode()
    hjson += b" " * (-len(hjson) % 8)
    # One copy of each tensor, straight into the result.
    return b"".join([struct.pack("<Q", len(hjson)), hjson, *chunks])


def keep_message_buffers() -> bool:
    """Have glibc serve allocations below 64 MiB from the heap and trim it only past 128 MiB.

    By default a buffer of 128 KiB or more (a LeNet message is 248 KB) is mapped afresh and
    unmapped when freed, so every message faults its pages in again: on this VM that halved the
    codec's throughput (0.6 against 1.2 GB/s encode+decode). Called once by each process that
    handles messages (CLI, device, fleet worker); returns False where there is no glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    return bool(libc.mallopt(m_mmap_threshold, 64 << 20)) and bool(
        libc.mallopt(m_trim_threshold, 128 << 20)
    )


def params_sha256(tensors: dict[str, np.ndarray]) -> str:
    """SHA-256 of ``write_tensors(tensors)`` (no metadata): equal hashes mean bit-identical
    tensors with the same names, shapes, dtypes and order."""
    return hashlib.sha256(write_tensors(tensors)).hexdigest()


class TensorEntry(NamedTuple):
    """One validated header entry: dtype, shape and byte span within the data section."""

    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def json_depth(text: bytes) -> int:
    """Deepest nesting of ``[`` and ``{`` outside JSON strings (no recursion, linear time)."""
    if b"\\" in text:  # escaped quotes: strings found by the regex
        text = _JSON_STRING.sub(b'""', text)
    # Without escapes, the pieces between quotes alternate outside and inside strings.
    brackets = b"".join(text.split(b'"')[::2]).translate(None, _NOT_BRACKETS)
    if len(brackets) > 256:  # a hostile header: vectorised
        return max(0, int(np.cumsum(_NESTING[np.frombuffer(brackets, np.uint8)]).max()))
    depth = deepest = 0
    for c in brackets:
        if c in _OPENS:
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _shape(value: object) -> tuple[int, ...] | None:
    """A tensor shape: a list of at most ``MAX_RANK`` non-negative ints (bools are not ints)."""
    if not isinstance(value, list) or len(value) > MAX_RANK:
        return None
    if not all(type(s) is int and s >= 0 for s in value):
        return None
    return tuple(value)


def read_header(
    buf: bytes | memoryview, *, max_header_bytes: int = MAX_HEADER_BYTES
) -> tuple[dict[str, TensorEntry], dict[str, str], int]:
    """Parse and validate the header: (tensor entries, metadata, data start offset)."""
    if len(buf) < 8:
        raise CodecError("not_container", f"{len(buf)} bytes; a container has at least 8")
    (hlen,) = struct.unpack_from("<Q", buf, 0)
    if 8 + hlen > len(buf):
        raise CodecError(
            "not_container", f"header length {hlen} does not fit a {len(buf)}-byte buffer"
        )
    if hlen > max_header_bytes:
        raise CodecError("oversize", f"header of {hlen} bytes > limit {max_header_bytes}")
    raw = bytes(buf[8 : 8 + hlen])
    depth = json_depth(raw)
    if depth > MAX_HEADER_DEPTH:
        raise CodecError("bad_header", f"header JSON nests {depth} deep > {MAX_HEADER_DEPTH}")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CodecError("not_container", f"header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise CodecError("not_container", "header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise CodecError("not_container", "__metadata__ must map strings to strings")
    data_len = len(buf) - 8 - hlen
    entries: dict[str, TensorEntry] = {}
    for name, entry in header.items():
        if not isinstance(entry, dict) or entry.keys() != _ENTRY_KEYS:
            raise CodecError(
                "not_container", f"tensor {name!r}: expected dtype, shape, data_offsets"
            )
        tag, shape, offs = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(tag, str) or tag not in _DTYPES:
            raise CodecError("bad_dtype", f"tensor {name!r} has dtype {str(tag)[:40]!r}")
        dims = _shape(shape)
        if dims is None:
            raise CodecError(
                "bad_shape",
                f"tensor {name!r} has shape {str(shape)[:80]}; "
                f"expected a list of at most {MAX_RANK} non-negative integers",
            )
        if not (
            isinstance(offs, list)
            and len(offs) == 2
            and type(offs[0]) is int
            and type(offs[1]) is int
            and 0 <= offs[0] <= offs[1] <= data_len
        ):
            raise CodecError(
                "not_container", f"tensor {name!r} has offsets {str(offs)[:80]} outside the data"
            )
        n = math.prod(dims) * _DTYPES[tag].itemsize  # Python ints: no overflow
        if offs[1] - offs[0] != n:
            raise CodecError(
                "bad_shape", f"tensor {name!r}: {offs[1] - offs[0]} bytes for shape {list(dims)}"
            )
        entries[name] = TensorEntry(_DTYPES[tag], dims, offs[0], offs[1])
    spans = sorted((e.begin, e.end) for e in entries.values())
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        if start < end:
            raise CodecError("not_container", "tensor data overlaps")
    return entries, meta, 8 + hlen


def read_tensors(buf: bytes | memoryview) -> dict[str, np.ndarray]:
    """All tensors of a container, as read-only arrays viewing ``buf``, in header order."""
    return read_container(buf)[0]


def read_container(
    buf: bytes | memoryview, *, max_header_bytes: int = MAX_HEADER_BYTES
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of a container."""
    entries, meta, start = read_header(buf, max_header_bytes=max_header_bytes)
    out: dict[str, np.ndarray] = {}
    for name, e in entries.items():
        count = (e.end - e.begin) // e.dtype.itemsize
        out[name] = np.frombuffer(buf, e.dtype, count, start + e.begin).reshape(e.shape)
    return out, meta
