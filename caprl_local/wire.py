"""What a fleet client says to one OpenAI-compatible server, and what it takes from the answers.

Pure but for the HTTP exchange itself: the image as the local engine would see it (upright, flattened,
at the family's grid, as a PNG so that its pixels survive) or a video clip's own bytes, the request under
the names every server honours, and each answer sorted into what it is: a caption, this image's failure,
a busy server, a faulty one, one that refuses us, or one out of reach. Nothing a server says is trusted:
each field is checked and bounded before use, and its text is escaped before it reaches a message.
"""

from __future__ import annotations

import base64
import io
import json
import math
import secrets
import time
from dataclasses import dataclass
from typing import Any, Literal

import urllib3

from .budgets import ImageBudget, TiledBudget
from .loopguard import cut_text, cut_tokens
from .options import GenerationOptions
from .printable import printable
from .prompts import IMAGE_PLACEHOLDER
from .results import Timings

#: The most bytes read of one answer (a caption with its tokens' logprobs is well under a megabyte).
MAX_ANSWER_BYTES = 16 * 1024 * 1024
#: As engine/session.py: the repeat penalty looks at this many tokens (llama-server's own default is 64).
REPEAT_LAST_N = 256
#: What llama-server calls the samplers the engine chains (penalties, then greedy or top-p and temperature).
GREEDY_SAMPLERS, SAMPLING_SAMPLERS = ["penalties", "top_k"], ["penalties", "top_p", "temperature"]
#: The servers a probe recognises (by the ``owned_by`` of their model list), and those known to name each
#: generated token when asked (``logprobs``), so that the loop guard can cut exactly where the engine's would.
KINDS = {"caprl-local": "caprl-local", "llamacpp": "llama-server", "vllm": "vLLM", "sglang": "SGLang"}
NAMES_TOKENS = frozenset({"llama-server", "vLLM", "SGLang"})
#: The servers whose API has no video input (llama-server's chat completions take images and audio only).
NO_VIDEO = frozenset({"llama-server"})
#: A chat template for the servers (llama-server's --chat-template-file, vLLM's and SGLang's --chat-template) that
#: lays a caption out as the local engine does: ChatML with no system turn (a Qwen-VL model's own template adds
#: "You are a helpful assistant."), the image and the prompt's text run together (llama-server's --no-jinja
#: route would put a newline between them).
NO_SYSTEM_TEMPLATE = """\
{%- for message in messages %}<|im_start|>{{ message['role'] }}
{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}\
{% if part['type'] in ('image', 'image_url') %}<|vision_start|><|image_pad|><|vision_end|>\
{% elif part['type'] in ('video', 'video_url') %}<|vision_start|><|video_pad|><|vision_end|>\
{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>
{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""
#: Connection errors are retried once (the request never left); nothing is re-sent once it did.
_RETRY = urllib3.Retry(total=None, connect=1, read=False, status=0, other=0, redirect=False, raise_on_status=False,
                       backoff_factor=0.2)

FinishReason = Literal["stop", "length", "repetition"]


class Answer(Exception):
    """An answer that is not a caption; its message is one line about the endpoint, for a CaptionFailure."""


class Rejected(Answer):
    """The server refused this image or request (4xx): the image's failure; no other server is asked."""


class Faulty(Answer):
    """The server took the request and failed it (5xx, garbage, a hang, a dropped connection): asked elsewhere."""


class Busy(Answer):
    """The server says it is busy (429, 503): ask it later, after ``retry_after_s`` if it said."""

    def __init__(self, message: str, retry_after_s: float | None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Refused(Answer):
    """The server refuses us (the key, the model or the URL is wrong): nothing will work there."""


class Unreachable(Answer):
    """The request never reached the server (connection refused, no such host)."""


class Unsupported(Answer):
    """The server cannot take this kind of input (a video on llama-server): never sent, and no fault of it."""


@dataclass(frozen=True)
class Server:
    """What a probe learnt of one endpoint."""

    model: str  # the model it lists first, or the one asked for
    slots: int | None  # the captions it decodes at once, where it says
    kind: str  # one of KINDS' values, or "" for a server it does not recognise

    @property
    def guards_loops(self) -> bool:
        """It ends a looping caption itself, as the local engine does (caprl-local serve)."""
        return self.kind == "caprl-local"

    @property
    def takes_video(self) -> bool:
        """Its API has a video input (one it does not recognise is given the chance)."""
        return self.kind not in NO_VIDEO


@dataclass(frozen=True)
class Reply:
    """A caption as a server answered it, checked, with the loop guard applied."""

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    image_tokens: int
    generated_tokens: int
    model: str | None  # the model the answer names
    timings: Timings


@dataclass(frozen=True)
class Clip:
    """A video clip for a request: its bytes as read (bounded by the caller), their media type, and the
    frame sampling asked of the servers that take it per request."""

    data: bytes
    media_type: str  # video/mp4, video/webm, ...
    fps: float
    max_frames: int


def prepare_image(name: str, budget: ImageBudget | TiledBudget) -> tuple[bytes, float]:
    """The image file as the local engine would see it, as PNG bytes, and the seconds that took (ImageError)."""
    started = time.perf_counter()
    rgb = budget.prepare(name)
    out = io.BytesIO()
    rgb.save(out, "PNG", compress_level=1)  # lossless: the server sees the engine's pixels; level 1 is fast
    return out.getvalue(), time.perf_counter() - started


def request_body(server: Server, media: bytes | Clip, prompt: str, opts: GenerationOptions) -> bytes:
    """The chat-completions request (JSON bytes) for one image (PNG bytes) or video clip, every caption option
    and sampling hint under each server's name for it."""
    token = secrets.token_hex(16)  # stands for the media's data URL until the body is encoded (see below)
    kind = "video_url" if isinstance(media, Clip) else "image_url"
    part = {"type": kind, kind: {"url": token}}
    before, mark, after = prompt.partition(IMAGE_PLACEHOLDER)  # as the engine: the media there, else first
    parts = [before, part, after] if mark else [part, prompt]
    content = [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts if p]
    body: dict[str, Any] = {
        "model": server.model, "messages": [{"role": "user", "content": content}], "stream": False,
        "max_tokens": opts.max_tokens, "temperature": opts.temperature, "top_p": opts.top_p,
        # vLLM and SGLang read repetition_penalty, llama-server repeat_penalty and its window (each ignores the other's)
        "repetition_penalty": opts.repeat_penalty, "repeat_penalty": opts.repeat_penalty, "repeat_last_n": REPEAT_LAST_N,
    }
    if opts.temperature == 0:  # greedy, as the engine: the likeliest token only, whatever else a server applies
        body["top_k"] = 1
    if server.kind == "llama-server":  # the engine's sampler chain, in its order (no min_p, no top_k of 40)
        body["samplers"] = GREEDY_SAMPLERS if opts.temperature == 0 else SAMPLING_SAMPLERS
    if opts.seed is not None:
        body["seed"] = opts.seed
    if opts.stop:
        body["stop"] = list(opts.stop)
    if opts.ignore_eos:  # vLLM, SGLang, llama-server and caprl-local serve take it under this name
        body["ignore_eos"] = True
    if not opts.loop_guard:  # caprl-local serve's own switch; other servers have no guard to turn off
        body["loop_guard"] = False
    elif not opts.ignore_eos and server.kind in NAMES_TOKENS and not server.guards_loops:
        body["logprobs"], body["top_logprobs"] = True, 1  # each token named, for the loop guard here
    if isinstance(media, Clip) and server.kind == "vLLM":
        # vLLM's frame reader takes a rate and a most per request (merged over its --media-io-kwargs), and
        # Qwen-VL's processor the rate the frames were taken at; caprl-local serve samples as its own options
        # say, and SGLang names no such option.
        body["media_io_kwargs"] = {"video": {"fps": media.fps, "num_frames": media.max_frames}}
        body["mm_processor_kwargs"] = {"fps": media.fps}
    # The media goes in as bytes: a clip's base64 is never copied into a JSON string and out again (base64's
    # characters need no escaping in JSON, and no other text holds a random token).
    head, tail = json.dumps(body).encode().split(token.encode(), 1)
    data = media.data if isinstance(media, Clip) else media
    scheme = f"data:{media.media_type};base64," if isinstance(media, Clip) else "data:image/png;base64,"
    return b"".join((head, scheme.encode(), base64.b64encode(data), tail))


def read_reply(status: int, headers: Any, data: bytes, server: Server, opts: GenerationOptions) -> Reply:
    """The caption in an answer, or the Answer it is instead (see the classes above)."""
    if status != 200:
        raise _not_ok(status, headers, data)
    try:
        answer = json.loads(data)
    except (ValueError, RecursionError):
        raise Faulty(f"answered HTTP 200 with {_what(data)}, not a chat completion") from None
    choice = _first_choice(answer)
    message = choice.get("message")
    text = message.get("content") if isinstance(message, dict) else None
    if not isinstance(text, str):
        raise Faulty("answered HTTP 200 with a choice that holds no message text")
    finish = choice.get("finish_reason")
    if finish in ("abort", "error", "cancelled"):
        raise Faulty(f"answered HTTP 200 with an unfinished caption (finish_reason {printable(finish, limit=40)!r})")
    usage: dict[str, Any] = answer["usage"] if isinstance(answer.get("usage"), dict) else {}
    details: dict[str, Any] = usage["prompt_tokens_details"] if isinstance(usage.get("prompt_tokens_details"), dict) \
        else {}
    generated = _count(usage.get("completion_tokens"))
    native = choice.get("native_finish_reason")  # a server's own reason beside OpenAI's (as OpenRouter names it)
    if native in ("stop", "length", "repetition"):
        finish = native
    reason: FinishReason = "length" if finish == "length" else "repetition" if finish == "repetition" else "stop"
    text = text.strip()
    if opts.loop_guard and not opts.ignore_eos and not server.guards_loops:
        cut = _cut(choice, text)
        if cut is not None:
            text, reason = cut[0], "repetition"
            generated = cut[1] or generated
    model = answer.get("model")
    return Reply(text=text, finish_reason=reason, prompt_tokens=_count(usage.get("prompt_tokens")),
                 image_tokens=_count(usage.get("image_tokens", details.get("image_tokens"))),
                 generated_tokens=generated, model=printable(model, limit=200) if isinstance(model, str) else None,
                 timings=_timings(answer.get("timings")))


def probe_models(status: int, data: bytes, asked: str | None) -> tuple[str, str]:
    """(the model to ask for, the server's kind) from a GET /models answer, or the Answer it is instead."""
    if status != 200:
        raise _not_ok(status, {}, data, listing=True)
    try:
        answer = json.loads(data)
    except (ValueError, RecursionError):
        raise Faulty(f"answered GET /models with {_what(data)}, not a model list") from None
    listed = answer.get("data") if isinstance(answer, dict) else None
    first = listed[0] if isinstance(listed, list) and listed and isinstance(listed[0], dict) else {}
    name, owner = first.get("id"), first.get("owned_by")
    kind = KINDS.get(owner, "") if isinstance(owner, str) else ""
    if asked:
        return asked, kind
    if not isinstance(name, str) or not name.strip() or len(name) > 512:
        raise Faulty("lists no model at GET /models; name the model to ask for")
    return name, kind


def slots_of(data: bytes, key: str) -> int | None:
    """The captions a server decodes at once, from llama-server's /props (total_slots) or caprl-local serve's
    /health (slots), where it says; bounded."""
    try:
        value = json.loads(data).get(key)
    except (ValueError, RecursionError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 4096 else None


def exchange(http: urllib3.PoolManager, method: str, url: str, headers: dict[str, str], body: bytes | None, *,
             timeout_s: float, connect_s: float) -> tuple[int, Any, bytes]:
    """One HTTP request with a deadline: (status, headers, body). Never re-sent once it may have reached the
    server; Unreachable when it did not, Faulty for a hang ("timed out after N s") or a dropped answer."""
    deadline = time.monotonic() + timeout_s
    try:
        response = http.request(method, url, body=body, headers=headers, preload_content=False, retries=_RETRY,
                                redirect=False, timeout=urllib3.Timeout(connect=min(connect_s, timeout_s), read=timeout_s))
    except urllib3.exceptions.MaxRetryError as exc:  # the connection retries ran out
        raise _failed(exc.reason or exc, timeout_s) from exc
    except urllib3.exceptions.HTTPError as exc:
        raise _failed(exc, timeout_s) from exc
    try:
        chunks, size = [], 0
        while True:
            sock = getattr(getattr(response, "connection", None), "sock", None)
            if sock is not None:  # each read waits only as long as the request has left
                sock.settimeout(max(0.05, deadline - time.monotonic()))
            chunk = response.read(65536)
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_ANSWER_BYTES:
                raise Faulty(f"answered with more than {MAX_ANSWER_BYTES // (1024 * 1024)} MB")
            if time.monotonic() > deadline:
                raise Faulty(f"timed out after {timeout_s:g} s")
            chunks.append(chunk)
    except urllib3.exceptions.HTTPError as exc:
        response.close()  # a half-read answer: its connection is not reused
        raise _failed(exc, timeout_s) from exc
    except Faulty:
        response.close()
        raise
    finally:
        response.release_conn()
    return response.status, response.headers, b"".join(chunks)


def _failed(exc: BaseException, timeout_s: float) -> Answer:
    if isinstance(exc, urllib3.exceptions.ReadTimeoutError):
        return Faulty(f"timed out after {timeout_s:g} s")
    if isinstance(exc, (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError,
                        urllib3.exceptions.NameResolutionError, ConnectionRefusedError)):
        return Unreachable(f"cannot reach it ({_why(exc)})")
    return Faulty(f"dropped the connection before answering ({_why(exc)})")


def _why(exc: BaseException) -> str:
    text = str(exc).rsplit(": ", 1)[-1] if str(exc) else type(exc).__name__
    return printable(text, limit=120)


def _not_ok(status: int, headers: Any, data: bytes, *, listing: bool = False) -> Answer:
    said = _message(data)
    what = f"HTTP {status}" + (f": {said}" if said else "")
    if status in (429, 503):
        return Busy(f"is busy ({what})", _retry_after(headers))
    if status in (401, 403):
        return Refused(f"refuses the key ({what}); give the right API key")
    if status in (404, 405):
        return Refused(f"answered {what}; check the URL (it ends in /v1) and the model name")
    if 400 <= status < 500 and status not in (408, 409, 421, 425) and not listing:
        return Rejected(f"answered {what}")
    return Faulty(f"answered {what}")


def _message(data: bytes) -> str:
    """The error message of an answer's body (OpenAI's shape, or its text), escaped and short."""
    try:
        answer = json.loads(data)
    except (ValueError, RecursionError):
        return printable(data[:200].decode("utf-8", "replace"), limit=200) if data.strip() else ""
    error = answer.get("error") if isinstance(answer, dict) else None
    said = error.get("message") if isinstance(error, dict) else error if isinstance(error, str) else None
    if said is None and isinstance(answer, dict):
        said = answer.get("message") or answer.get("detail")
    return printable(said, limit=300) if isinstance(said, str) else ""


def _retry_after(headers: Any) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    try:
        seconds = float(value) if value is not None else None
    except ValueError:  # an HTTP date: a wait of our own choosing instead
        return None
    return seconds if seconds is not None and math.isfinite(seconds) and seconds >= 0 else None


def _what(data: bytes) -> str:
    """What an answer that is not JSON looks like, for a message."""
    if not data.strip():
        return "an empty body"
    if data.lstrip()[:1] == b"<":
        return "HTML"
    return f"{len(data)} bytes that are not JSON"


def _first_choice(answer: Any) -> dict[str, Any]:
    if not isinstance(answer, dict):
        raise Faulty("answered HTTP 200 with JSON that is not an object")
    if isinstance(answer.get("error"), (dict, str)):  # some proxies answer errors with status 200
        raise Faulty(f"answered HTTP 200 with an error: {_message(json.dumps(answer).encode()) or 'unnamed'}")
    choices = answer.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise Faulty("answered HTTP 200 without a choice (\"choices\" is missing or empty)")
    return choices[0]


def _cut(choice: dict[str, Any], text: str) -> tuple[str, int] | None:
    """The loop guard over a caption: its tokens where the answer names them, else its text."""
    logprobs = choice.get("logprobs")
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if isinstance(content, list) and content and all(isinstance(t, dict) for t in content):
        pieces, ids = [], []
        for token in content:
            raw, name, number = token.get("bytes"), token.get("token"), token.get("id")
            if isinstance(raw, list) and all(isinstance(b, int) and 0 <= b < 256 for b in raw):
                piece = bytes(raw)
            elif isinstance(name, str):
                piece = name.encode("utf-8", "surrogatepass")
            else:
                break
            pieces.append(piece)
            ids.append(number if isinstance(number, int) and not isinstance(number, bool) else piece)
        else:
            return cut_tokens(pieces, ids)
    cut = cut_text(text)
    return None if cut is None else (cut, 0)


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 31 else 0


def _seconds(timings: dict[str, Any], key: str) -> float:
    value = timings.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return 0.0
    return float(value) if 0 <= value < 1e9 else 0.0


def _timings(timings: Any) -> Timings:
    """llama-server's ``timings`` (milliseconds) as the engine's; zeros for what a server does not say."""
    t = timings if isinstance(timings, dict) else {}
    prompt_s, gen_s = _seconds(t, "prompt_ms") / 1000, _seconds(t, "predicted_ms") / 1000
    return Timings(image_load_s=0.0, image_encode_s=0.0, prompt_eval_s=prompt_s, generation_s=gen_s,
                   total_s=prompt_s + gen_s, prompt_tokens_per_s=_seconds(t, "prompt_per_second"),
                   generation_tokens_per_s=_seconds(t, "predicted_per_second"))
