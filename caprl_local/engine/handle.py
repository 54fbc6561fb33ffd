"""A caption in flight: the handle :meth:`Captioner.submit` returns, the generator ``stream`` makes of one, and
how a request's end becomes a result (caption_many's tagged sinks, outcomes and failures)."""

from __future__ import annotations

import concurrent.futures
import queue
from collections.abc import Callable, Generator, Iterator

from ..errors import Cancelled, CaprlError
from ..results import Caption, CaptionFailure
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


def finished(handle: CaptionHandle, on_text: Callable[[str], None] | None) -> Caption:
    """The handle's caption, its text passed to `on_text` as it comes (in this thread)."""
    try:
        if on_text is not None:
            for piece in text_of(handle._request):
                on_text(piece)
        return handle.result()
    except BaseException:  # Ctrl-C or on_text failing: the caption is not wanted any more
        handle.cancel()
        raise


class Tagged:
    """A request's text sink in caption_many: its pieces (if wanted) and its end, tagged with its
    index, into the one queue the caller waits on."""

    def __init__(self, events: queue.SimpleQueue[tuple[int, str | None]], index: int, *, text: bool) -> None:
        self.events, self.index, self.text = events, index, text

    def put(self, piece: str | None, /) -> None:
        if piece is None or self.text:
            self.events.put((self.index, piece))


def outcome(request: Request) -> Caption | CaptionFailure:
    try:
        return request.future.result()
    except Cancelled:
        raise
    except CaprlError as exc:
        return failure(request.name, exc)


def failure(name: str, exc: BaseException) -> CaptionFailure:
    message = str(exc) if isinstance(exc, CaprlError) else f"{name}: cannot read the image ({type(exc).__name__}: {exc})"
    kind = type(exc).__name__ if isinstance(exc, CaprlError) else "ImageError"
    return CaptionFailure(image=name, error=message, kind=kind)
