"""One run of the fleet client: which image goes to which endpoint, and what each outcome comes to.

One thread (the caller's, iterating :meth:`Run.results`) owns the run: it starts each request and probe
in a daemon thread of its own (a hung server holds only that thread, and never the process's exit), and
settles what comes back. A request that may have reached a server is never repeated blindly: the next
attempt of an image is decided here, on another endpoint where there is one.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .clips import Video
from .errors import Cancelled, EngineError, ImageError
from .fleet import Fleet, Member
from .options import GenerationOptions
from .results import Caption, CaptionFailure
from .wire import Answer, Busy, Faulty, Refused, Rejected, Reply, Server, Unsupported

log = logging.getLogger("caprl_local")


@dataclass(eq=False)
class Job:
    """One image or video of a run, and the endpoints that failed it so far."""

    index: int
    name: str
    video: Video | None = None  # a video: read again for each attempt (a clip is large), never kept
    png: bytes | None = None  # the prepared image, kept for its next attempt
    load_s: float = 0.0
    sent_at: float = 0.0  # when its latest request left
    faults: list[str] = field(default_factory=list)  # "URL what went wrong", one per failed attempt
    tried: set[str] = field(default_factory=set)
    unsupported: set[str] = field(default_factory=set)  # the endpoints that cannot take it (a video on llama-server)

    def avoids(self, member: Member) -> bool:
        """Whether `member` said it cannot take this input: it is not asked again."""
        return member.url in self.unsupported


#: What a thread reports: ("probe" or "done", the endpoint, the job (None for a probe), the outcome, when it began).
Event = tuple[str, Member, Job | None, Any, float]
#: Asks one endpoint for one image's caption: (member, job, prompt, options, deadline) -> the outcome.
Attempt = Callable[[Member, Job, str, GenerationOptions, float], "Reply | Answer | ImageError"]


@dataclass
class Limits:
    """The bounds of a run."""

    timeout_s: float  # of each request
    attempts: int  # failed attempts (on endpoints that took the request) after which an image fails
    outage_s: float  # with no endpoint usable, the run stops after this long
    video_extra_s: float = 0.0  # added to a video's requests (its frames are many images to read)


class Run:
    """One caption_many over a fleet; see the module docstring."""

    def __init__(self, fleet: Fleet, *, probe: Callable[[Member], Server], attempt: Attempt, limits: Limits,
                 opts: GenerationOptions, prompt: str, count: Callable[[int, int], None],
                 video_prompt: str | None = None) -> None:
        self.fleet, self.probe, self.attempt, self.limits = fleet, probe, attempt, limits
        self.opts, self.prompt, self.count = opts, prompt, count  # count(requests in flight +-, tokens made)
        self.video_prompt = video_prompt or prompt
        self.events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self.jobs: deque[Job] = deque()
        self.remaining = self.done = self.in_flight = 0
        self.usable_at = time.monotonic()  # the last moment some endpoint was usable

    def results(self, images: Iterable[tuple[str, Video | None]], cancelled: threading.Event,
                progress: Callable[[int, int | None], None] | None) -> Iterator[Caption | CaptionFailure]:
        """Each input's result (an image file's name, or a video's name and the video), in the order they finish;
        Cancelled once `cancelled` is set, EngineError once no endpoint has been usable for too long (or every
        one refuses us)."""
        self.jobs.extend(Job(i, name, video) for i, (name, video) in enumerate(images))
        total = self.remaining = len(self.jobs)
        try:
            while self.remaining:
                if cancelled.is_set():
                    raise Cancelled("cancelled")
                self._step()
                try:  # look at cancel() now and then: a caption may take minutes
                    event = self.events.get(timeout=min(0.2, max(0.01, self.fleet.next_change(time.monotonic()))))
                except queue.Empty:
                    continue
                result = self._settle(event)
                if result is not None:
                    self.done += 1
                    self.remaining -= 1
                    if progress is not None:
                        progress(self.done, total)
                    yield result
        finally:  # requests still in flight end on their own; their answers go nowhere
            for member in self.fleet.members:
                member.in_flight, member.probing = 0, False
            self.count(-self.in_flight, 0)

    def _step(self) -> None:
        now = time.monotonic()
        for member in self.fleet.due(now):
            member.probing = True
            self._spawn(self._probing(member))
        if self.fleet.refused_all():
            raise EngineError(f"every endpoint refuses the requests ({self.fleet.describe()}); "
                              f"{self.remaining} images were not captioned")
        self._assign(now)
        if any(self._usable(m, now) for m in self.fleet.members):
            self.usable_at = now
        elif now - self.usable_at > self.limits.outage_s:
            what = "endpoint that takes the videos left" if self.jobs and any(  # those up cannot (llama-server)
                m.state == "up" and all(job.avoids(m) for job in self.jobs) for m in self.fleet.members) else "endpoint"
            raise EngineError(f"no {what} has answered for {self.limits.outage_s:g} s ({self.fleet.describe()}); "
                              f"{self.remaining} images were not captioned: run the same command again to "
                              "caption them")

    def _usable(self, member: Member, now: float) -> bool:
        """Whether `member` takes requests (one that only says "busy" has a bound too), for an input still to go."""
        if not (member.state == "up" or member.in_flight) or member.stalled(now, self.limits.outage_s):
            return False
        return bool(member.in_flight) or any(not job.avoids(member) for job in self.jobs)

    def _assign(self, now: float) -> None:
        """Hand waiting images to endpoints with room, the least loaded first: each to one it has not failed on
        while one is up, else to any that can take it."""
        free = self.fleet.free(now)
        waiting: list[Job] = []
        while self.jobs and free:
            job = self.jobs.popleft()
            able = [m for m in free if not job.avoids(m)]
            fresh = [m for m in able if m.url not in job.tried]
            if not able or not fresh and any(m.state == "up" and m.url not in job.tried and not job.avoids(m)
                                             for m in self.fleet.members):
                waiting.append(job)  # an endpoint it has not failed on (or one that takes it) will have room soon
                continue
            member = min(fresh or able, key=lambda m: m.in_flight / m.width)
            self._send(member, job)
            free = [m for m in free if m.in_flight < m.width]
        self.jobs.extendleft(reversed(waiting))

    def _probing(self, member: Member) -> Callable[[], Event]:
        return lambda: ("probe", member, None, guarded(lambda: self.probe(member)), 0.0)

    def _send(self, member: Member, job: Job) -> None:
        member.in_flight += 1
        self.in_flight += 1
        self.count(1, 0)
        started = time.monotonic()
        timeout = self.limits.timeout_s + (self.limits.video_extra_s if job.video is not None else 0.0)
        prompt = self.video_prompt if job.video is not None else self.prompt
        self._spawn(lambda: ("done", member, job, guarded(
            lambda: self.attempt(member, job, prompt, self.opts, timeout)), started))

    def _spawn(self, work: Callable[[], Event]) -> None:
        threading.Thread(target=lambda: self.events.put(work()), daemon=True, name="caprl-endpoint").start()

    def _settle(self, event: Event) -> Caption | CaptionFailure | None:
        """What one finished request or probe comes to: a result, or None (the image waits again)."""
        kind, member, job, outcome, started = event
        now = time.monotonic()
        if kind == "probe":
            member.probing = False
            note_probe(self.fleet, member, outcome, now)
            return None
        assert job is not None
        member.in_flight -= 1
        self.in_flight -= 1
        self.count(-1, outcome.generated_tokens if isinstance(outcome, Reply) else 0)
        result = self._result(member, job, outcome, now - (job.sent_at or started), now)
        if result is None:
            self.jobs.appendleft(job)  # first in line again
        else:
            job.png = None
        return result

    def _result(self, member: Member, job: Job, outcome: Any, seconds: float, now: float) -> Caption | CaptionFailure | None:
        name, url = job.name, member.url
        if isinstance(outcome, ImageError):  # unreadable here: never sent
            return CaptionFailure(image=name, error=str(outcome), kind="ImageError", index=job.index)
        if isinstance(outcome, Reply):
            self.fleet.answered(member)
            timings = dataclasses.replace(outcome.timings, image_load_s=job.load_s, total_s=job.load_s + seconds)
            return Caption(text=outcome.text, image=name, image_tokens=outcome.image_tokens,
                           prompt_tokens=outcome.prompt_tokens, generated_tokens=outcome.generated_tokens,
                           finish_reason=outcome.finish_reason, timings=timings, index=job.index, source=url,
                           model=outcome.model)
        if isinstance(outcome, Unsupported):  # never sent: another endpoint, if one may take it
            job.unsupported.add(url)
            if all(job.avoids(m) or m.state == "refused" for m in self.fleet.members):
                return CaptionFailure(image=name, error=f"{name}: {url} {outcome}", kind="CaprlError",
                                      index=job.index, source=url)
            return None
        if isinstance(outcome, Rejected):
            self.fleet.answered(member)
            return CaptionFailure(image=name, error=f"{name}: {url} {outcome}", kind="ImageError", index=job.index,
                                  source=url)
        if isinstance(outcome, Faulty):
            self.fleet.faulted(member, str(outcome), now)
            job.faults.append(f"{url} {outcome}")
            job.tried.add(url)
            if len(job.faults) >= self.limits.attempts:
                return _poisoned(job, url)
            log.debug("%s: %s %s; it goes to another endpoint", name, url, outcome)
        elif isinstance(outcome, Busy):
            self.fleet.busy(member, outcome.retry_after_s, str(outcome), now)
        elif isinstance(outcome, Refused):
            self.fleet.refused(member, str(outcome))
        else:  # Unreachable: the request never got there, and the image is not at fault
            self.fleet.down(member, str(outcome), now)
        return None


def _poisoned(job: Job, url: str) -> CaptionFailure:
    """The failure of an image that failed on every endpoint it was given to."""
    said = {fault: job.faults.count(fault) for fault in job.faults}
    tried = len(job.tried)
    return CaptionFailure(image=job.name, kind="EngineError", index=job.index, source=url, error=(
        f"{job.name}: failed on {tried} endpoint{'s' * (tried > 1)} ("
        + "; ".join(f"{fault} ({n} times)" if n > 1 else fault for fault, n in said.items())
        + f"); the servers may be unable to caption this {'video' if job.video is not None else 'image'}"))


def guarded(work: Callable[[], Any]) -> Any:
    """The outcome of `work`, any exception it raises as the outcome instead (an unforeseen one a fault)."""
    try:
        return work()
    except (Answer, ImageError) as exc:
        return exc
    except Exception as exc:  # noqa: BLE001 - whatever a server's answer makes go wrong is that server's fault
        log.debug("endpoint request failed", exc_info=True)
        return Faulty(f"failed unexpectedly ({type(exc).__name__}: {exc})")


def note_probe(fleet: Fleet, member: Member, outcome: Server | Answer, now: float) -> None:
    """What a probe's outcome makes of its endpoint."""
    if isinstance(outcome, Server):
        fleet.joined(member, outcome)
    elif isinstance(outcome, Refused):
        fleet.refused(member, str(outcome))
    elif isinstance(outcome, Busy):
        fleet.not_ready(member, outcome.retry_after_s, str(outcome), now)
    else:
        fleet.down(member, str(outcome), now)
