"""The OpenAI chat-completions protocol, as far as a captioner speaks it: requests in, bodies out.

Pure: no web framework, no llama.cpp. A request becomes a typed :class:`ChatRequest`, or an
:class:`ApiError` that the app answers with OpenAI's error shape; images named by URL are
fetched only as the :class:`ImagePolicy` allows.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CaprlError
from ..options import GenerationOptions

MAX_STOP = 4  # as OpenAI's API


class ApiError(Exception):
    """A request that gets an error answer: HTTP status, message, OpenAI's error type and code."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.headers = status, message, kind, code, headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "code": self.code, "param": None}}


@dataclass(frozen=True)
class ImagePolicy:
    """Where images named by URL may come from. Servers fetch nothing unless told: a server that
    fetches any URL it is sent lets its clients reach whatever it can reach."""

    allow_remote: bool = False
    local_dir: Path | None = None  # file paths (and file:// URLs) under this folder only
    max_bytes: int = 20_000_000
    timeout_s: float = 15.0


@dataclass(frozen=True)
class ChatRequest:
    """What a chat-completions request asks of the captioner."""

    image_url: str
    options: GenerationOptions  # prompt None: the model's own caption prompt
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the token counts
    model: str | None = None


def parse_chat(body: Any) -> ChatRequest:
    """Check a request body and turn it into a ChatRequest; ApiError(400) says what is wrong."""
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", code="invalid_messages")
    user = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not user:
        raise ApiError(400, "no user message: send one with an image_url part", code="invalid_messages")
    texts, images = _parts(user[-1].get("content"))
    if not images:
        raise ApiError(400, "the user message has no image: this server captions images (send an image_url part)",
                       code="no_image")
    if len(images) > 1:
        raise ApiError(400, f"one image per request, not {len(images)}", code="too_many_images")
    n = body.get("n", 1)
    if n != 1:
        raise ApiError(400, "only n=1 is supported", code="unsupported_n")
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or len(stop) > MAX_STOP:
        raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOP} strings", code="invalid_stop")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    text = "\n".join(t for t in texts if t.strip()).strip()
    options: dict[str, Any] = {"prompt": text or None, "stop": tuple(stop)}
    # ignore_eos (as vLLM and llama-server take it): a fixed caption length, for benchmarks; loop_guard: ours
    for name, value in (("max_tokens", max_tokens), ("temperature", body.get("temperature")),
                        ("top_p", body.get("top_p")), ("seed", body.get("seed")), ("ignore_eos", body.get("ignore_eos")),
                        ("loop_guard", body.get("loop_guard")),
                        # llama-server's name, and vLLM's (the CapRL card's)
                        ("repeat_penalty", body.get("repeat_penalty", body.get("repetition_penalty")))):
        if value is not None:
            options[name] = value
    try:
        generation = GenerationOptions(**options)
    except (CaprlError, TypeError) as exc:
        raise ApiError(400, str(exc), code="invalid_parameter") from exc
    stream_options = body.get("stream_options") or {}
    return ChatRequest(image_url=images[0], options=generation, stream=bool(body.get("stream", False)),
                       include_usage=bool(isinstance(stream_options, dict) and stream_options.get("include_usage")),
                       model=body.get("model") if isinstance(body.get("model"), str) else None)


def _parts(content: Any) -> tuple[list[str], list[str]]:
    """A message's text parts and image URLs."""
    if isinstance(content, str):
        return [content], []
    if not isinstance(content, list):
        raise ApiError(400, "a message's content must be a string or a list of parts", code="invalid_content")
    texts, images = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url:
                raise ApiError(400, "an image_url part needs a url", code="invalid_image_url")
            images.append(url)
        else:
            raise ApiError(400, f"unsupported content part {kind!r} (text and image_url are)", code="invalid_content")
    return texts, images


_DATA_URI = re.compile(r"data:(?:image(?:/[\w.+-]+)?)?(?:;[\w=.+-]+)*;base64,(.*)", re.S | re.I)


def image_bytes(url: str, policy: ImagePolicy) -> bytes:
    """The encoded image a URL names: a base64 data URI (``data:image;base64,...`` too, as CapRL's
    own client sends), an http(s) URL if remote images are allowed, a path under the allowed folder."""
    if url.startswith("data:"):
        match = _DATA_URI.fullmatch(url.strip())
        if match is None:
            raise ApiError(400, "a data URI must be base64 (data:image/...;base64,...)", code="invalid_image_url")
        try:
            data = base64.b64decode(match.group(1), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ApiError(400, f"the image's base64 is invalid ({exc})", code="invalid_image") from exc
        if len(data) > policy.max_bytes:
            raise ApiError(413, f"the image is over {policy.max_bytes:,} bytes", code="image_too_large")
        return data
    if url.startswith(("http://", "https://")):
        if not policy.allow_remote:
            raise ApiError(400, "this server does not fetch image URLs (remote images are off); send the image "
                           "as a base64 data URI", code="remote_images_disabled")
        return _fetch(url, policy)
    return _local(url, policy)


def _fetch(url: str, policy: ImagePolicy) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=policy.timeout_s) as response:  # noqa: S310 - http(s) only, above
            data = response.read(policy.max_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ApiError(400, f"cannot fetch the image at {url} ({getattr(exc, 'reason', exc)})",
                       code="image_fetch_failed") from exc
    if len(data) > policy.max_bytes:
        raise ApiError(413, f"the image at {url} is over {policy.max_bytes:,} bytes", code="image_too_large")
    return data


def _local(url: str, policy: ImagePolicy) -> bytes:
    path = Path(url.removeprefix("file://"))
    if policy.local_dir is None:
        raise ApiError(400, "image URLs must be base64 data URIs here", code="invalid_image_url")
    resolved, allowed = path.resolve(), policy.local_dir.resolve()
    if not resolved.is_relative_to(allowed):
        raise ApiError(403, f"{url}: not under the folder this server may read", code="path_not_allowed")
    try:
        data = resolved.read_bytes()
    except OSError as exc:
        raise ApiError(400, f"{url}: cannot read it ({exc.strerror or exc})", code="invalid_image_url") from exc
    return data


# --- answers ----------------------------------------------------------------------------------


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(cid: str, model: str, text: str, finish_reason: str, counts: dict[str, int]) -> dict[str, Any]:
    """A whole (non-streamed) chat completion."""
    return {
        "id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
                     "logprobs": None}],
        "usage": counts,
    }


def chunk(cid: str, model: str, delta: dict[str, Any], finish_reason: str | None = None,
          counts: dict[str, int] | None = None) -> dict[str, Any]:
    """One server-sent event of a streamed completion (the last, with usage, has no choices)."""
    body: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
                            "choices": [] if counts is not None and not delta and finish_reason is None else
                            [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
    if counts is not None:
        body["usage"] = counts
    return body


def model_list(model_id: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                        "owned_by": "caprl-local"}]}


def names_model(requested: str | None, served: str) -> bool:
    """Whether a request's "model" names the one this server runs: its id, or any spelling of it
    clients use (a Hub repo such as ``internlm/CapRL-3B``, a path, a file name, any case)."""
    if not requested:
        return True
    base = re.sub(r"\.gguf$", "", requested.rstrip("/").rsplit("/", 1)[-1], flags=re.I).lower()
    return base.startswith(served.lower()) or served.lower().startswith(base)
