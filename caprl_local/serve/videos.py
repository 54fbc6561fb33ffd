"""Where a served video comes from, what is checked before anything decodes it, and its frames at its turn.

The places and the rules are the images' (sources.py): a base64 data URI, a file under the allowed folder
(a regular file only: a FIFO or a device could stream for ever), an http(s) URL only where remote fetching
is on, each within the video byte cap and deadline (:meth:`ImagePolicy.for_video`). A data URI's media
type must be a video's, or say nothing (none, or application/octet-stream); whatever the source, its
bytes must open like a video container. The headers are then probed (PyAV) in the reading thread, so that
a clip claiming too many pixels or hours, or holding no frame, is a 400 before its request queues. The
frames are read only at the request's turn at the engine (see jobs.py), with the Captioner's own budget.

A file stays open rather than read: a queued request holds its descriptor, never its bytes, and the
reader opens that very file again (not its name, which may name another file by then).
"""

from __future__ import annotations

import functools
import importlib.util
import io
import os
import re
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..chat import ChatVideo
from ..clips import Video, sniff
from ..errors import CaprlError
from ..families import FAMILIES
from ..images import describe
from ..options import GenerationOptions
from .chat import ParsedMessage, Turn, VideoUrl, fetch_media
from .protocol import ApiError
from .sources import (
    ImagePolicy,
    check_open,
    from_base64,
    image_bytes,
    is_local,
    not_read,
    open_local,
    read_open,
    remote_bytes,
    return_freed_memory,
    scheme_of,
)

if TYPE_CHECKING:
    from ..engine import Captioner

#: Media types a data URI may give a video: the containers the reader takes, under their usual names.
VIDEO_TYPES = frozenset({"video", "video/mp4", "video/webm", "video/quicktime", "video/x-matroska", "video/matroska",
                         "video/x-msvideo", "video/avi", "video/msvideo"})
#: Types that say nothing of what the bytes are: taken when the bytes open like a video container.
UNTYPED = frozenset({"", "application/octet-stream"})
_DATA_URI = re.compile(r"data:([\w.+/-]*)((?:;[\w=.+-]+)*);base64,(.*)", re.S | re.I)
_KINDS = "video/mp4, video/webm, video/quicktime, video/x-matroska or video/x-msvideo"


class Clip:
    """A fetched video, its container checked and its headers probed, not yet decoded: its bytes, or the
    open file it is in. Whoever holds it closes it (a file also closes when the Clip is dropped)."""

    def __init__(self, where: str, limit: int, *, data: bytes | None = None, fd: int | None = None) -> None:
        self.where, self.limit = where, limit
        self._data = data
        self._file = io.FileIO(fd, "r", closefd=True) if fd is not None else None

    def source(self) -> bytes | str:
        """What the video reader opens: the bytes, or the very file opened, again (if it is still a regular
        file within the byte cap: a file may change while its request waits)."""
        if self._file is None:
            if self._data is None:
                raise CaprlError(f"{self.where}: the video was closed before it was read")
            return self._data
        check_open(self._file.fileno(), self.where, None, ImagePolicy(max_bytes=self.limit), "video")
        return f"/proc/self/fd/{self._file.fileno()}"

    def close(self) -> None:
        self._data = None
        if self._file is not None:
            self._file.close()


def video_refusal(captioner: Captioner) -> str | None:
    """Why this server takes no video (said before anything is fetched), or None."""
    family = FAMILIES.get(captioner.architecture)
    if family is None or family.video is None:
        return "this model cannot take video; send its frames as images, or serve a Qwen-VL or InternVL model"
    if importlib.util.find_spec("av") is None:
        return "this server cannot read videos (PyAV, caprl-local's video extra, is not installed); send images"
    return None


def read_media(messages: tuple[ParsedMessage, ...], policy: ImagePolicy) -> tuple[Turn[Clip], ...]:
    """The conversation with each image's encoded bytes (a data URI decoded, a file or URL read where allowed)
    and each video read and its headers checked (not decoded; a file held open, not read). In a worker thread."""
    opened: list[Clip] = []

    def video(part: VideoUrl) -> Clip:
        opened.append(clip := read_clip(part, policy))
        return clip

    try:
        return fetch_media(messages, lambda url: image_bytes(url, policy), video)
    except BaseException:  # a later part refused: the videos read so far are closed now
        for clip in opened:
            clip.close()
        raise


def read_clip(part: VideoUrl, policy: ImagePolicy, *, tls: ssl.SSLContext | None = None) -> Clip:
    """The video a video_url part names, read within the policy's video bounds, its container and headers
    checked (in the calling thread: a worker's). Anything refused is an ApiError naming the part."""
    return_freed_memory()
    try:
        clip = _fetch(part, policy.for_video(), tls)
    except ApiError as exc:
        raise _named(exc, part.where) from exc
    try:
        _probe(clip)
    except BaseException:
        clip.close()
        raise
    return clip


def prepare_clip(captioner: Captioner, clip: Clip, generation: GenerationOptions,
                 cancelled: Callable[[], bool] | None = None) -> ChatVideo:
    """The clip's frames for a chat, sampled as the Captioner samples a video (its fps, frame and token caps,
    what its context leaves after the caption's max_tokens); the clip is closed after. ApiError names the part."""
    source: bytes | str | None = None
    try:
        source = clip.source()  # ApiError (naming the part) for a file that is not one any more
        loaded = captioner.prepare_video(Video(source, name=clip.where), generation=generation, cancelled=cancelled)
    except CaprlError as exc:  # a clip that cannot be read, or a context with no room for one
        raise _video_error(clip.where, exc, source) from exc
    finally:
        clip.close()
    return loaded[0]


def _fetch(part: VideoUrl, policy: ImagePolicy, tls: ssl.SSLContext | None) -> Clip:
    url, where = part.url, part.where
    deadline = time.monotonic() + policy.timeout_s
    kind = scheme_of(url)
    if kind == "data":
        data = _inline(url, policy)
    elif kind in ("http", "https"):
        data = remote_bytes(url, policy, deadline, tls, "video")
    elif is_local(url):
        return _local(url, where, policy, deadline)
    else:
        raise not_read(url, "video")
    _container(data[:16])
    return Clip(where, policy.max_bytes, data=data)


def _inline(url: str, policy: ImagePolicy) -> bytes:
    match = _DATA_URI.fullmatch(url.strip())
    if match is None:
        raise _refused("a data URI must be base64 (data:video/mp4;base64,...)", "invalid_video_url")
    media = match.group(1).lower()
    if media not in VIDEO_TYPES | UNTYPED:
        raise _refused(f"a video_url holds a video ({_KINDS}), not {media}; send images as image_url parts",
                       "invalid_video_url")
    return from_base64(match.group(3), policy, "video")


def _local(url: str, where: str, policy: ImagePolicy, deadline: float) -> Clip:
    fd, name = open_local(url, policy, "video")
    try:
        try:
            head = os.pread(fd, 16, 0)
        except OSError as exc:
            raise _refused(f"{name}: cannot read it ({exc.strerror or exc})", "invalid_video_url") from exc
        _container(head)
        if not _reopenable():  # no way to open this very file again: its bytes, then
            return Clip(where, policy.max_bytes, data=read_open(fd, name, policy, deadline, "video"))
        clip, fd = Clip(where, policy.max_bytes, fd=fd), -1  # the Clip owns the descriptor now
        return clip
    finally:
        if fd >= 0:
            os.close(fd)


@functools.cache
def _reopenable() -> bool:
    """Whether an open file can be opened again by its descriptor (Linux's /proc/self/fd)."""
    return os.path.isdir("/proc/self/fd")


def _container(head: bytes) -> None:
    """Refuse bytes that do not open like a video container (MP4/MOV, Matroska/WebM, AVI)."""
    if not sniff(head):
        raise _refused("not a video (its bytes are not an MP4, QuickTime, Matroska, WebM or AVI file's); "
                       "send a video file, or images as image_url parts", "invalid_video")


def _probe(clip: Clip) -> None:
    """Read the clip's headers (bounded sizes and duration, a first frame that decodes) before it queues."""
    from ..video import probe_video

    source = clip.source()
    try:
        probe_video(source)
    except CaprlError as exc:
        raise _video_error(clip.where, exc, source) from exc


def _video_error(where: str, exc: CaprlError, source: bytes | str | None) -> ApiError:
    """A video that cannot be read, as a 400 naming its part (the reader's own name for it left out)."""
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    for name in (where, describe(source) if source is not None else None):
        if name and message.startswith(f"{name}: "):
            message = message[len(name) + 2:]
            break
    return ApiError(400, f"{where}: {message}", code="invalid_video", param="messages")


def _named(exc: ApiError, where: str) -> ApiError:
    """A refusal of the sources' pieces, naming the part it is about."""
    return ApiError(exc.status, f"{where}: {exc.message}", kind=exc.kind, code=exc.code, headers=exc.headers,
                    param="messages")


def _refused(message: str, code: str) -> ApiError:
    return ApiError(400, message, code=code)
