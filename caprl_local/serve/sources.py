"""Where a served image comes from: a base64 data URI, an http(s) URL, or a file under the allowed folder.

Each source is bounded in bytes and in total time, and each image's header is read before anything
decodes it (too many pixels: refused). Every refusal is an ApiError. A URL is fetched only from public
addresses unless the operator names other networks: the host is resolved here, each address checked and
the one checked connected to (no second lookup for a rebinding DNS server to answer), and redirects are
followed here, each checked again. Every failed fetch gets one answer, so that the server cannot be made
to map what it reaches; the log says why. Videos come from the same places under the same rules, with a
byte cap and a deadline of their own (videos.py, with the pieces here).
"""

from __future__ import annotations

import base64
import binascii
import concurrent.futures
import ctypes
import dataclasses
import functools
import ipaddress
import logging
import os
import re
import ssl
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote_to_bytes

from ..errors import CaprlError, ImageError
from ..images import peek_image
from ..printable import shown
from . import remote
from .remote import Network, is_public, may_reach

__all__ = ["ImagePolicy", "image_bytes", "is_public", "may_reach", "return_freed_memory"]

if TYPE_CHECKING:
    from .protocol import ApiError

log = logging.getLogger("caprl_local")

_CHUNK = 1 << 16
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_DATA_URI = re.compile(r"data:(?:image(?:/[\w.+-]+)?)?(?:;[\w=.+-]+)*;base64,(.*)", re.S | re.I)


@dataclass(frozen=True)
class ImagePolicy:
    """Where images named by URL may come from, and how much of each is taken. Servers fetch nothing
    unless told: a server that fetches any URL it is sent lets its clients reach whatever it can reach."""

    allow_remote: bool = False
    local_dir: Path | None = None  # file paths (and file:// URLs) under this folder only
    max_bytes: int = 20_000_000  # per image, from any source
    timeout_s: float = 15.0  # per image, in all: resolving, connecting, redirects, headers and body; or the file
    max_pixels: int = 16_000_000  # a header saying more is refused before decoding (see pixels_for)
    networks: tuple[Network, ...] = ()  # non-public networks remote fetching may reach too (CIDR strings welcome)
    max_redirects: int = 5
    max_video_bytes: int = 256 * 1024 * 1024  # per video (a data URI's is within the request body's cap too)
    video_timeout_s: float = 60.0  # per video, reading it in all (as timeout_s for an image)

    def __post_init__(self) -> None:
        try:
            networks = tuple(ipaddress.ip_network(n, strict=False) for n in self.networks)
        except (TypeError, ValueError) as exc:
            raise CaprlError(f"{exc}: give image networks in CIDR form, such as 10.0.0.0/8 or fd00::/8") from exc
        object.__setattr__(self, "networks", networks)

    @staticmethod
    def pixels_for(image_max_tokens: int | None) -> int:
        """A generous pixel cap for an image-token cap: 16 times the pixels the largest image keeps
        (a Qwen3-VL token covers 32x32 pixels, Qwen2.5-VL's 28x28), and never under 16 megapixels."""
        return max(16_000_000, 16 * (image_max_tokens or 4096) * 32 * 32)  # None: llama.cpp's own cap

    def for_video(self) -> ImagePolicy:
        """This policy with a video's byte cap and deadline in place of an image's (where stays the same)."""
        return dataclasses.replace(self, max_bytes=self.max_video_bytes, timeout_s=self.video_timeout_s)


def image_bytes(url: str, policy: ImagePolicy, *, tls: ssl.SSLContext | None = None) -> bytes:
    """The encoded image a URL names, read within the policy's bounds and its header checked: a base64
    data URI (``data:image;base64,...`` too, as CapRL's own client sends), an http(s) URL if remote
    images are allowed (``tls``: the certificates to trust; the system's by default), a path or a
    file: URL under the allowed folder. Anything refused is an ApiError."""
    return_freed_memory()
    deadline = time.monotonic() + policy.timeout_s
    kind = scheme_of(url)
    if kind == "data":
        data = _inline(url, policy)
    elif kind in ("http", "https"):
        data = remote_bytes(url, policy, deadline, tls)
    elif is_local(url):
        data = _local(url, policy, deadline)  # "photo:1.png" is a file name, "ftp://..." a URL
    else:
        raise not_read(url)
    _check_header(data, policy)
    return data


def scheme_of(url: str) -> str | None:
    """A URL's scheme in lower case; None for a plain path."""
    scheme = _SCHEME.match(url)
    return scheme.group(1).lower() if scheme else None


def is_local(url: str) -> bool:
    """Whether `url` names a file on this machine: a file: URL, or a path ("photo:1.png" too; "ftp://..." not)."""
    scheme = _SCHEME.match(url)
    return scheme is None or scheme.group(1).lower() == "file" or not url[scheme.end():].startswith("//")


def not_read(url: str, noun: str = "image") -> ApiError:
    kind = scheme_of(url)
    return _api(400, f"{shown(kind)}: URLs are not read here; send a data URI, an http(s) URL or a file path",
                f"invalid_{noun}_url")


def _api(status: int, message: str, code: str) -> ApiError:
    from .protocol import ApiError  # protocol imports this module for its names: resolved at the call

    return ApiError(status, message, code=code)


def _check_header(data: bytes, policy: ImagePolicy) -> None:
    """Refuse an image whose header says more pixels than the cap (before anything decodes it)."""
    try:
        kind, width, height, pixels = peek_image(data)  # pixels 0: a JPEG decoded at a reduced scale
    except ImageError as exc:
        raise _api(400, f"the image: {str(exc).split(': ', 1)[-1]}", "invalid_image") from exc
    if pixels > policy.max_pixels:
        held = f"{pixels:,} pixels" + ("" if pixels == width * height else " (its tiles are larger than it)")
        raise _api(413, f"the image is a {width}x{height} {shown(kind)}: decoding it takes {held}, over this server's "
                   f"limit of {policy.max_pixels:,}; downscale it first", "image_too_large")


def too_large(what: str, policy: ImagePolicy, noun: str = "image") -> ApiError:
    return _api(413, f"{what} is over {policy.max_bytes:,} bytes, this server's limit for {_a(noun)}", f"{noun}_too_large")


def _a(noun: str) -> str:
    return f"an {noun}" if noun[0] in "aeiou" else f"a {noun}"


# --- data URIs --------------------------------------------------------------------------------


def _inline(url: str, policy: ImagePolicy) -> bytes:
    match = _DATA_URI.fullmatch(url.strip())
    if match is None:
        if url.strip()[5:11].lower() == "video/":
            raise _api(400, "a data URI of a video: send it as a video_url part", "invalid_image_url")
        raise _api(400, "a data URI must be base64 (data:image/...;base64,...)", "invalid_image_url")
    return from_base64(match.group(1), policy)


def from_base64(text: str, policy: ImagePolicy, noun: str = "image") -> bytes:
    """A data URI's payload decoded, within the byte cap (refused before decoding when it says more)."""
    if len(text) // 4 * 3 > policy.max_bytes + 3:
        raise too_large(f"the {noun}", policy, noun)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _api(400, f"the {noun}'s base64 is invalid ({exc})", f"invalid_{noun}") from exc
    if len(data) > policy.max_bytes:
        raise too_large(f"the {noun}", policy, noun)
    return data


# --- files under the allowed folder -----------------------------------------------------------


def _local(url: str, policy: ImagePolicy, deadline: float) -> bytes:
    fd, name = open_local(url, policy)
    try:
        return read_open(fd, name, policy, deadline)
    finally:
        os.close(fd)


def open_local(url: str, policy: ImagePolicy, noun: str = "image") -> tuple[int, str]:
    """(an open descriptor, the name for messages) of the regular file `url` names under the allowed folder,
    within the byte cap; the caller closes it. 403 outside the folder, 400 for what is not a regular file."""
    code = f"invalid_{noun}_url"
    if policy.local_dir is None:
        raise _api(400, f"this server reads no {noun} files; send the {noun} as a base64 data URI", code)
    name = shown(url)
    root = os.path.realpath(os.fsencode(policy.local_dir))
    resolved = os.path.realpath(os.path.join(root, _file_path(url, code)))  # a relative path: in the folder
    if not _under(resolved, root):  # symbolic links followed: where the file really is
        raise _api(403, f"{name}: not under the folder this server may read", "path_not_allowed")
    try:
        if kind := _not_a_file(os.stat(resolved).st_mode):  # refused without opening it (a device may act on open)
            raise _api(400, f"{name}: is {kind}, not {_a(noun)} file", code)
        # Non-blocking, so that a FIFO put in the file's place since cannot hold the open; not following a link
        # put there since either.
        fd = os.open(resolved, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NOCTTY", 0)
                     | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as exc:
        raise _api(400, f"{name}: no such file; check the path", code) from exc
    except (OSError, ValueError) as exc:
        raise _api(400, f"{name}: cannot read it ({getattr(exc, 'strerror', None) or exc})", code) from exc
    try:
        check_open(fd, name, root, policy, noun)
    except BaseException:
        os.close(fd)
        raise
    return fd, name


def check_open(fd: int, name: str, root: bytes | None, policy: ImagePolicy, noun: str = "image") -> os.stat_result:
    """The open file's status, if it is a regular file (under `root`, when given) within the byte cap."""
    try:
        st = os.fstat(fd)
        if kind := _not_a_file(st.st_mode):
            raise _api(400, f"{name}: is {kind}, not {_a(noun)} file", f"invalid_{noun}_url")
        with_proc = f"/proc/self/fd/{fd}".encode()
        if root is not None and os.path.exists(with_proc) and not _under(os.readlink(with_proc), root):
            raise _api(403, f"{name}: not under the folder this server may read", "path_not_allowed")  # where it is
    except OSError as exc:
        raise _api(400, f"{name}: cannot read it ({exc.strerror or exc})", f"invalid_{noun}_url") from exc
    if st.st_size > policy.max_bytes:
        raise too_large(name, policy, noun)
    return st


def read_open(fd: int, name: str, policy: ImagePolicy, deadline: float, noun: str = "image") -> bytes:
    """A checked open file's bytes, within the byte cap (it may grow while read) and the deadline."""
    pieces, total = [], 0
    try:
        while piece := os.read(fd, 16 * _CHUNK):
            total += len(piece)
            if total > policy.max_bytes:  # it grew while read
                raise too_large(name, policy, noun)
            if time.monotonic() > deadline:
                raise _api(400, f"{name}: reading it took more than {policy.timeout_s:g} s", f"invalid_{noun}_url")
            pieces.append(piece)
    except OSError as exc:
        raise _api(400, f"{name}: cannot read it ({exc.strerror or exc})", f"invalid_{noun}_url") from exc
    return b"".join(pieces)


def _file_path(url: str, code: str) -> bytes:
    """The path a request names, as bytes: a plain path, or a file: URL (``file:///p``,
    ``file://localhost/p``, RFC 8089's ``file:/p``) percent-decoded. 400 for another host, a NUL, a lone surrogate."""
    name = shown(url)
    try:
        if url[:5].lower() == "file:":
            rest = url[5:]
            if rest.startswith("//"):
                host, slash, tail = rest[2:].partition("/")
                if host.lower() not in ("", "localhost"):
                    raise _api(400, f"{name}: a file URL names a file on this machine (file:///path), not on "
                               f"{shown(host)}", code)
                rest = slash + tail
            if not rest.startswith("/"):
                raise _api(400, f"{name}: a file URL's path is absolute (file:///path/to/file)", code)
            path = unquote_to_bytes(rest.split("#", 1)[0].split("?", 1)[0])
        else:
            path = url.encode("utf-8")
    except UnicodeError as exc:
        raise _api(400, f"{name}: the path is not valid text (it holds a lone surrogate)", code) from exc
    if b"\0" in path:
        raise _api(400, f"{name}: the path holds a NUL byte", code)
    return path


def _under(path: bytes, root: bytes) -> bool:
    return path == root or path.startswith(root.rstrip(b"/") + b"/")


_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device"}


def _not_a_file(mode: int) -> str | None:
    """What a file that is not a regular file is, for a message; None for a regular file."""
    return None if stat.S_ISREG(mode) else _KINDS.get(stat.S_IFMT(mode), "not a regular file")


# --- remote images ----------------------------------------------------------------------------


def remote_bytes(url: str, policy: ImagePolicy, deadline: float, tls: ssl.SSLContext | None, noun: str = "image") -> bytes:
    """The body at an http(s) URL, if the policy allows remote fetching (and the address); one answer for
    every failure (the log says why)."""
    if not policy.allow_remote:
        raise _api(400, f"this server does not fetch {noun} URLs (remote images are off); send the {noun} "
                   "as a base64 data URI", "remote_images_disabled")
    try:
        return remote.fetch(url, policy, deadline, tls, accept=f"{noun}/*")
    except remote.TooLarge:  # too large: said as such
        raise too_large(f"the {noun}", policy, noun) from None
    except Exception as exc:  # noqa: BLE001 - refused, unreachable, or whatever a hostile origin makes http.client raise
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, TimeoutError | concurrent.futures.TimeoutError):
            reason = f"no answer within the {policy.timeout_s:g} s allowed ({reason})"
        log.warning("%s URL %s not fetched: %s", noun, shown(url), shown(reason, 400))
        raise _api(400, f"cannot fetch the {noun} at {shown(url)}", f"{noun}_fetch_failed") from exc


# --- memory -----------------------------------------------------------------------------------


@functools.cache
def return_freed_memory() -> None:
    """Have glibc give the memory of a large decode back to the system once it is freed (process-wide,
    once). Its mmap threshold otherwise rises to the largest block freed (up to 32 MB), and from then on
    Pillow's 16-MB blocks come from the heap and stay with the process: a server that had decoded one
    88-megapixel PNG kept 1.4 GB. Fixed at 1 MB, large blocks are mapped and unmapped each time."""
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(-3, 1 << 20) != 1:  # M_MMAP_THRESHOLD
        log.debug("the C library kept its own mmap threshold")
