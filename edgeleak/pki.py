"""Enrolment (``edgeleak pki``): a CA, Ed25519 certificates per identity, revocation, and the
mosquitto TLS + ACL settings of the secure broker. Layout of the folder: ``edge.sign``."""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge import sign
from edge.aggregator import group_run as aggregator_group_run
from edge.wire import WireError
from edgeleak.errors import UsageError

CA_DAYS = 3650
CERT_DAYS = 825
DEFAULT_HOSTS = ("127.0.0.1", "localhost", "::1")
REVOKED_LIST = "revoked.txt"  # ids revoked so far, one a line (the CRL holds their serials)
GROUPS = "groups"  # groups/<aggregator>: the group runs it serves, one a line (serve_group)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write_key(path: Path, key: ed25519.Ed25519PrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _load_ca(pki: Path) -> tuple[x509.Certificate, ed25519.Ed25519PrivateKey]:
    if not (pki / sign.CA_KEY).is_file():
        raise UsageError(f"{pki}: no CA there (ca.key); create one with `edgeleak pki init {pki}`")
    cert = x509.load_pem_x509_certificate((pki / sign.CA_CERT).read_bytes())
    key = serialization.load_pem_private_key((pki / sign.CA_KEY).read_bytes(), password=None)
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    return cert, key


def _usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip


def init(pki: Path, *, hosts: Iterable[str] = (), name: str = "edgeleak CA") -> Path:
    """Create a CA, an empty CRL and the broker's server certificate (valid for 127.0.0.1,
    localhost, ::1 and ``hosts``) in a new (or empty) folder ``pki``."""
    if pki.exists() and (not pki.is_dir() or any(pki.iterdir())):
        raise UsageError(f"{pki}: expected a new or empty folder for the CA")
    names = list(dict.fromkeys([*DEFAULT_HOSTS, *hosts]))
    (pki / sign.IDENTITIES).mkdir(parents=True, exist_ok=True)
    key = ed25519.Ed25519PrivateKey.generate()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    ca = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, None)
    )
    _write_key(pki / sign.CA_KEY, key)
    _write_cert(pki / sign.CA_CERT, ca)
    _write_crl(pki, ca, key, [])
    (pki / REVOKED_LIST).write_text("")
    _issue(pki, ca, key, sign.BROKER, "broker", server_names=names, folder=pki)
    return pki


def _issue(
    pki: Path,
    ca: x509.Certificate,
    ca_key: ed25519.Ed25519PrivateKey,
    identity: str,
    role: str,
    *,
    server_names: list[str] | None = None,
    folder: Path | None = None,
) -> Path:
    key = ed25519.Ed25519PrivateKey.generate()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            x509.NameAttribute(NameOID.COMMON_NAME, identity),
        ]
    )
    now = _now()
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server_names else ExtendedKeyUsageOID.CLIENT_AUTH
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if server_names:
        b = b.add_extension(x509.SubjectAlternativeName(_alt_names(server_names)), critical=False)
    cert = b.sign(ca_key, None)
    where = folder or pki / sign.IDENTITIES
    _write_key(where / f"{identity}.key", key)
    _write_cert(where / f"{identity}.crt", cert)
    return where / f"{identity}.crt"


def _alt_names(names: list[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for n in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            out.append(x509.DNSName(n))
    return out


def enroll(pki: Path, identity: str, role: str = "device") -> Path:
    """Issue ``identity`` (of ``role``) a key and certificate: ``identities/<id>.crt|key``."""
    try:
        sign.check_id(identity)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if role not in sign.ROLES:
        raise UsageError(f"--role {role!r}: expected one of {', '.join(sign.ROLES)}")
    if role == sign.COORDINATOR and identity != sign.COORDINATOR:
        raise UsageError(f"the coordinator's identity is {sign.COORDINATOR!r}, not {identity!r}")
    if identity in (sign.COORDINATOR, sign.BROKER) and role != identity:
        raise UsageError(f"{identity!r} is reserved for the {identity}")
    ca, key = _load_ca(pki)
    if identity in revoked_ids(pki):
        raise UsageError(f"{identity} was revoked in {pki}; enrol the device under a new id")
    if sign.cert_path(pki, identity).exists():
        raise UsageError(
            f"{identity} is already enrolled in {pki} (its key and certificate are in identities/)"
        )
    return _issue(pki, ca, key, identity, role)


def revoked_ids(pki: Path) -> list[str]:
    path = pki / REVOKED_LIST
    return path.read_text().split() if path.is_file() else []


def revoke(pki: Path, identity: str) -> Path:
    """Put ``identity``'s certificate on the CRL (``crl.pem``); a running broker reads the CRL
    when it starts: restart it."""
    ca, key = _load_ca(pki)
    path = sign.cert_path(pki, identity)
    if not path.is_file():
        raise UsageError(f"{identity} is not enrolled in {pki} (no {path})")
    serials = [x509.load_pem_x509_certificate(path.read_bytes()).serial_number]
    crl_path = pki / sign.CRL
    old = x509.load_pem_x509_crl(crl_path.read_bytes())
    serials += [r.serial_number for r in old]
    _write_crl(pki, ca, key, sorted(set(serials)))
    if identity not in revoked_ids(pki):
        with open(pki / REVOKED_LIST, "a") as f:
            f.write(identity + "\n")
    return crl_path


def _write_crl(
    pki: Path, ca: x509.Certificate, key: ed25519.Ed25519PrivateKey, serials: list[int]
) -> None:
    now = _now()
    b = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(now - datetime.timedelta(minutes=5))
        .next_update(now + datetime.timedelta(days=CA_DAYS))
    )
    for s in serials:
        b = b.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(s).revocation_date(now).build()
        )
    tmp = pki / (sign.CRL + ".tmp")
    tmp.write_bytes(b.sign(key, None).public_bytes(serialization.Encoding.PEM))
    tmp.replace(pki / sign.CRL)  # atomic: verifiers never read half a CRL


def serve_group(pki: Path, aggregator: str, group_run: str) -> Path:
    """Let the enrolled ``aggregator`` serve the group run ``group_run`` (``<run>.<group>``):
    the broker's ACL gives it that group's task and control topics to write and its update and
    status topics to read (``groups/<aggregator>``, one group run per line; restart the broker
    to apply)."""
    if role(pki, aggregator) != "aggregator":
        raise UsageError(
            f"{aggregator} is not enrolled in {pki} as an aggregator (--role aggregator)"
        )
    check_group_run(group_run)
    path = pki / GROUPS / aggregator
    path.parent.mkdir(exist_ok=True)
    have = path.read_text().split() if path.is_file() else []
    if group_run not in have:
        path.write_text("".join(f"{g}\n" for g in [*have, group_run]))
    return path


def check_group_run(group_run: str) -> None:
    """``UsageError`` unless ``group_run`` is ``RUN.GROUP`` as a group's devices use in --run."""
    run, dot, group = group_run.partition(".")
    try:
        if not dot:
            raise ValueError("expected RUN.GROUP, as the group's devices use in --run")
        aggregator_group_run(run, group)
    except ValueError as e:
        raise UsageError(f"--group {group_run!r}: {e}") from None


def role(pki: Path, identity: str) -> str | None:
    """The role of an enrolled, unrevoked identity in ``pki``; None for any other."""
    try:
        return sign.Verifier(pki).role_of(identity)
    except (WireError, OSError):
        return None


def ensure_fleet(
    pki: Path,
    devices: Iterable[str],
    *,
    keyholder: str | None = None,
    groups: Mapping[str, str] | None = None,
) -> None:
    """A CA in ``pki`` (created if absent) with the coordinator and every device enrolled; a
    ``keyholder`` identity; aggregators (``groups``: aggregator id → the group run it serves)."""
    if not (pki / sign.CA_KEY).is_file():
        init(pki)
    need = [(sign.COORDINATOR, sign.COORDINATOR), *((d, "device") for d in devices)]
    need += [(keyholder, "keyholder")] if keyholder else []
    need += [(a, "aggregator") for a in groups or {}]
    for identity, kind in need:
        if not sign.cert_path(pki, identity).is_file():
            enroll(pki, identity, kind)
    for agg, group_run in (groups or {}).items():
        serve_group(pki, agg, group_run)


# -- the broker ---------------------------------------------------------------------------------

ACL = f"""\
# edgeleak secure broker: the identity (%u) is the client certificate's CN
# (use_identity_as_username), never the client id a client picks.
pattern write edgeleak/+/update/%u
pattern write edgeleak/+/status/%u
pattern read edgeleak/+/status/%u
pattern read edgeleak/+/task/%u
pattern read edgeleak/+/control
pattern write edgeleak/+/secagg/+/%u
pattern read edgeleak/+/secagg-to/%u/+
pattern read edgeleak/+/he/public

user {sign.COORDINATOR}
topic readwrite edgeleak/#
"""
KEYHOLDER_ACL = """
user {id}
topic read edgeleak/+/he/aggregate
topic write edgeleak/+/he/public
topic write edgeleak/+/he/result
"""
GROUP_ACL = """\
topic write edgeleak/{g}/task/+
topic write edgeleak/{g}/control
topic read edgeleak/{g}/update/+
topic read edgeleak/{g}/status/+
"""


def acl_text(pki: Path | None = None) -> str:
    """mosquitto's acl_file. Devices write only their own update and status topics and read
    their own task and status topics, the control topics and the HE public key, and their own
    secure-aggregation topics (``secagg/<phase>/<id>`` out, ``secagg-to/<id>/<phase>`` in); only
    the coordinator reads updates and writes tasks and control. From ``pki``: every enrolled
    key holder may publish HE keys and results and read aggregates; every aggregator may task,
    and read, the devices of the group runs it serves (``serve_group``), nothing more."""
    text = ACL
    if pki is None:
        return text
    for crt in sorted((pki / sign.IDENTITIES).glob("*.crt")):
        identity, kind = crt.stem, role(pki, crt.stem)
        if kind == "keyholder":
            text += KEYHOLDER_ACL.format(id=identity)
        elif kind == "aggregator":
            path = pki / GROUPS / identity
            served = path.read_text().split() if path.is_file() else []
            text += f"\nuser {identity}\n" + "".join(GROUP_ACL.format(g=g) for g in served)
    return text


def mosquitto_tls(pki: Path, acl_file: Path) -> str:
    """The listener's TLS, authentication and ACL lines (mosquitto 2.0)."""
    for need in (sign.CA_CERT, f"{sign.BROKER}.crt", f"{sign.BROKER}.key", sign.CRL):
        if not (pki / need).is_file():
            raise UsageError(f"--pki {pki}: no {need} there; create it with `edgeleak pki init`")
    p = pki.absolute()
    return (
        f"cafile {p / sign.CA_CERT}\n"
        f"certfile {p / sign.BROKER}.crt\n"
        f"keyfile {p / sign.BROKER}.key\n"
        f"crlfile {p / sign.CRL}\n"
        "require_certificate true\n"
        "use_identity_as_username true\n"
        "allow_anonymous false\n"
        f"acl_file {acl_file.absolute()}"
    )
