"""Caption through a fleet of OpenAI-compatible servers (vLLM, SGLang, llama-server, caprl-local serve).

:class:`EndpointCaptioner` satisfies the :class:`~caprl_local.captioning.Captioning` contract, so a run over
endpoints writes the same outputs, resumes the same way and isolates failures the same way as a local one.
Each image is sent as the local engine would see it, with every caption option under the names each server
honours (wire.py), so that the captions equal a local run's. A video (a path with a video suffix, or a
:class:`~caprl_local.clips.Video`) is sent as its clip's bytes, bounded in size, with the sampling asked of
it where a server takes that per request; llama-server, which has no video input, is never sent one. One
dispatcher thread hands each input to an endpoint with room (a bounded number of requests each) and sorts
what comes back:

- a caption, or a 4xx about the image: that image's result;
- a 5xx, garbage with status 200, a hang past the deadline, a dropped connection: a fault of that endpoint;
  the image goes to another one, and fails only after faults on ``attempts`` endpoints (a poison image);
  an endpoint that faults ``drop_after`` times in a row is dropped for a while (fleet.py);
- 429 or 503: the endpoint is busy (its Retry-After honoured within bounds), the image waits for room;
- out of reach: the endpoint is down, probed again with backoff, and rejoins when it answers.

Nothing is ever re-sent blindly: a request that may have reached a server is never repeated by the HTTP
layer, only handed (once decided here) to the next endpoint. The run fails only when no endpoint has been
usable for ``outage_s``: the images not yet captioned get no result, so the same command resumes them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import urllib3
from typing_extensions import Unpack

from . import wire
from .budgets import ImageBudget, TiledBudget
from .captioning import ClosingContext, ImageFile
from .clips import MAX_VIDEO_BYTES, Video, is_video_input, sniff
from .dispatch import Job, Limits, Run, guarded, note_probe
from .errors import CaprlError, ImageError
from .fleet import Fleet, Member, Policy
from .images import read_errors
from .options import DEFAULT_MAX_IMAGE_TOKENS, EngineOptions, GenerationKwargs, GenerationOptions, generation_of, positive
from .prompts import VIDEO_PROMPT, resolve_prompt
from .results import Activity, Caption, CaptionFailure
from .wire import Answer, Clip, Faulty, Reply, Server, Unsupported

log = logging.getLogger("caprl_local")

#: How each caption option reaches a server, under the names the OpenAI-compatible servers honour (see
#: wire.request_body): an option missing here is refused unless left at its default, never dropped in silence.
SENT = frozenset({"prompt", "preset", "max_tokens", "temperature", "top_p", "seed", "repeat_penalty", "stop",
                  "loop_guard", "ignore_eos", "video_prompt"})
#: Seconds a probe (GET /models and the like) may take.
PROBE_TIMEOUT_S = 10.0
#: The default deadline of one caption request: a generous time for the image and the prompt, and for each
#: new token allowed (a CPU server decoding several captions at once makes a few tokens a second each).
BASE_TIMEOUT_S, TIMEOUT_PER_TOKEN_S = 120.0, 0.5
#: The default time a run rides out with no endpoint usable before it stops (a vLLM restart takes minutes).
DEFAULT_OUTAGE_S = 300.0
#: The Qwen-VL grid (patch 14 x merge 2): how CapRL-3B and CapRL 2.0 images are sized.
QWEN_VL_ALIGN = 28
#: The most bytes of one clip sent to an endpoint (``video_max_bytes``, at most clips.MAX_VIDEO_BYTES). A clip
#: travels as base64 in the JSON body (4/3 of its size), which is built whole here for each request in flight and
#: parsed whole by the server (caprl-local serve takes 32 MB bodies by default): a longer clip is cut or
#: re-encoded first, or captioned locally, where it streams from its file.
MAX_SENT_VIDEO_BYTES = 64 * 1024 * 1024
#: The seconds added to a video request's default deadline for each frame it may be sampled to.
TIMEOUT_PER_FRAME_S = 2.0


@dataclass(frozen=True)
class Endpoint:
    """One OpenAI-compatible server: its base URL (as the openai client takes it), model, key."""

    url: str
    model: str | None = None  # None: the first model the server lists
    api_key: str | None = None
    concurrency: int | None = None  # requests at once; None: the server's slots if it says, else 4


def request_timeout(opts: GenerationOptions) -> float:
    """The default deadline of one caption request, from the work asked of it."""
    return BASE_TIMEOUT_S + TIMEOUT_PER_TOKEN_S * opts.max_tokens


class EndpointCaptioner(ClosingContext):
    """Captions images by sending them to OpenAI-compatible servers; see the module docstring.

    ``timeout_s``: the deadline of each request (None: from the work, see request_timeout); ``attempts``: the
    endpoints an image may fail on before it is that image's failure; ``outage_s``: how long a run waits with
    no endpoint usable; ``image_max_tokens``/``image_min_tokens``: the image-token cap the images are sized to
    (as the local engine's options), on the Qwen-VL grid unless ``image_budget`` says otherwise.
    """

    def __init__(self, endpoints: Iterable[Endpoint], *, timeout_s: float | None = None, attempts: int = 2,
                 outage_s: float = DEFAULT_OUTAGE_S, prompt: str | None = None,
                 image_max_tokens: int | None = DEFAULT_MAX_IMAGE_TOKENS, image_min_tokens: int | None = None,
                 image_budget: ImageBudget | TiledBudget | None = None, policy: Policy | None = None,
                 connect_timeout_s: float = 10.0, video_fps: float = EngineOptions.video_fps,
                 video_max_frames: int = EngineOptions.video_max_frames,
                 video_max_bytes: int = MAX_SENT_VIDEO_BYTES) -> None:
        self.endpoints = list(endpoints)
        if not self.endpoints:
            raise CaprlError("no endpoint given")
        positive("attempts", attempts)
        positive("image_max_tokens", image_max_tokens, allow_none=True)
        positive("image_min_tokens", image_min_tokens, allow_none=True)
        EngineOptions(video_fps=video_fps, video_max_frames=video_max_frames)  # checked as the engine's own
        positive("video_max_bytes", video_max_bytes)
        if video_max_bytes > MAX_VIDEO_BYTES:
            raise CaprlError(f"video_max_bytes must be at most {MAX_VIDEO_BYTES:,}, not {video_max_bytes:,}")
        self.video_fps, self.video_max_frames, self.video_max_bytes = video_fps, video_max_frames, video_max_bytes
        for value, name in ((timeout_s, "timeout_s"), (outage_s, "outage_s"), (connect_timeout_s, "connect_timeout_s")):
            if value is not None and not value > 0:
                raise CaprlError(f"{name} must be a number of seconds above 0, not {value!r}")
        self.timeout_s, self.attempts, self.outage_s, self.connect_s = timeout_s, attempts, outage_s, connect_timeout_s
        self.budget = image_budget or ImageBudget.for_tokens(align=QWEN_VL_ALIGN, min_tokens=image_min_tokens,
                                                              max_tokens=image_max_tokens)
        self.http = urllib3.PoolManager(maxsize=64, block=False)
        self.default_prompt = resolve_prompt(prompt=prompt)
        self.fleet = Fleet([Member(e.url, e.model, e.concurrency) for e in self.endpoints], policy or Policy())
        self._by_url = {e.url: e for e in self.endpoints}
        self._cancelled = threading.Event()
        self._lock = threading.Lock()
        self._generating = self._tokens = 0
        # Given its model and width, an endpoint is asked nothing until a run; the others are probed now, so that
        # the model and the width are known (one that does not answer is probed again as the run goes).
        unknown = [m for m in self.fleet.members if not (m.given_model and m.given_width)]
        if unknown:
            self._probe_now(unknown)

    # what the batch runner and progress displays read of a Captioner
    threads = 0
    on_gpu = False

    @property
    def parallel(self) -> int:
        return sum(m.width for m in self.fleet.members if m.state != "refused")

    @property
    def model(self) -> str:
        """The model of the first endpoint that named one (each result's ``source`` names its server)."""
        for member in self.fleet.members:
            if member.server is not None or member.given_model:
                return member.server.model if member.server else str(member.given_model)
        return "unknown"

    def activity(self) -> Activity:
        with self._lock:
            return Activity(generating=self._generating, waiting=0, tokens=self._tokens)

    def cancel(self) -> None:
        self._cancelled.set()

    def close(self) -> None:
        self.cancel()
        self.http.clear()

    def caption_many(self, images: Iterable[ImageFile | Video], *, generation: GenerationOptions | None = None,
                     on_text: Callable[[str, str], None] | None = None,
                     progress: Callable[[int, int | None], None] | None = None, prefetch: int = 2,
                     **options: Unpack[GenerationKwargs]) -> Iterator[Caption | CaptionFailure]:
        """Caption image files and videos on the endpoints, yielding each result as it comes (in the order they
        finish, each with its ``index`` in `images` and its ``source``). Raises EngineError once no endpoint
        has been usable for ``outage_s`` (or every one refuses us), and Cancelled after cancel(), in both cases
        after yielding every result finished before. ``on_text`` receives each caption whole, as it comes back;
        ``prefetch`` is unused (each input is read as it is sent). A video's prompt, unless one is given, is
        CapRL-Video's (as the engine's)."""
        opts = generation_of(generation, options)
        _check_sent(opts)
        prompt = opts.resolved(self.default_prompt).prompt
        video_prompt = opts.video_prompt or opts.resolved(VIDEO_PROMPT).prompt
        assert prompt is not None and video_prompt is not None
        extra = 0.0 if self.timeout_s else TIMEOUT_PER_FRAME_S * self.video_max_frames
        run = Run(self.fleet, probe=self._probe, attempt=self._attempt, opts=opts, prompt=prompt, count=self._count,
                  video_prompt=video_prompt,
                  limits=Limits(self.timeout_s or request_timeout(opts), self.attempts, self.outage_s, extra))
        try:
            for result in run.results((_named(image) for image in images), self._cancelled, progress):
                if on_text is not None and isinstance(result, Caption):
                    on_text(result.image, result.text)
                yield result
        finally:
            self._cancelled = threading.Event()  # the next run starts afresh

    def _count(self, requests: int, tokens: int) -> None:
        with self._lock:
            self._generating += requests
            self._tokens += tokens

    # -- what runs in worker threads --

    def _headers(self, url: str) -> dict[str, str]:
        key = self._by_url[url].api_key
        return {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}

    def _probe(self, member: Member) -> Server:
        """Ask an endpoint what it serves (and how many captions at once, unless given); an Answer if it cannot."""
        url = member.url.rstrip("/")
        timeout = min(PROBE_TIMEOUT_S, self.timeout_s or PROBE_TIMEOUT_S)
        status, _, data = wire.exchange(self.http, "GET", url + "/models", self._headers(member.url), None,
                                        timeout_s=timeout, connect_s=self.connect_s)
        if status == 404 and member.given_model:  # no model list here: the model asked for is taken on trust
            model, kind = member.given_model, ""
        else:
            model, kind = wire.probe_models(status, data, member.given_model)
        slots = None
        if member.given_width is None:  # llama-server's /props, caprl-local serve's /health
            root = url.removesuffix("/v1")
            for path, key in (("/props", "total_slots"), ("/health", "slots")):
                try:
                    status, _, data = wire.exchange(self.http, "GET", root + path, self._headers(member.url), None,
                                                    timeout_s=min(5.0, timeout), connect_s=self.connect_s)
                except Answer:
                    continue
                slots = wire.slots_of(data, key) if status == 200 else None
                if slots:
                    break
        return Server(model=model, slots=slots, kind=kind)

    def _probe_now(self, members: list[Member]) -> None:
        """Probe `members` at once, side by side, and note what each answered."""
        answers: dict[int, Server | Answer] = {}

        def probe(i: int, member: Member) -> None:
            answers[i] = guarded(lambda: self._probe(member))

        threads = [threading.Thread(target=probe, args=(i, m), daemon=True) for i, m in enumerate(members)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(PROBE_TIMEOUT_S * 4 + self.connect_s)
        now = time.monotonic()
        for i, member in enumerate(members):
            note_probe(self.fleet, member, answers.get(i, Faulty("did not answer a probe")), now)

    def _attempt(self, member: Member, job: Job, prompt: str, opts: GenerationOptions,
                 timeout_s: float) -> Reply | Answer | ImageError:
        """One request for one image or video to one endpoint: its reply, or what it came to instead."""
        assert member.server is not None
        media: bytes | Clip
        if job.video is not None:
            if not member.server.takes_video:
                return Unsupported(f"is {member.server.kind}, which has no video input in its API; caption videos on "
                                   "caprl-local serve or vLLM endpoints")
            try:
                started = time.perf_counter()
                media = Clip(*_read_clip(job.video, job.name, self.video_max_bytes), self.video_fps, self.video_max_frames)
                job.load_s = time.perf_counter() - started
            except ImageError as exc:
                return exc
        else:
            if job.png is None:
                try:
                    job.png, job.load_s = wire.prepare_image(job.name, self.budget)
                except ImageError as exc:
                    return exc
            media = job.png
        job.sent_at = time.monotonic()
        body = wire.request_body(member.server, media, prompt, opts)
        del media  # a clip's bytes: only the body's copy stays while the request is out
        status, headers, data = wire.exchange(self.http, "POST", member.url.rstrip("/") + "/chat/completions",
                                         self._headers(member.url), body, timeout_s=timeout_s,
                                         connect_s=self.connect_s)
        return wire.read_reply(status, headers, data, member.server, opts)


def _named(source: ImageFile | Video) -> tuple[str, Video | None]:
    """An input as a run takes it: its name for messages, and the video it is (None for an image file)."""
    if isinstance(source, Video):
        return source.describe(), source
    name = os.fspath(source)
    return (name, Video(name)) if is_video_input(name) else (name, None)


def _read_clip(video: Video, name: str, most: int) -> tuple[bytes, str]:
    """A clip's bytes and media type, `most` bytes at most: a file over it is refused from its size, before a
    byte is read (ImageError, as a bad image file)."""
    given = video.source
    if isinstance(given, (bytes, bytearray, memoryview)):  # in memory already: copied only once it fits
        size = given.nbytes if isinstance(given, memoryview) else len(given)
        data = bytes(given) if size <= most else b""
    else:
        data, size = _read_file(os.fspath(given), name, most)
    if size > most:
        raise ImageError(f"{name}: {size:,} bytes of video is over the {most:,} a request to an endpoint may carry; "
                         "cut or re-encode the clip, or caption it locally")
    media_type = _media_type(data[:64])
    if media_type is None:
        raise ImageError(f"{name}: not a video file (MP4/MOV, Matroska/WebM or AVI); check the file")
    return data, media_type


def _read_file(path: str, name: str, most: int) -> tuple[bytes, int]:
    """A regular file's bytes and size; nothing opened of one over `most` bytes (its size says so), nor of a FIFO
    or a device. ImageError where it cannot be read."""
    def measured(info: os.stat_result) -> int:
        if stat.S_ISDIR(info.st_mode):
            raise ImageError(f"{name}: is a directory, not a video file")
        if not stat.S_ISREG(info.st_mode):
            raise ImageError(f"{name}: is not a regular file; save the video to a file first")
        return info.st_size

    with read_errors(name):
        size = measured(os.stat(path))
        if size > most:
            return b"", size
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # replaced by a FIFO since: no wait
        with os.fdopen(fd, "rb") as fh:
            size = measured(os.fstat(fh.fileno()))  # the file opened is the one measured
            if size > most:
                return b"", size
            data = fh.read(most + 1)  # a file that grows as it is read is refused too
            return data, len(data)


def _media_type(head: bytes) -> str | None:
    """The media type of a clip from its first bytes, as a data URL names it; None for one that is no video."""
    if not sniff(head[:16]):
        return None
    if head[4:8] == b"ftyp":
        return "video/quicktime" if head[8:12] == b"qt  " else "video/mp4"
    if head[:4] == b"\x1a\x45\xdf\xa3":  # EBML: Matroska, or WebM, which names itself in its header
        return "video/webm" if b"webm" in head else "video/x-matroska"
    return "video/x-msvideo" if head[:4] == b"RIFF" else "video/quicktime"  # a QuickTime file older than MP4's ftyp


def _check_sent(opts: GenerationOptions) -> None:
    """CaprlError for an option the requests would not carry, unless it is left at its default."""
    for field_ in dataclasses.fields(opts):
        if field_.name not in SENT and getattr(opts, field_.name) != field_.default:
            raise CaprlError(f"the endpoints cannot honour option {field_.name!r}: the requests to the servers do not "
                             "carry it; leave it at its default")
