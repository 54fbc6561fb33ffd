"""The HTTP server around the app: its socket, bound before the model loads; uvicorn's h11 protocol with a
deadline on each request's head; a stop that answers every request in flight before the process ends."""

from __future__ import annotations

import asyncio
import errno
import json
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import CaprlError
from .protocol import ApiError

if TYPE_CHECKING:
    from ..engine import Captioner

#: The longest request head (request line and headers) taken, as h11's own default: 16 KiB.
HEAD_LIMIT = 16 * 1024
#: Seconds an idle connection is kept open between requests (uvicorn's default).
KEEP_ALIVE_S = 5
#: Seconds the requests in flight have to answer once the server stops (they are told at once; this is the bound).
GRACE_S = 5


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to `host`:`port` (listening starts with the server: until then connections are
    refused); CaprlError, from the OSError, if the address is not this machine's or the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        address = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)[0][4]
    except (socket.gaierror, UnicodeError) as exc:
        raise CaprlError(f"cannot listen on {host!r}: not an address of this machine ({exc})") from exc
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait out TIME_WAIT
        sock.bind(address)
    except OSError as exc:
        sock.close()
        why = {errno.EADDRINUSE: f"port {port} is in use by another program",
               errno.EADDRNOTAVAIL: f"{host} is not an address of this machine",
               errno.EACCES: f"port {port} needs privileges this program lacks"}.get(exc.errno or 0, exc.strerror)
        raise CaprlError(f"cannot listen on {url_host(host)}:{port}: {why}") from exc
    return sock


def url_host(host: str) -> str:
    """`host` as a URL writes it: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


class _Protocol(H11Protocol):
    """uvicorn's h11 protocol, with a deadline on each request's head (uvicorn has none: a client sending
    its headers a byte at a time would hold the connection for ever) and OpenAI's JSON error shape for a
    request that is not HTTP."""

    head_timeout_s: float = 60.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_late, self.cycle)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self, cycle: Any) -> None:
        if self.cycle is cycle and not self.transport.is_closing():  # no request's head arrived in time
            self.transport.close()

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request's head came in: the app's own deadlines take over
            self._disarm()

    def on_response_complete(self) -> None:
        self._arm()  # first: a pipelined request that the parent starts now disarms it again
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        body = json.dumps(ApiError(400, f"not an HTTP request this server can read ({msg.rstrip('.')})",
                                   code="bad_http").body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                      h11.EndOfMessage()):
            self.transport.write(self.conn.send(event) or b"")
        self.transport.close()


def protocol(head_timeout_s: float) -> type[asyncio.Protocol]:
    """The HTTP protocol class with this deadline on a request's head."""
    return type("_Protocol", (_Protocol,), {"head_timeout_s": head_timeout_s})


class Server(uvicorn.Server):
    """uvicorn's server, stopping the app's requests first (each then answers at once) and the captions in flight."""

    def __init__(self, config: uvicorn.Config, captioner: Captioner, stop_app: Callable[[], None]) -> None:
        super().__init__(config)
        self.captioner, self.stop_app = captioner, stop_app

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.captioner.cancel()  # captions in flight end now, so their requests answer and close
        super().handle_exit(sig, frame)
        # uvicorn raises the signal again once it has shut down; here a stop is the command's
        # normal end (exit 0), so it is not passed on.
        getattr(self, "_captured_signals", []).clear()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.stop_app()  # waiting requests answer 503 now, streams end with an error event
        self.captioner.cancel()  # and what began between the signal and now
        await super().shutdown(sockets)


def config(app: Any, read_timeout_s: float) -> uvicorn.Config:
    return uvicorn.Config(app, log_level="warning", lifespan="off", ws="none", http=protocol(read_timeout_s),
                          timeout_keep_alive=KEEP_ALIVE_S, timeout_graceful_shutdown=GRACE_S,
                          h11_max_incomplete_event_size=HEAD_LIMIT)
