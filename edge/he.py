"""Homomorphic encryption of updates (CKKS, TenSEAL; optional extra ``he``).

Roles: the *key holder* (``python -m edge keyholder``, its own process, not the coordinator)
makes the CKKS keys, publishes the public context, and decrypts only the aggregate; *devices*
encrypt ``n × update`` under the public key; the *coordinator* adds ciphertexts with the
public context alone and divides the decrypted sum by the total examples. Topics::

    edgeleak/<run>/he/public     key holder -> all          the public context, retained
    edgeleak/<run>/update/<dev>  device -> coordinator      an update with codec "ckks"
    edgeleak/<run>/he/aggregate  coordinator -> key holder  the summed ciphertext of a round
    edgeleak/<run>/he/result     key holder -> coordinator  its decryption (dense float64)

Every message is the usual tensor container. A CKKS payload is the tensor ``ckks`` (uint8: the
serialized ciphertexts of the flat parameter vector, one per ``slots`` values, concatenated) and
``ckks_sizes`` (int64: their byte lengths); the metadata names the key (``he``: SHA-256 hex of
the public context). Parameters: N = 8192, coefficient moduli 60/60/60 bits (180 of the 218
bits 128-bit security allows at this N), scale 2^52: additions only, no multiplicative depth
needed, so the whole 120-bit data modulus serves precision and the decrypted sum is as exact as a
float64 sum (values up to 2^67 before it wraps).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import queue
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from edge import wire
from edge.codec import CodecError, read_container, write_tensors
from edge.manifest import Manifest

if TYPE_CHECKING:
    from edge.mqtt import BrokerAddress, Received
    from edge.sign import Signer

log = logging.getLogger(__name__)

Params = dict[str, np.ndarray]
KEYHOLDER = "keyholder"  # the key holder's default identity (secure mode)
CODEC = "ckks"
POLY_MODULUS_DEGREE = 8192
COEFF_MOD_BIT_SIZES = (60, 60, 60)
SCALE_BITS = 52
SLOTS = POLY_MODULUS_DEGREE // 2
MAX_CONTEXT_BYTES = 16 * 1024 * 1024
INSTALL = (
    "homomorphic encryption needs TenSEAL: pip install 'edgeleak[he]' (tenseal 0.3.x ships "
    "wheels for x86_64 Linux/macOS/Windows only; no aarch64 wheel: HE devices are laptop-emulated)"
)


class HEError(RuntimeError):
    """HE cannot run here (TenSEAL missing) or a key does not fit."""


def tenseal() -> Any:
    """The ``tenseal`` module; ``HEError`` with the install command when it is missing."""
    try:
        import tenseal as ts
    except ImportError:
        raise HEError(INSTALL) from None
    return ts


def topic(run: str, what: str) -> str:
    """``edgeleak/<run>/he/<what>`` (``public``, ``aggregate``, ``result``)."""
    if what not in ("public", "aggregate", "result"):
        raise ValueError(f"he topic {what!r}; expected public, aggregate or result")
    return wire.control_topic(run).removesuffix("control") + f"he/{what}"


def key_id(public_context: bytes) -> str:
    return hashlib.sha256(public_context).hexdigest()


# -- keys ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyPair:
    """The key holder's CKKS context (with the secret key) and its public serialization."""

    secret: Any = field(repr=False)  # tenseal.Context, private
    public: bytes = field(repr=False)

    @property
    def key(self) -> str:
        return key_id(self.public)


def new_keys() -> KeyPair:
    """Fresh CKKS keys (SEAL draws them from its own CSPRNG)."""
    ts = tenseal()
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS,
        poly_modulus_degree=POLY_MODULUS_DEGREE,
        coeff_mod_bit_sizes=list(COEFF_MOD_BIT_SIZES),
    )
    ctx.global_scale = 2.0**SCALE_BITS
    return KeyPair(ctx, ctx.serialize(save_secret_key=False))


def public_context(public: bytes) -> Any:
    """A TenSEAL context from a public serialization; ``HEError`` if it holds a secret key."""
    if len(public) > MAX_CONTEXT_BYTES:
        raise HEError(f"public context of {len(public)} bytes > {MAX_CONTEXT_BYTES}")
    ctx = tenseal().context_from(public)
    if ctx.is_private():
        raise HEError("the 'public' context holds a secret key: refused")
    return ctx


# -- ciphertext payloads ------------------------------------------------------------------------


def flatten(params: Mapping[str, np.ndarray], manifest: Manifest) -> np.ndarray:
    """The parameters as one float64 vector in manifest order."""
    return np.concatenate([np.asarray(params[n], np.float64).ravel() for n in manifest.param_names])


def unflatten(vector: np.ndarray, manifest: Manifest) -> Params:
    """The flat float64 ``vector`` as named float64 arrays in manifest order."""
    out: Params = {}
    at = 0
    for spec in manifest.params:
        size = math.prod(spec.shape)
        out[spec.name] = vector[at : at + size].reshape(spec.shape).astype(np.float64)
        at += size
    return out


def encrypt(ctx: Any, vector: np.ndarray) -> dict[str, np.ndarray]:
    """The ``ckks`` and ``ckks_sizes`` tensors of ``vector`` under the public ``ctx``."""
    ts = tenseal()
    blobs = [
        ts.ckks_vector(ctx, vector[i : i + SLOTS].tolist()).serialize()
        for i in range(0, len(vector), SLOTS)
    ]
    return {
        "ckks": np.frombuffer(b"".join(blobs), dtype=np.uint8),
        "ckks_sizes": np.array([len(b) for b in blobs], dtype=np.int64),
    }


def _blobs(tensors: Mapping[str, np.ndarray], size: int) -> list[bytes]:
    """The ciphertexts of a payload, checked against a vector of ``size`` values."""
    if set(tensors) != {"ckks", "ckks_sizes"}:
        raise wire.WireError("bad_params", f"{sorted(tensors)[:4]}; expected ckks, ckks_sizes")
    raw, sizes = tensors["ckks"], tensors["ckks_sizes"]
    if raw.dtype != np.uint8 or sizes.dtype != np.int64 or raw.ndim != 1 or sizes.ndim != 1:
        raise wire.WireError("bad_dtype", "ckks: uint8 [bytes], ckks_sizes: int64 [chunks]")
    chunks = math.ceil(size / SLOTS)
    if len(sizes) != chunks or (sizes < 1).any() or int(sizes.sum()) != len(raw):
        raise wire.WireError("bad_shape", f"{len(sizes)} ciphertexts; expected {chunks}")
    ends = np.cumsum(sizes)
    data = raw.tobytes()
    return [data[e - s : e] for s, e in zip(sizes.tolist(), ends.tolist(), strict=True)]


def load(ctx: Any, tensors: Mapping[str, np.ndarray], size: int) -> list[Any]:
    """The CKKS vectors of a payload; ``WireError('bad_ciphertext')`` for a corrupt one."""
    ts = tenseal()
    out = []
    for b in _blobs(tensors, size):
        try:
            out.append(ts.ckks_vector_from(ctx, b))
        except Exception as e:  # SEAL raises several types on corrupt input
            raise wire.WireError("bad_ciphertext", f"{type(e).__name__}: {str(e)[:80]}") from None
    return out


def add(ciphertexts: Sequence[list[Any]]) -> list[Any]:
    """The element-wise sum of several payloads' vectors (public operation)."""
    if not ciphertexts:
        raise ValueError("no ciphertexts to add")
    acc = [c.copy() for c in ciphertexts[0]]
    for cts in ciphertexts[1:]:
        for a, c in zip(acc, cts, strict=True):
            a += c
    return acc


def pack(ciphertexts: Sequence[Any]) -> dict[str, np.ndarray]:
    blobs = [c.serialize() for c in ciphertexts]
    return {
        "ckks": np.frombuffer(b"".join(blobs), dtype=np.uint8),
        "ckks_sizes": np.array([len(b) for b in blobs], dtype=np.int64),
    }


def decrypt(keys: KeyPair, tensors: Mapping[str, np.ndarray], size: int) -> np.ndarray:
    """The key holder's decryption of a payload: float64 [size]."""
    vectors = load(keys.secret, tensors, size)
    return np.concatenate([np.asarray(v.decrypt(), np.float64) for v in vectors])[:size]


# -- messages ----------------------------------------------------------------------------------


def encode_update(
    update: wire.Update, key: str, tensors: dict[str, np.ndarray], signer: Signer | None = None
) -> bytes:
    """An update message whose tensors are a CKKS payload (codec ``ckks``, key ``he``);
    ``signer``: signed (secure mode)."""
    payload = wire.encode_update(
        wire.Update(
            run=update.run, round=update.round, device=update.device, kind=update.kind,
            num_examples=update.num_examples, params={}, train_loss=update.train_loss,
            runtime=update.runtime, codec=CODEC, defence=update.defence, nonce=update.nonce,
        ),
        tensors=tensors,
    )  # fmt: skip
    tensors_, meta = read_container(payload)
    meta["he"] = key
    return signer.write(dict(tensors_), meta) if signer else write_tensors(dict(tensors_), meta)


def encrypt_update(
    update: wire.Update, ctx: Any, key: str, manifest: Manifest, signer: Signer | None = None
) -> bytes:
    """A device's encrypted update: ``num_examples × params`` under the public key."""
    vector = flatten(update.params, manifest) * update.num_examples
    return encode_update(update, key, encrypt(ctx, vector), signer)


@dataclass(frozen=True)
class EncryptedUpdate:
    """A validated CKKS update: the header fields and its ciphertext tensors."""

    update: wire.Update  # params empty
    tensors: Mapping[str, np.ndarray] = field(repr=False)


def decode_update(
    buf: bytes, manifest: Manifest, key: str, *, max_bytes: int = wire.MAX_MESSAGE_BYTES
) -> EncryptedUpdate:
    """Validate an encrypted update for key ``key``; ``WireError`` otherwise."""
    if len(buf) > max_bytes:
        raise wire.WireError("oversize", f"{len(buf)} bytes > limit {max_bytes}")
    try:
        tensors, meta = read_container(buf)
    except CodecError as e:
        raise wire.WireError(e.reason, e.detail) from None
    tensors = {k: v for k, v in tensors.items() if k != wire.SIG_TENSOR}  # checked before (sign)
    if meta.get("codec") != CODEC:
        raise wire.WireError("not_encrypted", f"codec {meta.get('codec')!r} in an HE run")
    if meta.get("he") != key:
        raise wire.WireError("wrong_key", f"key {str(meta.get('he'))[:16]!r}, run's {key[:16]}")
    _blobs(tensors, manifest.num_parameters)
    # the header fields through the contract's own decoder, on an empty dense body
    meta_f32 = {**meta, "codec": "f32"}
    meta_f32.pop("he")
    zeros = {p.name: np.zeros(p.shape, np.float32) for p in manifest.params}
    header = wire.decode_update(write_tensors(zeros, meta_f32), manifest)
    return EncryptedUpdate(dataclasses.replace(header, params={}, codec=CODEC), tensors)


def public_message(run: str, public: bytes) -> bytes:
    return write_tensors(
        {"context": np.frombuffer(public, dtype=np.uint8)},
        {"edgeleak": str(wire.SCHEMA_VERSION), "type": "he_public", "run": run,
         "he": key_id(public)},
    )  # fmt: skip


def read_public(buf: bytes, run: str) -> bytes:
    """The public context in a ``he/public`` message of ``run``; ``WireError`` otherwise."""
    tensors, meta = _open(buf, "he_public", run)
    ctx = tensors.get("context")
    if ctx is None or ctx.dtype != np.uint8 or ctx.ndim != 1 or len(ctx) > MAX_CONTEXT_BYTES:
        raise wire.WireError("bad_params", "expected one uint8 tensor 'context'")
    public = ctx.tobytes()
    if meta.get("he") != key_id(public):
        raise wire.WireError("wrong_key", "the context does not hash to its key id")
    return public


def aggregate_message(run: str, round_: int, key: str, tensors: dict[str, np.ndarray]) -> bytes:
    meta = {"edgeleak": str(wire.SCHEMA_VERSION), "type": "he_aggregate", "run": run,
            "round": str(round_), "he": key}  # fmt: skip
    return write_tensors(tensors, meta)


def result_message(run: str, round_: int, key: str, params: Params) -> bytes:
    meta = {"edgeleak": str(wire.SCHEMA_VERSION), "type": "he_result", "run": run,
            "round": str(round_), "he": key}  # fmt: skip
    return write_tensors(params, meta)


def _open(buf: bytes, kind: str, run: str) -> tuple[Mapping[str, np.ndarray], dict[str, str]]:
    try:
        tensors, meta = read_container(buf)
    except CodecError as e:
        raise wire.WireError(e.reason, e.detail) from None
    if meta.get("edgeleak") != str(wire.SCHEMA_VERSION) or meta.get("type") != kind:
        raise wire.WireError("bad_type", f"type {meta.get('type')!r}; expected {kind!r}")
    if meta.get("run") != run:
        raise wire.WireError("wrong_run", f"run {str(meta.get('run'))[:40]!r}")
    return tensors, meta


def read_aggregate(
    buf: bytes, run: str, key: str, size: int
) -> tuple[int, Mapping[str, np.ndarray]]:
    tensors, meta = _open(buf, "he_aggregate", run)
    if meta.get("he") != key:
        raise wire.WireError("wrong_key", "aggregate under another key")
    _blobs(tensors, size)
    return int(meta.get("round", "-1")), tensors


def read_result(buf: bytes, run: str, key: str, manifest: Manifest) -> tuple[int, Params]:
    """(round, the decrypted sum as float64 arrays: one per parameter, finite)."""
    tensors, meta = _open(buf, "he_result", run)
    if meta.get("he") != key:
        raise wire.WireError("wrong_key", "result under another key")
    if set(tensors) != set(manifest.param_names):
        raise wire.WireError("bad_shape", "result tensors are not the model's parameters")
    for p in manifest.params:
        t = tensors[p.name]
        if t.dtype != np.float64 or t.shape != tuple(p.shape):
            raise wire.WireError(
                "bad_shape", f"{p.name}: {t.dtype} {t.shape}; expected F64 {p.shape}"
            )
        if not np.isfinite(t).all():
            raise wire.WireError("non_finite", f"{p.name} has NaN or Inf")
    return int(meta.get("round", "-1")), {
        p.name: np.array(tensors[p.name]) for p in manifest.params
    }


# -- the device's side -------------------------------------------------------------------------


def on_public(keys: dict[str, tuple[str, object]], msg: Received, pinned: str | None) -> None:
    """Keep the public context a ``he/public`` message carries for its run (a malformed one,
    or one for another run than the device's, is logged and dropped)."""
    run = msg.topic.split("/")[1]
    if (pinned is not None and run != pinned) or not msg.payload:
        keys.pop(run, None)
        return
    try:
        public = read_public(msg.payload, run)
        keys[run] = (key_id(public), public_context(public))
    except (wire.WireError, HEError, ValueError) as e:
        log.warning("refused the public key of run %s: %s", run, str(e)[:200])


def check_key(keys: dict[str, tuple[str, object]], task: wire.Task) -> None:
    """``WireError`` unless this device can encrypt ``task``'s update under its key."""
    try:
        tenseal()
    except HEError as e:
        raise wire.WireError("no_tenseal", str(e)) from None
    held = keys.get(task.run)
    if held is None or held[0] != task.he:
        raise wire.WireError(
            "no_he_key", f"no public key {task.he[:12]} of run {task.run[:40]} (he/public)"
        )


# -- the key holder ----------------------------------------------------------------------------


def run_keyholder(
    run: str,
    broker: BrokerAddress,
    manifest: Manifest,
    *,
    stop: threading.Event,
    keys: KeyPair | None = None,
    say: Any = log.info,
    identity: str = KEYHOLDER,
) -> KeyPair:
    """Publish the public context (retained), then decrypt each round's aggregate until
    ``stop``; the retained key is cleared at the end. ``identity``: its TLS identity in secure
    mode (the broker's ACL lets enrolled key holders alone publish keys and results)."""
    from edge.mqtt import QOS, make_client, running

    keys = keys or new_keys()
    inbox: queue.Queue[Received] = queue.Queue()
    ready: list[str] = []
    client = make_client(
        f"keyholder-{run}", inbox, protocol=broker.protocol,
        subscriptions=(topic(run, "aggregate"),), on_ready=ready,
    )  # fmt: skip
    with running(client, broker, identity=identity):
        pub = public_message(run, keys.public)
        client.publish(topic(run, "public"), pub, qos=QOS, retain=True).wait_for_publish(60)
        say(f"keyholder: public key {keys.key[:12]} on {topic(run, 'public')}")
        while not stop.is_set():
            try:
                msg = inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                round_, tensors = read_aggregate(
                    msg.payload, run, keys.key, manifest.num_parameters
                )
                total = decrypt(keys, tensors, manifest.num_parameters)
            except wire.WireError as e:
                say(f"keyholder: refused an aggregate: {e}")
                continue
            out = result_message(run, round_, keys.key, unflatten(total, manifest))
            client.publish(topic(run, "result"), out, qos=QOS).wait_for_publish(60)
            say(f"keyholder: decrypted the aggregate of round {round_}")
        client.publish(topic(run, "public"), b"", qos=QOS, retain=True).wait_for_publish(10)
    return keys


def main(argv: list[str], prog: str = "python -m edge keyholder") -> int:
    """``python -m edge keyholder --broker URL --run RUN --model DIR``."""
    import signal

    from edge.args import OneLineParser, secure_broker
    from edge.manifest import ModelArtifact

    p = OneLineParser(prog=prog, description="Hold a run's CKKS secret key; decrypt aggregates.")
    p.add_argument(
        "--broker", required=True, help="mqtt://[USER:PASSWORD@]HOST:PORT, or mqtts:// with --pki"
    )
    p.add_argument("--pki", help="PKI folder with the key holder's identity (secure mode)")
    p.add_argument("--id", default=KEYHOLDER, help=f"its identity (default {KEYHOLDER})")
    p.add_argument("--run", required=True, help="the run id")
    p.add_argument("--model", required=True, help="model folder with manifest.json")
    args = p.parse_args(argv)
    try:
        broker, _ = secure_broker(args.broker, args.pki, args.id)
        manifest = ModelArtifact.load(args.model).manifest
        tenseal()
    except (ValueError, OSError, HEError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    run_keyholder(
        args.run, broker, manifest, stop=stop, say=lambda s: print(s, flush=True), identity=args.id
    )
    return 0
