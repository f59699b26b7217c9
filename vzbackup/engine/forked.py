"""A forked helper process for work that one interpreter's lock would serialize (the
restore's second half, the unchanged backup's stat-ahead)."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

from vzbackup.syscalls import die_with_parent

CHILD_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}  # the default action in a child


def fork_child(work: Callable[[], None]) -> int:
    """Fork a child that runs *work* and exits, with 0 or, if *work* raised, 1; returns
    its pid. The child exits without Python's cleanup and never runs the parent's signal
    handlers (the parent owns every resource), and it dies with the parent. Only the
    calling thread goes on in the child: *work* must take no lock another thread of the
    parent could hold."""
    parent = os.getpid()
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, CHILD_SIGNALS)
    try:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                die_with_parent(parent)
                for sig in CHILD_SIGNALS:
                    signal.signal(sig, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
                work()
                code = 0
            finally:
                os._exit(code)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    return pid
