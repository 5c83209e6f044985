"""Decoy updates: a device's real update hidden among K decoys under keyed pseudonyms.

With ``decoys = K`` in a task, the device publishes K + 1 updates, one per slot 0..K, each on
``edgeleak/<run>/update/<pseudonym>`` with the pseudonym also in the ``device`` field. A slot's
pseudonym is ``HMAC-SHA256(key, "pseudonym|<run>|<round>|<slot>")`` (first 32 hex digits); the
real update sits in slot ``HMAC-SHA256(key, "slot|<run>|<round>") mod (K + 1)``, the others carry
decoys: the same training (same weights, hyper-parameters, example count and codec) run on public
examples of the same domain. Without the device's 32-byte key the pseudonyms look random and the
real slot is unpredictable; the coordinator, which holds every device's key (given at enrolment;
here a key file per device), recomputes the table and keeps only the real update.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

KEY_BYTES = 32
PSEUDONYM_HEX = 32


def new_key() -> bytes:
    """A fresh device key from the operating system's CSPRNG."""
    return secrets.token_bytes(KEY_BYTES)


def save_key(path: str | Path, key: bytes) -> None:
    """Write a key as hex, readable by its owner only."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(key.hex() + "\n")
    p.chmod(0o600)


def load_key(path: str | Path) -> bytes:
    """Read a hex key file; ``ValueError`` naming the expected format otherwise."""
    text = Path(path).read_text().strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"{path}: expected {2 * KEY_BYTES} hex digits (a device key)") from None
    if len(key) != KEY_BYTES:
        raise ValueError(f"{path}: {len(key)} bytes; a device key has {KEY_BYTES}")
    return key


def _mac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def pseudonym(key: bytes, run: str, round_: int, slot: int) -> str:
    """The topic segment and ``device`` field of slot ``slot`` in round ``round_``."""
    return _mac(key, f"pseudonym|{run}|{round_}|{slot}").hex()[:PSEUDONYM_HEX]


def real_slot(key: bytes, run: str, round_: int, decoys: int) -> int:
    """Which of the ``decoys + 1`` slots carries the real update."""
    return int.from_bytes(_mac(key, f"slot|{run}|{round_}"), "big") % (decoys + 1)
