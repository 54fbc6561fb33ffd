"""The one token loop: every caption, from any thread, is a request decoded here.

A scheduler owns the sequences of one Session and runs in a thread of its own. Each turn of
its loop admits waiting requests into free sequences (the image encoded and the prompt
evaluated), then advances every active caption by one token in a single decode step (the
weights are read once for all of them), streams each request's new text to it, and frees the
sequences of captions that ended. Requests that arrive while others generate join at the next
turn (continuous batching); beyond the free sequences they wait in order.

Lifetime: closing cancels everything, and the loop frees the session as it leaves (after its
step or prompt piece), so nothing frees handles a decode is in. At interpreter exit a hook stops
every loop while all threads still run; a forked child's copies refuse work (no loop there).
"""

from __future__ import annotations

import codecs
import logging
import os
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

from PIL import Image

from ..chat import ChatMessage, caption_conversation
from ..errors import Cancelled, CaprlError, EngineError
from ..loopguard import LoopGuard
from ..options import GenerationOptions
from ..results import Caption, Timings, VideoStats
from . import lifetime
from .backend import LLAMA_LOG
from .session import Sampler, Session

log = logging.getLogger("caprl_local")

_END = None  # closes a request's stream of text pieces

_CLOSED = "this Captioner is closed; create a new one"


@dataclass(eq=False)
class Request:
    """One caption asked for: a prepared image or conversation, its options, and where its text and result go."""

    image: Image.Image | None  # None for a conversation
    name: str  # the input, as named in messages
    options: GenerationOptions  # prompt already resolved
    load_s: float = 0.0  # seconds spent reading and resizing the image, before submission
    epoch: int = 0  # the scheduler's cancel epoch when the caller started: a later cancel() covers it
    future: Future[Caption] = field(default_factory=Future)
    sink: TextSink = field(default_factory=lambda: queue.SimpleQueue[str | None]())  # the text as generated, then _END
    cancelled: bool = False
    messages: tuple[ChatMessage, ...] | None = None  # a conversation to answer (its images prepared), else a caption
    video: VideoStats | None = None  # a video's caption: what of the clip its conversation holds

    def conversation(self) -> tuple[ChatMessage, ...]:
        """What the model is prompted with: the conversation, or a caption's one user turn."""
        if self.messages is None:
            assert self.image is not None  # a caption has one
            return caption_conversation(self.image, self.options.prompt or "")
        return self.messages

    def finish(self, outcome: Caption | BaseException) -> None:
        if self.future.done():
            return
        if isinstance(outcome, BaseException):  # first the outcome: whoever sees the end may ask for it at once
            self.future.set_exception(outcome)
        else:
            self.future.set_result(outcome)
        self.sink.put(_END)


class TextSink(Protocol):
    """Where a request's text goes as it is generated: each piece, then None at its end (called on the
    scheduler's thread: it must not block)."""

    def put(self, item: str | None, /) -> None: ...


class _Slot:
    """A request being generated in one sequence: its sampler, position and text so far."""

    def __init__(self, request: Request, seq: int, sampler: Sampler, n_past: int, t_start: float) -> None:
        self.request, self.seq, self.sampler, self.n_past, self.t_start = request, seq, sampler, n_past, t_start
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text: list[str] = []
        self.held = ""  # held back: whitespace until text follows it, and what may begin a stop string
        self.stopped = False  # a stop string came: the caption ends before it
        self.guard = LoopGuard()  # the tokens taken, and the text each one added, for the loop guard
        self.chunks: list[str] = []
        self.loop_keep: int | None = None  # tokens to keep when the caption ended in a loop
        self.pending = 0  # the token sampled but not yet taken into the caption
        self.n_gen = 0
        self.finish_reason = "length"
        self.image_tokens = self.prompt_tokens = 0
        self.encode_s = 0.0
        self.t_prompt = t_start

    def emit(self, piece: str, *, final: bool = False) -> None:
        """Pass on new text, trimmed as the finished caption is, so the pieces add up to it."""
        text = self.held + piece
        if not self.text:
            text = text.lstrip()  # a caption starts at its first visible character
        stops = self.request.options.stop
        found = [i for i in (text.find(s) for s in stops) if i >= 0]
        if found:
            text, self.stopped = text[:min(found)], True
        body = text.rstrip()
        if stops and not (self.stopped or final):  # what could begin a stop string waits for the next piece
            body = body[:len(body) - _stop_prefix(body, stops)]
        self.held = text[len(body):]
        if body:
            self.text.append(body)
            self.request.sink.put(body)

    def looped(self, token: int) -> bool:
        """Take `token` into the guard's view; True when the caption has fallen into a loop."""
        self.loop_keep = self.guard.take(token)  # then: everything before the repeats, and one round of the cycle
        return self.loop_keep is not None

    def caption(self) -> Caption:
        if not self.stopped:
            self.emit(self.decoder.decode(b"", final=True), final=True)  # trailing whitespace stays out
        t_end = time.perf_counter()
        prompt_s = self.t_prompt - self.t_start - self.encode_s
        gen_s = t_end - self.t_prompt
        # A loop is cut back to its first round (its repeats were streamed already: the text was out first).
        text = "".join(self.chunks[:self.loop_keep]).strip() if self.loop_keep is not None else "".join(self.text)
        return Caption(
            text=text, image=self.request.name, image_tokens=self.image_tokens, prompt_tokens=self.prompt_tokens,
            generated_tokens=self.n_gen, finish_reason=self.finish_reason,  # type: ignore[arg-type]
            video=self.request.video,
            timings=Timings(
                image_load_s=self.request.load_s, image_encode_s=self.encode_s, prompt_eval_s=prompt_s,
                generation_s=gen_s, total_s=t_end - self.t_start + self.request.load_s,
                prompt_tokens_per_s=self.prompt_tokens / prompt_s if prompt_s > 0 else 0.0,
                generation_tokens_per_s=self.n_gen / gen_s if gen_s > 0 else 0.0,
            ),
        )


class Scheduler:
    """Runs the token loop over one Session; see the module docstring. Thread-safe."""

    def __init__(self, session: Session, *, verbose: bool = False) -> None:
        self.session = session
        self._verbose = verbose
        self._cond = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._admitting: list[Request] = []  # taken from _waiting, their prompts not yet evaluated
        self._active: list[_Slot] = []
        self._free = list(range(session.slots - 1, -1, -1))
        self._thread: threading.Thread | None = None
        self.closed: str | None = None  # why no more requests are taken
        self._released = False  # the session is freed
        self.pid = os.getpid()  # the process it belongs to: after a fork, a child has no loop thread
        self.epoch = 0
        self.generated = 0  # tokens generated since the start, for progress displays
        lifetime.register(self)

    @property
    def released(self) -> bool:
        """The session's handles are freed."""
        return self._released

    @property
    def forked(self) -> bool:
        """This is a process forked after the scheduler was made: its loop thread is not here."""
        return os.getpid() != self.pid

    def check_process(self) -> None:
        """Raise EngineError in a process forked after this scheduler was made: its loop is not there."""
        if self.forked:
            raise EngineError(f"this Captioner was created in another process (pid {self.pid}); "
                              "create a new one in this process")

    # -- from any thread ------------------------------------------------------------------

    def submit(self, request: Request) -> None:
        self.check_process()  # before the lock: a fork may have copied it held
        with self._cond:
            if self.closed:
                raise EngineError(self.closed)
            if request.epoch != self.epoch:  # cancel() came between the caller's start and now
                request.finish(Cancelled.of(request.name))
                return
            self._waiting.append(request)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="caprl-scheduler", daemon=True)
                self._thread.start()
            self._cond.notify()

    def cancel(self, request: Request) -> None:
        """Cancel one request: at once if it still waits, else at the next step."""
        if self.forked:
            return
        with self._cond:
            request.cancelled = True
            if request in self._waiting:
                self._waiting.remove(request)
                request.finish(Cancelled.of(request.name))
            self._cond.notify()

    def cancel_all(self) -> None:
        """Cancel every request submitted so far (and those whose callers started before now)."""
        if self.forked:
            return
        with self._cond:
            self.epoch += 1
            for request in [*self._waiting, *self._admitting, *(slot.request for slot in self._active)]:
                request.cancelled = True
            while self._waiting:
                request = self._waiting.popleft()
                request.finish(Cancelled.of(request.name))
            self._cond.notify()

    def close(self, timeout: float | None = None) -> bool:
        """Cancel everything; the loop stops and frees the session (here if it never ran). Waits up to
        `timeout` s (None: until freed) from any number of threads, but never in the loop's own thread
        nor at interpreter exit (a daemon thread may be frozen there). True once freed."""
        if self.forked:
            return False
        with self._cond:
            self.closed = self.closed or _CLOSED
            self.cancel_all()
            thread = self._thread
            if thread is None:  # never started: no loop can be in the handles, and none starts now
                self._release()
                return True
        if thread is not threading.current_thread() and not sys.is_finalizing():
            thread.join(timeout)
        return self._released

    def activity(self) -> tuple[int, int, int, int]:
        """(captions in flight, of them those still having their prompt and image evaluated, captions waiting,
        tokens generated so far): a snapshot, each caption counted once."""
        self.check_process()
        with self._cond:
            started = {id(slot.request) for slot in self._active}
            encoding = sum(1 for r in self._admitting if id(r) not in started and not r.future.done())
            return len(started) + encoding, encoding, len(self._waiting), self.generated

    # -- the loop, in its own thread --------------------------------------------------------

    def _run(self) -> None:
        LLAMA_LOG.attach(verbose=self._verbose)
        try:
            while True:
                with self._cond:
                    while not (self.closed or self._waiting or self._active):
                        self._cond.wait()
                    if self.closed and not self._active:
                        return
                    n = min(len(self._free), len(self._waiting))
                    self._admitting = [self._waiting.popleft() for _ in range(n)]
                for request in self._admitting:  # outside the lock: an encode is slow, others may submit meanwhile
                    self._admit(request)
                self._admitting = []
                self._step()
        except Exception as exc:  # noqa: BLE001 - a bug here must not leave callers waiting forever
            log.exception("the caption scheduler stopped")
            failure = EngineError(f"the caption engine stopped ({type(exc).__name__}: {exc}); create a new Captioner")
            with self._cond:
                self.closed = str(failure)
                for request in [*self._waiting, *self._admitting, *(slot.request for slot in self._active)]:
                    request.finish(failure)
                self._waiting.clear()
        finally:
            self._stop()

    def _stop(self) -> None:
        """The loop's last act: end what it still holds, then free the session (no decode runs now)."""
        with self._cond:
            self.closed = self.closed or _CLOSED
            for slot in self._active:
                self.session.release(slot.sampler)
            for request in [*self._admitting, *self._waiting, *(slot.request for slot in self._active)]:
                request.finish(Cancelled.of(request.name))
            self._active, self._admitting = [], []
            self._waiting.clear()
            self._release()

    def _release(self) -> None:
        """Free the session's handles, once (with the lock held, so that another closer waits for it)."""
        if self._released:
            return
        self._released = True
        try:
            self.session.close()
        except Exception:  # noqa: BLE001 - at interpreter exit llama_cpp may be half gone; the OS frees the rest
            log.debug("could not free the llama.cpp handles", exc_info=True)

    def _admit(self, request: Request) -> None:
        """Evaluate the request's prompt into a free sequence and sample its first token."""
        if request.cancelled:
            request.finish(Cancelled.of(request.name))
            return
        seq = self._free.pop()
        t_start = time.perf_counter()
        LLAMA_LOG.clear()
        try:
            prompted = self.session.prompt_chat(seq, request.conversation(), request.name,
                                                cancelled=lambda: request.cancelled)
            sampler = self.session.sampler(request.options, prompted.text_tokens)  # the penalty sees the prompt
            slot = _Slot(request, seq, sampler, prompted.n_past, t_start)
            slot.image_tokens, slot.prompt_tokens, slot.encode_s = \
                prompted.image_tokens, prompted.prompt_tokens, prompted.encode_s
            (slot.pending,) = self._sample([slot])
            slot.sampler = self.session.on_device(seq, sampler)  # where the device samples, from the next step
            slot.t_prompt = time.perf_counter()
        except Exception as exc:  # noqa: BLE001 - any failure here is this image's alone
            self.session.forget(seq)
            self._free.append(seq)
            request.finish(_engine_error(request.name, exc))
            return
        self._active.append(slot)

    def _step(self) -> None:
        """Take every active caption's pending token, then decode the next one for all still going."""
        going: list[_Slot] = []
        for slot in list(self._active):
            if slot.request.cancelled:
                self._end(slot, Cancelled.of(slot.request.name))
            elif self._take(slot):
                self._end(slot, slot.caption())
            else:
                going.append(slot)
        if not going:
            return
        LLAMA_LOG.clear()
        try:
            self.session.decode([(slot.pending, slot.n_past, slot.seq) for slot in going])
        except EngineError as exc:
            for slot in going:
                self._end(slot, EngineError(f"{slot.request.name}: {exc}"))
            return
        for slot, token in zip(going, self._sample(going), strict=True):
            slot.n_past += 1
            slot.pending = token

    def _sample(self, slots: list[_Slot]) -> list[int]:
        """The next token of each slot, in one pass over the last evaluation's rows (one per slot, in order;
        a method, so that a test can watch each step)."""
        return self.session.sample([slot.sampler for slot in slots])

    def _take(self, slot: _Slot) -> bool:
        """Take the pending token into the caption; True when the caption is complete."""
        opts = slot.request.options
        if not opts.ignore_eos and self.session.is_end(slot.pending):
            slot.finish_reason = "stop"
            return True
        slot.n_gen += 1
        self.generated += 1
        chunk = slot.decoder.decode(self.session.token_bytes(slot.pending))
        slot.emit(chunk)
        if slot.stopped:
            slot.finish_reason = "stop"
            return True
        if opts.loop_guard and not opts.ignore_eos:
            slot.chunks.append(chunk)
            if slot.looped(slot.pending):
                slot.finish_reason = "repetition"
                return True
        return slot.n_gen >= opts.max_tokens or slot.n_past >= self.session.n_ctx

    def _end(self, slot: _Slot, outcome: Caption | BaseException) -> None:
        self._active.remove(slot)
        self.session.release(slot.sampler)
        self.session.forget(slot.seq)
        self._free.append(slot.seq)
        slot.request.finish(outcome)


def _stop_prefix(text: str, stops: tuple[str, ...]) -> int:
    """The length of the longest end of `text` that is the start of a stop string."""
    return max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])),
               default=0)


def _engine_error(name: str, exc: Exception) -> CaprlError:
    if isinstance(exc, CaprlError):
        return exc
    error = EngineError(f"{name}: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


def text_of(request: Request) -> Iterator[str]:
    """The request's text as it is generated, until its end (a request made with the default sink)."""
    assert isinstance(request.sink, queue.SimpleQueue)
    while (piece := request.sink.get()) is not _END:
        yield piece
