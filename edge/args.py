"""Command-line parsing that answers bad input in one line with exit code 2."""

from __future__ import annotations

import argparse
from typing import NoReturn


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
