"""Command-line parsing that answers bad input in one line with exit code 2."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from edge.mqtt import BrokerAddress
    from edge.sign import Credentials


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors (unknown flag, bad ``type=``, value outside ``choices``)
    are one line, ``<prog>: <message> (see <prog> --help)``, and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def csv_choices(values: str, allowed: tuple[str, ...] | list[str], what: str) -> list[str]:
    """The comma-separated ``values``, each one of ``allowed``; the error lists them."""
    names = [v.strip() for v in values.split(",") if v.strip()]
    bad = [v for v in names if v not in allowed]
    if bad:
        raise ValueError(f"unknown {what} {', '.join(bad)}; expected one of {', '.join(allowed)}")
    return names


def secure_broker(
    url: str, pki: str | None, identity: str
) -> tuple[BrokerAddress, Credentials | None]:
    """``--broker URL [--pki DIR]``: the broker address and, with a PKI folder (secure mode),
    ``identity``'s credentials from it; ``ValueError``/``OSError`` saying what is wrong."""
    from edge.mqtt import parse_broker_url, with_pki

    broker = with_pki(parse_broker_url(url), pki)
    if pki is None:
        return broker, None
    from edge.sign import Credentials

    return broker, Credentials.load(pki, identity)
