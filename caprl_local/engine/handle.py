"""A caption in flight: the handle :meth:`Captioner.submit` returns, and the generator ``stream`` makes of one."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Generator, Iterator

from ..results import Caption
from .scheduler import Request, Scheduler, text_of


class CaptionHandle:
    """A caption submitted with :meth:`Captioner.submit`, generating or waiting its turn.

    Iterate over it for the text as it is generated; ``result()`` waits for the Caption.
    """

    def __init__(self, request: Request, scheduler: Scheduler) -> None:
        self._request, self._scheduler = request, scheduler

    @property
    def image(self) -> str:
        """The input, as named in messages."""
        return self._request.name

    def result(self, timeout: float | None = None) -> Caption:
        """The finished caption. Raises what stopped it (Cancelled, EngineError), or
        TimeoutError if it is not done within `timeout` seconds."""
        self._here()
        try:
            return self._request.future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"{self.image}: not captioned within {timeout} s") from None

    def done(self) -> bool:
        return self._request.future.done()

    def cancel(self) -> None:
        """Stop this caption only; its slot goes to the next request at the next step."""
        self._scheduler.cancel(self._request)

    def __iter__(self) -> Iterator[str]:
        """Pieces of text as they are generated; raises at the end if the caption failed."""
        self._here()
        yield from text_of(self._request)
        self.result()

    def _here(self) -> None:
        """In a forked child, a caption the parent had not finished never will be: say so, not wait."""
        if self._scheduler.forked and not self._request.future.done():
            self._scheduler.check_process()


def cancel_on_close(handle: CaptionHandle) -> Generator[str, None, None]:
    """The handle's text; a caller that stops reading early no longer wants the caption."""
    try:
        yield from handle
    finally:
        if not handle.done():
            handle.cancel()
