"""Caption through a fleet of OpenAI-compatible servers (vLLM, SGLang, llama-server, caprl-local serve).

:class:`EndpointCaptioner` offers what the batch runner uses of a Captioner (``caption_many``,
``cancel``, ``close``, ``activity``), so a run over endpoints writes the same outputs, resumes
the same way and isolates failures the same way as a local one. Each endpoint gets a bounded
number of requests at once; urllib3 retries connection errors, 429 and 5xx with backoff; an
endpoint that stays unreachable is dropped and its image goes to the others.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import urllib3
from typing_extensions import Unpack

from .captioning import ClosingContext, ImageFile
from .errors import Cancelled, CaprlError, EngineError
from .options import GenerationKwargs, GenerationOptions, generation_of
from .prompts import resolve_prompt
from .results import Activity, Caption, CaptionFailure, Timings

log = logging.getLogger("caprl_local")
#: What a worker reports: a result, or (its endpoint, why it went down).
_Done = Caption | CaptionFailure | tuple[str, BaseException]

#: Statuses worth asking again (the server is busy or failing for a moment).
RETRY_STATUSES = (429, 500, 502, 503, 504)
#: How each caption option reaches a server, under the names the OpenAI-compatible servers honour (see _body):
#: an option missing here is refused unless left at its default, never dropped in silence.
SENT = frozenset({"prompt", "preset", "max_tokens", "temperature", "top_p", "seed", "repeat_penalty", "stop",
                  "loop_guard", "ignore_eos"})


@dataclass(frozen=True)
class Endpoint:
    """One OpenAI-compatible server: its base URL (as the openai client takes it), model, key."""

    url: str
    model: str | None = None  # None: the first model the server lists
    api_key: str | None = None
    concurrency: int | None = None  # requests at once; None: the server's slots if it says, else 4


class _Down(Exception):
    """This endpoint cannot be used (unreachable after retries, or refusing the key or model)."""


class EndpointCaptioner(ClosingContext):
    """Captions images by sending them to OpenAI-compatible servers; see the module docstring."""

    def __init__(self, endpoints: Iterable[Endpoint], *, retries: int = 4, timeout_s: float = 600.0,
                 prompt: str | None = None) -> None:
        self.endpoints = list(endpoints)
        if not self.endpoints:
            raise CaprlError("no endpoint given")
        retry = urllib3.Retry(total=retries, backoff_factor=0.5, status_forcelist=RETRY_STATUSES,
                              allowed_methods=None, raise_on_status=False, respect_retry_after_header=True)
        self.http = urllib3.PoolManager(retries=retry, timeout=urllib3.Timeout(connect=10, read=timeout_s),
                                        maxsize=64)
        self.default_prompt = resolve_prompt(prompt=prompt)
        self.models = {e.url: e.model or self._first_model(e) for e in self.endpoints}
        self.widths = {e.url: e.concurrency or self._slots(e) or 4 for e in self.endpoints}
        self._cancelled = threading.Event()
        self._lock = threading.Lock()
        self._generating = self._tokens = 0

    # what the batch runner and progress displays read of a Captioner
    threads = 0
    on_gpu = False

    @property
    def parallel(self) -> int:
        return sum(self.widths.values())

    @property
    def model(self) -> str:
        return self.models[self.endpoints[0].url]

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
        """Caption image files on the endpoints, yielding each result as it comes (with its ``index``
        in `images`). Raises EngineError once every endpoint is down, and Cancelled after
        cancel(), in both cases after yielding every result finished before. ``on_text`` receives each
        caption whole, as it comes back; ``prefetch`` is unused (each image is read as it is sent)."""
        opts = generation_of(generation, options)
        _check_sent(opts)
        prompt = opts.resolved(self.default_prompt).prompt
        assert prompt is not None
        todo: queue.SimpleQueue[tuple[int, str] | None] = queue.SimpleQueue()
        names = [os.fspath(image) for image in images]
        for job in enumerate(names):
            todo.put(job)
        done: queue.SimpleQueue[_Done] = queue.SimpleQueue()
        workers = [threading.Thread(target=self._work, args=(e, todo, done, prompt, opts), daemon=True,
                                    name=f"caprl-endpoint-{i}")
                   for i, e in enumerate(self.endpoints) for _ in range(self.widths[e.url])]
        alive = dict(self.widths)
        for worker in workers:
            worker.start()
        remaining, finished, down = len(names), 0, []
        try:
            while remaining and any(alive.values()) and not self._cancelled.is_set():
                try:
                    item = done.get(timeout=0.2)
                except queue.Empty:  # look at cancel() now and then: a caption may take minutes
                    continue
                if isinstance(item, tuple):  # a worker's endpoint went down; its image went back in line
                    url, exc = item
                    if alive[url] == self.widths[url]:
                        log.warning("%s is down (%s); its images go to the other endpoints", url, exc)
                    alive[url] -= 1
                    down.append(f"{url}: {exc}")
                    continue
                remaining -= 1
                finished += 1
                if progress is not None:
                    progress(finished, len(names))
                if on_text is not None and isinstance(item, Caption):
                    on_text(item.image, item.text)
                yield item
            if self._cancelled.is_set():
                raise Cancelled("cancelled")
            if remaining:
                raise EngineError(f"every endpoint is down ({'; '.join(dict.fromkeys(down))}); "
                                  f"{remaining} images were not captioned")
        finally:
            self._cancelled.set()  # stop the workers (the next run clears it)
            for _ in workers:
                todo.put(None)
            self._cancelled = threading.Event()

    # -- workers --

    def _work(self, endpoint: Endpoint, todo: queue.SimpleQueue[tuple[int, str] | None], done: queue.SimpleQueue[_Done],
              prompt: str, opts: GenerationOptions) -> None:
        cancelled = self._cancelled
        while not cancelled.is_set() and (job := todo.get()) is not None:
            if cancelled.is_set():
                return
            with self._lock:
                self._generating += 1
            try:
                done.put(dataclasses.replace(self._caption(endpoint, job[1], prompt, opts), index=job[0]))
            except _Down as exc:
                todo.put(job)  # another endpoint takes it
                done.put((endpoint.url, exc))
                return
            finally:
                with self._lock:
                    self._generating -= 1

    def _caption(self, endpoint: Endpoint, name: str, prompt: str, opts: GenerationOptions) -> Caption | CaptionFailure:
        try:
            data = Path(name).read_bytes()
        except OSError as exc:
            return CaptionFailure(image=name, error=f"{name}: cannot read the image ({exc.strerror or exc})",
                                  kind="ImageError")
        status, answer = self._call(endpoint, "/chat/completions", _body(self.models[endpoint.url], data, prompt, opts))
        if status == 200 and isinstance(answer.get("choices"), list) and answer["choices"]:
            choice, counts = answer["choices"][0], answer.get("usage") or {}
            text = ((choice.get("message") or {}).get("content") or "").strip()
            generated = int(counts.get("completion_tokens", 0))
            with self._lock:
                self._tokens += generated
            return Caption(text=text, image=name, image_tokens=0, prompt_tokens=int(counts.get("prompt_tokens", 0)),
                           generated_tokens=generated, finish_reason=choice.get("finish_reason") or "stop",
                           timings=Timings(0, 0, 0, 0, 0, 0, 0))
        message = (answer.get("error") or {}).get("message") if isinstance(answer.get("error"), dict) else None
        if status in (401, 403, 404):  # the key or the model is wrong: nothing will work here
            raise _Down(f"HTTP {status}: {message or 'refused'}")
        return CaptionFailure(image=name, error=f"{name}: {endpoint.url} answered HTTP {status}: {message or answer}",
                              kind="ImageError" if status in (400, 413, 422) else "EngineError")

    def _call(self, endpoint: Endpoint, path: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        """POST `body` as JSON (GET without one); (status, JSON answer). _Down when the server stays out of reach."""
        headers = {"Content-Type": "application/json"}
        if endpoint.api_key:
            headers["Authorization"] = f"Bearer {endpoint.api_key}"
        url = endpoint.url.rstrip("/") + path
        try:
            response = self.http.request("POST" if body is not None else "GET", url, headers=headers,
                                         body=None if body is None else json.dumps(body).encode())
        except urllib3.exceptions.HTTPError as exc:  # connection refused or reset, after every retry
            raise _Down(f"cannot reach it ({type(exc).__name__})") from exc
        try:
            answer = json.loads(response.data or b"{}")
        except ValueError:
            answer = {"error": {"message": response.data[:200].decode("utf-8", "replace")}}
        if response.status in RETRY_STATUSES:  # still failing after every retry
            raise _Down(f"HTTP {response.status}, again after retries")
        return response.status, answer if isinstance(answer, dict) else {}

    def _slots(self, endpoint: Endpoint) -> int | None:
        """How many requests the server decodes at once, where it says: llama-server's /props
        (total_slots), caprl-local serve's /health (slots)."""
        root = endpoint.url.rstrip("/").removesuffix("/v1")
        for path, key in (("/props", "total_slots"), ("/health", "slots")):
            try:
                response = self.http.request("GET", root + path, retries=False, timeout=5)
                value = json.loads(response.data).get(key) if response.status == 200 else None
            except (urllib3.exceptions.HTTPError, ValueError, AttributeError):
                continue
            if isinstance(value, int) and value > 0:
                return value
        return None

    def _first_model(self, endpoint: Endpoint) -> str:
        try:
            status, answer = self._call(endpoint, "/models")
        except _Down as exc:
            raise EngineError(f"{endpoint.url}: {exc}") from exc
        data = answer.get("data") if status == 200 else None
        if not data or not isinstance(data[0], dict) or "id" not in data[0]:
            raise EngineError(f"{endpoint.url}: GET /models answered HTTP {status} without a model; "
                              "name the model to use")
        return str(data[0]["id"])


def _body(model: str, data: bytes, prompt: str, opts: GenerationOptions) -> dict[str, Any]:
    """The chat-completions request for one image: every option in SENT (prompt and preset are `prompt`)."""
    body: dict[str, Any] = {
        "model": model, "temperature": opts.temperature, "top_p": opts.top_p, "max_tokens": opts.max_tokens,
        # llama-server reads repeat_penalty; vLLM and SGLang read repetition_penalty (each ignores the other's name)
        "repeat_penalty": opts.repeat_penalty, "repetition_penalty": opts.repeat_penalty,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image;base64," + base64.b64encode(data).decode()}},
            {"type": "text", "text": prompt.replace("<image>", "").strip()}]}],
    }
    body.update({k: v for k, v in (("seed", opts.seed), ("stop", list(opts.stop) or None)) if v is not None})
    if not opts.loop_guard:  # caprl-local serve honours it; other servers have no guard to turn off
        body["loop_guard"] = False
    if opts.ignore_eos:  # vLLM, SGLang, llama-server and caprl-local serve take it under this name
        body["ignore_eos"] = True
    return body


def _check_sent(opts: GenerationOptions) -> None:
    """CaprlError for an option the requests would not carry, unless it is left at its default."""
    for field in dataclasses.fields(opts):
        if field.name not in SENT and getattr(opts, field.name) != field.default:
            raise CaprlError(f"the endpoints cannot honour option {field.name!r}: the requests to the servers do not "
                             "carry it; leave it at its default")
