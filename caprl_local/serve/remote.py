"""Fetching an image (or video) URL from public addresses only: the host resolved here, each address checked and the
one checked connected to (no second lookup for a rebinding DNS server to answer), redirects followed here
and each checked again, every read and write within one deadline for the whole fetch."""

from __future__ import annotations

import concurrent.futures
import functools
import http.client
import io
import ipaddress
import re
import socket
import ssl
import time
from typing import Any, Protocol, cast
from urllib.parse import quote, urljoin, urlsplit

from .._version import __version__
from ..printable import shown

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

_CHUNK = 1 << 16
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215: a site's own translator, to anywhere
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_V4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated IPv4-compatible addresses, ::1 among them


class Bounds(Protocol):
    """What a fetch is bounded by (the server's ImagePolicy)."""

    @property
    def max_bytes(self) -> int: ...
    @property
    def max_redirects(self) -> int: ...
    @property
    def networks(self) -> tuple[Network, ...]: ...


class Refused(Exception):
    """Why a fetch failed, for the log (the client is told only that it failed)."""


class TooLarge(Exception):
    """The body is over the byte cap (its Content-Length says so, or its bytes do)."""


def fetch(url: str, policy: Bounds, deadline: float, tls: ssl.SSLContext | None, *, accept: str = "image/*") -> bytes:
    """The body at `url`, redirects followed here (each target checked as the first); `accept`: the media asked for."""
    for _ in range(policy.max_redirects + 1):
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise Refused(f"{shown(scheme or 'a relative')} URL ({shown(url)}): only http and https are fetched")
        if parts.username is not None or parts.password is not None:
            raise Refused("the URL holds a user name or password")
        host, port = parts.hostname, parts.port or (443 if scheme == "https" else 80)
        if not host:
            raise Refused("the URL names no host")
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        target = re.sub(r"[^\x21-\x7e]", lambda m: quote(m.group()), target)  # spaces, non-ASCII: as browsers send them
        context = (tls or _system_tls()) if scheme == "https" else None
        location, body = _get(host, port, target, context, policy, deadline, accept)
        if location is None:
            return body
        url = urljoin(url, location)
    raise Refused(f"more than {policy.max_redirects} redirects")


def _get(host: str, port: int, target: str, tls: ssl.SSLContext | None, policy: Bounds,
         deadline: float, accept: str) -> tuple[str | None, bytes]:
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
            return _exchange(connection, target, policy, accept)
        finally:
            connection.close()
    raise Refused(f"cannot connect to {host} ({'; '.join(failures)})")


def _exchange(connection: _Connection, target: str, policy: Bounds, accept: str) -> tuple[str | None, bytes]:
    connection.putrequest("GET", target, skip_accept_encoding=True)
    for header, value in (("Accept", accept), ("Accept-Encoding", "identity"), ("Connection", "close"),
                          ("User-Agent", f"caprl-local/{__version__}")):
        connection.putheader(header, value)
    connection.endheaders()
    with connection.getresponse() as response:
        if response.status in _REDIRECTS:
            if not (location := response.getheader("Location")):
                raise Refused(f"HTTP {response.status} without a Location")
            return location, b""
        if not 200 <= response.status < 300:
            raise Refused(f"HTTP {response.status} {response.reason}")
        declared = (response.getheader("Content-Length") or "").strip()
        if declared.isdigit() and int(declared) > policy.max_bytes:
            raise TooLarge
        body = bytearray()
        while piece := response.read(_CHUNK):
            body += piece
            if len(body) > policy.max_bytes:
                raise TooLarge
        return None, bytes(body)


def _addresses(host: str, port: int, policy: Bounds, deadline: float) -> list[tuple[int, Any]]:
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
        raise Refused(f"{host} is at {names}: not a public address, nor in a network the operator allows")
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
