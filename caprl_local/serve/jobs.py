"""One request's caption, from its image's bytes to its end, without a thread waiting on it.

The image is decoded and the caption submitted in a worker thread (the decode is slow); a video's frames
are read before that in a daemon thread of their own (longer still: a stopping server does not wait for
it), at most as many at once as the engine takes images, those whose request has gone included. From then
on the decode loop hands the text to the job, its sink, which passes each piece to the event loop
with ``call_soon_threadsafe``. A waiting request is an awaited event, never a parked thread.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from ..chat import ChatMessage, ChatVideo
from ..errors import Cancelled, CaprlError, EngineError, ImageError, PromptTooLongError
from ..options import GenerationOptions
from ..prompts import VIDEO_PROMPT
from ..results import Caption
from .admission import Place, stopping
from .chat import Turn, chat_turns, has_videos
from .protocol import ApiError
from .videos import Clip, prepare_clip

if TYPE_CHECKING:
    from ..engine import Captioner, CaptionHandle

T = TypeVar("T")
_NAME = re.compile(r"^<[^<>]*>: ")  # an input's name as messages give it: "<35137 bytes>: "


class Job:
    """The caption of one request; its room at the engine is given back when the engine is done."""

    def __init__(self, captioner: Captioner, turns: tuple[Turn[Clip], ...], generation: GenerationOptions,
                 place: Place, *, text: bool, gate: threading.Semaphore | None = None) -> None:
        self.captioner, self.turns, self.place = captioner, turns, place
        # A conversation of a video and no text is a video's caption: CapRL-Video's prompt, not the image one.
        self.generation = generation.resolved(VIDEO_PROMPT) if has_videos(turns) else generation
        self.gate = gate or threading.Semaphore(1)  # video reads at once: the server's gate, shared by its jobs
        self._ready: tuple[ChatMessage, ...] | None = None  # the conversation, its videos read
        self.text = text  # the pieces are wanted (a stream), not only the end
        self.loop = asyncio.get_running_loop()
        self.handle: CaptionHandle | None = None
        self.failure: BaseException | None = None
        self.ended = False
        self._pieces: deque[str] = deque()
        self._news = asyncio.Event()
        self._lock = threading.Lock()  # between the worker thread that submits and close()
        self._closed = False

    # -- the sink: called on the decode loop's thread (and on the submitting one), must not block --

    def put(self, piece: str | None, /) -> None:
        if piece is None or self.text:
            try:
                self.loop.call_soon_threadsafe(self._arrive, piece)
            except RuntimeError:  # the event loop is closed: the server has stopped, nobody waits
                pass

    def _arrive(self, piece: str | None) -> None:
        if piece is None:
            self.ended = True
            self.place.leave_engine()
        elif not self.ended:
            self._pieces.append(piece)
        self._news.set()

    # -- on the event loop --

    async def start(self, limiter: anyio.CapacityLimiter) -> None:
        """Read the videos, decode the images and submit the caption (the request holds its turn at the engine)."""
        try:
            if has_videos(self.turns):
                await in_daemon_thread(self._read_videos, name="caprl-video-read")
                if self._ready is None and self.failure is None:  # closed before its videos were read
                    self.failure = Cancelled.of("the conversation")
            if self.failure is None:
                await anyio.to_thread.run_sync(self._submit, limiter=limiter)  # waits out the thread even if cancelled
        finally:
            if self.handle is None:  # it never reached the engine: no end will come to give the room back
                self.place.leave_engine()
        if self.failure is not None:
            raise caption_error(self.failure)

    def _read_videos(self) -> None:
        """In a daemon thread: each video's frames, once the gate lets this read begin (unless the request
        has gone by then); the clips are this thread's from here, closed by it."""
        with self._lock:
            turns, self.turns = self.turns, ()
        try:
            with self.gate:
                if self._closed:
                    return
                self._ready = chat_turns(turns, lambda clip: prepare_clip(self.captioner, clip, self.generation,
                                                                          cancelled=lambda: self._closed))
        except (CaprlError, ApiError) as exc:
            self.failure = exc
        finally:
            _close_clips(turns)

    def _submit(self) -> None:
        """In a worker thread: the images are read here (the slow part), then the caption joins the loop."""
        messages = self._ready if self._ready is not None else chat_turns(self.turns, _unread)
        self._ready, self.turns = None, ()  # decoded now (or refused): the bytes are not needed any more
        try:
            handle = self.captioner.submit_chat(messages, sink=self, generation=self.generation)
        except CaprlError as exc:
            self.failure = exc
            return
        with self._lock:
            self.handle, closed = handle, self._closed
        if closed:  # the client went away while its image was decoded
            handle.cancel()

    async def _news_or_end(self) -> None:
        while not (self._pieces or self.ended):
            self._news.clear()
            await self._news.wait()

    async def first(self) -> None:
        """Wait for the first piece of text or the end, whichever comes first (nothing is taken)."""
        await self._news_or_end()
        if not self._pieces:
            self.result()  # ended before any text: raise what stopped it, now, as the answer's status

    async def next_piece(self) -> str | None:
        """The next piece of text, None at the end."""
        await self._news_or_end()
        return self._pieces.popleft() if self._pieces else None

    async def end(self) -> Caption:
        while not self.ended:
            self._news.clear()
            await self._news.wait()
        return self.result()

    def result(self) -> Caption:
        """The finished caption (the job has ended); its failure as an ApiError."""
        assert self.handle is not None
        try:
            return self.handle.result()
        except CaprlError as exc:
            raise caption_error(exc) from exc

    def close(self) -> None:
        """The answer is done with (sent, or its client gone): stop the caption if it still runs, close the
        videos no reading thread has taken. Thread-safe."""
        with self._lock:
            self._closed, handle = True, self.handle
            turns = self.turns if has_videos(self.turns) else ()  # an image conversation is the submitting thread's
            if turns:
                self.turns = ()
        _close_clips(turns)
        if handle is not None and not self.ended:
            handle.cancel()


def _close_clips(turns: tuple[Turn[Clip], ...]) -> None:
    for turn in turns:
        for part in turn.content:
            if isinstance(part, Clip):
                part.close()


def _unread(clip: Clip) -> ChatVideo:
    raise AssertionError("a conversation's videos are read before it is submitted")


def caption_error(exc: BaseException) -> ApiError:
    """The answer to a caption that failed: a message for the client, without the engine's name for its image."""
    if isinstance(exc, ApiError):
        return exc
    message = _NAME.sub("", str(exc))
    if isinstance(exc, ImageError):
        return ApiError(400, f"the image: {message}", code="invalid_image")
    if isinstance(exc, Cancelled):
        return stopping()
    if isinstance(exc, PromptTooLongError):
        return ApiError(400, f"the conversation needs {exc.needed} tokens but this server's context holds "
                        f"{exc.context}; send a shorter text or fewer images", code="context_length_exceeded")
    if isinstance(exc, EngineError) and "closed" in message:
        return ApiError(503, "the server is stopping", kind="server_error", code="unavailable")
    return ApiError(500, f"the caption failed: {message}", kind="server_error", code="caption_failed")

async def in_daemon_thread(work: Callable[[], T], *, name: str = "caprl-image-read") -> T:
    """`work()` in a thread of its own that never holds the process up: a read that waits out its deadline
    (a dripping origin, a slow disk) must not keep a stopped server from exiting at once. A request that
    stops waiting (its client gone, the server stopping) leaves the thread to end by its own deadline."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(value: Any, error: BaseException | None) -> None:
        if not done.done():
            done.set_exception(error) if error is not None else done.set_result(value)

    def run() -> None:
        try:
            value, error = work(), None
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting request
            value, error = None, exc
        try:
            loop.call_soon_threadsafe(settle, value, error)
        except RuntimeError:  # the event loop is closed: the server has stopped, nobody waits
            pass

    threading.Thread(target=run, name=name, daemon=True).start()
    return await done
