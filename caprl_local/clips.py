"""A video as a caption's input: probed, planned within what the caption's context leaves, read into the
frames the model's family takes, with the numbers a dataset record keeps.

Pure of llama.cpp: :mod:`caprl_local.video` reads the clip (PyAV), :mod:`caprl_local.videoplan` chooses
the frames, :mod:`caprl_local.videoprompt` says how the family reads them. Which inputs are videos: a path
with a video suffix, a :class:`Video` value, or bytes that open like a video container.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

from .budgets import ImageBudget, TiledBudget
from .chat import ChatVideo
from .errors import CaprlError, ImageError
from .options import EngineOptions
from .results import VideoStats
from .video import is_video
from .videoplan import DEFAULT_MAX_TOKENS, VideoInfo, VideoPlan, plan_video
from .videoprompt import VideoForm, image_groups, layout

#: Tokens kept for a caption's own text around the video (the template, the prompt) besides its new tokens.
PROMPT_ROOM = 256
#: Over this many bytes in memory, a video given as bytes is refused: a path streams instead.
MAX_VIDEO_BYTES = 1 << 30


@dataclass(frozen=True, eq=False)
class Video:
    """A video to caption: a path, or a clip's bytes (``Video(data)``), where a bare path or bytes would
    be taken for an image."""

    source: str | os.PathLike[str] | bytes
    name: str = ""

    def describe(self) -> str:
        if self.name:
            return self.name
        return os.fspath(self.source) if not isinstance(self.source, bytes) else f"<video: {len(self.source):,} bytes>"


def is_video_input(source: object) -> bool:
    """Whether a caption input is a video: a Video, a path with a video suffix, or bytes of a video container."""
    if isinstance(source, Video):
        return True
    if isinstance(source, (str, os.PathLike)):
        return is_video(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return sniff(bytes(source[:16]))
    return False


#: QuickTime files from before MP4 may start with one of these atoms instead of ftyp.
QUICKTIME_ATOMS = (b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot")


def sniff(head: bytes) -> bool:
    """Whether the first bytes of a file are a video container's (MP4/MOV, Matroska/WebM, AVI)."""
    return (head[4:8] == b"ftyp" and head[8:12] not in (b"avif", b"avis", b"heic", b"heix", b"mif1", b"msf1")) \
        or head[4:8] in QUICKTIME_ATOMS or head[:4] == b"\x1a\x45\xdf\xa3" \
        or (head[:4] == b"RIFF" and head[8:12] == b"AVI ")


VideoInput = Video | str | os.PathLike[str] | bytes | bytearray | memoryview


def prepare_video(source: VideoInput, *, form: VideoForm, budget: ImageBudget | TiledBudget, options: EngineOptions,
                  n_ctx: int, max_new_tokens: int, deadline_s: float | None = None,
                  cancelled: Callable[[], bool] | None = None) -> tuple[ChatVideo, VideoStats]:
    """Probe, plan and read a video for a caption: its frames and timestamps in the family's form, and the
    numbers of what was used. ImageError for a clip that cannot be read, or a context with no room for one;
    Cancelled once `cancelled()` is true, and ImageError past `deadline_s` seconds of reading."""
    from .video import probe_video, read_frames  # PyAV: its extra, named in the error when missing

    given = source.source if isinstance(source, Video) else source
    clip: str | os.PathLike[str] | bytes = bytes(given) if isinstance(given, (bytearray, memoryview)) else given
    name = source.describe() if isinstance(source, Video) else _name(clip)
    if isinstance(clip, bytes) and len(clip) > MAX_VIDEO_BYTES:
        raise ImageError(f"{name}: {len(clip):,} bytes of video in memory is over {MAX_VIDEO_BYTES:,}; give its path")
    room = n_ctx - max_new_tokens - PROMPT_ROOM
    most = min(options.video_max_tokens or DEFAULT_MAX_TOKENS, room)
    if most < 2 * ImageBudget.LLAMA_MIN_TOKENS:
        raise ImageError(f"{name}: a context of {n_ctx} tokens with {max_new_tokens} new ones leaves no room for a "
                         "video; raise the context size (-c) or lower max_tokens")
    info = probe_video(clip)
    plan = _plan(info, form=form, budget=budget, options=options, most=most)
    with read_frames(clip, plan, info=info, deadline_s=deadline_s, cancelled=cancelled) as stream:
        frames = list(stream)
    if not frames:
        raise ImageError(f"{name}: no frame could be read from the video; check the file")
    video = ChatVideo.of(frames, form, name)
    tokens = image_groups(layout(video.timestamps, form)) * _per_group(plan, budget)
    # A clip that ended early (cut short, or a header that lies) is as long as far as it was read.
    duration = min(info.duration_s, max(f.source_s for f in frames) + 1 / max(plan.fps, 1e-3)) if stream.truncated \
        else info.duration_s
    stats = VideoStats(duration_s=round(duration, 3), frames=len(frames), fps=round(plan.fps, 3),
                       width=plan.frame_size[0], height=plan.frame_size[1], tokens=tokens,
                       truncated=stream.truncated)
    return video, stats


def _plan(info: VideoInfo, *, form: VideoForm, budget: ImageBudget | TiledBudget, options: EngineOptions,
          most: int) -> VideoPlan:
    """The frames to read within `most` tokens as the family lays them out (llama.cpp's form pairs fewer
    frames than the plan assumes: its timestamps stand between some)."""
    target = most
    for _ in range(4):
        try:
            plan = _plan_once(info, form=form, budget=budget, options=options, most=target)
        except ValueError as exc:
            raise CaprlError(f"cannot sample the video: {exc}") from exc
        tokens = image_groups(layout(plan.timestamps, form)) * _per_group(plan, budget)
        if tokens <= most or len(plan.timestamps) <= form.merge:
            return plan
        target = max(2 * ImageBudget.LLAMA_MIN_TOKENS, math.floor(target * most / tokens))
    return plan


def _plan_once(info: VideoInfo, *, form: VideoForm, budget: ImageBudget | TiledBudget, options: EngineOptions,
               most: int) -> VideoPlan:
    if isinstance(budget, TiledBudget):  # InternVL: each frame one tile of its own (a larger one would be cut up)
        frames = max(1, min(options.video_max_frames, most // budget.per_tile))
        plan = plan_video(info, fps=options.video_fps, max_frames=frames, max_tokens=most,
                          align=budget.tile // math.isqrt(budget.per_tile), merge=1,
                          max_tokens_per_frame=budget.per_tile)
        scale = min(1.0, budget.tile / max(plan.frame_size))
        size = (max(1, round(plan.frame_size[0] * scale)), max(1, round(plan.frame_size[1] * scale)))
        return VideoPlan(fps=plan.fps, timestamps=plan.timestamps, frame_size=size,
                         tokens=len(plan.timestamps) * budget.per_tile, merge=1)
    return plan_video(info, fps=options.video_fps, max_frames=options.video_max_frames, max_tokens=most, align=budget.align,
                      merge=form.merge)


def _per_group(plan: VideoPlan, budget: ImageBudget | TiledBudget) -> int:
    """Tokens one image of the video's frames costs."""
    if isinstance(budget, TiledBudget):
        return budget.per_tile
    return (plan.frame_size[0] // budget.align) * (plan.frame_size[1] // budget.align)


def _name(clip: str | os.PathLike[str] | bytes) -> str:
    return f"<video: {len(clip):,} bytes>" if isinstance(clip, bytes) else os.fspath(clip)
