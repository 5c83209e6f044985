"""Secure aggregation, device side: SecAgg (Bonawitz et al., CCS 2017) with SecAgg+
neighbourhoods (Bell et al., CCS 2020). Torch-free; primitives from ``cryptography``.

Per round, device ``u`` with fixed-point input ``x_u`` (uint32, ``encode_fixed``):

1. advertise: two fresh X25519 public keys, ``c_pk`` (share transport) and ``s_pk`` (masks).
2. share keys: with its neighbours ``N(u)`` (a k-regular graph the coordinator draws from a
   public seed, ``neighbours``; all others when ``k=0``), t-of-|N(u)| Shamir shares of the
   self-mask seed ``b_u`` and of ``s_sk_u``, each pair encrypted to its neighbour with
   AES-256-GCM under ``HKDF-SHA256(X25519(c_sk_u, c_pk_v))``.
3. masked input: ``y_u = x_u + PRG(b_u) + sum_{v in N(u) ∩ U2} ±PRG(s_uv)`` mod 2^32, where
   ``s_uv = HKDF-SHA256(X25519(s_sk_u, s_pk_v))`` (+ if u < v) and PRG is ChaCha20 keyed by the
   256-bit seed.
4. unmask: for each neighbour that sent its masked input the share of ``b_v``; for each one that
   did not, the share of ``s_sk_v``; never both for one device, and nothing when fewer than t
   neighbours survived.

The coordinator (``coordinator.secagg``) relays the ciphertexts and reconstructs the sum.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from edge.codec import CodecError, read_container, write_tensors
from edge.wire import TOPIC_PREFIX, WireError

# Shamir field: the smallest prime above 2^256, so a 32-byte secret is one field element.
PRIME = 2**256 + 297
SHARE_BYTES = 33  # a field element, big-endian
KEY_BYTES = 32
NONCE_BYTES = 12
# Ciphertext of one neighbour's share pair: nonce + (b-share, s-share) + GCM tag.
CIPHER_BYTES = NONCE_BYTES + 2 * SHARE_BYTES + 16
MODULUS_BITS = 32  # inputs and masks live in Z_{2^32}
VERSION = "1"
# Device -> coordinator phases, in order; the coordinator answers on ``secagg-to/<device>/<phase>``
# with "keys" (roster), "shares" (ciphertexts addressed to the device), "unmask" (who survived).
UP_PHASES = ("advertise", "share", "masked", "unmask")
DOWN_PHASES = ("begin", "keys", "shares", "unmask")
# Byte-ledger kinds of these messages (``secagg_<phase>``), both directions.
LEDGER_KINDS = tuple(f"secagg_{p}" for p in dict.fromkeys(UP_PHASES + DOWN_PHASES))

Params = dict[str, np.ndarray]


class SecAggError(WireError):
    """A secure-aggregation message or state that breaks the protocol; ``reason`` is counted."""


# -- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SecAggSpec:
    """``k``: neighbours per device (0: every other device, classic SecAgg); ``t``: threshold as
    a fraction of a device's neighbours (t·|N(u)| rounded up shares reconstruct a secret);
    ``clip``: inputs are clipped to [-clip, clip]; ``bits``: fractional bits of the fixed point."""

    k: int = 0
    t: float = 0.5
    clip: float = 1.0
    bits: int = 16

    def __post_init__(self) -> None:
        if self.k < 0 or self.k % 2:
            raise ValueError(f"secagg k={self.k}: expected 0 (all) or an even number of neighbours")
        if not 0.5 <= self.t <= 1.0:
            raise ValueError(f"secagg t={self.t}: expected a fraction in [0.5, 1]")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"secagg clip={self.clip}: expected a positive number")
        if not 0 <= self.bits <= 24:
            raise ValueError(f"secagg bits={self.bits}: expected 0..24 fractional bits")

    def degree(self, n: int) -> int:
        """Neighbours per device among ``n``: k, or n-1 when k is 0 or at least n-1."""
        return n - 1 if self.k == 0 or self.k >= n - 1 else self.k

    def threshold(self, n: int) -> int:
        """Shares that reconstruct a secret in a round of ``n`` devices (at least 1)."""
        return max(1, math.ceil(self.t * self.degree(n)))

    def check_capacity(self, n: int) -> None:
        """The sum of ``n`` clipped inputs must not wrap around 2^32 (signed decoding)."""
        top = n * round(self.clip * 2**self.bits)
        if top >= 2 ** (MODULUS_BITS - 1):
            raise ValueError(
                f"secagg: {n} inputs × clip {self.clip} × 2^{self.bits} = {top} overflows "
                f"2^{MODULUS_BITS - 1}; lower clip or bits, or use fewer devices per round"
            )

    @property
    def text(self) -> str:
        return f"k={self.k},t={self.t:g},clip={self.clip:g},bits={self.bits}"


def parse_spec(spec: str) -> SecAggSpec:
    """``"k=K,t=T,clip=C,bits=B"`` (any subset, defaults otherwise); ValueError saying what is
    expected."""
    fields: dict[str, float | int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, raw = part.partition("=")
        if not sep or key not in ("k", "t", "clip", "bits"):
            raise ValueError(f"secagg {part!r}: expected k=INT, t=FRACTION, clip=FLOAT, bits=INT")
        try:
            fields[key] = int(raw) if key in ("k", "bits") else float(raw)
        except ValueError:
            raise ValueError(f"secagg {part!r}: {raw!r} is not a number") from None
    return SecAggSpec(**fields)  # type: ignore[arg-type]


def task_spec(text: str) -> SecAggSpec:
    """The spec a task carries; ``SecAggError("bad_secagg")`` when it is not one."""
    try:
        return parse_spec(text)
    except ValueError as e:
        raise SecAggError("bad_secagg", str(e)) from None


# -- fixed point ----------------------------------------------------------------------------------


def encode_fixed(x: np.ndarray, clip: float, bits: int) -> np.ndarray:
    """Clip to [-clip, clip], scale by 2^bits, round to nearest, two's complement mod 2^32."""
    q = np.rint(np.clip(np.asarray(x, np.float64), -clip, clip) * 2.0**bits).astype(np.int64)
    return (q & 0xFFFFFFFF).astype(np.uint32)


def decode_fixed(total: np.ndarray, bits: int) -> np.ndarray:
    """A sum mod 2^32 back to float64 (signed; ``SecAggSpec.check_capacity`` rules out wrap)."""
    return np.asarray(total, np.uint32).view(np.int32).astype(np.float64) / 2.0**bits


def flatten(params: Mapping[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
    """One float64 vector of ``params`` in ``names`` order."""
    return np.concatenate([np.asarray(params[n], np.float64).ravel() for n in names])


def unflatten(vector: np.ndarray, shapes: Mapping[str, tuple[int, ...]]) -> Params:
    """The inverse of ``flatten`` for the given (ordered) shapes, as float32 arrays."""
    out: Params = {}
    i = 0
    for name, shape in shapes.items():
        size = math.prod(shape)
        out[name] = vector[i : i + size].astype(np.float32).reshape(shape)
        i += size
    if i != len(vector):
        raise ValueError(f"vector of {len(vector)} values for {i} parameters")
    return out


# -- Shamir over GF(PRIME) ----------------------------------------------------------------------


def shamir_split(secret: int, xs: Sequence[int], t: int) -> dict[int, int]:
    """Shares ``{x: f(x)}`` of ``secret`` with a random polynomial of degree t-1 (``secrets``)."""
    if not 0 <= secret < PRIME:
        raise ValueError("secret out of the field")
    if not 1 <= t <= len(xs) or len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ValueError(f"need 1 <= t={t} <= {len(xs)} distinct non-zero points")
    top_first = [*(secrets.randbelow(PRIME) for _ in range(t - 1)), secret]
    shares = {}
    for x in xs:
        y = 0
        for c in top_first:  # Horner; one reduction at the end is faster for small x
            y = y * x + c
        shares[x] = y % PRIME
    return shares


def shamir_combine(shares: Mapping[int, int]) -> int:
    """Lagrange interpolation at 0 of the given points (t or more of one polynomial)."""
    if not shares:
        raise ValueError("no shares")
    total = 0
    for xi, yi in shares.items():
        num, den = 1, 1
        for xj in shares:
            if xj != xi:
                num = num * -xj % PRIME
                den = den * (xi - xj) % PRIME
        total = (total + yi * num * pow(den, -1, PRIME)) % PRIME
    return total


def int_bytes(value: int) -> bytes:
    return value.to_bytes(SHARE_BYTES, "big")


# -- key agreement, transport, masks ------------------------------------------------------------


def _hkdf(shared: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def agree(sk: X25519PrivateKey, pk: bytes, info: bytes) -> bytes:
    """A 256-bit key: HKDF-SHA256 of the X25519 shared secret, bound to ``info``."""
    return _hkdf(sk.exchange(X25519PublicKey.from_public_bytes(pk)), info)


def public_bytes(sk: X25519PrivateKey) -> bytes:
    return sk.public_key().public_bytes_raw()


def context(run: str, round_: int, what: str) -> bytes:
    """HKDF info / AEAD associated data naming the protocol, run, round and purpose."""
    return f"edgeleak-secagg/{VERSION}/{run}/{round_}/{what}".encode()


def prg(seed: bytes, m: int) -> np.ndarray:
    """``m`` uint32 words of ChaCha20 keystream under the 256-bit ``seed`` (zero nonce: every
    seed is used for one mask only)."""
    if len(seed) != KEY_BYTES:
        raise ValueError(f"mask seed of {len(seed)} bytes; expected {KEY_BYTES}")
    enc = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    return np.frombuffer(enc.update(bytes(4 * m)), dtype="<u4").astype(np.uint32)


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM with a random 96-bit nonce, prepended."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, blob: bytes, aad: bytes) -> bytes:
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
    except InvalidTag:
        raise SecAggError("bad_ciphertext", "a share failed authentication") from None


def pair_sign(u: str, v: str) -> int:
    """+1 when ``u`` adds the pairwise mask shared with ``v``, -1 when it subtracts it."""
    return 1 if u < v else -1


# -- SecAgg+ graph ------------------------------------------------------------------------------


def neighbours(devices: Sequence[str], k: int, seed: bytes) -> dict[str, list[str]]:
    """A k-regular Harary graph on a random ring order drawn from the public ``seed`` (Bell et al.
    2020): each device is joined to the k/2 nearest on either side; k=0 or k>=n-1: complete."""
    order = sorted(devices)
    n = len(order)
    if k == 0 or k >= n - 1:
        return {d: [e for e in order if e != d] for d in order}
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(seed, "big")))
    ring = [order[i] for i in rng.permutation(n)]
    pos = {d: i for i, d in enumerate(ring)}
    return {
        d: sorted({ring[(pos[d] + j) % n] for j in range(-k // 2, k // 2 + 1) if j}) for d in order
    }


def failure_bound(n: int, degree: int, t: int, dropout: float) -> float:
    """Union bound on the chance that some device keeps fewer than t of its ``degree``
    neighbours when each drops independently with probability ``dropout`` (the round aborts)."""
    p_one = sum(
        math.comb(degree, j) * (1 - dropout) ** j * dropout ** (degree - j) for j in range(t)
    )
    return min(1.0, n * p_one)


def choose_k(n: int, *, t: float, dropout: float, target: float = 1e-6) -> int:
    """The smallest even k whose ``failure_bound`` at ``dropout`` is at most ``target``; 0 (the
    complete graph) when no k below n-1 reaches it."""
    for k in range(2, n - 1, 2):
        if failure_bound(n, k, max(1, math.ceil(t * k)), dropout) <= target:
            return k
    return 0


# -- messages -----------------------------------------------------------------------------------


def up_topic(run: str, phase: str, device: str) -> str:
    return f"{TOPIC_PREFIX}/{run}/secagg/{phase}/{device}"


def down_topic(run: str, device: str, phase: str) -> str:
    return f"{TOPIC_PREFIX}/{run}/secagg-to/{device}/{phase}"


def up_filter(run: str) -> str:
    return f"{TOPIC_PREFIX}/{run}/secagg/+/+"


def down_filter(run: str, device: str) -> str:
    return f"{TOPIC_PREFIX}/{run}/secagg-to/{device}/+"


def parse_secagg_topic(topic: str) -> tuple[str, str, str, str] | None:
    """(run, direction "up"/"down", phase, device) of a secure-aggregation topic, else None."""
    parts = topic.split("/")
    if len(parts) != 5 or parts[0] != TOPIC_PREFIX:
        return None
    if parts[2] == "secagg" and parts[3] in UP_PHASES:
        return parts[1], "up", parts[3], parts[4]
    if parts[2] == "secagg-to" and parts[4] in DOWN_PHASES:
        return parts[1], "down", parts[4], parts[3]
    return None


@dataclass(frozen=True)
class Message:
    """One secure-aggregation message: header fields, JSON lists, byte/uint tensors."""

    phase: str
    run: str
    round: int
    device: str
    fields: dict[str, str] = field(default_factory=dict)
    tensors: dict[str, np.ndarray] = field(default_factory=dict)

    def encode(self) -> bytes:
        meta = {
            "secagg": VERSION,
            "phase": self.phase,
            "run": self.run,
            "round": str(self.round),
            "device": self.device,
        }
        return write_tensors(dict(self.tensors), {**meta, **self.fields})

    def names(self, key: str) -> list[str]:
        """A JSON list of device ids in field ``key``."""
        try:
            value = json.loads(self.fields[key])
        except (KeyError, ValueError):
            raise SecAggError(
                "bad_field", f"{self.phase}: field {key!r} missing or not JSON"
            ) from None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise SecAggError("bad_field", f"{self.phase}: {key!r} is not a list of device ids")
        return value

    def tensor(self, key: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        t = self.tensors.get(key)
        if t is None or t.dtype != np.dtype(dtype) or tuple(t.shape) != shape:
            got = None if t is None else (t.dtype, tuple(t.shape))
            raise SecAggError("bad_shape", f"{self.phase}: {key} is {got}, expected {dtype}{shape}")
        return t


def decode_message(
    payload: bytes, phase: str, run: str, round_: int | None, device: str
) -> Message:
    """Parse and check the header against what the topic and the round say (``round_=None``:
    any round, for the message that starts one)."""
    try:
        tensors, meta = read_container(payload)
    except CodecError as e:
        raise SecAggError(e.reason, e.detail) from None
    if meta.get("secagg") != VERSION:
        raise SecAggError("bad_version", f"secagg version {meta.get('secagg')!r}")
    if round_ is None:
        raw = meta.get("round", "")
        if not raw.isdigit() or len(raw) > 15:
            raise SecAggError("bad_field", f"round {raw[:20]!r}")
        round_ = int(raw)
    for key, want in (("phase", phase), ("run", run), ("round", str(round_)), ("device", device)):
        if meta.get(key) != want:
            raise SecAggError(
                "stale_round" if key == "round" else f"wrong_{key}",
                f"{key} {meta.get(key)!r}, expected {want!r}",
            )
    fields = {
        k: v for k, v in meta.items() if k not in ("secagg", "phase", "run", "round", "device")
    }
    return Message(phase, run, round_, device, fields, tensors)


def begin_message(run: str, round_: int, device: str, spec: SecAggSpec, length: int) -> Message:
    """What starts a device's secure aggregation when no task does (light devices)."""
    return Message("begin", run, round_, device, {"spec": spec.text, "length": str(length)})


# -- the device's state machine -----------------------------------------------------------------


class SecAggClient:
    """One device's part in one round. Each ``on_*`` takes the coordinator's message and
    returns the payload to publish on ``up_topic(run, phase, device)``."""

    def __init__(self, run: str, round_: int, device: str, x: np.ndarray, spec: SecAggSpec) -> None:
        """``x``: the update as float64 (``flatten``); encoded here with the spec's fixed point."""
        self.run, self.round, self.device, self.spec = run, round_, device, spec
        self.x = encode_fixed(x, spec.clip, spec.bits)
        self._c_sk = X25519PrivateKey.generate()
        self._s_sk = X25519PrivateKey.generate()
        self._b = os.urandom(KEY_BYTES)
        self.peers: dict[str, tuple[int, bytes, bytes]] = {}  # neighbour -> (x, c_pk, s_pk)
        self.threshold = 0
        self.held: dict[str, tuple[int, int]] = {}  # neighbour -> its (b, s_sk) shares for us
        self._channel: dict[str, bytes] = {}  # neighbour -> AES key of our share transport
        self.masked_with: list[str] = []
        self.phase = "advertise"

    def _msg(self, phase: str, **kw: object) -> bytes:
        return Message(phase, self.run, self.round, self.device, **kw).encode()  # type: ignore[arg-type]

    def _expect(self, phase: str) -> None:
        if self.phase != phase:
            raise SecAggError("wrong_phase", f"got {phase!r} while in {self.phase!r}")

    def advertise(self, *, examples: int = 0, loss: float = math.nan) -> bytes:
        """The two public keys, and what the device reports of its training (examples, loss)."""
        self._expect("advertise")
        self.phase = "keys"
        return self._msg(
            "advertise",
            fields={"examples": str(examples), "loss": repr(float(loss))},
            tensors={
                "c_pk": np.frombuffer(public_bytes(self._c_sk), np.uint8),
                "s_pk": np.frombuffer(public_bytes(self._s_sk), np.uint8),
            },
        )

    def on_keys(self, msg: Message) -> bytes:
        """The roster of its neighbours (ids, share points, keys): encrypted shares out."""
        self._expect("keys")
        ids = msg.names("peers")
        try:
            xs = [int(v) for v in json.loads(msg.fields["xs"])]
            t = int(msg.fields["t"])
        except (KeyError, ValueError, TypeError):
            raise SecAggError("bad_field", "keys: xs or t missing") from None
        n = len(ids)
        if len(xs) != n or len(set(ids)) != n or self.device in ids or len(set(xs)) != n:
            raise SecAggError("bad_roster", "peers and points must be distinct, without oneself")
        # Fewer than 2 neighbours, or a threshold below the spec's, would expose our secrets.
        if n < 2 or not max(1, math.ceil(self.spec.t * n)) <= t <= n:
            raise SecAggError("bad_roster", f"t={t} with {n} neighbours (spec {self.spec.text})")
        c_pk = msg.tensor("c_pk", "uint8", (n, KEY_BYTES))
        s_pk = msg.tensor("s_pk", "uint8", (n, KEY_BYTES))
        self.peers = {
            d: (x, c_pk[i].tobytes(), s_pk[i].tobytes())
            for i, (d, x) in enumerate(zip(ids, xs, strict=True))
        }
        self.threshold = t
        b_sh = shamir_split(int.from_bytes(self._b, "big"), xs, t)
        s_sh = shamir_split(int.from_bytes(self._s_sk.private_bytes_raw(), "big"), xs, t)
        cts = np.zeros((n, CIPHER_BYTES), np.uint8)
        for i, d in enumerate(ids):
            x, pk, _ = self.peers[d]
            key = self._channel[d] = agree(
                self._c_sk, pk, context(self.run, self.round, "share-key")
            )
            plain = int_bytes(b_sh[x]) + int_bytes(s_sh[x])
            cts[i] = np.frombuffer(seal(key, plain, self._aad(self.device, d)), np.uint8)
        self.phase = "shares"
        return self._msg("share", fields={"to": json.dumps(ids)}, tensors={"ct": cts})

    def _aad(self, sender: str, recipient: str) -> bytes:
        return context(self.run, self.round, f"share/{sender}/{recipient}")

    def on_shares(self, msg: Message) -> bytes:
        """The ciphertexts addressed to us: decrypted and kept; the masked input out."""
        self._expect("shares")
        senders = msg.names("from")
        if len(set(senders)) != len(senders) or not set(senders) <= set(self.peers):
            raise SecAggError("bad_roster", "shares from senders that are not our neighbours")
        cts = msg.tensor("ct", "uint8", (len(senders), CIPHER_BYTES))
        for i, d in enumerate(senders):
            plain = open_sealed(self._channel[d], cts[i].tobytes(), self._aad(d, self.device))
            b = int.from_bytes(plain[:SHARE_BYTES], "big")
            s = int.from_bytes(plain[SHARE_BYTES:], "big")
            self.held[d] = (b, s)
        if len(senders) < self.threshold:
            raise SecAggError(
                "too_few_peers", f"{len(senders)} neighbours shared, t={self.threshold}"
            )
        m = len(self.x)
        y = self.x + prg(self._b, m)
        for d in senders:
            seed = agree(self._s_sk, self.peers[d][2], context(self.run, self.round, "mask"))
            mask = prg(seed, m)
            y = y + mask if pair_sign(self.device, d) > 0 else y - mask
        self.masked_with = senders
        self.phase = "unmask"
        # The container has no unsigned 32-bit type: the words travel as int32, bit for bit.
        return self._msg("masked", tensors={"y": y.astype(np.uint32).view(np.int32)})

    def on_unmask(self, msg: Message) -> bytes:
        """Who survived: b-shares for survivors, s-shares for the dropped, never both."""
        self._expect("unmask")
        alive, dropped = msg.names("survivors"), msg.names("dropped")
        if set(alive) & set(dropped) or not (set(alive) | set(dropped)) <= set(self.held):
            raise SecAggError("bad_unmask", "survivors and dropped must be disjoint neighbours")
        if set(alive) | set(dropped) != set(self.masked_with):
            raise SecAggError("bad_unmask", "every neighbour we masked with must be accounted for")
        if len(alive) < self.threshold:
            raise SecAggError(
                "too_few_survivors", f"{len(alive)} neighbours left, t={self.threshold}"
            )
        self.phase = "done"

        def rows(ids: list[str], which: int) -> np.ndarray:
            out = np.zeros((len(ids), SHARE_BYTES), np.uint8)
            for i, d in enumerate(ids):
                out[i] = np.frombuffer(int_bytes(self.held[d][which]), np.uint8)
            return out

        return self._msg(
            "unmask",
            fields={"survivors": json.dumps(alive), "dropped": json.dumps(dropped)},
            tensors={"b": rows(alive, 0), "s": rows(dropped, 1)},
        )

    def handle(self, msg: Message) -> tuple[str, bytes]:
        """Dispatch a coordinator message by phase: (up phase, payload)."""
        if msg.phase == "keys":
            return "share", self.on_keys(msg)
        if msg.phase == "shares":
            return "masked", self.on_shares(msg)
        if msg.phase == "unmask":
            return "unmask", self.on_unmask(msg)
        raise SecAggError("wrong_phase", f"unexpected {msg.phase!r}")
