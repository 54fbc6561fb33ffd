"""The OpenAI chat-completions protocol, as far as a captioner speaks it: requests in, bodies out.

Pure: no web framework, no llama.cpp. A request becomes a typed :class:`ChatRequest`, or an
:class:`ApiError` that the app answers with OpenAI's error shape; images named by URL are
fetched only as the :class:`ImagePolicy` allows.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import CaprlError
from ..options import GenerationOptions
from .sources import ImagePolicy, image_bytes  # noqa: F401 - where images come from; importers find them here too

if TYPE_CHECKING:
    from .chat import ParsedMessage

MAX_STOP = 4  # as OpenAI's API


class ApiError(Exception):
    """A request that gets an error answer: HTTP status, message, OpenAI's error type and code."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.headers = status, message, kind, code, headers or {}
        self.param = param  # the request's field at fault, as OpenAI names it

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "code": self.code, "param": self.param}}


@dataclass(frozen=True)
class ChatRequest:
    """What a chat-completions request asks of the captioner."""

    messages: tuple[ParsedMessage, ...]  # checked; their images still URLs
    options: GenerationOptions  # prompt None: the model's own caption prompt, for a conversation without text
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the token counts
    model: str | None = None


#: Parameters the engine has no way to honour, with the values that ask for nothing (what many clients send
#: by default); any other value is refused with a 400 naming the parameter, never silently ignored.
_NOTHING_ASKED: dict[str, tuple[Any, ...]] = {
    "n": (1,), "best_of": (1,), "frequency_penalty": (0,), "presence_penalty": (0,), "logprobs": (False,),
    "top_logprobs": (0,), "logit_bias": ({},), "tools": ([],), "functions": ([],), "tool_choice": ("none", "auto"),
    "function_call": ("none", "auto"), "response_format": ({"type": "text"},), "modalities": (["text"],),
    "typical_p": (1,), "min_tokens": (0,), "mirostat": (0,), "dry_multiplier": (0,), "xtc_probability": (0,),
    "use_beam_search": (False,),
}
#: Honoured by greedy decoding (temperature 0) whatever their value: neither can drop the likeliest token.
_GREEDY_SAFE = {"top_k": (0, -1, 1), "min_p": (0,)}


def parse_chat(body: Any) -> ChatRequest:
    """Check a request body and turn it into a ChatRequest; ApiError(400) names what is wrong, in one line."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the body must be a JSON object, not {json_kind(body)}", code="invalid_body")
    from .chat import parse_messages  # serve.chat raises this module's ApiError

    messages = parse_messages(body.get("messages"))
    max_tokens = _integer(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1)
    temperature = _number(body, "temperature", minimum=0.0)
    if _same(body.get("top_k"), 1):  # the likeliest token only: greedy decoding, whatever the temperature
        temperature = 0.0
    penalty = _penalty(body)
    for name, nothing in _NOTHING_ASKED.items():
        _nothing_asked(body, name, nothing)
    greedy = temperature == 0 or (temperature is None and GenerationOptions().temperature == 0)
    for name, nothing in _GREEDY_SAFE.items():
        if body.get(name) is not None and not greedy:
            _nothing_asked(body, name, nothing, " with a temperature above 0")
        _number(body, name)
    options: dict[str, Any] = {"stop": _stop(body.get("stop")), "max_tokens": max_tokens, "temperature": temperature,
                               "top_p": _number(body, "top_p", minimum=0.0, open_low=True, maximum=1.0),
                               "seed": _integer(body, "seed", None), "repeat_penalty": penalty,
                               # ignore_eos (as vLLM and llama-server take it): a fixed caption length; loop_guard: ours
                               "ignore_eos": _flag(body, "ignore_eos"), "loop_guard": _flag(body, "loop_guard")}
    try:
        generation = GenerationOptions(**{k: v for k, v in options.items() if v is not None})
    except (CaprlError, TypeError) as exc:
        raise ApiError(400, str(exc), code="invalid_parameter") from exc
    stream = _flag(body, "stream") or False
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise ApiError(400, f"'stream_options' must be an object, not {json_kind(stream_options)}",
                       code="invalid_parameter", param="stream_options")
    include_usage = _flag(stream_options or {}, "include_usage", "stream_options.include_usage") or False
    return ChatRequest(messages=messages, options=generation, stream=stream, include_usage=include_usage,
                       model=_model(body.get("model")))


def clean_text(text: str, what: str, param: str = "messages") -> str:
    """`text` as the engine may take it: no NUL (C strings end there), no lone surrogate (not UTF-8)."""
    if "\x00" in text:
        raise ApiError(400, f"{what} holds a NUL character", code="invalid_text", param=param)
    if not _encodable(text):
        raise ApiError(400, f"{what} holds a lone surrogate (such as \\ud800), which is not Unicode text",
                       code="invalid_text", param=param)
    return text


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def json_kind(value: Any) -> str:
    """A JSON value's type, as OpenAI's errors name it."""
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def quoted(value: Any, limit: int = 40) -> str:
    """A client's value, quoted for a one-line message: escaped and cut short."""
    text = ascii(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _bad(name: str, wants: str, value: Any) -> ApiError:
    return ApiError(400, f"'{name}' must be {wants}, not {quoted(value)}", code="invalid_parameter", param=name)


def _number(body: dict[str, Any], name: str, *, minimum: float | None = None, maximum: float | None = None,
            open_low: bool = False) -> float | None:
    """A finite number (not a boolean, not a string) within its range, or None if absent or null."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(name, "a finite number", value)
    if (minimum is not None and (value < minimum or (open_low and value == minimum))) or \
            (maximum is not None and value > maximum):
        low = "" if minimum is None else f"{'above' if open_low else 'at least'} {minimum:g}"
        high = "" if maximum is None else f"at most {maximum:g}"
        raise _bad(name, " and ".join(filter(None, (low, high))), value)
    return float(value)


def _integer(body: dict[str, Any], name: str, minimum: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        raise _bad(name, "a whole number" + (f" of at least {minimum}" if minimum is not None else ""), value)
    return value


def _flag(body: dict[str, Any], name: str, param: str | None = None) -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise _bad(param or name, "true or false", value)
    return value


def _penalty(body: dict[str, Any]) -> float | None:
    """repetition_penalty (vLLM's name, the CapRL card's) or repeat_penalty (llama-server's): one value."""
    vllm, llama = (_number(body, name, minimum=0.0, open_low=True) for name in ("repetition_penalty", "repeat_penalty"))
    if vllm is not None and llama is not None and vllm != llama:
        raise ApiError(400, f"'repetition_penalty' ({vllm:g}) and 'repeat_penalty' ({llama:g}) disagree; send one",
                       code="invalid_parameter", param="repetition_penalty")
    return vllm if vllm is not None else llama


def _same(a: Any, b: Any) -> bool:
    """JSON equality: true is not 1."""
    if isinstance(a, bool) != isinstance(b, bool) or isinstance(a, (int, float)) != isinstance(b, (int, float)):
        return False
    return bool(a == b)


def _nothing_asked(body: dict[str, Any], name: str, nothing: tuple[Any, ...], when: str = "") -> None:
    value = body.get(name)
    if value is not None and not any(_same(value, v) for v in nothing):
        raise ApiError(400, f"'{name}' {quoted(value)} is not supported by this server{when}; leave it out",
                       code="unsupported_n" if name == "n" else "unsupported_parameter", param=name)


def _stop(value: Any) -> tuple[str, ...]:
    stop = () if value is None else (value,) if isinstance(value, str) else value
    if not isinstance(stop, list | tuple) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOP} non-empty strings",
                       code="invalid_stop", param="stop")
    return tuple(clean_text(s, "a stop string", "stop") for s in stop)


def _model(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _bad("model", "a string naming the model", value)
    if not value.strip():
        raise ApiError(400, "'model' is empty; name the model (GET /v1/models lists it) or leave it out",
                       code="invalid_parameter", param="model")
    return clean_text(value, "'model'", "model")


# --- answers ----------------------------------------------------------------------------------


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int, image_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's token counts; the prompt's image tokens among them, in prompt_tokens_details (as vLLM reports them)."""
    counts: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                              "total_tokens": prompt_tokens + completion_tokens}
    if image_tokens:
        counts["prompt_tokens_details"] = {"image_tokens": image_tokens}
    return counts


def completion(cid: str, model: str, text: str, finish_reason: str, counts: dict[str, Any],
               native_finish_reason: str | None = None) -> dict[str, Any]:
    """A whole (non-streamed) chat completion; ``native_finish_reason`` our own reason beside OpenAI's (a caption
    the loop guard ended says "repetition" there, "stop" in finish_reason)."""
    choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                              "finish_reason": finish_reason, "logprobs": None}
    if native_finish_reason is not None:
        choice["native_finish_reason"] = native_finish_reason
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model, "choices": [choice],
            "usage": counts}


def chunk(cid: str, model: str, delta: dict[str, Any], finish_reason: str | None = None,
          counts: dict[str, Any] | None = None, native_finish_reason: str | None = None) -> dict[str, Any]:
    """One server-sent event of a streamed completion (the last, with usage, has no choices)."""
    choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
    if native_finish_reason is not None:
        choice["native_finish_reason"] = native_finish_reason
    body: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
                            "choices": [] if counts is not None and not delta and finish_reason is None else [choice]}
    if counts is not None:
        body["usage"] = counts
    return body


def model_list(model_id: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                        "owned_by": "caprl-local"}]}


def names_model(requested: str | None, served: str) -> bool:
    """Whether a request's "model" names the one this server runs: its id, or a spelling of it that clients
    use (a Hub repo such as ``internlm/CapRL-3B``, a path, a file name, any case), or its leading words
    (``caprl``, ``CapRL-3B`` for ``CapRL-3B.Q4_K_M``): whole words only, so ``C`` names nothing."""
    if requested is None:  # as vLLM and llama-server take it: the one model served
        return True
    asked, ours = _bare(requested), _bare(served)
    return bool(asked) and (asked == ours or _leads(asked, ours) or _leads(ours, asked))


def _bare(name: str) -> str:
    return re.sub(r"\.gguf$", "", name.strip().rstrip("/").rsplit("/", 1)[-1], flags=re.I).lower()


def _leads(short: str, long: str) -> bool:
    """`short` is `long`'s first words: it ends where a word of `long` ends."""
    return long.startswith(short) and long[len(short)] in "-._ "
