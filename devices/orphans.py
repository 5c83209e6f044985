"""Child processes that die with their parent, even when the parent is killed with SIGKILL.

On Linux the kernel sends the child a signal when its parent dies (``prctl(PR_SET_PDEATHSIG)``,
tied to the parent *thread* that started the child: keep that thread alive as long as the
child). Elsewhere, and as a back-up, a thread in the child watches its parent pid.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>
PARENT_POLL_S = 1.0


def parent_death_hook() -> Callable[[], None] | None:
    """A function that asks the kernel to SIGKILL the calling process when its parent dies;
    ``None`` where unsupported. Resolved here, so that as a ``Popen(preexec_fn=...)`` the child
    only makes the system call (no import, no lock)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    sig = int(signal.SIGKILL)

    def hook() -> None:
        prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)

    return hook


def die_with_parent(parent_pid: int) -> None:
    """End this process as soon as ``parent_pid`` is no longer its parent."""
    hook = parent_death_hook()
    if hook is not None:
        hook()
    if os.getppid() != parent_pid:  # the parent died before we got here
        os._exit(1)

    def watch() -> None:
        stop = threading.Event()
        while os.getppid() == parent_pid:
            stop.wait(PARENT_POLL_S)
        log.warning("parent %d is gone: exiting", parent_pid)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
