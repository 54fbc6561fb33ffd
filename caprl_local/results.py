"""The values a caption run produces: plain data, free of llama.cpp."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Timings:
    """Seconds spent in each stage of one caption."""

    image_load_s: float
    image_encode_s: float
    prompt_eval_s: float
    generation_s: float
    total_s: float
    prompt_tokens_per_s: float
    generation_tokens_per_s: float


@dataclass(frozen=True)
class VideoStats:
    """What a video caption was made from: the clip's length and the frames the model saw."""

    duration_s: float  # the clip's length (one that ended early: as far as it was read)
    frames: int  # frames given to the model
    fps: float  # the rate they were taken at (frames over the duration)
    width: int  # each frame's size as the model got it
    height: int
    tokens: int  # image tokens the frames cost (within the caption's image_tokens)
    truncated: bool = False  # the clip ended early or would not all decode: fewer frames than planned


@dataclass(frozen=True)
class Caption:
    """A caption and what it cost."""

    text: str
    image: str  # the input, as named in messages: its path when it has one
    image_tokens: int
    prompt_tokens: int  # text and image tokens fed to the model
    generated_tokens: int
    finish_reason: Literal["stop", "length", "repetition"]  # repetition: a loop, cut back to its first round
    timings: Timings
    index: int | None = None  # its image's place in caption_many's input (None from caption)
    source: str | None = None  # the server that made it (an endpoint's URL); None: made here
    model: str | None = None  # the model that server reports, where it says
    video: VideoStats | None = None  # for a video: what of it the model saw


@dataclass(frozen=True)
class CaptionFailure:
    """An image of a batch that could not be captioned; the batch went on."""

    image: str  # the input, as named in messages
    error: str  # one line: what went wrong and what to do
    kind: str  # the error's class: ImageError, EngineError, ...
    index: int | None = None  # its image's place in caption_many's input
    source: str | None = None  # the server that answered last (an endpoint's URL); None: here


@dataclass(frozen=True)
class Activity:
    """A snapshot of what a Captioner is doing, for progress displays."""

    generating: int  # captions being generated now
    waiting: int  # captions asked for, waiting for a free slot
    tokens: int  # tokens generated since the Captioner was loaded
    encoding: int = 0  # of the captions generating, those whose image and prompt are being evaluated (no text yet)
    frames: int = 0  # video frames read and sampled since the Captioner was loaded
