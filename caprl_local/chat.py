"""A conversation to answer: the typed messages of a chat, as OpenAI clients send them, and how they
are laid out in a model's chat template.

Pure values, free of llama.cpp. A message has a role and a content of parts: text (a ``str``, always
text: a client's typed control tokens or media markers are never parsed) and images (:class:`ChatImage`,
holding whatever :meth:`Captioner.caption` takes). Images belong to user messages only. A caption is
the conversation of one user turn: its image and its prompt (:func:`caption_conversation`).

    chat = [system("Answer in French."), user(Path("photo.jpg"), "What is this?"),
            assistant("Un chat."), user("And its colour?")]
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Union, get_args

from PIL import Image

from .errors import CaprlError
from .images import ImageInput, describe
from .prompts import IMAGE_PLACEHOLDER, Turn

if TYPE_CHECKING:
    import numpy as np

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = get_args(Role)


@dataclass(frozen=True, eq=False)
class ChatImage:
    """An image in a user message: a path (a ``str`` path too), encoded bytes, a PIL image or a numpy array."""

    source: ImageInput


Part = str | ChatImage

#: What :func:`user` takes for an image besides a ChatImage (a bare ``str`` is text, never a path).
ImageLike = Union["os.PathLike[str]", bytes, bytearray, memoryview, Image.Image, "np.ndarray"]


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a conversation: its role and its parts, in order."""

    role: Role
    content: tuple[Part, ...]

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise CaprlError(f"unknown chat role {self.role!r}; use one of: {', '.join(ROLES)}")
        content = (self.content,) if isinstance(self.content, str) else self.content
        if not isinstance(content, (tuple, list)):
            raise CaprlError(f"a {self.role} message's content must be a tuple of parts (text and images), "
                             f"not {type(content).__name__}")
        for part in content:
            if isinstance(part, ChatImage):
                if self.role != "user":
                    raise CaprlError(f"a {self.role} message cannot hold an image; put images in user messages")
            elif not isinstance(part, str):
                raise CaprlError(f"a message part must be text (str) or a ChatImage, not {type(part).__name__}")
        object.__setattr__(self, "content", tuple(content))  # a list given by a caller stays hashable

    @property
    def text(self) -> str:
        """The message's text parts, joined."""
        return "".join(part for part in self.content if isinstance(part, str))

    @property
    def images(self) -> tuple[ChatImage, ...]:
        return tuple(part for part in self.content if isinstance(part, ChatImage))


def system(text: str) -> ChatMessage:
    return ChatMessage("system", (text,))


def assistant(text: str) -> ChatMessage:
    return ChatMessage("assistant", (text,))


def user(*parts: str | ChatImage | ImageLike) -> ChatMessage:
    """A user message: each ``str`` is text; a ChatImage, Path, bytes, PIL image or array is an image."""
    return ChatMessage("user", tuple(part if isinstance(part, (str, ChatImage)) else ChatImage(part) for part in parts))


def conversation(messages: Iterable[ChatMessage]) -> tuple[ChatMessage, ...]:
    """The messages, checked: at least one, each a ChatMessage, the last a user's (it is what gets answered)."""
    if isinstance(messages, ChatMessage):
        messages = (messages,)
    turns = tuple(messages)
    for turn in turns:
        if not isinstance(turn, ChatMessage):
            raise CaprlError(f"a conversation is a sequence of ChatMessage values, not of {type(turn).__name__}")
    if not turns:
        raise CaprlError("the conversation is empty; give at least one user message")
    if turns[-1].role != "user":
        raise CaprlError(f"the conversation's last message is the {turns[-1].role}'s; end it with the user "
                         "message to answer")
    return turns


def has_text(messages: Iterable[ChatMessage]) -> bool:
    """Whether any message carries text of its own (more than whitespace)."""
    return any(part.strip() for message in messages for part in message.content if isinstance(part, str))


def with_prompt(messages: tuple[ChatMessage, ...], prompt: str | None) -> tuple[ChatMessage, ...]:
    """The messages, the last user message given `prompt` (its images placed as in a caption) when no
    message carries text of its own; otherwise, or without a prompt, the messages as they are."""
    if prompt is None or has_text(messages):
        return messages
    last = max(i for i, message in enumerate(messages) if message.role == "user")
    return (*messages[:last], ChatMessage("user", place_images(prompt, messages[last].images)), *messages[last + 1:])


def place_images(prompt: str, images: tuple[ChatImage, ...]) -> tuple[Part, ...]:
    """A user turn of `prompt` and `images`: the images where the prompt's first IMAGE_PLACEHOLDER is,
    else first (CapRL's order)."""
    before, mark, after = prompt.partition(IMAGE_PLACEHOLDER)
    parts: tuple[Part, ...] = (before, *images, after) if mark else (*images, prompt)
    return tuple(part for part in parts if not isinstance(part, str) or part)


def caption_conversation(image: Image.Image, prompt: str) -> tuple[ChatMessage, ...]:
    """The conversation a caption is: one user turn with the image and the prompt, no system turn."""
    return (ChatMessage("user", place_images(prompt, (ChatImage(image),))),)


def prepared(messages: tuple[ChatMessage, ...], prepare: Callable[[ImageInput], Image.Image]) -> tuple[ChatMessage, ...]:
    """The messages with each image read and sized by `prepare` (which raises ImageError for a bad one)."""
    def part(p: Part) -> Part:
        return ChatImage(prepare(p.source)) if isinstance(p, ChatImage) else p

    return tuple(ChatMessage(m.role, tuple(part(p) for p in m.content)) if m.images else m for m in messages)


def name_of(messages: tuple[ChatMessage, ...]) -> str:
    """A conversation's name in messages and results: its image's when it has exactly one."""
    images = [image for message in messages for image in message.images]
    if len(images) == 1:
        return describe(images[0].source)
    return f"<conversation of {_count(len(messages), 'message')}, {_count(len(images), 'image')}>"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n or 'no'} {noun}s"


# --- a conversation in the model's chat format ------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """A stretch of a rendered conversation: the chat template's own text (its control tokens are
    meant), a message's text (never parsed for control tokens) or an image."""

    kind: Literal["template", "text", "image"]
    text: str = ""
    image: Image.Image | None = None


# Unlike any template's text: each message part stands in the template's input as one of these.
_MARK = "[[caprl-part-{}]]"
_MARKS = re.compile(r"\[\[caprl-part-(\d+)\]\]")


def render_chat(messages: tuple[ChatMessage, ...], render: Callable[[list[Turn]], str | None]) -> list[Piece] | None:
    """The conversation as the model reads it, in pieces. `render` applies the chat template to turns
    whose contents are placeholders, and the rendering is split at them: no message's text ever passes
    through the template or is read as its markup. None when `render` cannot render the turns, or
    loses or repeats a part."""
    parts: list[Piece] = []
    turns: list[Turn] = []
    for message in messages:
        content = []
        for part in message.content:
            if isinstance(part, ChatImage):
                if not isinstance(part.source, Image.Image):
                    raise TypeError("a conversation's images are prepared (RGB PIL images) before it is rendered")
                parts.append(Piece("image", image=part.source))
            elif part:
                parts.append(Piece("text", part))
            else:
                continue
            content.append(_MARK.format(len(parts) - 1))
        turns.append((message.role, "".join(content)))
    rendered = render(turns)
    if rendered is None or any(rendered.count(_MARK.format(i)) != 1 for i in range(len(parts))):
        return None
    pieces: list[Piece] = []
    for i, stretch in enumerate(_MARKS.split(rendered)):
        if i % 2:
            pieces.append(parts[int(stretch)])
        elif stretch:
            pieces.append(Piece("template", stretch))
    return pieces
