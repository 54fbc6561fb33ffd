"""A video in a prompt: which text stands between which frames, and which frames the model reads as one image.

Pure: no llama.cpp and no pixels. The layout comes from the frames' timestamps and the family's
:class:`VideoForm`, so it can be checked without a model. The engine turns it into llama.cpp's own video
input: every frame a bitmap, the two frames of a group marked mergeable, so that the Qwen-VL projectors
fold them into one image (Conv3D's two temporal halves), and the text between the images.

The forms (each family module in caprl_local.families names the one it reads; docs/robustness.md says why):

- ``qwen3`` (Qwen3-VL, CapRL 2.0, CapRL-Video-4B): ``<{t:.1f} seconds>`` before each pair, t the mean
  time of the pair's two frames. This is what Qwen3-VL's own processor writes, and llama.cpp's
  chunk-per-pair positions are Qwen3-VL's own (each pair an image of its own).
- ``llama.cpp`` (Qwen2-VL, Qwen2.5-VL): llama.cpp's video helper (mtmd-helper.cpp) exactly: ``Video:``,
  then the frames, with ``[{m}m{s:.2f}s]`` after the first frame at or past each ``every_s`` mark
  (0 s included). Qwen2.5-VL carries time in its M-RoPE positions, which llama.cpp does not give frames,
  so this text is the only sense of time it gets; and its captions equal `llama-mtmd-cli --video`'s.
- ``frames`` (InternVL): ``Frame{i}: `` before each frame (one image each, no merging), frames on lines
  of their own, as InternVL's processor writes a video.
- ``none``: the pairs alone, no text (Qwen2.5-VL's own processor writes no time, but llama.cpp does not
  put time in the positions either).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

from .errors import CaprlError

Stamps = Literal["qwen3", "llama.cpp", "frames", "none"]
STAMPS: tuple[str, ...] = get_args(Stamps)

#: A run of the layout: text, or the indices of the frames the model reads as one image.
Slot = str | tuple[int, ...]


@dataclass(frozen=True)
class VideoForm:
    """How a model family reads a video: how many frames one image holds, and the timestamp text."""

    stamps: Stamps
    merge: int = 2  # frames folded into one image (Qwen-VL's temporal patch); 1: each frame an image
    every_s: float = 5.0  # llama.cpp's form: a timestamp every this many seconds (its helper's default)

    def __post_init__(self) -> None:
        if self.stamps not in STAMPS:
            raise CaprlError(f"unknown video timestamp form {self.stamps!r}; use one of: {', '.join(STAMPS)}")
        if self.merge not in (1, 2):
            raise CaprlError(f"a video form merges 1 or 2 frames into one image, not {self.merge!r}")
        if not (isinstance(self.every_s, (int, float)) and math.isfinite(self.every_s) and self.every_s > 0):
            raise CaprlError(f"a video's timestamp interval must be a positive number of seconds, not {self.every_s!r}")


QWEN3_VL = VideoForm("qwen3")
LLAMA_CPP = VideoForm("llama.cpp")
INTERNVL = VideoForm("frames", merge=1)
PLAIN = VideoForm("none")

def check_timestamps(timestamps: Sequence[float]) -> None:
    """At least one frame, each time a finite number of seconds from 0 on, never going back."""
    if not timestamps:
        raise CaprlError("a video needs at least one frame; sample the clip before captioning it")
    last = 0.0
    for i, t in enumerate(timestamps):
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise CaprlError(f"video frame {i} has timestamp {t!r}; give each frame its time in seconds from 0")
        if t < last:
            raise CaprlError(f"video frame {i} comes at {t}s, before frame {i - 1} at {last}s; give the frames in time order")
        last = float(t)


def layout(timestamps: Sequence[float], form: VideoForm) -> tuple[Slot, ...]:
    """The video as the model reads it: text and frame groups in order, for frames at `timestamps`."""
    check_timestamps(timestamps)
    n = len(timestamps)
    if form.stamps == "qwen3":
        slots: list[Slot] = []
        for group in _groups(list(range(n)), form.merge):
            mid = (timestamps[group[0]] + timestamps[group[-1]]) / 2  # a lone last frame: its own time
            slots += [f"<{mid:.1f} seconds>", group]
        return tuple(slots)
    if form.stamps == "frames":
        return tuple(slot for i in range(n) for slot in (("\n" if i else "") + f"Frame{i + 1}: ", (i,)))
    items: list[str | int] = list(range(n))
    if form.stamps == "llama.cpp":
        items = ["Video:", *_llama_cpp_stamps(timestamps, form.every_s)]
    return _grouped(items, form.merge)


def image_groups(slots: Sequence[Slot]) -> int:
    """How many images a layout costs the model (each group one image of the frames' grid)."""
    return sum(1 for slot in slots if not isinstance(slot, str))


def _llama_cpp_stamps(timestamps: Sequence[float], every_s: float) -> list[str | int]:
    """The frames with llama.cpp's timestamp text after each frame that reaches the next mark (its
    mtmd_helper_video::read_next: one mark a frame, the next mark one interval on, whatever the gap)."""
    items: list[str | int] = []
    next_ms, every_ms = 0.0, every_s * 1000.0
    for i, t in enumerate(timestamps):
        items.append(i)
        elapsed_ms = t * 1000.0
        if elapsed_ms >= next_ms:
            minutes = int(elapsed_ms / 1000.0 / 60)
            items.append(f"[{minutes}m{elapsed_ms / 1000.0 - minutes * 60.0:.2f}s]")
            next_ms += every_ms
    return items


def _groups(frames: list[int], merge: int) -> list[tuple[int, ...]]:
    """Consecutive frames, `merge` at a time from the first (a lone one last), as mtmd pairs them."""
    return [tuple(frames[i:i + merge]) for i in range(0, len(frames), merge)]


def _grouped(items: list[str | int], merge: int) -> tuple[Slot, ...]:
    """Text stays; each run of frames between two texts is grouped on its own (mtmd merges only
    neighbouring bitmaps)."""
    slots: list[Slot] = []
    run: list[int] = []
    for item in [*items, ""]:
        if isinstance(item, int):
            run.append(item)
            continue
        slots += _groups(run, merge)
        run = []
        if item:
            slots.append(item)
    return tuple(slots)
