"""An OpenAI-compatible HTTP server on one Captioner (starlette + uvicorn: the ``serve`` extra).

Every request becomes a caption submitted to the Captioner's one decode loop, so concurrent
requests are decoded together, up to its ``parallel``; a bounded number more wait, and beyond
that the answer is 503. Streamed answers are server-sent events; a client that goes away
cancels its caption, and its slot takes the next request at the next step.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import Cancelled, CaprlError, ImageError
from .protocol import (
    ApiError,
    ChatRequest,
    ImagePolicy,
    chunk,
    completion,
    completion_id,
    image_bytes,
    model_list,
    names_model,
    parse_chat,
    usage,
)

if TYPE_CHECKING:  # serve submits captions one by one: the local engine itself, not the batch contract
    from ..engine import Captioner, CaptionHandle

log = logging.getLogger("caprl_local")


@dataclass(frozen=True)
class ServeOptions:
    """How the server answers: who may call it, how much it takes, what it may read."""

    host: str = "127.0.0.1"
    port: int = 8080
    model_id: str = "caprl"
    api_key: str | None = None
    queue: int | None = None  # requests waiting beyond the decoding ones; None: as many as decode at once
    max_body_bytes: int = 32 * 1024 * 1024
    images: ImagePolicy = field(default_factory=ImagePolicy)


class _State:
    def __init__(self, captioner: Captioner, options: ServeOptions) -> None:
        self.capacity = captioner.parallel + (captioner.parallel if options.queue is None else options.queue)
        self.taken = 0  # requests admitted and not yet answered: decoding, waiting, or reading their image
        self.lock = threading.Lock()  # released from worker threads and finalizers too
        self.created = int(time.time())

    def admit(self) -> _Ticket:
        """A place for one more request, or 503 when every place is taken."""
        with self.lock:
            if self.taken >= self.capacity:
                raise ApiError(503, f"{self.taken} requests are in progress or waiting; try again shortly",
                               kind="server_busy", code="queue_full", headers={"Retry-After": "1"})
            self.taken += 1
        return _Ticket(self)


class _Ticket:
    """One admitted request's place; given back once, however the request ends."""

    def __init__(self, state: _State) -> None:
        self.state, self.held = state, True

    def release(self) -> None:
        with self.state.lock:
            if self.held:
                self.held = False
                self.state.taken -= 1


def create_app(captioner: Captioner, options: ServeOptions) -> Starlette:
    """The ASGI app serving `captioner` (which the caller loads, and closes after)."""
    state = _State(captioner, options)

    async def health(request: Request) -> Response:
        now = captioner.activity()
        return JSONResponse({"status": "ok", "model": options.model_id, "generating": now.generating,
                             "waiting": now.waiting, "tokens": now.tokens, "slots": captioner.parallel})

    async def models(request: Request) -> Response:
        _authorise(request, options.api_key)
        return JSONResponse(model_list(options.model_id, state.created))

    async def chat(request: Request) -> Response:
        _authorise(request, options.api_key)
        asked = parse_chat(await _json_body(request, options.max_body_bytes))
        if not names_model(asked.model, options.model_id):
            raise ApiError(404, f"model {asked.model!r} is not served here; this server runs {options.model_id!r}",
                           code="model_not_found")
        ticket = state.admit()
        streaming = False
        try:
            handle = await _submit(captioner, asked, options.images)
            if asked.stream:
                events = _events(handle, asked, completion_id(), options.model_id, ticket)
                # However the response ends (even before its first byte), the caption stops and the place is freed.
                weakref.finalize(events, _end, handle, ticket)
                streaming = True  # the place is the stream's now
                return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            result = await _finished(handle, request)
        finally:
            if not streaming:
                ticket.release()
        counts = usage(result.prompt_tokens, result.generated_tokens)
        return JSONResponse(completion(completion_id(), options.model_id, result.text, _finish(result), counts))

    return Starlette(
        routes=[Route("/health", health), Route("/v1/models", models),
                Route("/v1/chat/completions", chat, methods=["POST"])],
        exception_handlers={ApiError: _api_error, HTTPException: _http_error, Exception: _unexpected},
    )


def _authorise(request: Request, key: str | None) -> None:
    if key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ApiError(401, "missing or wrong API key (send it as 'Authorization: Bearer KEY')",
                       kind="authentication_error", code="invalid_api_key")


async def _json_body(request: Request, limit: int) -> Any:
    """The body as JSON, refused with 413 once it passes `limit` bytes (before reading it all)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise _too_large(limit)
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON ({exc})", code="invalid_json") from exc


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is over {limit // 1_048_576} MB (see --max-body-mb)",
                    code="request_too_large")


async def _submit(captioner: Captioner, asked: ChatRequest, policy: ImagePolicy) -> CaptionHandle:
    """Fetch and read the image (in a worker thread: both may take a while) and submit the caption."""
    def start() -> CaptionHandle:
        data = image_bytes(asked.image_url, policy)
        return captioner.submit(data, **_options(asked))

    try:
        return await anyio.to_thread.run_sync(start)
    except ImageError as exc:
        raise ApiError(400, f"the image: {str(exc).split(': ', 1)[-1]}", code="invalid_image") from exc
    except CaprlError as exc:  # the captioner is closing
        raise ApiError(503, str(exc), kind="server_error", code="unavailable") from exc


def _options(asked: ChatRequest) -> dict[str, Any]:
    """The request's caption options as the captioner takes them (no prompt: the model's own)."""
    given = dataclasses.asdict(asked.options)
    return {k: v for k, v in given.items() if k != "preset" and not (k == "prompt" and v is None)}


async def _next_piece(pieces: Any) -> str | None:
    """The next piece of text, None at the end. The handle's pieces come from a queue the decode
    loop fills: wait for them in a worker thread."""
    return await anyio.to_thread.run_sync(_take, pieces, abandon_on_cancel=True)


def _take(pieces: Any) -> str | None:
    try:
        return next(pieces, None)
    except CaprlError:  # the caption failed or was cancelled: the end, which result() tells
        return None


async def _finished(handle: Any, request: Request) -> Any:
    """The caption, cancelled if the client goes away while it waits."""
    gone = False
    async with anyio.create_task_group() as group:
        async def watch() -> None:
            nonlocal gone
            while not await request.is_disconnected():
                await anyio.sleep(0.25)
            gone = True
            handle.cancel()
            group.cancel_scope.cancel()

        group.start_soon(watch)
        await anyio.to_thread.run_sync(_wait, handle, abandon_on_cancel=True)
        group.cancel_scope.cancel()
    if gone:
        raise ApiError(499, "the client went away", code="client_closed")
    try:
        return handle.result()
    except Cancelled as exc:
        raise ApiError(503, "the server is stopping", kind="server_error", code="unavailable") from exc
    except CaprlError as exc:
        raise ApiError(500, str(exc), kind="server_error", code="caption_failed") from exc


def _wait(handle: Any) -> None:
    try:
        handle.result()
    except BaseException:  # noqa: BLE001 - told by the caller, which asks again
        pass


async def _events(handle: Any, asked: ChatRequest, cid: str, model: str, ticket: _Ticket) -> AsyncIterator[str]:
    """The streamed answer as server-sent events; closed early (the client went away), it cancels."""
    pieces = iter(handle)
    try:
        yield _sse(chunk(cid, model, {"role": "assistant", "content": ""}))
        while (piece := await _next_piece(pieces)) is not None:
            yield _sse(chunk(cid, model, {"content": piece}))
        try:
            result = await anyio.to_thread.run_sync(handle.result)
        except Cancelled:
            yield _sse(ApiError(503, "the caption was cancelled: the server is stopping", kind="server_error",
                                code="unavailable").body())
            return
        except CaprlError as exc:
            yield _sse(ApiError(500, str(exc), kind="server_error", code="caption_failed").body())
            return
        yield _sse(chunk(cid, model, {}, _finish(result)))
        if asked.include_usage:
            yield _sse(chunk(cid, model, {}, counts=usage(result.prompt_tokens, result.generated_tokens)))
        yield "data: [DONE]\n\n"
    finally:
        _end(handle, ticket)  # if the client is gone, its slot goes to the next request at the next step


def _end(handle: Any, ticket: _Ticket) -> None:
    if not handle.done():
        handle.cancel()
    ticket.release()


def _finish(result: Any) -> str:
    """OpenAI's finish reasons: a caption the loop guard ended stopped of its own accord."""
    return "stop" if result.finish_reason == "repetition" else str(result.finish_reason)


def _sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    what = "no such route" if exc.status_code == 404 else exc.detail
    return await _api_error(request, ApiError(exc.status_code, f"{request.method} {request.url.path}: {what}",
                                              code="not_found" if exc.status_code == 404 else None))


async def _unexpected(request: Request, exc: Exception) -> Response:
    # A bug of ours: the client gets one line, the log gets the traceback, the server goes on.
    log.error("unexpected error answering %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse(ApiError(500, f"internal error ({type(exc).__name__})", kind="server_error").body(),
                        status_code=500)


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, captioner: Captioner) -> None:
        super().__init__(config)
        self.captioner = captioner

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.captioner.cancel()  # captions in flight end now, so their requests answer and close
        super().handle_exit(sig, frame)
        # uvicorn raises the signal again once it has shut down; here a stop is the command's
        # normal end (exit 0), so it is not passed on.
        getattr(self, "_captured_signals", []).clear()


def serve(captioner: Captioner, options: ServeOptions, *, on_ready: Callable[[str], None] | None = None) -> None:
    """Serve until Ctrl-C or SIGTERM; captions in flight are cancelled on the way out."""
    config = uvicorn.Config(create_app(captioner, options), host=options.host, port=options.port,
                            log_level="warning", lifespan="off", timeout_graceful_shutdown=5)
    server = _Server(config, captioner)
    if on_ready is not None:
        startup = server.startup

        async def announce(sockets: Any = None) -> None:
            await startup(sockets)
            if server.started:
                port = next((s.getsockname()[1] for srv in server.servers for s in srv.sockets), options.port)
                on_ready(f"http://{options.host}:{port}/v1")

        server.startup = announce  # type: ignore[method-assign]
    try:
        server.run()
    finally:
        captioner.cancel()
