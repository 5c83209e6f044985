"""Errors the front door reports as one line and exit code 2 (never a traceback)."""

from __future__ import annotations


class UsageError(Exception):
    """Bad input from the user (a flag, a file, an unreachable broker): what was expected and how
    to fix it. ``edgeleak.cli.main`` prints it as ``edgeleak <command>: <message>`` and exits 2."""
