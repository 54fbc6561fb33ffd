"""Who goes next: the server's places for requests, the queue in front of the engine, the expected wait.

A request takes a place as it arrives (before its body is read) and keeps it until it is answered;
when every place is taken the answer is 503 with the expected wait. Between reading its image and
captioning it, a request waits here in arrival order, as the bytes it was sent: its image is decoded
only once the engine has room for one more than it decodes at once, so a long queue holds
compressed images, never decoded ones.

Everything here runs on the event loop's thread; the decode loop's news reaches it through
``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import math
import statistics
from collections import deque

from .protocol import ApiError

#: Captions whose durations the expected wait is taken from.
RECENT = 32
#: The expected wait of one round of captions before any has finished (nothing measured yet).
FIRST_GUESS_S = 1.0
#: The longest Retry-After given: beyond an hour, the figure says more about the guess than the wait.
MOST_RETRY_S = 3600


def stopping() -> ApiError:
    return ApiError(503, "the server is stopping; send the request again once it is back", kind="server_error",
                    code="unavailable")


class Admission:
    """Places for ``slots + queue`` requests, and a FIFO turn at the engine for ``slots + 1`` of them."""

    def __init__(self, slots: int, queue: int) -> None:
        self.slots = slots
        self.limit = slots + queue  # requests in the server at once: reading, queued, decoding, generating
        self.engine_limit = slots + 1  # images decoded (or being decoded) at once: one ready when a slot frees
        self.taken = 0  # places held
        self.reading = 0  # of which still reading their body or fetching their image
        self.engine = 0  # requests at the engine, including those whose client has gone and that end at the next step
        self._queue: deque[Place] = deque()  # waiting for the engine, in arrival order, as compressed bytes
        self._durations: deque[float] = deque(maxlen=RECENT)
        self.stopping = False

    @property
    def queued(self) -> int:
        return len(self._queue)

    def admit(self) -> Place:
        """A place for one more request; ApiError 503 (with the expected wait) when none is left."""
        if self.stopping:
            raise stopping()
        if self.taken >= self.limit:
            wait = self.retry_after()
            raise ApiError(503, f"the server is full ({self.taken} requests in progress or waiting); try again in "
                           f"about {wait} s", kind="server_error", code="queue_full", headers={"Retry-After": str(wait)})
        return Place(self)

    def record(self, seconds: float) -> None:
        """A caption took `seconds` from its image's decoding to its end."""
        if seconds > 0 and math.isfinite(seconds):
            self._durations.append(seconds)

    def expected_wait(self) -> float:
        """Seconds until a request arriving now would be answered: rounds of `slots` captions, each as long
        as recent ones took, for everything ahead of it and itself."""
        per_round = statistics.median(self._durations) if self._durations else FIRST_GUESS_S
        return per_round * math.ceil((self.taken + 1) / self.slots)

    def retry_after(self) -> int:
        return max(1, min(MOST_RETRY_S, math.ceil(self.expected_wait())))

    def stop(self) -> None:
        """The server is stopping: no more places, and every queued request is told so."""
        self.stopping = True
        while self._queue:
            self._queue.popleft().wake(False)

    def _wake(self) -> None:
        """Give the engine's free room to the longest waiting requests."""
        while self._queue and self.engine < self.engine_limit and not self.stopping:
            place = self._queue.popleft()
            if place.wake(True):
                self.engine += 1


class Place:
    """One request's place in the server; given back once, however the request ends."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.held = self.reading = True
        self.at_engine = False
        self._turn: asyncio.Future[bool] | None = None
        admission.taken += 1
        admission.reading += 1

    def done_reading(self) -> None:
        if self.reading:
            self.reading = False
            self.admission.reading -= 1

    async def turn(self) -> None:
        """Wait, in arrival order, until the engine has room for this request's image."""
        admission = self.admission
        self.done_reading()
        if admission.stopping:
            raise stopping()
        if not admission._queue and admission.engine < admission.engine_limit:
            admission.engine += 1
            self.at_engine = True
            return
        self._turn = turn = asyncio.get_running_loop().create_future()
        admission._queue.append(self)
        try:
            given = await turn
        except BaseException:  # the client went away, or the server stops: the place in the queue is given up
            if self in admission._queue:
                admission._queue.remove(self)
            if turn.done() and not turn.cancelled() and turn.result():  # given the room just as it was cancelled
                self.at_engine = True
                self.leave_engine()
            raise
        finally:
            self._turn = None
        if not given:
            raise stopping()
        self.at_engine = True

    def wake(self, given: bool) -> bool:
        """Tell the waiting request whether it has its turn; False if it is not waiting any more."""
        if self._turn is None or self._turn.done():
            return False
        self._turn.set_result(given)
        return True

    def leave_engine(self) -> None:
        """The engine is done with this request (its caption ended, or never started): the next one goes."""
        if self.at_engine:
            self.at_engine = False
            self.admission.engine -= 1
            self.admission._wake()

    def release(self) -> None:
        """The request is answered (or its client gone): its place is free. Its room at the engine is
        given back apart, once the engine is done with it."""
        if not self.held:
            return
        self.held = False
        self.done_reading()
        self.admission.taken -= 1
        if self._turn is not None and not self._turn.done():
            self._turn.cancel()
        if self in self.admission._queue:
            self.admission._queue.remove(self)
