"""A conversation to answer: the typed messages of a chat, as OpenAI clients send them, and how they
are laid out in a model's chat template.

Pure values, free of llama.cpp. A message has a role and a content of parts: text (a ``str``, always
text: a client's typed control tokens or media markers are never parsed) and images (:class:`ChatImage`,
holding whatever :meth:`Captioner.caption` takes) and videos (:class:`ChatVideo`, frames already sampled,
each with its time). Images and videos belong to user messages only. A caption is the conversation of one
user turn: its image and its prompt (:func:`caption_conversation`).

    chat = [system("Answer in French."), user(Path("photo.jpg"), "What is this?"),
            assistant("Un chat."), user("And its colour?")]
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, Union, get_args

from PIL import Image

from .errors import CaprlError
from .images import ImageInput, describe
from .prompts import IMAGE_PLACEHOLDER, Turn
from .videoprompt import VideoForm, check_timestamps, layout

if TYPE_CHECKING:
    import numpy as np

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = get_args(Role)


@dataclass(frozen=True, eq=False)
class ChatImage:
    """An image in a user message: a path (a ``str`` path too), encoded bytes, a PIL image or a numpy array."""

    source: ImageInput


class FrameLike(Protocol):
    """A sampled frame (caprl_local.video's Frame): its RGB image and its time in the clip."""

    @property
    def image(self) -> Image.Image: ...

    @property
    def timestamp_s(self) -> float: ...


@dataclass(frozen=True, eq=False)
class ChatVideo:
    """A video in a user message: its frames, already sampled and sized (RGB PIL images, all of one size),
    each frame's time in seconds, and the form the model reads them in (which frames merge into one image,
    the timestamp text: see caprl_local.videoprompt). ``name`` names it in messages (its file, say)."""

    frames: tuple[Image.Image, ...]
    timestamps: tuple[float, ...]
    form: VideoForm
    name: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.frames, (tuple, list)) or not isinstance(self.timestamps, (tuple, list)):
            raise CaprlError("a video's frames and timestamps are sequences (tuples or lists); "
                             "use ChatVideo.of(frames) for sampled frames")
        frames, timestamps = tuple(self.frames), tuple(self.timestamps)
        if not isinstance(self.form, VideoForm):
            raise CaprlError(f"a video's form is a VideoForm (caprl_local.videoprompt), not {type(self.form).__name__}")
        if len(frames) != len(timestamps):
            raise CaprlError(f"a video of {len(frames)} frames has {len(timestamps)} timestamps; give one time per frame")
        check_timestamps(timestamps)
        for i, frame in enumerate(frames):
            if not isinstance(frame, Image.Image) or frame.mode != "RGB":
                what = f"a {frame.mode} image" if isinstance(frame, Image.Image) else type(frame).__name__
                raise CaprlError(f"video frame {i} is {what}; give RGB PIL images (image.convert('RGB'))")
            if frame.size != frames[0].size:
                raise CaprlError(f"video frame {i} is {frame.width}x{frame.height} but frame 0 is "
                                 f"{frames[0].width}x{frames[0].height}; sample every frame at one size")
        object.__setattr__(self, "frames", frames)  # a list given by a caller becomes a tuple
        object.__setattr__(self, "timestamps", tuple(float(t) for t in timestamps))

    @classmethod
    def of(cls, frames: Iterable[FrameLike], form: VideoForm, name: str = "") -> ChatVideo:
        """A video of sampled frames (caprl_local.video's Frame values, or anything with .image and .timestamp_s)."""
        taken = tuple(frames)
        return cls(tuple(f.image for f in taken), tuple(f.timestamp_s for f in taken), form, name)

    def describe(self) -> str:
        return self.name or f"<video of {_count(len(self.frames), 'frame')}>"


Part = str | ChatImage | ChatVideo
Media = ChatImage | ChatVideo

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
            if isinstance(part, (ChatImage, ChatVideo)):
                if self.role != "user":
                    role = f"{'an' if self.role[0] in 'aeiou' else 'a'} {self.role}"
                    kind = "an image" if isinstance(part, ChatImage) else "a video"
                    raise CaprlError(f"{role} message cannot hold {kind}; put images and videos in user messages")
            elif not isinstance(part, str):
                raise CaprlError(f"a message part must be text (str) or a ChatImage, not {type(part).__name__}; "
                                 "give a video as a ChatVideo")
        object.__setattr__(self, "content", tuple(content))  # a list given by a caller stays hashable

    @property
    def text(self) -> str:
        """The message's text parts, joined."""
        return "".join(part for part in self.content if isinstance(part, str))

    @property
    def images(self) -> tuple[ChatImage, ...]:
        return tuple(part for part in self.content if isinstance(part, ChatImage))

    @property
    def videos(self) -> tuple[ChatVideo, ...]:
        return tuple(part for part in self.content if isinstance(part, ChatVideo))

    @property
    def media(self) -> tuple[Media, ...]:
        """The images and videos, in order."""
        return tuple(part for part in self.content if isinstance(part, (ChatImage, ChatVideo)))


def system(text: str) -> ChatMessage:
    return ChatMessage("system", (text,))


def assistant(text: str) -> ChatMessage:
    return ChatMessage("assistant", (text,))


def user(*parts: str | ChatImage | ChatVideo | ImageLike) -> ChatMessage:
    """A user message: each ``str`` is text, a ChatVideo a video; a ChatImage, Path, bytes, PIL image or array is an image."""
    return ChatMessage("user", tuple(part if isinstance(part, (str, ChatImage, ChatVideo)) else ChatImage(part)
                                     for part in parts))


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
    """The messages, the last user message given `prompt` (its images and videos placed as in a caption)
    when no message carries text of its own; otherwise, or without a prompt, the messages as they are."""
    if prompt is None or has_text(messages):
        return messages
    last = max(i for i, message in enumerate(messages) if message.role == "user")
    return (*messages[:last], ChatMessage("user", place_images(prompt, messages[last].media)), *messages[last + 1:])


def place_images(prompt: str, images: tuple[Media, ...]) -> tuple[Part, ...]:
    """A user turn of `prompt` and `images` (and videos): the images where the prompt's first
    IMAGE_PLACEHOLDER is, else first (CapRL's order)."""
    before, mark, after = prompt.partition(IMAGE_PLACEHOLDER)
    parts: tuple[Part, ...] = (before, *images, after) if mark else (*images, prompt)
    return tuple(part for part in parts if not isinstance(part, str) or part)


def caption_conversation(image: Image.Image, prompt: str) -> tuple[ChatMessage, ...]:
    """The conversation a caption is: one user turn with the image and the prompt, no system turn."""
    return (ChatMessage("user", place_images(prompt, (ChatImage(image),))),)


def prepared(messages: tuple[ChatMessage, ...], prepare: Callable[[ImageInput], Image.Image]) -> tuple[ChatMessage, ...]:
    """The messages with each image read and sized by `prepare` (which raises ImageError for a bad one);
    a video's frames are sampled and sized already."""
    def part(p: Part) -> Part:
        return ChatImage(prepare(p.source)) if isinstance(p, ChatImage) else p

    return tuple(ChatMessage(m.role, tuple(part(p) for p in m.content)) if m.images else m for m in messages)


def name_of(messages: tuple[ChatMessage, ...]) -> str:
    """A conversation's name in messages and results: its image's or video's when it has exactly one."""
    media = [part for message in messages for part in message.media]
    if len(media) == 1:
        return describe(media[0].source) if isinstance(media[0], ChatImage) else media[0].describe()
    videos = sum(len(message.videos) for message in messages)
    also = f", {_count(videos, 'video')}" if videos else ""
    return f"<conversation of {_count(len(messages), 'message')}, {_count(len(media) - videos, 'image')}{also}>"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n or 'no'} {noun}s"


# --- a conversation in the model's chat format ------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """A stretch of a rendered conversation: the chat template's own text (its control tokens are
    meant), a message's text (never parsed for control tokens), an image, a video's text around its
    frames ("stamp": ours, read as the template's is) or a group of a video's frames the model reads as
    one image ("frames": two that merge, or one)."""

    kind: Literal["template", "text", "image", "stamp", "frames"]
    text: str = ""
    image: Image.Image | None = None
    frames: tuple[Image.Image, ...] = ()


# Unlike any template's text: each message part stands in the template's input as one of these.
_MARK = "[[caprl-part-{}]]"
_MARKS = re.compile(r"\[\[caprl-part-(\d+)\]\]")


def render_chat(messages: tuple[ChatMessage, ...], render: Callable[[list[Turn]], str | None]) -> list[Piece] | None:
    """The conversation as the model reads it, in pieces. `render` applies the chat template to turns
    whose contents are placeholders, and the rendering is split at them: no message's text ever passes
    through the template or is read as its markup. None when `render` cannot render the turns, or
    loses or repeats a part."""
    parts: list[tuple[Piece, ...]] = []
    turns: list[Turn] = []
    for message in messages:
        content = []
        for part in message.content:
            if isinstance(part, ChatImage):
                if not isinstance(part.source, Image.Image):
                    raise TypeError("a conversation's images are prepared (RGB PIL images) before it is rendered")
                parts.append((Piece("image", image=part.source),))
            elif isinstance(part, ChatVideo):
                parts.append(video_pieces(part))
            elif part:
                parts.append((Piece("text", part),))
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
            pieces += parts[int(stretch)]
        elif stretch:
            pieces.append(Piece("template", stretch))
    return pieces


def video_pieces(video: ChatVideo) -> tuple[Piece, ...]:
    """A video as pieces, in its form's layout: its text, and each group of frames read as one image."""
    return tuple(Piece("stamp", slot) if isinstance(slot, str) else Piece("frames", frames=tuple(video.frames[i] for i in slot))
                 for slot in layout(video.timestamps, video.form))
