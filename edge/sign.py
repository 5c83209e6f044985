"""Secure mode on the device side: identities from a PKI folder, TLS contexts, signed messages.

Every identity (device, coordinator, aggregator, key holder) has one Ed25519 key and an X.509
certificate from the run's CA (``edgeleak pki``): CN = the id, OU = the role. The same key
authenticates the TLS connection to the broker and signs the identity's messages. PKI folder::

    ca.crt                           the CA certificate: every role trusts it
    ca.key                           the CA's key: stays where enrolment happens, never bundled
    crl.pem                          revoked certificates (mosquitto's crlfile; verifiers read it)
    broker.crt, broker.key           the broker's TLS server certificate
    identities/<id>.crt, <id>.key    one pair per enrolled identity

A signed message is a tensor container (``edge.codec``) whose metadata has ``signer`` (the
signer's id) and whose last tensor is ``__sig__`` (U8, shape [64], the last 64 bytes of the
message): the Ed25519 signature of every byte before it, i.e. the 8-byte header length, the
whole JSON header (all metadata and every tensor entry, ``__sig__``'s included) and the data of
every other tensor. Verification failures are ``WireError`` with reason ``bad_signature``
(unsigned, malformed, wrong signer or wrong signature), ``unknown_device`` (no valid certificate
for the signer) or ``revoked`` (its certificate is on the CRL).
"""

from __future__ import annotations

import datetime
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

from edge import wire
from edge.codec import CodecError, read_header, write_tensors
from edge.wire import WireError

SIG_TENSOR = wire.SIG_TENSOR
SIG_BYTES = 64
COORDINATOR = "coordinator"  # the coordinator's identity (and its role)
ROLES = ("device", "coordinator", "aggregator", "keyholder")
CA_CERT = "ca.crt"
CA_KEY = "ca.key"
CRL = "crl.pem"
BROKER = "broker"
IDENTITIES = "identities"


def check_id(identity: str) -> str:
    """``identity`` if it can name a certificate, an MQTT topic segment and a file; else
    ``ValueError`` saying what is allowed."""
    if (
        not identity
        or len(identity) > 64
        or any(c in identity for c in "/+#\\\0")
        or identity.startswith(".")
        or not identity.isprintable()
        or identity != identity.strip()
    ):
        raise ValueError(
            f"identity {identity!r}: expected 1-64 printable characters without '/', '+', '#', "
            "'\\', surrounding spaces or a leading '.'"
        )
    return identity


def cert_path(pki: str | Path, identity: str) -> Path:
    return Path(pki) / IDENTITIES / f"{check_id(identity)}.crt"


def key_path(pki: str | Path, identity: str) -> Path:
    return Path(pki) / IDENTITIES / f"{check_id(identity)}.key"


def bundle_files(identity: str) -> list[str]:
    """What a device's bundle carries of the PKI folder (same relative paths): the CA, the CRL,
    its own key and certificate, and the coordinator's certificate (never the CA's key)."""
    ids = f"{IDENTITIES}/{check_id(identity)}"
    return [CA_CERT, CRL, f"{ids}.crt", f"{ids}.key", f"{IDENTITIES}/{COORDINATOR}.crt"]


def tls_context(pki: str | Path, identity: str) -> ssl.SSLContext:
    """A client TLS context: trusts only the PKI's CA, presents ``identity``'s certificate."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(Path(pki) / CA_CERT))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert_path(pki, identity)), str(key_path(pki, identity)))
    return ctx


@dataclass(frozen=True)
class Signer:
    """An identity's signing key: ``write`` makes signed messages."""

    identity: str
    key: ed25519.Ed25519PrivateKey

    @classmethod
    def load(cls, pki: str | Path, identity: str) -> Signer:
        path = key_path(pki, identity)
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise ValueError(f"{path}: expected an Ed25519 key (edgeleak pki enroll)")
        return cls(identity, key)

    def write(self, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
        """The signed container of ``tensors`` and ``metadata`` (plus ``signer``)."""
        meta = {**metadata, "signer": self.identity}
        out = bytearray(write_tensors({**tensors, SIG_TENSOR: np.zeros(SIG_BYTES, np.uint8)}, meta))
        view = memoryview(out)
        out[-SIG_BYTES:] = self.key.sign(view[:-SIG_BYTES])
        return bytes(out)


def signed_part(buf: bytes) -> tuple[memoryview, bytes, str]:
    """(the signed bytes, the signature, the signer named in the metadata) of a signed message;
    ``WireError('bad_signature')`` when it is not one."""
    try:
        entries, meta, start = read_header(buf)
    except CodecError as e:
        raise WireError("bad_signature", f"not a signed message: {e.detail}") from None
    sig = entries.get(SIG_TENSOR)
    if sig is None or "signer" not in meta:
        raise WireError("bad_signature", "unsigned message (no __sig__ tensor or signer)")
    if (
        sig.dtype != np.dtype("u1")
        or sig.shape != (SIG_BYTES,)
        or start + sig.end != len(buf)
        or any(o.end > sig.begin for n, o in entries.items() if n != SIG_TENSOR)
    ):
        raise WireError("bad_signature", f"{SIG_TENSOR} must be the last {SIG_BYTES} bytes (U8)")
    view = memoryview(buf)
    return view[:-SIG_BYTES], bytes(view[-SIG_BYTES:]), meta["signer"]


class Verifier:
    """Checks certificates against the PKI's CA and CRL, and signatures against certificates.

    Public keys are cached per identity; the CRL is read again whenever its file changes, so a
    revocation takes effect on the next message."""

    def __init__(self, pki: str | Path) -> None:
        self.pki = Path(pki)
        self.ca = x509.load_pem_x509_certificate((self.pki / CA_CERT).read_bytes())
        self._keys: dict[str, tuple[int, str, ed25519.Ed25519PublicKey]] = {}
        self._crl_stamp: tuple[int, int] | None = None
        self._revoked: frozenset[int] = frozenset()

    def _load_crl(self) -> None:
        path = self.pki / CRL
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self._revoked, self._crl_stamp = frozenset(), None
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._crl_stamp:
            return
        crl = x509.load_pem_x509_crl(path.read_bytes())
        if not crl.is_signature_valid(self.ca.public_key()):  # type: ignore[arg-type]
            raise ValueError(f"{path}: not signed by the CA of {self.pki}")
        self._revoked = frozenset(r.serial_number for r in crl)
        self._crl_stamp = stamp

    def admit(self, identity: str, role: str | None = None) -> ed25519.Ed25519PublicKey:
        """The public key of an enrolled, unrevoked ``identity`` (of ``role``, if given);
        ``WireError`` ``unknown_device`` or ``revoked`` otherwise."""
        self._load_crl()
        cached = self._keys.get(identity)
        if cached is None:
            cached = self._certificate_key(identity)
            self._keys[identity] = cached
        serial, enrolled_as, key = cached
        if role is not None and enrolled_as != role:
            raise WireError("unknown_device", f"{identity} is not enrolled as a {role}")
        if serial in self._revoked:
            raise WireError("revoked", f"{identity}'s certificate (serial {serial:x}) is revoked")
        return key

    def role_of(self, identity: str) -> str:
        """The role an enrolled, unrevoked ``identity`` has (``WireError`` as ``admit``)."""
        self.admit(identity)
        return self._keys[identity][1]

    def check_any(self, buf: bytes, roles: tuple[str, ...]) -> str:
        """The signer of ``buf`` when it is enrolled in one of ``roles``, unrevoked, and its
        signature verifies; ``WireError`` otherwise."""
        named = signed_part(buf)[2]
        kind = self.role_of(named)
        if kind not in roles:
            raise WireError(
                "bad_signature", f"signed by {named[:64]!r}, expected a {' or '.join(roles)}"
            )
        self.check(buf, named, kind)
        return named

    def _certificate_key(self, identity: str) -> tuple[int, str, ed25519.Ed25519PublicKey]:
        try:
            path = cert_path(self.pki, identity)
            cert = x509.load_pem_x509_certificate(path.read_bytes())
            cert.verify_directly_issued_by(self.ca)
        except (OSError, ValueError, TypeError, InvalidSignature) as e:
            raise WireError(
                "unknown_device", f"{identity[:64]!r} has no certificate from this CA ({e})"
            ) from None
        now = datetime.datetime.now(datetime.UTC)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise WireError("unknown_device", f"{identity}'s certificate is not valid now")
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        roles = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
        if [n.value for n in names] != [identity] or len(roles) != 1:
            raise WireError("unknown_device", f"{path} is not {identity}'s certificate")
        key = cert.public_key()
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise WireError("unknown_device", f"{identity}'s certificate key is not Ed25519")
        return cert.serial_number, str(roles[0].value), key

    def check(self, buf: bytes, signer: str, role: str | None = None) -> None:
        """Pass only if ``buf`` is signed by ``signer`` (enrolled as ``role``, not revoked)."""
        signed, signature, named = signed_part(buf)
        if named != signer:
            raise WireError("bad_signature", f"signed by {named[:64]!r}, expected {signer!r}")
        key = self.admit(signer, role)
        try:
            key.verify(signature, signed)
        except InvalidSignature:
            raise WireError(
                "bad_signature", f"signature does not verify with {signer}'s key"
            ) from None


@dataclass(frozen=True)
class Credentials:
    """What a role needs in secure mode: its own signer and a verifier of the others."""

    signer: Signer
    verifier: Verifier

    @classmethod
    def load(cls, pki: str | Path, identity: str) -> Credentials:
        return cls(Signer.load(pki, identity), Verifier(pki))
