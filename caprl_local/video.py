"""Video clips in, sampled frames out: probe a clip's headers, then stream the frames a plan names.

This is the only module that decodes video (PyAV, the ``video`` extra). It holds at most a couple of
decoded frames at a time, bounds every number a header claims before decoding, and turns every failure
into an :class:`ImageError` whose one-line message names the clip. Which frames to read and at what size
is :mod:`caprl_local.videoplan`'s arithmetic.
"""

from __future__ import annotations

import io
import logging
import math
import os
import stat
import threading
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, BinaryIO, Union

from PIL import Image

from .errors import Cancelled, ImageError
from .images import BACKGROUND, describe, read_errors
from .printable import printable
from .videoplan import VideoInfo, VideoPlan, check_duration, check_frame_size, frame_rate, quarter_turn, seconds

if TYPE_CHECKING:
    from av.container import InputContainer
    from av.video.frame import VideoFrame
    from av.video.stream import VideoStream

log = logging.getLogger("caprl_local")

#: File name endings read as video (an animated GIF stays an image: its first frame).
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi")

VideoSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview]

#: Packets decoded at most while looking for a clip's first frame (probe_video).
FIRST_FRAME_PACKETS = 1000
#: Packets read at most, looking for the end of a clip whose headers give no duration.
SCAN_PACKETS = 2_000_000
#: A read ends after MIN_PACKETS + PACKETS_PER_SECOND per second of the clip it needs, or MAX_READ_BYTES,
#: whatever the timestamps say: a looping or endless stream ends too.
MIN_PACKETS, PACKETS_PER_SECOND, MAX_READ_BYTES = 10_000, 1000, 16 * 1024**3
#: Packets that fail to decode before a read gives up on the rest of the clip.
MAX_BAD_PACKETS = 50

#: Nested opens refused: a demuxer reads only the bytes handed to it, so a playlist or concat list
#: inside a ".mp4" can make FFmpeg fetch no URL and open no other file. (No protocol has this name.)
_OPEN_OPTIONS = {"protocol_whitelist": "none"}
_EPS = 1e-6  # seconds: a frame whose time is within float noise of a planned time is shown at it
_TRANSPOSE = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}


def is_video(path: str | os.PathLike[str]) -> bool:
    """Whether `path` names a video by its suffix (case-insensitive)."""
    return os.fspath(path).lower().endswith(VIDEO_SUFFIXES)


@dataclass(frozen=True)
class Frame:
    """One sampled frame: the `index`-th delivered, for the planned time `timestamp_s` (seconds from the
    start), showing the decoded frame of time `source_s`; `image` is upright RGB at the plan's frame size.
    `repeated` marks a copy of the previous frame that completes the last merged group."""

    index: int
    timestamp_s: float
    image: Image.Image
    source_s: float
    repeated: bool = False


def _av() -> ModuleType:
    try:
        import av
    except ImportError as exc:
        raise ImageError(f"reading videos needs PyAV ({exc.name or 'av'} is missing); install caprl-local[video] "
                         "(pip install '.[video]' in a caprl-local checkout)") from exc
    return av


def _why(exc: BaseException) -> str:
    """FFmpeg's reason, one short line (its messages may carry a file name: those are data)."""
    return printable(getattr(exc, "strerror", None) or exc or type(exc).__name__, limit=160)


def _open_file(path: Path, name: str) -> BinaryIO:
    with read_errors(name):
        st = path.stat()
        if stat.S_ISDIR(st.st_mode):
            raise ImageError(f"{name}: is a directory, not a video file")
        if not stat.S_ISREG(st.st_mode):
            # A video is read twice (its headers, then its frames), which a FIFO or a device cannot give.
            raise ImageError(f"{name}: is not a regular file; save the video to a file first")
        if st.st_size == 0:
            raise ImageError(f"{name}: file is empty (0 bytes); re-export or re-download it")
        return open(path, "rb")


@contextmanager
def _opened(source: VideoSource, name: str) -> Iterator[tuple[ModuleType, InputContainer]]:
    """PyAV and the open container of `source`, closed on leaving."""
    av = _av()
    fh: BinaryIO
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageError(f"{name}: no video data (empty input)")
        fh = io.BytesIO(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        fh = _open_file(Path(source), name)
    else:
        raise ImageError(f"{name}: unsupported video input; pass a path or bytes")
    with fh:
        try:
            container = av.open(fh, mode="r", options=_OPEN_OPTIONS)
        except EOFError as exc:  # av's EOFError is one too: the headers and no frames, or not even those
            raise ImageError(f"{name}: ends before any frame (it holds no frames); the file is empty or cut short, "
                             "re-export it") from exc
        except (av.FFmpegError, OSError, ValueError) as exc:  # PyAV's errors are FFmpegError, some also OSError
            raise ImageError(f"{name}: not a video file FFmpeg can read ({_why(exc)}); check the file or re-encode it") from exc
        try:
            yield av, container
        finally:
            container.close()


def _video_stream(av: ModuleType, container: InputContainer, name: str) -> VideoStream:
    """The clip's video: its first video stream that is not cover art."""
    art = getattr(getattr(av, "stream", None), "Disposition", None)  # a song's cover picture is no video
    for stream in container.streams.video:
        if art is None or not stream.disposition & art.attached_pic:
            if stream.codec_context is None:
                raise ImageError(f"{name}: no decoder for its video codec; the file may be damaged, or re-encode it "
                                 "(H.264, VP9, AV1)")
            return stream
    if container.streams.audio:
        raise ImageError(f"{name}: has no video stream, only audio; give a video file")
    raise ImageError(f"{name}: has no video stream; give a video file")


def _rotation(frame: VideoFrame, stream: VideoStream) -> int:
    """How far to turn `frame` (counter-clockwise) to show it upright: its display matrix (PyAV 14.1 and
    later), else an old muxer's `rotate` tag (which counts clockwise)."""
    turned = getattr(frame, "rotation", None)
    if turned is not None:
        return quarter_turn(float(turned))
    try:
        return quarter_turn(-float(stream.metadata.get("rotate", 0)))
    except ValueError:
        return 0


def _check_header(stream: VideoStream, name: str) -> tuple[int, int]:  # the coded size, bounded before decoding
    return check_frame_size(int(stream.codec_context.width or 0), int(stream.codec_context.height or 0), name)


def _claimed_duration(container: InputContainer, stream: VideoStream, fps: float) -> float | None:
    for claim in (seconds(stream.duration, stream.time_base), seconds(container.duration, 1e-6),
                  stream.frames / fps if stream.frames and fps else None):
        if claim is not None and claim > 0:
            return claim
    return None


def probe_video(source: VideoSource) -> VideoInfo:
    """What `source`'s headers say, checked: bounded sizes and duration, a video stream that has a first
    frame (decoded, for the rotation that only frames carry). A clip whose headers give no duration is
    read to its end (packets only, not decoded) to find it."""
    name = describe(source)
    with _opened(source, name) as (av, container):
        stream = _video_stream(av, container, name)
        w, h = _check_header(stream, name)
        fps = frame_rate(stream.average_rate, stream.guessed_rate)
        duration = _claimed_duration(container, stream, fps)
        if duration is not None:
            check_duration(duration, name)
        stream.codec_context.thread_count = 1
        first: VideoFrame | None = None
        last_end, packets = 0.0, 0
        start = seconds(stream.start_time, stream.time_base)
        try:
            for packet in container.demux(stream):
                packets += 1
                if first is None:
                    try:
                        decoded = packet.decode()
                    except av.FFmpegError:  # a damaged packet: the next may decode
                        decoded = []
                    first = decoded[0] if decoded else None
                    if first is None and packets >= FIRST_FRAME_PACKETS:
                        break
                if duration is None:  # read on for the end
                    end = seconds(packet.pts, packet.time_base)
                    if end is not None:
                        if start is None:
                            start = end
                        last_end = max(last_end, end - start + (seconds(packet.duration, packet.time_base) or 0.0))
                elif first is not None:
                    break
                if packets >= SCAN_PACKETS:
                    break
        except (av.FFmpegError, OSError) as exc:  # a damaged tail; what was read stands
            if first is None:
                raise ImageError(f"{name}: cannot read its video ({_why(exc)}); the file is damaged, re-encode it") from exc
        if first is None:
            why = "its video stream holds no frames" if packets == 0 else "no frame of its video decodes"
            raise ImageError(f"{name}: {why}; the file is empty or damaged, re-export it")
        if duration is None:
            duration = check_duration(last_end or (1 / fps if fps else 0.0), name)
        rotation = _rotation(first, stream)
        sar = seconds(stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio, 1)
        shown_w = round(w * sar) if sar is not None and 0.125 <= sar <= 8 else w  # anamorphic pixels
        if rotation in (90, 270):
            shown_w, h = h, shown_w
        return VideoInfo(duration_s=duration, fps=fps, width=shown_w, height=h, rotation=rotation,
                         n_frames_hint=max(0, min(int(stream.frames or 0), 2**31 - 1)),  # a claim: only bounded
                         codec=printable(stream.codec_context.name, limit=40), has_audio=bool(container.streams.audio))


class FrameStream(Iterator[Frame]):
    """The frames :func:`read_frames` delivers, read as they are asked for.

    Once iteration ends, ``dropped`` counts the planned times no frame was delivered for (the video
    ended before its header said: the times past its real end), ``damaged`` says whether decoding met a
    truncated or corrupt stretch (the frames before it are delivered; a warning is logged), and
    ``padded`` counts copies of the last frame added to complete the last merged group.
    """

    def __init__(self, source: VideoSource, plan: VideoPlan, info: VideoInfo | None, deadline_s: float | None,
                 cancelled: threading.Event | Callable[[], bool] | None, threads: int) -> None:
        if plan.merge < 1 or min(plan.frame_size) < 1 or not plan.timestamps or list(plan.timestamps) != sorted(plan.timestamps):
            raise ValueError(f"not a plan to read (merge {plan.merge}, size {plan.frame_size}, times ascending?)")
        self.name = describe(source)
        self.dropped, self.padded, self.damaged = 0, 0, False
        self._source, self._plan, self._info, self._threads, self._deadline_s = source, plan, info, max(1, threads), deadline_s
        self._cancelled = cancelled.is_set if isinstance(cancelled, threading.Event) else cancelled
        self._converted: VideoFrame | None = None  # the decoded frame the last delivered image is of
        self._began, self._frames = 0.0, self._read()

    @property
    def truncated(self) -> bool:
        """Whether the video gave less than planned: it ended before its header said (cut short, or a
        header that lies), or part of it would not decode."""
        return self.damaged or self.dropped > 0

    def __iter__(self) -> FrameStream:
        return self

    def __next__(self) -> Frame:
        return next(self._frames)

    def close(self) -> None:
        """Stop reading and close the file (also done when the frames run out or the stream is dropped)."""
        self._frames.close()

    def __enter__(self) -> FrameStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self) -> Generator[Frame, None, None]:
        self._began = time.monotonic()
        info = self._info or probe_video(self._source)
        plan, name = self._plan, self.name
        targets, done = plan.timestamps, 0
        delivered: Frame | None = None
        with _opened(self._source, name) as (av, container):
            stream = _video_stream(av, container, name)
            _check_header(stream, name)  # again: `info` may be of another file
            stream.codec_context.thread_type = "AUTO"
            stream.codec_context.thread_count = self._threads  # the machine may be busy: few threads
            held: tuple[VideoFrame, float] | None = None  # the latest frame: it is shown until the next one's time
            with closing(self._decoded(av, container, stream, info)) as decoded:
                for frame, t in decoded:
                    while done < len(targets) and t > targets[done] + _EPS:
                        delivered = self._frame(done, targets[done], held or (frame, t), stream, delivered)
                        yield delivered
                        done += 1
                    held = (frame, t)
                    if done == len(targets):
                        break
            if held is not None:  # the last frame is shown for its duration, then the clip ends
                length = seconds(getattr(held[0], "duration", None), held[0].time_base) or (1 / info.fps if info.fps else 0)
                while done < len(targets) and targets[done] <= held[1] + length + _EPS:
                    delivered = self._frame(done, targets[done], held, stream, delivered)
                    yield delivered
                    done += 1
        if delivered is None:
            raise ImageError(f"{name}: no frame of its video decodes; the file is damaged, re-export it")
        self.dropped = len(targets) - done
        if self.dropped:
            log.warning("%s: the video ends at %.2f s, before %d of its %d planned frames", printable(name),
                        delivered.source_s, self.dropped, len(targets))
        while (done + self.padded) % plan.merge:  # complete the last group, as Qwen's processor does
            self.padded += 1
            yield Frame(done + self.padded - 1, delivered.timestamp_s, delivered.image.copy(), delivered.source_s, True)

    def _frame(self, index: int, at: float, shown: tuple[VideoFrame, float], stream: VideoStream,
               previous: Frame | None) -> Frame:
        if previous is not None and self._converted is shown[0]:  # the same frame again: no second conversion
            return Frame(index, at, previous.image.copy(), shown[1])
        self._converted = shown[0]
        try:
            image = _picture(shown[0], self._plan.frame_size, _rotation(shown[0], stream))
        except (_av().FFmpegError, ValueError) as exc:  # a pixel format FFmpeg cannot convert, say
            raise ImageError(f"{self.name}: cannot convert its frame at {shown[1]:.2f} s ({_why(exc)}); "
                             "re-encode the video") from exc
        return Frame(index, at, image, shown[1])

    def _decoded(self, av: ModuleType, container: InputContainer, stream: VideoStream,
                 info: VideoInfo) -> Generator[tuple[VideoFrame, float], None, None]:
        """Each decoded frame and its time in seconds from the clip's start, in display order, until the
        clip ends, a bound is reached, or the decoding fails for good."""
        name = self.name
        last_target = self._plan.timestamps[-1] if self._plan.timestamps else 0.0
        most_packets = MIN_PACKETS + PACKETS_PER_SECOND * math.ceil(last_target + 2)
        start = seconds(stream.start_time, stream.time_base)
        packets, size, bad, latest = 0, 0, 0, -math.inf
        step = 1 / info.fps if info.fps else 0.0
        demux = container.demux(stream)
        while True:
            if self._cancelled is not None and self._cancelled():
                raise Cancelled.of(name)
            if self._deadline_s is not None and time.monotonic() - self._began > self._deadline_s:
                raise ImageError(f"{name}: reading its frames took more than {self._deadline_s:g} s; give a shorter "
                                 "clip or more time")
            try:
                packet = next(demux)
                packets, size = packets + 1, size + packet.size
                decoded = packet.decode()
            except StopIteration:
                return
            except (av.FFmpegError, OSError) as exc:  # a truncated or corrupt stretch: skip it, within a bound
                bad += 1
                if not self.damaged:
                    log.warning("%s: part of the video is damaged (%s); its other frames are used", printable(name), _why(exc))
                self.damaged = True
                if bad > MAX_BAD_PACKETS:
                    return
                continue
            if packets > most_packets or size > MAX_READ_BYTES:
                log.warning("%s: the video goes on past every bound on its reading; it is cut there", printable(name))
                return
            for frame in decoded:
                t = seconds(frame.pts, frame.time_base)
                if t is None:  # no timestamp: one frame step after the last
                    t = latest + step if latest > -math.inf else 0.0
                else:
                    start = t if start is None else start
                    t -= start
                if t < latest - _EPS:  # time went back (a looping or broken stream): such frames are not shown
                    continue
                latest = t
                yield frame, max(0.0, t)


def _has_alpha(frame: VideoFrame) -> bool:
    return any(getattr(c, "is_alpha", False) for c in frame.format.components)


def _picture(frame: VideoFrame, size: tuple[int, int], rotation: int) -> Image.Image:
    """`frame` upright as RGB at `size`: scaled by FFmpeg (before turning: the coded orientation),
    transparency shown on white as the image reader does."""
    w, h = size if rotation not in (90, 270) else (size[1], size[0])
    if _has_alpha(frame):
        rgba = Image.fromarray(frame.reformat(width=w, height=h, format="rgba", interpolation="BICUBIC").to_ndarray(), "RGBA")
        img = Image.new("RGB", rgba.size, BACKGROUND)
        img.paste(rgba, mask=rgba.getchannel("A"))
    else:
        img = frame.reformat(width=w, height=h, format="rgb24", interpolation="BICUBIC").to_image()
    return img.transpose(_TRANSPOSE[rotation]) if rotation in _TRANSPOSE else img


def read_frames(source: VideoSource, plan: VideoPlan, *, info: VideoInfo | None = None, deadline_s: float | None = None,
                cancelled: threading.Event | Callable[[], bool] | None = None, threads: int = 1) -> FrameStream:
    """Stream the frames `plan` names from `source` (a path or bytes): for each planned time, the frame
    shown at that time (the last one whose timestamp is not after it), upright, RGB, at
    ``plan.frame_size``. Timestamps are used, not frame counts, so a variable frame rate is read right.

    At most a couple of decoded frames are held at a time. A clip that ends before its header said
    gives fewer frames (``len(list(...))`` is what counts; see :class:`FrameStream` for what was dropped),
    always a whole number of merged groups (the last frame repeated to complete one, as Qwen's processor
    does). `info` (from :func:`probe_video`) spares a second probe. `deadline_s`: seconds the reading may
    take, counted from the first frame asked for; `cancelled`: raise :class:`Cancelled` once it is set.
    `threads`: decoder threads (few: the machine may be busy).
    """
    return FrameStream(source, plan, info, deadline_s, cancelled, threads)
