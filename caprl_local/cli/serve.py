"""``caprl-local serve``: the OpenAI-compatible server (the serve extra)."""

from __future__ import annotations

from typing import Any

import click

from .. import console
from ..errors import CaprlError
from ..options import Parallel
from .base import AutoOrNumber, cli, engine_options, source_options, warn_unused


@cli.command()
@source_options
@click.option("--parallel", type=AutoOrNumber(1, "1 or more requests decoded together"), default="auto",
              show_default=True, help="Requests decoded together (auto: as many as memory allows, as for caption).")
@engine_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface; then set --api-key).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="Port (0: any free one).")
@click.option("--api-key", envvar="CAPRL_LOCAL_API_KEY", help="Require 'Authorization: Bearer KEY' [env CAPRL_LOCAL_API_KEY].")
@click.option("--queue", type=click.IntRange(min=0),
              help="Requests that may wait beyond those decoding; more get 503 [default: as many as decode].")
@click.option("--max-body-mb", type=click.IntRange(min=1), default=32, show_default=True, help="Largest request body.")
@click.option("--allow-remote-images", is_flag=True,
              help="Fetch http(s) image URLs (off: a server that fetches any URL it is sent can be made to reach "
                   "whatever this machine reaches).")
@click.option("--allowed-local-dir", type=click.Path(file_okay=False, exists=True, path_type=str),
              help="Let requests name image files under this folder.")
def serve(model: str, mmproj_path: str | None, quant: str | None, imatrix: bool, mmproj_quant: str | None,
          cache_dir: str | None, offline: bool, parallel: Parallel, host: str, port: int, api_key: str | None,
          queue: int | None, max_body_mb: int, allow_remote_images: bool, allowed_local_dir: str | None,
          **engine: Any) -> None:
    """Serve the model over an OpenAI-compatible API (POST /v1/chat/completions, GET /v1/models).

    Prints the API's base URL on stdout once it listens; Ctrl-C stops it, cancelling the
    captions in flight. Needs the serve extra: pip install 'caprl-local[serve]'.
    """
    try:
        from ..serve import ImagePolicy, ServeOptions
        from ..serve import serve as run_server
    except ImportError as exc:
        raise CaprlError(f"caprl-local serve needs its extra ({exc.name} is missing): "
                         "pip install 'caprl-local[serve]'") from exc
    from pathlib import Path

    from ..engine import Captioner
    from ..hub import download_model

    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        click.echo(f"Warning: listening on {host} without --api-key: anyone who can reach this machine can use "
                   "the server", err=True)
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
                             local_dir=Path(allowed_local_dir) if allowed_local_dir else None)
        options = ServeOptions(host=host, port=port, model_id=model_id, api_key=api_key, queue=queue,
                               max_body_bytes=max_body_mb * 1024 * 1024, images=policy)

        def ready(url: str) -> None:
            click.echo(url)  # the result, for scripts; the rest is for people
            console.say(f"Serving {model_id} (Ctrl-C stops)")  # a file's name: escaped

        run_server(captioner, options, on_ready=ready)
