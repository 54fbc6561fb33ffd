"""Caption through a fleet of OpenAI-compatible servers (vLLM, SGLang, llama-server, caprl-local serve).

:class:`EndpointCaptioner` satisfies the :class:`~caprl_local.captioning.Captioning` contract, so a run over
endpoints writes the same outputs, resumes the same way and isolates failures the same way as a local one.
Each image is sent as the local engine would see it, with every caption option under the names each server
honours (wire.py), so that the captions equal a local run's. One dispatcher thread hands each image to an
endpoint with room (a bounded number of requests each) and sorts what comes back:

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
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import urllib3
from typing_extensions import Unpack

from . import wire
from .budgets import ImageBudget, TiledBudget
from .captioning import ClosingContext, ImageFile
from .dispatch import Job, Limits, Run, guarded, note_probe
from .errors import CaprlError, ImageError
from .fleet import Fleet, Member, Policy
from .options import DEFAULT_MAX_IMAGE_TOKENS, GenerationKwargs, GenerationOptions, generation_of, positive
from .prompts import resolve_prompt
from .results import Activity, Caption, CaptionFailure
from .wire import Answer, Faulty, Reply, Server

log = logging.getLogger("caprl_local")

#: How each caption option reaches a server, under the names the OpenAI-compatible servers honour (see
#: wire.request_body): an option missing here is refused unless left at its default, never dropped in silence.
SENT = frozenset({"prompt", "preset", "max_tokens", "temperature", "top_p", "seed", "repeat_penalty", "stop",
                  "loop_guard", "ignore_eos"})
#: Seconds a probe (GET /models and the like) may take.
PROBE_TIMEOUT_S = 10.0
#: The default deadline of one caption request: a generous time for the image and the prompt, and for each
#: new token allowed (a CPU server decoding several captions at once makes a few tokens a second each).
BASE_TIMEOUT_S, TIMEOUT_PER_TOKEN_S = 120.0, 0.5
#: The default time a run rides out with no endpoint usable before it stops (a vLLM restart takes minutes).
DEFAULT_OUTAGE_S = 300.0
#: The Qwen-VL grid (patch 14 x merge 2): how CapRL-3B and CapRL 2.0 images are sized.
QWEN_VL_ALIGN = 28


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
                 connect_timeout_s: float = 10.0) -> None:
        self.endpoints = list(endpoints)
        if not self.endpoints:
            raise CaprlError("no endpoint given")
        positive("attempts", attempts)
        positive("image_max_tokens", image_max_tokens, allow_none=True)
        positive("image_min_tokens", image_min_tokens, allow_none=True)
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

    def caption_many(self, images: Iterable[ImageFile], *, generation: GenerationOptions | None = None,
                     on_text: Callable[[str, str], None] | None = None,
                     progress: Callable[[int, int | None], None] | None = None, prefetch: int = 2,
                     **options: Unpack[GenerationKwargs]) -> Iterator[Caption | CaptionFailure]:
        """Caption image files on the endpoints, yielding each result as it comes (in the order they finish,
        each with its ``index`` in `images` and its ``source``). Raises EngineError once no endpoint has been
        usable for ``outage_s`` (or every one refuses us), and Cancelled after cancel(), in both cases after
        yielding every result finished before. ``on_text`` receives each caption whole, as it comes back;
        ``prefetch`` is unused (each image is read as it is sent)."""
        opts = generation_of(generation, options)
        _check_sent(opts)
        prompt = opts.resolved(self.default_prompt).prompt
        assert prompt is not None
        run = Run(self.fleet, probe=self._probe, attempt=self._attempt, opts=opts, prompt=prompt, count=self._count,
                  limits=Limits(self.timeout_s or request_timeout(opts), self.attempts, self.outage_s))
        try:
            for result in run.results([os.fspath(image) for image in images], self._cancelled, progress):
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
        """One request for one image to one endpoint: its reply, or what it came to instead."""
        if job.png is None:
            try:
                job.png, job.load_s = wire.prepare_image(job.name, self.budget)
            except ImageError as exc:
                return exc
        job.sent_at = time.monotonic()
        assert member.server is not None
        body = json.dumps(wire.request_body(member.server, job.png, prompt, opts)).encode()
        status, headers, data = wire.exchange(self.http, "POST", member.url.rstrip("/") + "/chat/completions",
                                         self._headers(member.url), body, timeout_s=timeout_s,
                                         connect_s=self.connect_s)
        return wire.read_reply(status, headers, data, member.server, opts)


def _check_sent(opts: GenerationOptions) -> None:
    """CaprlError for an option the requests would not carry, unless it is left at its default."""
    for field_ in dataclasses.fields(opts):
        if field_.name not in SENT and getattr(opts, field_.name) != field_.default:
            raise CaprlError(f"the endpoints cannot honour option {field_.name!r}: the requests to the servers do not "
                             "carry it; leave it at its default")
