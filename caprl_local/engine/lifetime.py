"""The lives of caption engines: closed by a thread of their own when nobody holds them, stopped
at interpreter exit while every thread still runs, and disowned by a forked child.

A finalizer (``Captioner.__del__``) must neither wait nor take a lock: the garbage collector runs
it at any allocation, in a thread that may hold a scheduler's lock or be its very loop. So it only
hands the scheduler to the closer thread here.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
import time
import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .scheduler import Scheduler

log = logging.getLogger("caprl_local")

#: At interpreter exit, how long the loops together may take to stop (each after the step or
#: prompt piece it is in); beyond it their handles are left to the OS.
EXIT_WAIT_S = 60.0


class _Closer:
    """A thread closing schedulers handed over by finalizers, which must neither wait nor take a lock: the
    garbage collector runs them at any allocation, in a thread that may hold the scheduler's lock or be its loop."""

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue[Scheduler] = queue.SimpleQueue()  # put() is safe in a finalizer
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="caprl-closer", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            scheduler = self.queue.get()
            try:
                scheduler.close(timeout=0)  # the loop frees the session itself as it stops
            except Exception:  # noqa: BLE001 - one bad close must not stop the others
                log.exception("could not close a Captioner nobody held")
            del scheduler


_closer = _Closer()
_schedulers: weakref.WeakSet[Scheduler] = weakref.WeakSet()  # every one alive, for the exit hook


def close_later(scheduler: Scheduler) -> None:
    """Close `scheduler` soon, in the closer thread (for finalizers: takes no lock, never waits)."""
    _closer.queue.put(scheduler)


@atexit.register
def _stop_all_at_exit() -> None:
    """Stop every loop, bounded, while all threads still run (atexit runs before finalization, which
    freezes daemon threads wherever they are: from then on neither a join nor a free is safe)."""
    schedulers = [s for s in list(_schedulers) if not s.forked and not s.released]
    for scheduler in schedulers:
        scheduler.close(timeout=0)  # all stop at once
    deadline = time.monotonic() + EXIT_WAIT_S
    if not all([s.close(timeout=max(0.0, deadline - time.monotonic())) for s in schedulers]):
        log.warning("a caption engine did not stop within %.0f s at exit; its memory is left to the OS", EXIT_WAIT_S)


def _after_fork_in_child() -> None:
    """A forked child has only the forking thread: the parent's loops and closer are not here."""
    global _closer
    _closer = _Closer()
    _schedulers.clear()  # the parent's (each refuses work here: see check_process)


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)


def register(scheduler: Scheduler) -> None:
    """Track a new scheduler for the exit hook, and make sure the closer thread runs."""
    _closer.start()
    _schedulers.add(scheduler)
