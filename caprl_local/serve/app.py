"""An OpenAI-compatible HTTP server on one Captioner (starlette + uvicorn: the ``serve`` extra).

Every request becomes a caption submitted to the Captioner's one decode loop, so concurrent
requests are decoded together, up to its ``parallel``. The rest wait their turn in arrival order,
up to a bound (``queue``), as the bytes they were sent (see admission.py); beyond it the answer is
503 with the expected wait. No thread waits on a request: the decode loop hands each caption's text
to the event loop (see jobs.py). Streamed answers are server-sent events, begun once the caption's
first text is out (so a request that cannot be captioned gets its 4xx, not a broken stream); a
client that goes away, while it waits or while its caption runs, cancels it, and its place and slot
go to the next request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ..errors import CaprlError
from .admission import Admission, Place, stopping
from .chat import Turn
from .jobs import Job, caption_error, in_daemon_thread
from .protocol import (
    ApiError,
    ChatRequest,
    ImagePolicy,
    chunk,
    completion,
    completion_id,
    model_list,
    names_model,
    parse_chat,
    usage,
)
from .server import Server, config, listen, url_host
from .videos import Clip, read_media, video_refusal

if TYPE_CHECKING:  # serve submits captions one by one: the local engine itself, not the batch contract
    import socket

    from ..engine import Captioner

log = logging.getLogger("caprl_local")

#: Requests waiting beyond those decoding, by default (as Ollama's OLLAMA_MAX_QUEUE).
DEFAULT_QUEUE = 512
#: Seconds a client has for a request's head, and again for its body (llama-server allows 600 for both).
DEFAULT_READ_TIMEOUT_S = 60.0
#: Images and videos read at once (a data URI's base64 decoded, a URL fetched when allowed, a video's headers
#: probed), each in a worker thread.
READERS = 4
#: Bodies above this are parsed in a worker thread, so that the event loop keeps serving.
_PARSE_INLINE = 1 << 20


@dataclass(frozen=True)
class ServeOptions:
    """How the server answers: who may call it, how much it takes, what it may read."""

    host: str = "127.0.0.1"
    port: int = 8080
    model_id: str = "caprl"
    api_key: str | None = None
    queue: int = DEFAULT_QUEUE  # requests that may wait beyond the decoding ones; more get 503
    max_body_bytes: int = 32 * 1024 * 1024
    images: ImagePolicy = field(default_factory=ImagePolicy)
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the API ("*": any); none by default
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S


class _Abort:
    """Ends a request's wait early: its client went away, or the server stops."""

    def __init__(self) -> None:
        self.scope = anyio.CancelScope()
        self.why: str | None = None

    def __call__(self, why: str) -> None:
        if self.why is None:
            self.why = why
            self.scope.cancel()


class _State:
    """The app's requests in flight, and how to stop them all."""

    def __init__(self, captioner: Captioner, options: ServeOptions) -> None:
        self.admission = Admission(captioner.parallel, options.queue)
        self.aborts: set[_Abort] = set()
        self.jobs: set[Job] = set()
        self.created = int(time.time())
        # Videos whose frames are read at once, as many as images are decoded; a read whose request has gone
        # runs on in its daemon thread, and keeps its place here until it ends.
        self.video_reads = threading.BoundedSemaphore(self.admission.engine_limit)
        self._limiters: tuple[anyio.CapacityLimiter, anyio.CapacityLimiter] | None = None

    def limiters(self) -> tuple[anyio.CapacityLimiter, anyio.CapacityLimiter]:
        """(image readers, image decoders): made on the event loop, where they live."""
        if self._limiters is None:
            self._limiters = anyio.CapacityLimiter(READERS), anyio.CapacityLimiter(self.admission.engine_limit)
        return self._limiters

    def stop(self) -> None:
        self.admission.stop()
        for abort in list(self.aborts):
            abort("stopping")
        for job in list(self.jobs):
            job.close()


def create_app(captioner: Captioner, options: ServeOptions) -> Starlette:
    """The ASGI app serving `captioner` (which the caller loads, and closes after); ``app.state.stop()``
    answers every request in flight at once (the server calls it as it stops)."""
    state = _State(captioner, options)
    admission = state.admission

    async def health(request: Request) -> Response:
        now = captioner.activity()
        generating = min(now.generating, captioner.parallel)
        ready = max(0, admission.engine - generating)  # decoded (or decoding), waiting for a slot
        return JSONResponse({
            "status": "stopping" if admission.stopping else "ok", "model": options.model_id,
            "slots": captioner.parallel, "generating": generating,
            "waiting": admission.reading + admission.queued + ready, "reading": admission.reading,
            "queued": admission.queued, "queue": admission.limit - admission.slots,
            "expected_wait_s": round(admission.expected_wait(), 1), "tokens": now.tokens})

    async def models(request: Request) -> Response:
        _authorise(request, options.api_key)
        return JSONResponse(model_list(options.model_id, state.created))

    async def one_model(request: Request) -> Response:
        _authorise(request, options.api_key)
        if not names_model(request.path_params["name"], options.model_id):
            raise ApiError(404, f"model {request.path_params['name'][:100]!r} is not served here; this server runs "
                           f"{options.model_id!r}", code="model_not_found", param="model")
        return JSONResponse(model_list(options.model_id, state.created)["data"][0])

    async def chat(request: Request) -> Response:
        _authorise(request, options.api_key)
        place = admission.admit()
        abort, job, handed = _Abort(), None, False
        state.aborts.add(abort)
        try:
            with abort.scope:
                asked = parse_chat(await _json_body(request, options.max_body_bytes, options.read_timeout_s))
                if not names_model(asked.model, options.model_id):
                    raise ApiError(404, f"model {(asked.model or '')[:100]!r} is not served here; this server runs "
                                   f"{options.model_id!r}", code="model_not_found", param="model")
                if videos := [video for message in asked.messages for video in message.videos]:
                    if why := video_refusal(captioner):  # before anything is fetched
                        raise ApiError(400, f"{videos[0].where}: {why}", code="video_unsupported", param="messages")
                readers, decoders = state.limiters()
                turns = await _read_images(asked, options.images, readers)
                asked = dataclasses.replace(asked, messages=())  # a queued request holds the images' bytes only
                job = Job(captioner, turns, asked.options, place, text=asked.stream, gate=state.video_reads)
                state.jobs.add(job)
                async with _watching(request, abort):
                    await place.turn()
                    await job.start(decoders)
                    await (job.first() if asked.stream else job.end())
            if abort.why is not None:
                raise stopping() if abort.why == "stopping" else ApiError(499, "the client went away",
                                                                         code="client_closed")
            assert job is not None
            if asked.stream:
                handed = True  # the place and the job are the stream's now
                return _Stream(_events(job, asked, options.model_id, admission), lambda: _end(state, job, place))
            result = job.result()
            admission.record(result.timings.total_s)
            counts = usage(result.prompt_tokens, result.generated_tokens, result.image_tokens)
            return JSONResponse(completion(completion_id(), options.model_id, result.text, _finish(result), counts,
                                           native_finish_reason=result.finish_reason))
        finally:
            state.aborts.discard(abort)
            if not handed:
                _end(state, job, place)

    app = Starlette(
        routes=[Route("/health", _guarded(health)), Route("/v1/models", _guarded(models)),
                Route("/v1/models/{name:path}", _guarded(one_model)),
                Route("/v1/chat/completions", _guarded(chat), methods=["POST"])],
        middleware=[Middleware(CORSMiddleware, allow_origins=list(options.cors_origins), allow_methods=["GET", "POST"],
                               allow_headers=["*"], expose_headers=["Retry-After"], max_age=600)]
        if options.cors_origins else [],
        exception_handlers={HTTPException: _http_error},
    )
    app.state.stop = state.stop
    return app


def _end(state: _State, job: Job | None, place: Place) -> None:
    """However a request ends: its caption stops if it still runs, and its place is free."""
    if job is not None:
        job.close()
        state.jobs.discard(job)
    place.release()


def _guarded(endpoint: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """The endpoint, answering its ApiErrors, and a bug of ours as one 500 (the traceback to the log, once)."""
    async def guarded(request: Request) -> Response:
        try:
            return await endpoint(request)
        except ApiError as exc:
            return _api_response(exc)
        except Exception as exc:  # noqa: BLE001 - a bug: the client gets one line, the log the traceback
            log.error("unexpected error answering %s %s", request.method, request.url.path, exc_info=exc)
            return _api_response(ApiError(500, f"internal error ({type(exc).__name__})", kind="server_error"))
    return guarded


class _watching:
    """While it waits, a request listens for its client going away (its body is read: the next message
    from the server is the disconnect)."""

    def __init__(self, request: Request, abort: _Abort) -> None:
        self.request, self.abort = request, abort

    async def __aenter__(self) -> None:
        self.task = asyncio.ensure_future(self._watch())

    async def __aexit__(self, *exc: object) -> None:
        self.task.cancel()

    async def _watch(self) -> None:
        try:
            while (await self.request.receive())["type"] != "http.disconnect":
                pass
        except Exception:  # noqa: BLE001 - the connection is in a state we cannot read: leave it to the server
            return
        self.abort("gone")


def _authorise(request: Request, key: str | None) -> None:
    if key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ApiError(401, "missing or wrong API key (send it as 'Authorization: Bearer KEY')",
                       kind="authentication_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


async def _json_body(request: Request, limit: int, timeout_s: float) -> Any:
    """The body as JSON, within `limit` bytes (refused before it is read when announced larger) and
    `timeout_s` seconds in all (a body that drips in is cut off)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    body = bytearray()
    try:
        with anyio.fail_after(timeout_s):
            async for part in request.stream():
                body += part
                if len(body) > limit:
                    raise _too_large(limit)
    except TimeoutError as exc:
        raise ApiError(408, f"the request body took more than {timeout_s:g} s to arrive", code="request_timeout",
                       headers={"Connection": "close"}) from exc
    except ClientDisconnect as exc:
        log.info("a client went away while sending its request")
        raise ApiError(499, "the client went away", code="client_closed") from exc
    if len(body) > _PARSE_INLINE:
        return await anyio.to_thread.run_sync(_parse_json, bytes(body))
    return _parse_json(bytes(body))


def _parse_json(body: bytes) -> Any:
    try:
        return json.loads(body, parse_constant=_not_json)
    except RecursionError as exc:
        raise ApiError(400, "the body nests arrays or objects too deeply", code="invalid_json") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON ({exc})", code="invalid_json") from exc


def _not_json(word: str) -> Any:
    raise ValueError(f"{word} is not a JSON value")


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is over {limit // 1_048_576} MB", code="request_too_large",
                    headers={"Connection": "close"})


async def _read_images(asked: ChatRequest, policy: ImagePolicy,
                       readers: anyio.CapacityLimiter) -> tuple[Turn[Clip], ...]:
    """The conversation with each image's encoded bytes and each video read (see read_media), in a worker thread."""
    try:
        async with readers:
            return await in_daemon_thread(lambda: read_media(asked.messages, policy))
    except CaprlError as exc:
        raise caption_error(exc) from exc


class _Stream(StreamingResponse):
    """A streamed answer whose request ends (caption stopped, place freed) however the response does."""

    def __init__(self, events: AsyncIterator[str], end: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._end = end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._end()


async def _events(job: Job, asked: ChatRequest, model: str, admission: Admission) -> AsyncIterator[str]:
    """The streamed answer as server-sent events; a caption stopped midway ends it with an error event."""
    cid = completion_id()
    yield _sse(chunk(cid, model, {"role": "assistant", "content": ""}))
    while (piece := await job.next_piece()) is not None:
        yield _sse(chunk(cid, model, {"content": piece}))
    try:
        result = job.result()
    except ApiError as exc:
        yield _sse(exc.body())
        return
    admission.record(result.timings.total_s)
    yield _sse(chunk(cid, model, {}, _finish(result), native_finish_reason=result.finish_reason))
    if asked.include_usage:
        yield _sse(chunk(cid, model, {}, counts=usage(result.prompt_tokens, result.generated_tokens, result.image_tokens)))
    yield "data: [DONE]\n\n"


def _finish(result: Any) -> str:
    """OpenAI's finish reasons: a caption the loop guard ended stopped of its own accord."""
    return "stop" if result.finish_reason == "repetition" else str(result.finish_reason)


def _sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def _api_response(exc: ApiError) -> Response:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    what = {404: "no such route", 405: f"method not allowed (allowed: {(exc.headers or {}).get('Allow', '')})"}
    return _api_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: "
                                  f"{what.get(exc.status_code, exc.detail)}",
                                  code={404: "not_found", 405: "method_not_allowed"}.get(exc.status_code),
                                  headers=dict(exc.headers or {})))


def serve(captioner: Captioner, options: ServeOptions, *, sock: socket.socket | None = None,
          on_ready: Callable[[str], None] | None = None) -> None:
    """Serve until Ctrl-C or SIGTERM, on `sock` if given (see :func:`listen`: bind it before the model
    loads), else on options.host and port; requests in flight are answered on the way out."""
    sock = sock if sock is not None else listen(options.host, options.port)
    app = create_app(captioner, options)
    server = Server(config(app, options.read_timeout_s), captioner, app.state.stop)
    if on_ready is not None:
        startup = server.startup

        async def announce(sockets: Any = None) -> None:
            await startup(sockets)
            if server.started:
                on_ready(f"http://{url_host(options.host)}:{sock.getsockname()[1]}/v1")

        server.startup = announce  # type: ignore[method-assign]
    try:
        server.run(sockets=[sock])
    except SystemExit as exc:  # uvicorn's way to report a failed start
        raise CaprlError(f"the server could not start on {url_host(options.host)}:{options.port}") from exc
    finally:
        captioner.cancel()
        sock.close()
