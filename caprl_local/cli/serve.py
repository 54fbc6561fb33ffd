"""``caprl-local serve``: the OpenAI-compatible server (the serve extra)."""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import click

from .. import console
from ..errors import CaprlError
from ..options import Parallel
from .base import AutoOrNumber, cli, engine_options, source_options, warn_unused


def _networks(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[Any, ...]:
    """--allow-image-network's values as networks (one not in CIDR form is a usage error)."""
    import ipaddress

    try:
        return tuple(ipaddress.ip_network(value, strict=False) for value in values)
    except ValueError as exc:
        raise click.BadParameter(f"{exc}; give a network such as 10.0.0.0/8 or fd00::/8") from exc


_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
_HOST_NAME = re.compile(rf"(?=.{{1,253}}$)(?![\d.]+$){_LABEL}(\.{_LABEL})*\.?")  # all digits: a broken IPv4 address


def _host(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """--host as an IP address (an IPv6 one in brackets too) or a host name; anything else (a URL, a port)
    is a usage error, found before anything is resolved or loaded."""
    import ipaddress

    host = value.strip().removeprefix("[").removesuffix("]")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        if _HOST_NAME.fullmatch(host):
            return host
    raise click.BadParameter(f"{value!r} is neither an IP address nor a host name (such as 127.0.0.1, 0.0.0.0 or "
                             "::1; the port goes in --port)")


def _api_key(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A key clients can send: not empty (`--api-key "$KEY"` with KEY unset), printable ASCII (an HTTP header)."""
    if value is None and os.environ.get("CAPRL_LOCAL_API_KEY") == "":
        raise click.BadParameter("CAPRL_LOCAL_API_KEY is set but empty: give it a key, or unset it")
    if value is None:
        return None
    if not value.strip():
        raise click.BadParameter("the key is empty (an unset variable in --api-key \"$KEY\"?): give a key, or leave "
                                 "--api-key out")
    if not (value.isascii() and value.isprintable()) or value != value.strip():
        raise click.BadParameter("the key must be printable ASCII, without spaces at its ends: clients send it in an "
                                 "HTTP header")
    return value


def _origins(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    """--cors-origin's values as browsers send an Origin: scheme://host[:port], no path; or '*'."""
    origins = tuple(value.strip().rstrip("/") or value for value in values)
    for given, origin in zip(values, origins, strict=True):
        if origin != "*" and not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*://[^/\s?#]+", origin):
            raise click.BadParameter(f"{given!r} is not an origin: give scheme://host[:port] (such as "
                                     "http://localhost:3000), or '*' for any")
    return origins


def _listen(host: str, port: int) -> Any:
    """The server's socket, bound now, before the model loads: a busy port or a foreign address is reported
    at once (an address that is not this machine's, as a usage error)."""
    import errno
    import socket

    from ..serve.server import listen

    try:
        return listen(host, port)
    except CaprlError as exc:
        cause = exc.__cause__
        if isinstance(cause, (socket.gaierror, UnicodeError)) or getattr(cause, "errno", None) == errno.EADDRNOTAVAIL:
            raise click.BadParameter(str(exc).removeprefix("cannot listen on "), param_hint="'--host'") from exc
        if getattr(cause, "errno", None) == errno.EADDRINUSE:
            raise CaprlError(f"{exc}; choose another --port (0: any free one)") from exc
        raise


@cli.command()
@source_options
@click.option("--parallel", type=AutoOrNumber(1, "1 or more requests decoded together"), default="auto",
              show_default=True, help="Requests decoded together (auto: as many as memory allows, as for caption).")
@engine_options
@click.option("--host", default="127.0.0.1", show_default=True, callback=_host,
              help="Address to listen on (0.0.0.0: every interface; then set --api-key).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="Port (0: any free one).")
@click.option("--api-key", envvar="CAPRL_LOCAL_API_KEY", callback=_api_key,
              help="Require 'Authorization: Bearer KEY' [env CAPRL_LOCAL_API_KEY].")
@click.option("--queue", type=click.IntRange(min=0),
              help="Requests that may wait, in arrival order, beyond those decoding; more get 503 with the expected "
                   "wait in Retry-After [default: 512].")
@click.option("--max-body-mb", type=click.IntRange(min=1), default=32, show_default=True, help="Largest request body.")
@click.option("--max-video-mb", type=click.IntRange(min=1), default=256, show_default=True,
              help="Largest video a request may name (a file or URL; a data URI is within --max-body-mb too).")
@click.option("--read-timeout", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="Time a client has to send a request's headers, and again its body; slower ones are cut off "
                   "[default: 60].")
@click.option("--cors-origin", "cors_origins", multiple=True, metavar="ORIGIN", callback=_origins,
              help="Let web pages from ORIGIN (such as http://localhost:3000, or '*' for any) call the API from a "
                   "browser (repeatable; off by default).")
@click.option("--allow-remote-images", is_flag=True,
              help="Fetch http(s) image URLs (off: a server that fetches any URL it is sent can be made to reach "
                   "whatever this machine reaches).")
@click.option("--allowed-local-dir", type=click.Path(file_okay=False, exists=True, path_type=str),
              help="Let requests name image files under this folder.")
@click.option("--allow-image-network", "image_networks", multiple=True, metavar="CIDR", callback=_networks,
              help="With --allow-remote-images: a private network image URLs may reach too, such as 10.0.0.0/8 "
                   "(repeatable; otherwise only public addresses are fetched).")
def serve(model: str, mmproj_path: str | None, quant: str | None, imatrix: bool, mmproj_quant: str | None,
          cache_dir: str | None, offline: bool, parallel: Parallel, host: str, port: int, api_key: str | None,
          queue: int | None, max_body_mb: int, max_video_mb: int, allow_remote_images: bool, allowed_local_dir: str | None,
          image_networks: tuple[Any, ...], read_timeout: float | None, cors_origins: tuple[str, ...],
          **engine: Any) -> None:
    """Serve the model over an OpenAI-compatible API (POST /v1/chat/completions, GET /v1/models).

    Prints the API's base URL on stdout once it listens; Ctrl-C stops it, cancelling the
    captions in flight. Needs the serve extra: pip install '.[serve]' in a caprl-local checkout.
    """
    try:
        from ..serve import ImagePolicy, ServeOptions
        from ..serve import serve as run_server
    except ImportError as exc:
        raise CaprlError(f"caprl-local serve needs its extra ({exc.name} is missing): pip install '.[serve]' in a "
                         "caprl-local checkout, or 'caprl-local[serve]' once caprl-local is on your package index") from exc
    from pathlib import Path

    from ..engine import Captioner
    from ..hub import download_model

    if image_networks and not allow_remote_images:
        raise click.UsageError("--allow-image-network widens --allow-remote-images: give that too, or leave it out")
    sock = _listen(host, port)
    click.get_current_context().call_on_close(sock.close)  # however the command ends
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        click.echo(f"Warning: listening on {host} without --api-key: anyone who can reach this machine can use "
                   "the server", err=True)
    if not offline and not model.lower().endswith(".gguf"):  # at once: a stalled network is never a silent wait
        console.status(f"Looking for {model} (the cache, then the Hub) ...")
    files = download_model(model, mmproj=mmproj_path, quant=quant, imatrix=imatrix, mmproj_quant=mmproj_quant,
                           cache_dir=cache_dir, offline=offline, progress=console.DownloadBar())
    warn_unused(files.name, quant=quant, imatrix=imatrix, mmproj_quant=mmproj_quant)
    console.status(f"Loading {files.model.name} ...")
    with Captioner(files.model, files.mmproj, parallel=parallel, prompt=files.prompt, cache_dir=cache_dir,
                   **engine) as captioner:
        console.status("")
        console.loaded(captioner)
        model_id = files.name or files.model.stem
        policy = ImagePolicy(allow_remote=allow_remote_images,
                             local_dir=Path(allowed_local_dir) if allowed_local_dir else None,
                             networks=image_networks, max_pixels=ImagePolicy.pixels_for(engine.get("image_max_tokens")),
                             max_video_bytes=max_video_mb * 1024 * 1024)
        options = ServeOptions(host=host, port=port, model_id=model_id, api_key=api_key, images=policy,
                               max_body_bytes=max_body_mb * 1024 * 1024, cors_origins=cors_origins)
        # Where not given, ServeOptions' defaults (defined there once).
        if queue is not None:
            options = dataclasses.replace(options, queue=queue)
        if read_timeout is not None:
            options = dataclasses.replace(options, read_timeout_s=read_timeout)

        def ready(url: str) -> None:
            click.echo(url)  # the result, for scripts; the rest is for people
            console.say(f"Serving {model_id} (Ctrl-C stops)")  # a file's name: escaped

        run_server(captioner, options, sock=sock, on_ready=ready)
