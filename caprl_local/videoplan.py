"""Which frames of a video a Qwen-VL model sees, and at what size: pure arithmetic on a :class:`VideoInfo`.

:mod:`caprl_local.video` probes a clip into a :class:`VideoInfo` and reads the frames a :class:`VideoPlan`
names; this module decides the plan, so that it can be computed (and tested) without decoding anything,
and holds the bounds on what a video's headers may claim.

The rule, in the order it is applied:

1. frames at ``fps`` over the clip's duration, spread evenly from its first frame to its last (as Qwen's
   processors do; Qwen3-VL's: ``np.linspace(0, total_num_frames - 1, num_frames)``), as many as
   ``duration * fps`` rounded to a multiple of ``merge``, at least ``merge``, at most ``max_frames`` and
   never more than the clip has;
2. every frame resized to one size, in multiples of ``align``, aspect kept, with at most
   ``max_tokens_per_frame`` tokens per merged group of frames (the Qwen "smart resize" of
   :func:`caprl_local.budgets.fit_to_budget`);
3. when the whole video would cost more than ``max_tokens``, the frames shrink first, down to
   ``min_tokens_per_frame`` tokens per group (or their own size, if smaller), and only then are frames
   dropped: the fewer frames are again spread evenly from the first to the last, so both ends stay covered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .budgets import ImageBudget, fit_to_budget
from .errors import ImageError

#: Frames sampled per second of video. Qwen2.5-VL's processor samples at FPS = 2.0 (qwen-vl-utils,
#: vision_process.py) and Qwen3-VL's video processor at fps=2 (transformers, Qwen3VLVideoProcessor):
#: the rate both were trained at, and the one CapRL-Video-4B inherits.
DEFAULT_FPS = 2.0

#: The most frames sampled from one video: CapRL-Video is evaluated with 128.
DEFAULT_MAX_FRAMES = 128

#: The image tokens a whole video may cost (``--max-video-tokens``). A 32k context then holds the video,
#: the prompt and 2048 new tokens with room to spare, and 128 frames still get 256 tokens per pair
#: (448x448 at Qwen2.5-VL's 28-pixel grid, 512x512 at Qwen3-VL's 32).
DEFAULT_MAX_TOKENS = 16384

#: Tokens per merged group of frames, at most: Qwen2.5-VL's VIDEO_MAX_PIXELS = 768 * 28 * 28, and the
#: 768 patches a frame gets at most from Qwen3-VL's video processor (its size["longest_edge"] = 32 * 32 * 768).
DEFAULT_MAX_TOKENS_PER_FRAME = 768

#: Frames shrink to fit the budget down to this many tokens per merged group (Qwen2.5-VL's VIDEO_MIN_PIXELS
#: = 128 * 28 * 28, Qwen3-VL's size["shortest_edge"] = 128 * 32 * 32) before any frame is dropped.
DEFAULT_MIN_TOKENS_PER_FRAME = 128

#: Frames Qwen-VL merges in time (temporal_patch_size): llama.cpp pairs consecutive frames.
DEFAULT_MERGE = 2

#: Headers claiming more than these are refused before anything is decoded: a frame of 8192x8192 or
#: 40 megapixels is more than any camera records, and a day is longer than any clip a caption describes.
MAX_SIDE = 8192
MAX_FRAME_PIXELS = 40_000_000
MAX_DURATION_S = 24 * 3600.0
#: A frame rate above this is no real video's: it is taken for a header's nonsense (and ignored).
MAX_FPS = 1000.0

def check_frame_size(width: int, height: int, name: str) -> tuple[int, int]:
    """A header's frame size, refused (ImageError naming the clip `name`) when missing or beyond the bounds."""
    if width <= 0 or height <= 0:
        raise ImageError(f"{name}: its video header gives no frame size; the file is damaged, re-encode it")
    if width > MAX_SIDE or height > MAX_SIDE or width * height > MAX_FRAME_PIXELS:
        raise ImageError(f"{name}: claims {width}x{height} frames, more than this reads ({MAX_SIDE} a side, "
                         f"{MAX_FRAME_PIXELS // 1_000_000} megapixels); scale the video down first")
    return width, height


def check_duration(duration_s: float, name: str) -> float:
    """A header's duration, refused (ImageError naming the clip `name`) beyond MAX_DURATION_S."""
    if duration_s > MAX_DURATION_S:
        raise ImageError(f"{name}: claims to last {duration_s / 3600:,.0f} hours, more than this reads "
                         f"({MAX_DURATION_S / 3600:.0f}); cut it into shorter clips")
    return duration_s


@dataclass(frozen=True)
class VideoInfo:
    """What a video's headers say about it (see :func:`caprl_local.video.probe_video`), every number bounded.

    ``width`` and ``height`` are as displayed: after the rotation (degrees counter-clockwise, one of 0,
    90, 180, 270, as FFmpeg's display matrix gives it) and the pixel aspect ratio. ``n_frames_hint`` is
    the container's claim, 0 when it makes none; it may be wrong, as may ``duration_s``.
    """

    duration_s: float
    fps: float  # the stream's average frame rate; 0.0 when it gives none
    width: int
    height: int
    rotation: int
    n_frames_hint: int
    codec: str
    has_audio: bool


@dataclass(frozen=True)
class VideoPlan:
    """The frames to read and the size to read them at.

    ``timestamps`` are seconds from the start of the video, one per frame, ascending; ``frame_size`` is
    (width, height), both multiples of the grid; ``tokens`` is what the frames cost together,
    ``len(timestamps) // merge`` groups of ``(width // align) * (height // align)`` tokens; ``fps`` is the
    rate the frames are taken at (their count over the duration, as Qwen's processors report it).
    """

    fps: float
    timestamps: tuple[float, ...]
    frame_size: tuple[int, int]
    tokens: int
    merge: int

    @property
    def tokens_per_group(self) -> int:
        """The tokens one merged group of frames costs."""
        return self.tokens // max(1, len(self.timestamps) // self.merge)


def seconds(value: Any, base: Any) -> float | None:
    """`value` x `base` in seconds, or None when either is missing or the product is not a sane time."""
    try:
        product = float(value * base) if value is not None and base else None
    except (TypeError, ValueError, OverflowError, ZeroDivisionError):  # a header's nonsense
        return None
    return product if product is not None and math.isfinite(product) else None


def frame_rate(*rates: Any) -> float:
    """The first of `rates` (frames per second, any number type) that is a real video's, else 0.0."""
    for rate in rates:
        fps = seconds(rate, 1)
        if fps is not None and 0 < fps <= MAX_FPS:
            return fps
    return 0.0


def quarter_turn(degrees: float) -> int:
    """A display rotation (degrees counter-clockwise) to the nearest quarter turn, in [0, 360)."""
    return int(round(degrees / 90.0)) * 90 % 360 if math.isfinite(degrees) else 0


def plan_video(info: VideoInfo, *, fps: float = DEFAULT_FPS, max_frames: int = DEFAULT_MAX_FRAMES,
               max_tokens: int = DEFAULT_MAX_TOKENS, align: int, merge: int = DEFAULT_MERGE,
               min_tokens_per_frame: int = DEFAULT_MIN_TOKENS_PER_FRAME,
               max_tokens_per_frame: int = DEFAULT_MAX_TOKENS_PER_FRAME) -> VideoPlan:
    """The frames of `info`'s video to read and their size, within `max_tokens` (see the module's rule).

    The frame count is always a multiple of `merge` (an odd count never arises, so nothing is padded
    here; the reader pads only when a video ends before its header said, see read_frames). "Per frame"
    in the token limits means per merged group of `merge` frames: the unit llama.cpp turns into tokens.
    """
    least = ImageBudget.LLAMA_MIN_TOKENS  # llama.cpp enlarges a smaller image to this, which would overrun a budget
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number, not {fps!r}")
    if align < 1 or merge < 1:
        raise ValueError(f"align and merge must be positive, not {align} and {merge}")
    if max_frames < merge:
        raise ValueError(f"max_frames must be at least merge ({merge}), not {max_frames}")
    if min(max_tokens, max_tokens_per_frame) < least:
        raise ValueError(f"max_tokens and max_tokens_per_frame must be at least {least}, "
                         f"not {max_tokens} and {max_tokens_per_frame}")
    per_group_most = min(max_tokens_per_frame, ImageBudget.LLAMA_MAX_TOKENS)
    floor = max(least, min(min_tokens_per_frame, per_group_most))

    wanted = groups = _frame_count(info, fps=fps, max_frames=max_frames, merge=merge) // merge
    size = (max(1, info.width), max(1, info.height))
    floor_tokens = _tokens(_fit(size, align, floor), align)
    if groups * floor_tokens > max_tokens:  # even shrunk to the floor the frames do not fit: drop some
        groups = max(1, max_tokens // floor_tokens)
    frame_size = _fit(size, align, min(per_group_most, max_tokens // groups))
    groups = min(wanted, max(groups, max_tokens // _tokens(frame_size, align)))  # the resize rounds down: room for more?
    count = groups * merge
    return VideoPlan(fps=count / info.duration_s if info.duration_s > 0 else 0.0,
                     timestamps=_spread(info, count), frame_size=frame_size,
                     tokens=groups * _tokens(frame_size, align), merge=merge)


def _frame_count(info: VideoInfo, *, fps: float, max_frames: int, merge: int) -> int:
    """Frames at `fps` over the duration, a multiple of `merge` in [merge, max_frames], within the frames there are."""
    wanted = max(merge, round(info.duration_s * fps / merge) * merge)
    most = max_frames // merge * merge
    if info.fps > 0 and info.duration_s > 0:  # no frame twice while there are others
        there = max(1, round(info.duration_s * info.fps))
        most = min(most, max(merge, there // merge * merge))
    return min(wanted, most)


def _spread(info: VideoInfo, count: int) -> tuple[float, ...]:
    """`count` times from the first frame's to the last frame's, evenly apart."""
    last = max(0.0, info.duration_s - (1.0 / info.fps if info.fps > 0 else 0.0))
    if count == 1:
        return (0.0,)
    return tuple(round(last * i / (count - 1), 6) for i in range(count))


def _fit(size: tuple[int, int], align: int, most_tokens: int) -> tuple[int, int]:
    """Qwen's smart resize of `size` to at most `most_tokens` tokens; a strip too thin for that is narrowed
    (fit_to_budget keeps each side at least one token, which a strip would exceed the cap by)."""
    least = min(ImageBudget.LLAMA_MIN_TOKENS, most_tokens)
    w, h = fit_to_budget(size, align=align, min_pixels=least * align * align, max_pixels=most_tokens * align * align)
    across, down = max(1, w // align), max(1, h // align)
    if across * down > most_tokens:
        if across >= down:
            down = min(down, most_tokens)
            across = max(1, most_tokens // down)
        else:
            across = min(across, most_tokens)
            down = max(1, most_tokens // across)
    if across * down < least:  # llama.cpp would enlarge it past the cap: the grid nearest the aspect within both
        aspect = math.log(size[0] / size[1])
        across, down = min(((a, d) for a in range(1, most_tokens + 1) for d in range(-(-least // a), most_tokens // a + 1)),
                           key=lambda g: (abs(math.log(g[0] / g[1]) - aspect), -g[0] * g[1]))
    return across * align, down * align


def _tokens(size: tuple[int, int], align: int) -> int:
    return (size[0] // align) * (size[1] // align)
