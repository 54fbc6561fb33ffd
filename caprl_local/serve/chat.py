"""OpenAI's chat ``messages`` as the captioner takes them: the JSON list checked and turned into
ChatMessage values (:mod:`caprl_local.chat`).

Pure: no web framework, no llama.cpp. Strict: roles system, developer (as system), user and assistant;
content a string or a list of text, image_url and video_url parts (vLLM's name for a video; OpenAI's API
has none), images and videos in user messages only, at most ``max_images`` images and ``max_videos``
videos; the last message the user's. Anything else is an ApiError(400) that names the message and part.
Images named by URL become bytes through the caller's ``fetch``, videos whatever its ``fetch_video`` makes
of them (read and checked, not decoded), called only once the whole list has passed (so that a request
refused costs no fetch); :func:`chat_turns` then turns the videos into frames, where the engine has room.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ..chat import ChatImage, ChatMessage, ChatVideo, Role
from .protocol import ApiError, clean_text, json_kind, quoted

#: The most images one conversation may hold (each costs up to the image-token cap, and its decode).
MAX_IMAGES = 8
#: The most videos one conversation may hold: a video takes what the caption's context leaves (its frames
#: are sampled to fill it), so a second one would never fit; and each costs its decode.
MAX_VIDEOS = 1

V = TypeVar("V")

_ROLES: dict[str, Role] = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_DETAILS = ("auto", "low", "high")


@dataclass(frozen=True)
class ImageUrl:
    """An image part as the client named it, not yet fetched."""

    url: str


@dataclass(frozen=True)
class VideoUrl:
    """A video part as the client named it, not yet fetched; `where` names the part in messages."""

    url: str
    where: str  # "messages[0].content[1]"


@dataclass(frozen=True)
class ParsedMessage:
    """One checked message, its images and videos still URLs."""

    role: Role
    content: tuple[str | ImageUrl | VideoUrl, ...]

    @property
    def videos(self) -> tuple[VideoUrl, ...]:
        return tuple(part for part in self.content if isinstance(part, VideoUrl))


@dataclass(frozen=True)
class Turn(Generic[V]):
    """One checked message, its images fetched and its videos as `fetch_video` gave them (not yet decoded)."""

    role: Role
    content: tuple[str | ChatImage | V, ...]


def chat_messages(messages: Any, fetch: Callable[[str], bytes], *, max_images: int = MAX_IMAGES) -> tuple[ChatMessage, ...]:
    """The conversation a request's ``messages`` holds, its images fetched; ApiError(400) says what is wrong."""
    return fetch_images(parse_messages(messages, max_images=max_images), fetch)


def parse_messages(messages: Any, *, max_images: int = MAX_IMAGES, max_videos: int = MAX_VIDEOS) -> tuple[ParsedMessage, ...]:
    """Check a request's ``messages`` (fetching nothing); ApiError(400) names what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list of messages", "invalid_messages")
    parsed = tuple(_message(i, m) for i, m in enumerate(messages))
    n_images = sum(isinstance(part, ImageUrl) for message in parsed for part in message.content)
    if n_images > max_images:
        raise _bad(f"the conversation holds {n_images} images; send at most {max_images}", "too_many_images")
    n_videos = sum(len(message.videos) for message in parsed)
    if n_videos > max_videos:
        raise _bad(f"the conversation holds {n_videos} videos; send at most {max_videos} (a video takes what the "
                   "context leaves), each other one in a request of its own", "too_many_videos")
    if parsed[-1].role != "user":
        raise _bad(f"the last message must be the user's (it is the one answered), not the {parsed[-1].role}'s",
                   "invalid_messages")
    return parsed


def fetch_images(messages: tuple[ParsedMessage, ...], fetch: Callable[[str], bytes]) -> tuple[ChatMessage, ...]:
    """The checked messages as ChatMessage values, each image's bytes from ``fetch(url)`` (which raises
    ApiError for an image it may not or cannot get); a video is refused (this caller takes none)."""
    return chat_turns(fetch_media(messages, fetch, _no_videos), _no_videos)


def fetch_media(messages: tuple[ParsedMessage, ...], fetch: Callable[[str], bytes],
                fetch_video: Callable[[VideoUrl], V]) -> tuple[Turn[V], ...]:
    """The checked messages with each image's bytes from ``fetch(url)`` and each video as ``fetch_video(part)``
    gives it (both raise ApiError for what they may not or cannot get)."""
    def part(p: str | ImageUrl | VideoUrl) -> str | ChatImage | V:
        if isinstance(p, ImageUrl):
            return ChatImage(fetch(p.url))
        return fetch_video(p) if isinstance(p, VideoUrl) else p

    return tuple(Turn(m.role, tuple(part(p) for p in m.content)) for m in messages)


def chat_turns(turns: tuple[Turn[V], ...], prepare: Callable[[V], ChatVideo]) -> tuple[ChatMessage, ...]:
    """The fetched turns as the engine takes them, each video's frames from ``prepare(video)``."""
    return tuple(ChatMessage(t.role, tuple(p if isinstance(p, (str, ChatImage)) else prepare(p) for p in t.content))
                 for t in turns)


def has_videos(turns: tuple[Turn[V], ...]) -> bool:
    return any(not isinstance(p, (str, ChatImage)) for t in turns for p in t.content)


def _no_videos(part: Any) -> Any:
    where = part.where if isinstance(part, VideoUrl) else "the conversation"
    raise _bad(f"{where}: videos are not taken here; send images", "invalid_content")


def _message(i: int, message: Any) -> ParsedMessage:
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise _bad(f"{where} must be an object with a role and content", "invalid_messages")
    role = message.get("role")
    if not isinstance(role, str) or role not in _ROLES:
        raise _bad(f"{where} has role {quoted(role)}; use system, developer, user or assistant", "invalid_role")
    if message.get("tool_calls") or message.get("function_call"):
        raise _bad(f"{where}: tool calls are not supported by this server", "invalid_messages")
    content = message.get("content")
    if isinstance(content, str):
        return ParsedMessage(_ROLES[role], (_text(where, content),))
    if not isinstance(content, list):
        raise _bad(f"{where}: content must be a string or a list of text, image_url and video_url parts, not "
                   f"{json_kind(content)}", "invalid_content")
    parts: list[str | ImageUrl | VideoUrl] = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            text = _text(at, part.get("text"))
            if parts and isinstance(parts[-1], str):  # adjacent text parts read as lines, as llama.cpp joins them
                text = f"{parts.pop()}\n{text}"
            parts.append(text)
        elif kind == "image_url":
            if role != "user":
                raise _bad(f"{at}: {_a(role)} message cannot hold an image; put images in user messages", "invalid_content")
            parts.append(_image_url(at, part.get("image_url")))
        elif kind == "video_url":
            if role != "user":
                raise _bad(f"{at}: {_a(role)} message cannot hold a video; put videos in user messages", "invalid_content")
            parts.append(_video_url(at, part.get("video_url")))
        elif isinstance(part, dict):
            raise _bad(f"{at}: unsupported part type {quoted(kind)} (text, image_url and video_url are)",
                       "invalid_content")
        else:
            raise _bad(f"{at} must be an object with a type, not {json_kind(part)}", "invalid_content")
    return ParsedMessage(_ROLES[role], tuple(parts))


def _text(at: str, text: Any) -> str:
    if not isinstance(text, str):
        raise _bad(f"{at}: the text must be a string, not {json_kind(text)}", "invalid_content")
    return clean_text(text, f"{at}: the text")  # text crosses into C: no NUL, no lone surrogate


def _image_url(at: str, image: Any) -> ImageUrl:
    url = image.get("url") if isinstance(image, dict) else image  # a bare string too, as some clients send
    if not isinstance(url, str) or not url.strip():
        raise _bad(f"{at}: an image_url part needs a url (a data URI or an address)", "invalid_image_url")
    detail = image.get("detail", "auto") if isinstance(image, dict) else "auto"
    if detail not in _DETAILS:
        raise _bad(f"{at}: image_url.detail must be one of {', '.join(_DETAILS)}, not {quoted(detail)}",
                   "invalid_image_url")
    return ImageUrl(url)


def _video_url(at: str, video: Any) -> VideoUrl:
    url = video.get("url") if isinstance(video, dict) else video  # a bare string too, as vLLM takes it
    if not isinstance(url, str) or not url.strip():
        raise _bad(f"{at}: a video_url part needs a url (a data URI, an address or a file)", "invalid_video_url")
    return VideoUrl(url, at)


def _a(role: str) -> str:
    return f"an {role}" if role[0] in "aeiou" else f"a {role}"


def _bad(message: str, code: str) -> ApiError:
    return ApiError(400, message, code=code, param="messages")
