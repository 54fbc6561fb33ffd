"""Where a served image comes from: a base64 data URI, an http(s) URL, or a file under the allowed folder.

Each source is bounded in bytes and in total time, and each image's header is read before anything
decodes it (too many pixels: refused). Every refusal is an ApiError. A URL is fetched only from public
addresses unless the operator names other networks: the host is resolved here, each address checked and
the one checked connected to (no second lookup for a rebinding DNS server to answer), and redirects are
followed here, each checked again. Every failed fetch gets one answer, so that the server cannot be made
to map what it reaches; the log says why.
"""

from __future__ import annotations

import base64
import binascii
import concurrent.futures
import ctypes
import functools
import http.client
import io
import ipaddress
import logging
import os
import re
import socket
import ssl
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import quote, unquote_to_bytes, urljoin, urlsplit

from .._version import __version__
from ..errors import CaprlError, ImageError
from ..images import peek_image
from ..printable import shown

if TYPE_CHECKING:
    from .protocol import ApiError

log = logging.getLogger("caprl_local")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

_CHUNK = 1 << 16
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_DATA_URI = re.compile(r"data:(?:image(?:/[\w.+-]+)?)?(?:;[\w=.+-]+)*;base64,(.*)", re.S | re.I)
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215: a site's own translator, to anywhere
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_V4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated IPv4-compatible addresses, ::1 among them


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


def image_bytes(url: str, policy: ImagePolicy, *, tls: ssl.SSLContext | None = None) -> bytes:
    """The encoded image a URL names, read within the policy's bounds and its header checked: a base64
    data URI (``data:image;base64,...`` too, as CapRL's own client sends), an http(s) URL if remote
    images are allowed (``tls``: the certificates to trust; the system's by default), a path or a
    file: URL under the allowed folder. Anything refused is an ApiError."""
    return_freed_memory()
    deadline = time.monotonic() + policy.timeout_s
    scheme = _SCHEME.match(url)
    kind = scheme.group(1).lower() if scheme else None
    if kind == "data":
        data = _inline(url, policy)
    elif kind in ("http", "https"):
        if not policy.allow_remote:
            raise _api(400, "this server does not fetch image URLs (remote images are off); send the image "
                       "as a base64 data URI", "remote_images_disabled")
        data = _remote(url, policy, deadline, tls)
    elif kind == "file" or scheme is None or not url[scheme.end():].startswith("//"):
        data = _local(url, policy, deadline)  # "photo:1.png" is a file name, "ftp://..." a URL
    else:
        raise _api(400, f"{shown(kind)}: URLs are not read here; send a data URI, an http(s) URL or a file path",
                   "invalid_image_url")
    _check_header(data, policy)
    return data


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


def _too_large(what: str, policy: ImagePolicy) -> ApiError:
    return _api(413, f"{what} is over {policy.max_bytes:,} bytes, this server's limit for an image", "image_too_large")


# --- data URIs --------------------------------------------------------------------------------


def _inline(url: str, policy: ImagePolicy) -> bytes:
    match = _DATA_URI.fullmatch(url.strip())
    if match is None:
        raise _api(400, "a data URI must be base64 (data:image/...;base64,...)", "invalid_image_url")
    if len(match.group(1)) // 4 * 3 > policy.max_bytes + 3:  # refused before decoding it
        raise _too_large("the image", policy)
    try:
        data = base64.b64decode(match.group(1), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _api(400, f"the image's base64 is invalid ({exc})", "invalid_image") from exc
    if len(data) > policy.max_bytes:
        raise _too_large("the image", policy)
    return data


# --- files under the allowed folder -----------------------------------------------------------


def _local(url: str, policy: ImagePolicy, deadline: float) -> bytes:
    if policy.local_dir is None:
        raise _api(400, "this server reads no image files; send the image as a base64 data URI", "invalid_image_url")
    name = shown(url)
    root = os.path.realpath(os.fsencode(policy.local_dir))
    resolved = os.path.realpath(os.path.join(root, _file_path(url)))  # a relative path: in the folder
    if not _under(resolved, root):  # symbolic links followed: where the file really is
        raise _api(403, f"{name}: not under the folder this server may read", "path_not_allowed")
    try:
        if kind := _not_a_file(os.stat(resolved).st_mode):  # refused without opening it (a device may act on open)
            raise _api(400, f"{name}: is {kind}, not an image file", "invalid_image_url")
        # Non-blocking, so that a FIFO put in the file's place since cannot hold the open; not following a link
        # put there since either.
        fd = os.open(resolved, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NOCTTY", 0)
                     | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as exc:
        raise _api(400, f"{name}: no such file; check the path", "invalid_image_url") from exc
    except (OSError, ValueError) as exc:
        raise _api(400, f"{name}: cannot read it ({getattr(exc, 'strerror', None) or exc})", "invalid_image_url") from exc
    try:
        return _read_file(fd, name, root, policy, deadline)
    except OSError as exc:
        raise _api(400, f"{name}: cannot read it ({exc.strerror or exc})", "invalid_image_url") from exc
    finally:
        os.close(fd)


def _read_file(fd: int, name: str, root: bytes, policy: ImagePolicy, deadline: float) -> bytes:
    """An open file's bytes, if it is a regular file under `root` and within the size cap."""
    st = os.fstat(fd)
    if kind := _not_a_file(st.st_mode):
        raise _api(400, f"{name}: is {kind}, not an image file", "invalid_image_url")
    with_proc = f"/proc/self/fd/{fd}".encode()
    if os.path.exists(with_proc) and not _under(os.readlink(with_proc), root):  # the file opened, wherever it is
        raise _api(403, f"{name}: not under the folder this server may read", "path_not_allowed")
    if st.st_size > policy.max_bytes:
        raise _too_large(name, policy)
    pieces, total = [], 0
    while piece := os.read(fd, 16 * _CHUNK):
        total += len(piece)
        if total > policy.max_bytes:  # it grew while read
            raise _too_large(name, policy)
        if time.monotonic() > deadline:
            raise _api(400, f"{name}: reading it took more than {policy.timeout_s:g} s", "invalid_image_url")
        pieces.append(piece)
    return b"".join(pieces)


def _file_path(url: str) -> bytes:
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
                               f"{shown(host)}", "invalid_image_url")
                rest = slash + tail
            if not rest.startswith("/"):
                raise _api(400, f"{name}: a file URL's path is absolute (file:///path/to/image.png)", "invalid_image_url")
            path = unquote_to_bytes(rest.split("#", 1)[0].split("?", 1)[0])
        else:
            path = url.encode("utf-8")
    except UnicodeError as exc:
        raise _api(400, f"{name}: the path is not valid text (it holds a lone surrogate)", "invalid_image_url") from exc
    if b"\0" in path:
        raise _api(400, f"{name}: the path holds a NUL byte", "invalid_image_url")
    return path


def _under(path: bytes, root: bytes) -> bool:
    return path == root or path.startswith(root.rstrip(b"/") + b"/")


_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device"}


def _not_a_file(mode: int) -> str | None:
    """What a file that is not a regular file is, for a message; None for a regular file."""
    return None if stat.S_ISREG(mode) else _KINDS.get(stat.S_IFMT(mode), "not a regular file")


# --- remote images ----------------------------------------------------------------------------


class _Refused(Exception):
    """Why a fetch failed, for the log (the client is told only that it failed)."""


def _remote(url: str, policy: ImagePolicy, deadline: float, tls: ssl.SSLContext | None) -> bytes:
    from .protocol import ApiError

    try:
        return _follow(url, policy, deadline, tls)
    except ApiError:  # too large: said as such
        raise
    except Exception as exc:  # noqa: BLE001 - refused, unreachable, or whatever a hostile origin makes http.client raise
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, TimeoutError | concurrent.futures.TimeoutError):
            reason = f"no answer within the {policy.timeout_s:g} s allowed ({reason})"
        log.warning("image URL %s not fetched: %s", shown(url), shown(reason, 400))
        raise _api(400, f"cannot fetch the image at {shown(url)}", "image_fetch_failed") from exc


def _follow(url: str, policy: ImagePolicy, deadline: float, tls: ssl.SSLContext | None) -> bytes:
    """The body at `url`, redirects followed here (each target checked as the first)."""
    for _ in range(policy.max_redirects + 1):
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise _Refused(f"{shown(scheme or 'a relative')} URL ({shown(url)}): only http and https are fetched")
        if parts.username is not None or parts.password is not None:
            raise _Refused("the URL holds a user name or password")
        host, port = parts.hostname, parts.port or (443 if scheme == "https" else 80)
        if not host:
            raise _Refused("the URL names no host")
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        target = re.sub(r"[^\x21-\x7e]", lambda m: quote(m.group()), target)  # spaces, non-ASCII: as browsers send them
        context = (tls or _system_tls()) if scheme == "https" else None
        location, body = _get(host, port, target, context, policy, deadline)
        if location is None:
            return body
        url = urljoin(url, location)
    raise _Refused(f"more than {policy.max_redirects} redirects")


def _get(host: str, port: int, target: str, tls: ssl.SSLContext | None, policy: ImagePolicy,
         deadline: float) -> tuple[str | None, bytes]:
    """(a redirect's Location, b"") or (None, the body), from the first checked address that answers."""
    failures = []
    for family, sockaddr in _addresses(host, port, policy, deadline):
        connection = _Connection(host, port, family, sockaddr, tls, deadline)
        try:
            connection.connect()
        except OSError as exc:
            failures.append(f"{sockaddr[0]}: {exc}")
            connection.close()
            continue
        try:
            return _exchange(connection, target, policy)
        finally:
            connection.close()
    raise _Refused(f"cannot connect to {host} ({'; '.join(failures)})")


def _exchange(connection: _Connection, target: str, policy: ImagePolicy) -> tuple[str | None, bytes]:
    connection.putrequest("GET", target, skip_accept_encoding=True)
    for header, value in (("Accept", "image/*"), ("Accept-Encoding", "identity"), ("Connection", "close"),
                          ("User-Agent", f"caprl-local/{__version__}")):
        connection.putheader(header, value)
    connection.endheaders()
    with connection.getresponse() as response:
        if response.status in _REDIRECTS:
            if not (location := response.getheader("Location")):
                raise _Refused(f"HTTP {response.status} without a Location")
            return location, b""
        if not 200 <= response.status < 300:
            raise _Refused(f"HTTP {response.status} {response.reason}")
        declared = (response.getheader("Content-Length") or "").strip()
        if declared.isdigit() and int(declared) > policy.max_bytes:
            raise _too_large("the image", policy)
        body = bytearray()
        while piece := response.read(_CHUNK):
            body += piece
            if len(body) > policy.max_bytes:
                raise _too_large("the image", policy)
        return None, bytes(body)


def _addresses(host: str, port: int, policy: ImagePolicy, deadline: float) -> list[tuple[int, Any]]:
    """The addresses `host` resolves to that fetching may reach (resolved once: these are connected to)."""
    lookup = _resolver().submit(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    infos = lookup.result(timeout=_left(deadline))  # getaddrinfo has no timeout of its own
    allowed: list[tuple[int, Any]] = []
    refused: list[tuple[int, Any]] = []
    for family, _, _, _, sockaddr in infos:
        try:
            address: Address | None = ipaddress.ip_address(sockaddr[0])
        except ValueError:
            address = None
        (allowed if address is not None and may_reach(address, policy.networks) else refused).append((family, sockaddr))
    if not allowed:
        names = ", ".join(sorted({str(s[0]) for _, s in refused}))
        raise _Refused(f"{host} is at {names}: not a public address, nor in a network the operator allows")
    return allowed


def may_reach(address: Address, networks: tuple[Network, ...] = ()) -> bool:
    """Whether fetching may connect to `address`: a public one, or one in `networks`."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    return any(address in network for network in networks) or is_public(address)


def is_public(address: Address) -> bool:
    """Whether an address is globally routable: not loopback, private, shared, link-local, multicast,
    reserved or unspecified, nor an IPv6 spelling of one (v4-mapped, 6to4, NAT64, IPv4-compatible) or a
    Teredo tunnel."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return is_public(address.ipv4_mapped)
        if address.sixtofour is not None:
            return is_public(address.sixtofour)
        if address in _NAT64:
            return is_public(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        if address.teredo is not None or address in _NAT64_LOCAL or address in _V4_COMPATIBLE or address.is_site_local:
            return False
    return address.is_global and not (address.is_private or address.is_loopback or address.is_link_local
                                      or address.is_multicast or address.is_reserved or address.is_unspecified)


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the time allowed ran out")
    return left


class _Connection(http.client.HTTPConnection):
    """HTTP(S) to an address checked beforehand (no lookup of its own; the Host header and TLS's
    server name are the URL's host), every read and write within one deadline."""

    def __init__(self, host: str, port: int, family: int, sockaddr: Any, tls: ssl.SSLContext | None,
                 deadline: float) -> None:
        super().__init__(host, port)
        self.family, self.sockaddr, self.tls, self.deadline = family, sockaddr, tls, deadline
        self.default_port = 80 if tls is None else 443  # the Host header names the port only if it is not the scheme's

    def connect(self) -> None:
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            sock.settimeout(_left(self.deadline))
            sock.connect(self.sockaddr)
            if self.tls is not None:  # the handshake too ends by the socket's timeout, in all
                sock.settimeout(_left(self.deadline))
                sock = self.tls.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise
        self.sock = cast(socket.socket, _Timed(sock, self.deadline))  # http.client uses sendall, makefile and close


class _Timed(io.RawIOBase):
    """A connected socket whose reads and writes all end by one deadline: a timeout per read would let
    an origin that sends a byte every few seconds hold the request for ever."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock, self.deadline = sock, deadline
        self.users = 1  # the connection, and the response reading from it: the socket closes when both have

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        self.sock.settimeout(_left(self.deadline))
        return self.sock.recv_into(buffer)

    def sendall(self, data: bytes) -> None:
        self.sock.settimeout(_left(self.deadline))
        self.sock.sendall(data)

    def makefile(self, mode: str = "rb") -> io.BufferedReader:
        self.users += 1
        return io.BufferedReader(self)

    def close(self) -> None:
        self.users -= 1
        if self.users <= 0:
            super().close()
            self.sock.close()


@functools.cache
def _system_tls() -> ssl.SSLContext:
    return ssl.create_default_context()


@functools.cache
def _resolver() -> concurrent.futures.ThreadPoolExecutor:
    # A lookup that outlives its deadline is left to finish here (the resolver's own timeout ends it).
    return concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="caprl-resolve")


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
