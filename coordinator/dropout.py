"""Who dropped out of a round, and why: one reason per selected device without an accepted update.

Reasons (the ``dropouts`` table of the run store):

- ``straggler``: its update arrived, but after the deadline in virtual time (a clock's verdict);
- ``rejected``: it sent something on its update topic, and nothing of it was accepted;
- ``offline``: it went offline during the round (its status, or its last will when the broker
  lost the connection: a killed process, a cut link once the keepalive runs out);
- ``not_sent``: the round ended before its task was sent (pace steering, ``max_concurrent``);
- ``no_answer``: nothing came from it before the round's deadline.
"""

from __future__ import annotations

from collections.abc import Collection

REASONS = ("straggler", "rejected", "offline", "not_sent", "no_answer")


def dropouts(
    selected: Collection[str],
    accepted: Collection[str],
    *,
    heard: Collection[str],
    lost: Collection[str],
    late: Collection[str],
    untasked: Collection[str] = (),
) -> list[tuple[str, str]]:
    """(device, reason) for every selected device without an accepted update, sorted by device;
    ``heard``: selected devices that sent an update, ``lost``: went offline, ``late``: updates
    dropped as stragglers, ``untasked``: never sent their task."""
    out: list[tuple[str, str]] = []
    for device in sorted(set(selected) - set(accepted)):
        if device in late:
            reason = "straggler"
        elif device in heard:
            reason = "rejected"
        elif device in lost:
            reason = "offline"
        elif device in untasked:
            reason = "not_sent"
        else:
            reason = "no_answer"
        out.append((device, reason))
    return out
