"""The wire contract: topics, message schema, codecs and validation.

Every message is one tensor container (see ``edge.codec``, the safetensors layout) whose
``__metadata__`` carries the message fields as strings. Topics (``<run>`` is the run id)::

    edgeleak/<run>/task/<device>     coordinator -> device  Task: global weights + hyper-parameters
    edgeleak/<run>/update/<device>   device -> coordinator  Update: gradient or weight delta
    edgeleak/<run>/status/<device>   device -> all          JSON {"state": "online"|"offline", ...},
                                                            retained; "offline" is the last will
    edgeleak/<run>/control           coordinator -> all     b"end <token>" when the run is over;
                                                            b"hello": devices re-announce;
                                                            b"model <round> <sha256>": the round's
                                                            global weights (``model_announcement``)
    edgeleak/any/status/<device>     device -> all          as status, for a device that is not
                                                            pinned to a run (``ANY_RUN``)

A device pinned to a run subscribes to its run's task and control topics; an unpinned one to
``edgeleak/+/task/<device>`` and ``edgeleak/+/control``, and takes part in any run that sends it a
task. Each task carries ``end``: the SHA-256 (hex) of the run's random 32-byte end token; the
real ``end`` reveals the token, so a device accepts an ``end`` only for a run whose commitment
it holds (``EndCommitments``), and a forged one is ignored.

Decoding validates everything before use and raises ``WireError`` with a short ``reason``
(counted by the coordinator) and a ``detail`` for people.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from edge import compress
from edge.codec import (
    MAX_HEADER_BYTES,
    CodecError,
    params_sha256,
    read_container,
    write_tensors,
)
from edge.manifest import Manifest

if TYPE_CHECKING:
    from edge.sign import Signer

SCHEMA_VERSION = 1
TOPIC_PREFIX = "edgeleak"
ALGORITHMS = ("fedsgd", "fedavg")
# The update kind each algorithm sends: FedSGD a gradient, FedAvg a weight delta.
UPDATE_KIND = {"fedsgd": "gradient", "fedavg": "delta"}
UPDATE_KINDS = tuple(UPDATE_KIND.values())
# The run segment of the status topic of devices not pinned to a run; never a run id.
ANY_RUN = "any"
HELLO = b"hello"  # control: every device of the run (and every unpinned one) re-announces
END_TOKEN_BYTES = 32
# MQTT caps a packet at 268,435,455 bytes; brokers usually allow far less. Checked before publish.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MAX_STATUS_BYTES = 4096  # a status is a small JSON object
SITE = re.compile(r"[A-Za-z0-9._-]{1,64}")  # a site name (the broker a device is bridged from)
MAX_PROTECT_CHARS = 1024  # a task's protection spec
NONCE_HEX = 24  # a nonce is 12 random bytes as lowercase hex
_NONCE = re.compile(f"[0-9a-f]{{{NONCE_HEX}}}")
_INTEGER = re.compile(r"-?[0-9]{1,19}")
# Bounds every decoded message obeys (``bad_field`` outside them); devices and the coordinator
# apply their own, tighter, configured limits on top (``over_limit``, ``bad_examples``).
MAX_INT = 2**53  # round, n: exact in float64, so no aggregation can overflow
MAX_LR = 1e3
MAX_DEADLINE_S = 7 * 24 * 3600.0
MAX_EPOCHS = 10_000
MAX_BATCH_SIZE = 2**31 - 1
# Decoys multiply a device's training work; a task may not ask for more than this.
MAX_DECOYS = 32
# A signed message's last tensor: its Ed25519 signature (``edge.sign``).
SIG_TENSOR = "__sig__"

Params = dict[str, np.ndarray]


class WireError(ValueError):
    """A message that breaks the contract; ``reason`` is the counted code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# -- topics -------------------------------------------------------------------------------------


def _check_segment(value: str, what: str) -> str:
    if not value or any(c in value for c in "/+#\0"):
        raise ValueError(f"{what} {value!r} must be non-empty and free of '/', '+', '#'")
    return value


def task_topic(run: str, device: str) -> str:
    return f"{TOPIC_PREFIX}/{_check_segment(run, 'run')}/task/{_check_segment(device, 'device')}"


def update_topic(run: str, device: str) -> str:
    return f"{TOPIC_PREFIX}/{_check_segment(run, 'run')}/update/{_check_segment(device, 'device')}"


def status_topic(run: str, device: str) -> str:
    return f"{TOPIC_PREFIX}/{_check_segment(run, 'run')}/status/{_check_segment(device, 'device')}"


def control_topic(run: str) -> str:
    return f"{TOPIC_PREFIX}/{_check_segment(run, 'run')}/control"


def device_filters(device: str, run: str | None) -> tuple[str, str]:
    """The task and control topic filters a device subscribes to: its run's, or (``run=None``)
    those of every run."""
    if run is None:
        any_run = f"{TOPIC_PREFIX}/+"
        return f"{any_run}/task/{_check_segment(device, 'device')}", f"{any_run}/control"
    return task_topic(run, device), control_topic(run)


def lobby_status_topic(device: str) -> str:
    """The run-independent status topic of a device that takes part in any run."""
    return status_topic(ANY_RUN, device)


def parse_topic(topic: str) -> tuple[str, str, str | None]:
    """(run, channel, device or None) of a contract topic; ``WireError('bad_topic')`` otherwise."""
    parts = topic.split("/")
    if len(parts) == 3 and parts[0] == TOPIC_PREFIX and parts[2] == "control":
        return parts[1], "control", None
    if len(parts) == 4 and parts[0] == TOPIC_PREFIX and parts[2] in ("task", "update", "status"):
        return parts[1], parts[2], parts[3]
    raise WireError("bad_topic", f"{topic!r} is not an edgeleak topic")


# -- codecs -------------------------------------------------------------------------------------
# A codec turns named float32 arrays into wire tensors and back: dense f32 and f16 here, and the
# compressed ones of ``edge.compress`` (int8, int8c, topk:F, topk:F+int8) by parsed name.

DENSE_CODECS = ("f32", "f16")
CODEC_HELP = "f32, f16, int8, int8c, topk:F or topk:F+int8 (F in (0, 1], e.g. topk:0.01+int8)"


@dataclass(frozen=True)
class Codec:
    name: str
    encode: Callable[[Params], dict[str, np.ndarray]]
    decode: Callable[[Mapping[str, np.ndarray], Manifest], Params]
    lossless: bool = False  # decode(encode(x)) == x: no residual to keep

    def compress(
        self, params: Params, residual: Params | None, manifest: Manifest
    ) -> tuple[dict[str, np.ndarray], Params, Params | None]:
        """Error feedback: encode ``params + residual``; returns (wire tensors, the corrected
        update that was encoded, the new residual = corrected - what the receiver decodes;
        None for a lossless codec)."""
        if self.lossless:
            return self.encode(params), params, None
        corrected = {
            k: (np.asarray(v, np.float32) + residual[k]) if residual is not None else v
            for k, v in params.items()
        }
        tensors = self.encode(corrected)
        sent = self.decode(tensors, manifest)
        return tensors, corrected, {k: corrected[k] - sent[k] for k in corrected}


def _dense_decoder(wire_dtype: np.dtype) -> Callable[[Mapping[str, np.ndarray], Manifest], Params]:
    def decode(tensors: Mapping[str, np.ndarray], manifest: Manifest) -> Params:
        expected = manifest.param_names
        if set(tensors) != set(expected):
            missing = sorted(set(expected) - set(tensors))
            extra = sorted(set(tensors) - set(expected))
            raise WireError("bad_params", f"missing {missing[:5]}, unexpected {extra[:5]}")
        out: Params = {}
        for spec in manifest.params:
            t = tensors[spec.name]
            if t.dtype != wire_dtype:
                raise WireError("bad_dtype", f"{spec.name}: {t.dtype}, expected {wire_dtype}")
            if tuple(t.shape) != spec.shape:
                raise WireError(
                    "bad_shape", f"{spec.name}: {tuple(t.shape)}, expected {spec.shape}"
                )
            out[spec.name] = t.astype(np.float32, copy=False)
        return out

    return decode


CODECS: dict[str, Codec] = {
    "f32": Codec(
        "f32",
        lambda p: {k: np.asarray(v, dtype=np.float32) for k, v in p.items()},
        _dense_decoder(np.dtype("<f4")),
        lossless=True,
    ),
    "f16": Codec(
        "f16",
        lambda p: {k: np.asarray(v, dtype=np.float16) for k, v in p.items()},
        _dense_decoder(np.dtype("<f2")),
    ),
}


def _compressed_codec(name: str) -> Codec:
    try:
        spec = compress.parse(name)
    except compress.CompressError as e:
        raise WireError(e.reason, f"{e.detail}; expected {CODEC_HELP}") from None

    def decode(tensors: Mapping[str, np.ndarray], manifest: Manifest) -> Params:
        try:
            return compress.decode(spec, tensors, manifest.shapes())
        except compress.CompressError as e:
            raise WireError(e.reason, e.detail) from None

    return Codec(name, lambda p: compress.encode(spec, p), decode)


@lru_cache(maxsize=64)
def get_codec(name: str) -> Codec:
    """The codec of a name; ``WireError('bad_codec')`` for a name outside the contract."""
    if name in CODECS:
        return CODECS[name]
    if name.startswith(("int8", "topk:")):
        return _compressed_codec(name)
    raise WireError("bad_codec", f"codec {name!r}; expected {CODEC_HELP}")


def check_codec(name: str) -> str:
    """``name`` if it is a valid codec name; ``ValueError`` (a ``WireError``) saying what is."""
    return get_codec(name).name


# -- run end -----------------------------------------------------------------------------------


def new_end_token() -> bytes:
    """A run's secret end token (cryptographic randomness)."""
    return secrets.token_bytes(END_TOKEN_BYTES)


def end_commitment(token: bytes) -> str:
    """What every task carries: the SHA-256 (hex) of the end token."""
    return hashlib.sha256(token).hexdigest()


def encode_status(state: str, **info: object) -> bytes:
    """A status message: JSON ``{"state": "online"|"offline", ...info}`` (keys sorted)."""
    return json.dumps({"state": state, **info}, sort_keys=True).encode()


def check_site(site: object) -> str:
    """``site`` if it is a site name (``SITE``: 1 to 64 letters, digits, '.', '_' or '-'),
    else ``ValueError`` saying so."""
    if not isinstance(site, str) or not SITE.fullmatch(site):
        raise ValueError(f"site {site!r}: expected 1 to 64 letters, digits, '.', '_' or '-'")
    return site


def decode_status(payload: bytes) -> dict[str, object]:
    """A status message's JSON object; ``WireError("bad_status")`` for one over
    ``MAX_STATUS_BYTES``, not a JSON object, without ``state``, or with a ``site`` that is
    not a name of 1 to 64 letters, digits, '.', '_' or '-'."""
    try:
        if len(payload) > MAX_STATUS_BYTES:
            raise ValueError(f"{len(payload)} bytes > {MAX_STATUS_BYTES}")
        status = json.loads(payload)
        if not isinstance(status, dict):
            raise TypeError("not a JSON object")
        status["state"]
        if "site" in status:
            check_site(status["site"])
    except (ValueError, KeyError, TypeError, RecursionError):
        raise WireError("bad_status", payload[:60].decode(errors="replace")) from None
    return status


def model_digest(weights: Mapping[str, np.ndarray], codec: str = "f32") -> str:
    """SHA-256 of the weights as a device decodes them from a task in ``codec`` (names in the
    mapping's order): what ``model_announcement`` carries and a verifying device recomputes."""
    wire_tensors = get_codec(_dense(codec)).encode(dict(weights))
    return params_sha256({k: v.astype(np.float32) for k, v in wire_tensors.items()})


def model_announcement(round_: int, digest: str) -> bytes:
    """The control message that tells every device of a run the round's global weights
    (``model_digest``), before the tasks go out; devices that verify compare their own."""
    return f"model {round_} {digest}".encode()


def parse_model_announcement(payload: bytes) -> tuple[int, str] | None:
    """(round, digest) of a ``model_announcement``; None for any other control payload."""
    parts = payload.split(b" ")
    if len(parts) != 3 or parts[0] != b"model" or not parts[1].isdigit() or len(parts[1]) > 12:
        return None
    digest = parts[2].decode("ascii", "replace")
    return (int(parts[1]), digest) if _is_commitment(digest) else None


def end_payload(token: bytes) -> bytes:
    """The control message that ends a run by revealing its token."""
    return b"end " + token.hex().encode()


def _is_commitment(value: str) -> bool:
    return len(value) == 64 and all(c in "0123456789abcdef" for c in value)


class EndCommitments:
    """The end commitments a device (or a fleet worker, or an eavesdropper) received, per run;
    ``accepts`` is the one check of an ``end`` message."""

    def __init__(self) -> None:
        self._by_run: dict[str, set[str]] = {}

    def add(self, run: str, commitment: str) -> None:
        self._by_run.setdefault(run, set()).add(commitment)

    def forget(self, run: str) -> None:
        self._by_run.pop(run, None)

    def runs(self) -> list[str]:
        return sorted(self._by_run)

    def accepts(self, run: str, payload: bytes) -> bool:
        """True only for ``end <token>`` whose token hashes to a commitment held for ``run``."""
        held = self._by_run.get(run)
        if not held or not payload.startswith(b"end ") or len(payload) != 4 + 2 * END_TOKEN_BYTES:
            return False
        try:
            token = bytes.fromhex(payload[4:].decode("ascii"))
        except ValueError:
            return False
        digest = end_commitment(token)
        return any(hmac.compare_digest(digest, c) for c in held)


# -- messages -----------------------------------------------------------------------------------


def new_nonce() -> str:
    return os.urandom(12).hex()


@dataclass(frozen=True)
class Task:
    """A round's instruction to one device, with the global weights."""

    run: str
    round: int
    device: str
    algorithm: str
    lr: float
    epochs: int
    batch_size: int
    model_hash: str
    weights: Params = field(repr=False)
    deadline_s: float = 60.0
    codec: str = "f32"  # the task's own tensors: f32 or f16 (tasks stay dense)
    uplink: str = "f32"  # the codec the device must use for its update
    decoys: int = 0  # decoy updates the device publishes beside its real one (edge.decoy)
    nonce: str = field(default_factory=new_nonce)
    # SHA-256 hex of the run's end token; by default one nobody holds the token of.
    end: str = field(default_factory=lambda: end_commitment(new_end_token()))
    protect: str = ""  # the run's client-side protections (edge.protect spec); "" for none
    secagg: str = ""  # secure aggregation (edge.secagg spec): answer with its phases, no update
    he: str = ""  # encrypt the update under this CKKS key (SHA-256 hex; edge.he); "" for none


@dataclass(frozen=True)
class Update:
    """A device's answer: a batch gradient (FedSGD) or a weight delta after local training (FedAvg)."""

    run: str
    round: int
    device: str
    kind: str
    num_examples: int
    params: Params = field(repr=False)
    train_loss: float = float("nan")
    runtime: str = ""
    codec: str = "f32"
    defence: str = "{}"
    nonce: str = field(default_factory=new_nonce)
    group: str = ""  # an edge aggregator's group (edge.aggregator.GroupInfo JSON); "" for a device


def encode_task(task: Task, *, signer: Signer | None = None) -> bytes:
    meta = {
        "edgeleak": str(SCHEMA_VERSION),
        "type": "task",
        "run": task.run,
        "round": str(task.round),
        "device": task.device,
        "algorithm": task.algorithm,
        "lr": repr(float(task.lr)),
        "epochs": str(task.epochs),
        "batch_size": str(task.batch_size),
        "model": task.model_hash,
        "deadline_s": repr(float(task.deadline_s)),
        "codec": _dense(task.codec),
        "uplink": check_codec(task.uplink),
        "decoys": str(task.decoys),
        "nonce": task.nonce,
        "end": task.end,
    }
    if task.protect:  # optional: tasks without protections keep their old bytes
        meta["protect"] = task.protect
    if task.secagg:
        meta["secagg"] = task.secagg
    if task.he:
        meta["he"] = task.he
    tensors = get_codec(task.codec).encode(task.weights)
    return signer.write(tensors, meta) if signer else write_tensors(tensors, meta)


def _dense(codec: str) -> str:
    if codec not in DENSE_CODECS:
        raise WireError("bad_codec", f"a task is dense: codec {codec!r}, expected f32 or f16")
    return codec


def encode_update(
    update: Update, *, tensors: dict[str, np.ndarray] | None = None, signer: Signer | None = None
) -> bytes:
    """The update's message; ``tensors``: the codec's output for ``update.params`` when the
    caller already has it (``Codec.compress`` returns it); ``signer``: signed (secure mode)."""
    meta = {
        "edgeleak": str(SCHEMA_VERSION),
        "type": "update",
        "run": update.run,
        "round": str(update.round),
        "device": update.device,
        "kind": update.kind,
        "n": str(update.num_examples),
        # Fixed width (exact for float64), so that the field's length says nothing about the value.
        "loss": f"{float(update.train_loss):.16e}",
        "runtime": update.runtime,
        "codec": update.codec,
        "defence": update.defence,
        "nonce": update.nonce,
    }
    if update.group:  # optional: device updates keep their old bytes
        meta["group"] = update.group
    if tensors is None:
        tensors = get_codec(update.codec).encode(update.params)
    return signer.write(tensors, meta) if signer else write_tensors(tensors, meta)


def _field(meta: Mapping[str, str], key: str) -> str:
    if key not in meta:
        raise WireError("missing_field", f"metadata has no {key!r}")
    return meta[key]


def _int(meta: Mapping[str, str], key: str, lo: int = 0, hi: int = MAX_INT) -> int:
    raw = _field(meta, key)
    if not _INTEGER.fullmatch(raw):
        raise WireError("bad_field", f"{key}={raw[:40]!r} is not a decimal integer")
    v = int(raw)
    if not lo <= v <= hi:
        raise WireError("bad_field", f"{key}={v} is outside [{lo}, {hi}]")
    return v


def _float(
    meta: Mapping[str, str],
    key: str,
    *,
    allow_nan: bool = False,
    lo: float = -math.inf,
    hi: float = math.inf,
) -> float:
    """A finite number (or NaN if allowed) in ``(lo, hi]``."""
    raw = _field(meta, key)
    try:
        v = float(raw)
    except ValueError:
        raise WireError("bad_field", f"{key}={raw[:40]!r} is not a number") from None
    if allow_nan and math.isnan(v):
        return v
    if not math.isfinite(v):
        raise WireError("bad_field", f"{key}={raw[:40]!r} is not finite")
    if not lo < v <= hi:
        raise WireError("bad_field", f"{key}={v!r} is outside ({lo}, {hi}]")
    return v


def _nonce(meta: Mapping[str, str]) -> str:
    raw = _field(meta, "nonce")
    if not _NONCE.fullmatch(raw):
        raise WireError(
            "bad_nonce", f"nonce {raw[:40]!r} ({len(raw)} chars); expected {NONCE_HEX} hex digits"
        )
    return raw


def _choice(meta: Mapping[str, str], key: str, allowed: tuple[str, ...]) -> str:
    v = _field(meta, key)
    if v not in allowed:
        raise WireError("bad_field", f"{key}={v!r}; expected one of {', '.join(allowed)}")
    return v


def _open(
    buf: bytes, expected_type: str, max_bytes: int, max_header_bytes: int = MAX_HEADER_BYTES
) -> tuple[Mapping[str, np.ndarray], dict[str, str]]:
    if len(buf) > max_bytes:
        raise WireError("oversize", f"{len(buf)} bytes > limit {max_bytes}")
    try:
        tensors, meta = read_container(buf, max_header_bytes=max_header_bytes)
    except CodecError as e:
        raise WireError(
            "not_schema" if e.reason == "not_container" else e.reason, e.detail
        ) from None
    if "edgeleak" not in meta:
        raise WireError("not_schema", "no 'edgeleak' schema version in the metadata")
    if meta["edgeleak"] != str(SCHEMA_VERSION):
        raise WireError(
            "bad_version", f"schema {meta['edgeleak']!r}; this build speaks {SCHEMA_VERSION}"
        )
    if meta.get("type") != expected_type:
        raise WireError("bad_type", f"type {meta.get('type')!r}; expected {expected_type!r}")
    tensors.pop(SIG_TENSOR, None)  # a signature is checked before decoding (edge.sign)
    return tensors, meta


def _bounded(tensors: Mapping[str, np.ndarray], manifest: Manifest) -> None:
    """Any codec's wire tensors: at most 4 per parameter tensor, none with more
    elements than the whole model (checked before a codec decodes or allocates anything)."""
    if len(tensors) > 4 * len(manifest.params):
        raise WireError(
            "bad_params", f"{len(tensors)} tensors for a model of {len(manifest.params)} parameters"
        )
    limit = manifest.num_parameters
    for name, t in tensors.items():
        if t.size > limit:
            raise WireError(
                "bad_shape", f"{name[:60]}: {t.size} elements > the model's {limit} parameters"
            )


def _finite(params: Params) -> None:
    for name, arr in params.items():
        if not np.isfinite(arr).all():
            raise WireError("non_finite", f"{name} has NaN or Inf")


def _open_params(
    buf: bytes,
    expected_type: str,
    manifest: Manifest,
    max_bytes: int,
    max_header_bytes: int = MAX_HEADER_BYTES,
) -> tuple[Params, dict[str, str], Codec]:
    """Open a message and decode its finite parameters with the codec it names (a task's is
    dense)."""
    tensors, meta = _open(buf, expected_type, max_bytes, max_header_bytes)
    name = _field(meta, "codec")
    codec = get_codec(_dense(name) if expected_type == "task" else name)
    _bounded(tensors, manifest)
    decoded = codec.decode(tensors, manifest)
    params = {n: decoded[n] for n in manifest.param_names}  # the manifest's order, any codec
    _finite(params)
    return params, meta, codec


def decode_task(buf: bytes, manifest: Manifest, *, max_bytes: int = MAX_MESSAGE_BYTES) -> Task:
    """Validate and decode a task for a model with ``manifest``."""
    weights, meta, codec = _open_params(buf, "task", manifest, max_bytes)
    return Task(
        run=_field(meta, "run"),
        round=_int(meta, "round"),
        device=_field(meta, "device"),
        algorithm=_choice(meta, "algorithm", ALGORITHMS),
        lr=_float(meta, "lr", lo=0.0, hi=MAX_LR),
        epochs=_int(meta, "epochs", 1, MAX_EPOCHS),
        batch_size=_int(meta, "batch_size", 0, MAX_BATCH_SIZE),
        model_hash=_field(meta, "model"),
        weights=weights,
        deadline_s=_float(meta, "deadline_s", lo=0.0, hi=MAX_DEADLINE_S),
        codec=codec.name,
        uplink=check_codec(_field(meta, "uplink")),
        decoys=_int(meta, "decoys", 0, MAX_DECOYS),
        nonce=_nonce(meta),
        end=_commitment(meta, "end"),
        protect=_protect(meta),
        secagg=_protect(meta, "secagg"),
        he=_commitment(meta, "he") if "he" in meta else "",
    )


def _protect(meta: Mapping[str, str], key: str = "protect") -> str:
    v = meta.get(key, "")
    if len(v) > MAX_PROTECT_CHARS:
        raise WireError("bad_field", f"{key}: {len(v)} characters > {MAX_PROTECT_CHARS}")
    return v


def _commitment(meta: Mapping[str, str], key: str) -> str:
    v = _field(meta, key)
    if not _is_commitment(v):
        raise WireError("bad_field", f"{key}={v[:80]!r}: expected 64 lowercase hex digits")
    return v


def decode_update(
    buf: bytes,
    manifest: Manifest,
    *,
    max_bytes: int = MAX_MESSAGE_BYTES,
    max_header_bytes: int = MAX_HEADER_BYTES,
) -> Update:
    """Validate and decode an update for a model with ``manifest``."""
    params, meta, codec = _open_params(buf, "update", manifest, max_bytes, max_header_bytes)
    return Update(
        run=_field(meta, "run"),
        round=_int(meta, "round"),
        device=_field(meta, "device"),
        kind=_choice(meta, "kind", UPDATE_KINDS),
        num_examples=_int(meta, "n", 1),
        params=params,
        train_loss=_float(meta, "loss", allow_nan=True),
        runtime=_field(meta, "runtime"),
        codec=codec.name,
        defence=_field(meta, "defence"),
        nonce=_nonce(meta),
        group=_bounded_str(meta, "group", MAX_PROTECT_CHARS),
    )


def _bounded_str(meta: Mapping[str, str], key: str, limit: int) -> str:
    """An optional field of at most ``limit`` characters ("" when absent)."""
    v = meta.get(key, "")
    if len(v) > limit:
        raise WireError("bad_field", f"{key}: {len(v)} characters > {limit}")
    return v
