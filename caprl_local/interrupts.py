"""Ctrl-C, SIGTERM and SIGHUP while the CLI captions: the run ends cleanly, what is done written."""

from __future__ import annotations

import signal
import threading
from typing import TYPE_CHECKING, Any, TypeVar

from .safefiles import STOP_SIGNALS

if TYPE_CHECKING:
    from .captioning import Captioning

C = TypeVar("C", bound="Captioning")


class GracefulInterrupt:
    """Ctrl-C, SIGTERM or SIGHUP while captioning: ask the captioner to stop at the next token, so
    the run ends cleanly with what is done written and the summary shown; a second signal stops
    at once. (A service manager's stop and a closed terminal deserve the same care as Ctrl-C.)

    (A KeyboardInterrupt raised by Python's default handler can land inside llama.cpp's log
    callback, where ctypes swallows it, and the Ctrl-C would be lost.)
    """

    def __init__(self) -> None:
        self.requested = False
        self.captioner: Captioning | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> GracefulInterrupt:
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self.previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self.previous.items():
            signal.signal(signum, previous)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested or self.captioner is None:
            self.requested = True
            raise KeyboardInterrupt
        self.requested = True
        self.captioner.cancel()

    def watch(self, captioner: C) -> C:
        self.captioner = captioner
        if self.requested:  # Ctrl-C came while the model was loading
            captioner.close()
            raise KeyboardInterrupt
        return captioner
