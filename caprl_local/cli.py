"""The ``caprl-local`` command: a thin client of the library.

Results go to stdout, everything else to stderr. Errors are turned into
messages and exit codes in one place, :func:`main`.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import click

from . import console
from ._version import __version__
from .errors import Cancelled, CaprlError, HubUnreachableError, NoProjectorError, NoSpaceError, OfflineError
from .options import EngineOptions, GenerationOptions, Parallel, default
from .prompts import PRESETS
from .registry import DEFAULT_MODEL

# Exit codes: 0 success, 1 failure, 2 usage, 130 interrupted.
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130



def _pull_hint(exc: OfflineError) -> str:
    args = [exc.model, *(["--quant", exc.quant] if exc.quant else []), *(["--imatrix"] if exc.imatrix else [])]
    return f"Error: {exc} (`caprl-local pull {' '.join(args)}`)"


# Exception type -> (exit code, message: a format string of the exception, "{exc}", or a function
# of it); first match wins. The library's messages say what happened; the CLI adds its own
# flags and commands. Usage errors print click's own usage message.
ERROR_TABLE: tuple[tuple[type[BaseException], int, str | Callable[[Any], str]], ...] = (
    (click.UsageError, EXIT_USAGE, ""),
    (KeyboardInterrupt, EXIT_INTERRUPTED, "Interrupted."),
    (Cancelled, EXIT_INTERRUPTED, "Interrupted."),
    (click.exceptions.Abort, EXIT_INTERRUPTED, "Interrupted."),
    (OfflineError, EXIT_FAILURE, _pull_hint),
    (HubUnreachableError, EXIT_FAILURE, "Error: {exc}, or add --offline to use the files already cached"),
    (NoProjectorError, EXIT_FAILURE, "Error: {exc} with --mmproj"),
    (NoSpaceError, EXIT_FAILURE, "Error: {exc} (--cache-dir or CAPRL_LOCAL_HOME moves it)"),
    (CaprlError, EXIT_FAILURE, "Error: {exc}"),
    (MemoryError, EXIT_FAILURE, "Error: out of memory; lower --max-image-tokens or use a smaller quant"),
)


class AutoOrNumber(click.ParamType):
    """'auto' or a whole number of at least `minimum`."""

    name = "auto|N"

    def __init__(self, minimum: int, hint: str) -> None:
        self.minimum, self.hint = minimum, hint

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str | int:
        if isinstance(value, int) or value == "auto":
            return value
        try:
            number = int(value)
        except ValueError:
            self.fail(f"{value!r} is neither 'auto' nor a number", param, ctx)
        if number < self.minimum:
            self.fail(f"{number} is too small ({self.hint})", param, ctx)
        return number


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="caprl-local")
def cli() -> None:
    """Caption images locally with the CapRL models, through llama.cpp."""


def _options(*options: Callable[[Any], Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A decorator applying a group of click options, in the order given."""
    def apply(func: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            func = option(func)
        return func
    return apply


#: Options that choose and fetch model files (caption, serve, pull).
model_options = _options(
    click.option("--quant", help="Quantization, e.g. Q4_K_M (default: the model's default)."),
    click.option("--imatrix", is_flag=True, help="Use the imatrix (i1) quants."),
    click.option("--mmproj-quant", help="Vision projector precision: f16 or Q8_0 (lighter) "
                                        "[default: the model's, see `caprl-local models`]."),
    click.option("--cache-dir", type=click.Path(file_okay=False, path_type=str), envvar="CAPRL_LOCAL_HOME",
                 help="Where models are cached [default: the platform's cache dir; env CAPRL_LOCAL_HOME]."),
)

#: The model to load, from a name, a repo or files (caption, serve).
source_options = _options(
    click.option("--model", "-m", "model", default=DEFAULT_MODEL, envvar="CAPRL_LOCAL_MODEL", show_default=True,
                 metavar="NAME|REPO|PATH",
                 help="A model name from `caprl-local models`, a Hub repo (owner/name), or a .gguf file."),
    click.option("--mmproj", "mmproj_path", type=click.Path(path_type=str), metavar="PATH.gguf",
                 help="The vision projector, with --model PATH.gguf [default: the *mmproj*.gguf beside it]."),
    model_options,
    click.option("--offline", is_flag=True, help="Never touch the network; use cached files only."),
)

#: How the model runs (caption, serve).
engine_options = _options(
    click.option("--gpu-layers", type=AutoOrNumber(-1, "-1 for all layers, 0 for none"),
                 default=default(EngineOptions, "gpu_layers"), show_default=True,
                 help="Layers to offload to the GPU: auto (all, if llama.cpp has GPU support), 0 for CPU, or N."),
    click.option("--threads", "-t", type=click.IntRange(min=1),
                 help="CPU threads [default: one per physical core, less the cores other programs keep busy]."),
    click.option("--max-image-tokens", "image_max_tokens", type=click.IntRange(min=1),
                 default=default(EngineOptions, "image_max_tokens"), show_default=True,
                 help="Cap on tokens per image; large images are scaled down to fit."),
    click.option("--verbose", "-v", is_flag=True, help="Show llama.cpp's log, timings and tracebacks."),
)
ENGINE_NAMES = ("gpu_layers", "threads", "image_max_tokens", "verbose")


@cli.command()
@click.argument("images", nargs=-1, type=click.Path(path_type=str))
@source_options
@click.option("--recursive", "-r", is_flag=True, help="Take images from sub-folders of folders too.")
@click.option("--from-list", "list_file", metavar="FILE",
              help="Read images from FILE ('-' for stdin): a path per line, or JSONL objects with an "
                   "\"image\" field whose other fields are kept in the output.")
@click.option("--format", "fmt", type=click.Choice(["text", "jsonl"]), default="text", show_default=True,
              help="Output format; jsonl gives one object per image with tokens, timings or the error.")
@click.option("--output", "-o", "output", type=click.Path(dir_okay=False, path_type=str),
              help="Write results to FILE instead of stdout; with jsonl, images already in it are skipped.")
@click.option("--sidecar", is_flag=True, help="Write each caption beside its image (photo.jpg -> photo.txt).")
@click.option("--sidecar-ext", default=".txt", show_default=True, help="File extension for --sidecar.")
@click.option("--overwrite", is_flag=True, help="Caption images that already have a result again.")
@click.option("--parallel", type=AutoOrNumber(1, "1 or more captions in flight"), default="auto", show_default=True,
              help="Captions in flight at once in a batch: more images per minute for a little more memory "
                   "(auto: as many as memory allows, at most 4 on a CPU with up to 4 threads, 8 with more, "
                   "16 on a GPU).")
@click.option("--progress/--quiet", "progress", default=None,
              help="Force the progress bar on or off [default: on when stderr is a terminal].")
@click.option("--prompt", "-p", help="Your own instruction; '<image>' marks where the image goes (default: first).")
@click.option("--preset", type=click.Choice(list(PRESETS)), help="A ready-made prompt [default: the model's own].")
@click.option("--max-tokens", "-n", type=click.IntRange(min=1), default=default(GenerationOptions, "max_tokens"),
              show_default=True, help="Stop after this many new tokens.")
@click.option("--temperature", type=click.FloatRange(min=0.0), default=default(GenerationOptions, "temperature"),
              show_default=True, help="0 is greedy decoding; higher values sample more freely.")
@click.option("--top-p", type=click.FloatRange(min=0.0, max=1.0, min_open=True),
              default=default(GenerationOptions, "top_p"), show_default=True,
              help="Nucleus sampling: keep the most likely tokens up to this probability (with --temperature > 0).")
@click.option("--repeat-penalty", type=click.FloatRange(min=0.0, min_open=True),
              default=default(GenerationOptions, "repeat_penalty"), show_default=True,
              help="Penalty on tokens repeated in the last 256 (1 is none).")
@click.option("--seed", type=int, help="Seed for sampling (with --temperature > 0).")
@click.option("--stop", multiple=True, metavar="TEXT", help="End a caption before this text (repeatable).")
@engine_options
def caption(images: tuple[str, ...], model: str, mmproj_path: str | None, quant: str | None, imatrix: bool,
            mmproj_quant: str | None, cache_dir: str | None, offline: bool, recursive: bool, list_file: str | None,
            fmt: str, output: str | None, sidecar: bool, sidecar_ext: str, overwrite: bool, parallel: Parallel,
            progress: bool | None, prompt: str | None, preset: str | None, **options: Any) -> None:
    """Caption IMAGES (files, folders, glob patterns, or - for one image on stdin) and print the captions.

    One image: its caption on stdout, as it is written. Many: each written as it is done; the
    same command run again (after Ctrl-C, say) skips images that already have a --sidecar or
    an entry in the --output file. The model is fetched and verified on first use, then cached:
    later runs need no network.
    """
    if prompt is not None and preset is not None:
        raise click.UsageError("use either --prompt or --preset, not both")
    if not images and list_file is None:
        raise click.UsageError("give images, folders or glob patterns, or --from-list FILE")
    from_stdin = "-" in images
    if from_stdin and (len(images) > 1 or list_file or sidecar or output or fmt != "text"):
        raise click.UsageError("'-' (an image on stdin) goes alone, with text output to stdout")
    from .batch import OutputOptions, caption_batch
    from .engine import Captioner  # imported here so that --help stays instant
    from .hub import download_model
    from .images import capture_libtiff_messages
    from .inputs import collect_inputs
    from .prompts import DEFAULT_PROMPT, resolve_prompt

    capture_libtiff_messages()  # libtiff prints from C; its lines become log records
    engine = {k: options.pop(k) for k in ENGINE_NAMES}
    # Inputs first: a mistyped path must not wait for a 3 GB download to be noticed.
    items = [] if from_stdin else collect_inputs(images, recursive=recursive, list_file=list_file, stdin=sys.stdin)
    if not items and not from_stdin:
        raise CaprlError(f"{list_file}: the list names no images")
    files = download_model(model, mmproj=mmproj_path, quant=quant, imatrix=imatrix, mmproj_quant=mmproj_quant,
                           cache_dir=cache_dir, offline=offline, progress=console.DownloadBar())
    _warn_unused(files.name, quant=quant, imatrix=imatrix, mmproj_quant=mmproj_quant)
    prompt_text = resolve_prompt(prompt=prompt, preset=preset, default=files.prompt or DEFAULT_PROMPT)
    show = sys.stderr.isatty() if progress is None else progress
    single = from_stdin or (len(images) == 1 and [i.path for i in items] == list(images))  # a file, not a folder

    with console.GracefulInterrupt() as interrupt:
        def load(in_flight: str | int, announce: bool = False, watch: Any = None) -> Any:
            console.status(f"Loading {files.model.name} ...")
            captioner = Captioner(files.model, files.mmproj, parallel=in_flight, **engine)
            console.status("")
            if announce:
                console.loaded(captioner, images=None if single else len(items))
            if watch is not None:
                watch.watch(captioner)
            return interrupt.watch(captioner)

        if single and fmt == "text" and not (output or sidecar or list_file):
            source = sys.stdin.buffer.read() if from_stdin else images[0]
            with load(1, announce=engine["verbose"] or sys.stderr.isatty()) as cap:
                _caption_one(cap, source, prompt_text, options, engine["verbose"])
            return
        reporter: list[console.BatchProgress] = []
        summary = caption_batch(
            items, load=lambda n: load(n, announce=show or engine["verbose"], watch=reporter[0]), prompt=prompt_text,
            parallel=parallel, model=files.name or files.model.name, quant=files.quant,
            stream=console.results_stream(progress=show),
            outputs=OutputOptions(format=fmt, path=output, sidecar=sidecar,  # type: ignore[arg-type]
                                  sidecar_ext=sidecar_ext, overwrite=overwrite),
            on_start=lambda total, skipped: reporter.append(
                console.BatchProgress(total, skipped, show=show, quiet=progress is False)),
            on_result=lambda *args: reporter[0].result(*args), on_done=lambda n: reporter[0].done(n), **options)
    reporter[0].finish(summary)
    if summary is not None and summary.interrupted:
        raise SystemExit(EXIT_INTERRUPTED)  # the summary said so already
    if summary is not None and summary.failed:
        raise SystemExit(EXIT_FAILURE)


def _warn_unused(registry_name: str | None, **chosen: Any) -> None:
    """Options that choose files mean nothing for a model given as a file: say so."""
    given = [f"--{name.replace('_', '-')}" for name, value in chosen.items() if value]
    if registry_name is None and given:
        click.echo(f"Warning: {', '.join(given)} ha{'ve' if len(given) > 1 else 's'} no effect with a .gguf file "
                   "as --model", err=True)


def _caption_one(cap: Any, image: str | bytes, prompt: str, options: dict[str, Any], verbose: bool) -> None:
    on_text = console.Streamer()  # to a terminal or a pipe: each piece as it is generated
    console.status("Reading the image ...")  # on a CPU the vision encoder can take a minute
    try:
        result = cap.caption(image, prompt=prompt, on_text=on_text, **options)
    finally:
        if not on_text.started:  # once the caption shows, the line is its own
            console.status("")
    click.echo("")
    if verbose:
        t = result.timings
        click.echo(
            f"{result.image_tokens} image tokens, {result.prompt_tokens} prompt tokens, "
            f"{result.generated_tokens} generated; encode {t.image_encode_s:.2f}s, "
            f"prompt {t.prompt_tokens_per_s:.1f} tok/s, generation {t.generation_tokens_per_s:.1f} tok/s",
            err=True,
        )


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
        from .serve import ImagePolicy, ServeOptions
        from .serve import serve as run_server
    except ImportError as exc:
        raise CaprlError(f"caprl-local serve needs its extra ({exc.name} is missing): "
                         "pip install 'caprl-local[serve]'") from exc
    from pathlib import Path

    from .engine import Captioner
    from .hub import download_model

    files = download_model(model, mmproj=mmproj_path, quant=quant, imatrix=imatrix, mmproj_quant=mmproj_quant,
                           cache_dir=cache_dir, offline=offline, progress=console.DownloadBar())
    _warn_unused(files.name, quant=quant, imatrix=imatrix, mmproj_quant=mmproj_quant)
    console.status(f"Loading {files.model.name} ...")
    with Captioner(files.model, files.mmproj, parallel=parallel, prompt=files.prompt, **engine) as captioner:
        console.status("")
        console.loaded(captioner)
        model_id = files.name or files.model.stem
        policy = ImagePolicy(allow_remote=allow_remote_images,
                             local_dir=Path(allowed_local_dir) if allowed_local_dir else None)
        options = ServeOptions(host=host, port=port, model_id=model_id, api_key=api_key, queue=queue,
                               max_body_bytes=max_body_mb * 1024 * 1024, images=policy)

        def ready(url: str) -> None:
            click.echo(url)  # the result, for scripts; the rest is for people
            click.echo(f"Serving {model_id} (Ctrl-C stops)", err=True)

        run_server(captioner, options, on_ready=ready)


@cli.command()
@click.argument("model", default=DEFAULT_MODEL, metavar="MODEL")
@model_options
def pull(model: str, quant: str | None, imatrix: bool, mmproj_quant: str | None, cache_dir: str | None) -> None:
    """Download MODEL (a name or owner/repo) and its vision projector, verify and cache them.

    Prints the two local paths. An interrupted pull resumes where it stopped.
    """
    from .hub import download_model

    files = download_model(model, quant=quant, imatrix=imatrix, mmproj_quant=mmproj_quant,
                           cache_dir=cache_dir, progress=console.DownloadBar())
    click.echo(files.model)
    click.echo(files.mmproj)


@cli.command(name="models")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--offline", is_flag=True, help="Do not ask the Hub; show cached files only.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=str), envvar="CAPRL_LOCAL_HOME",
              help="Where models are cached [env CAPRL_LOCAL_HOME].")
def models_cmd(as_json: bool, offline: bool, cache_dir: str | None) -> None:
    """List the known models, their published quants and what is cached."""
    from .hub import cache_root, list_models
    from .registry import user_models_path

    listings = list_models(cache_dir=cache_dir, offline=offline)
    if as_json:
        click.echo(json.dumps([console.listing_json(item, default=DEFAULT_MODEL) for item in listings], indent=2))
        return
    console.print_models(listings, default=DEFAULT_MODEL)
    click.echo(f"\n* cached. Cache: {cache_root(cache_dir)}", err=True)
    click.echo(f"Your own models go in {user_models_path()}", err=True)


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []},
             add_help_option=False, hidden=True)  # a source checkout's tool, not a user's command
@click.pass_context
def bench(ctx: click.Context) -> None:
    """Benchmark against llama.cpp's llama-mtmd-cli (scripts/bench.py; `bench -h` for its options)."""
    import subprocess

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "bench.py")
    if not os.path.isfile(script):
        raise CaprlError("the benchmark lives in a source checkout of caprl-local (scripts/bench.py); "
                         "run it from there")
    raise SystemExit(subprocess.call([sys.executable, script, *ctx.args]))


@cli.command(name="rm")
@click.argument("model")
@click.option("--quant", help="Remove only this quant (default: every file of the model).")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=str), envvar="CAPRL_LOCAL_HOME",
              help="Where models are cached [env CAPRL_LOCAL_HOME].")
def rm(model: str, quant: str | None, cache_dir: str | None) -> None:
    """Delete MODEL's cached files (or one quant) to free disk space."""
    from .hub import remove_model

    removed = remove_model(model, quant=quant, cache_dir=cache_dir)
    for c in removed:
        click.echo(c.path)
    click.echo(f"Removed {len(removed)} file(s), freed {console.size(sum(c.size for c in removed))}.", err=True)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def info(as_json: bool) -> None:
    """Show versions, GPU offload support and the devices llama.cpp sees."""
    from .engine import runtime_info

    rt = runtime_info()
    if as_json:
        click.echo(json.dumps(asdict(rt), indent=2))
        return
    rows = [
        ("caprl-local", rt.caprl_local_version),
        ("llama-cpp-python", rt.llama_cpp_python_version),
        ("GPU offload", "yes" if rt.gpu_offload else "no (this llama.cpp build runs on the CPU)"),
        ("devices", ", ".join(rt.devices) or "unknown"),
        ("system", rt.system_info),
    ]
    for key, value in rows:
        click.echo(f"{key:<17} {value}")


def _verbose_requested(argv: list[str]) -> bool:
    return "--verbose" in argv or "-v" in argv


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI, map every failure to a message and an exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = _verbose_requested(args)
    console.configure_logging(verbose)
    try:
        code = cli.main(args=args, prog_name="caprl-local", standalone_mode=False)
        return code if isinstance(code, int) else EXIT_OK
    except BrokenPipeError:
        # stdout closed early (e.g. piped into `head`): stop quietly.
        sys.stdout = open(os.devnull, "w")
        return EXIT_FAILURE
    except BaseException as exc:  # noqa: BLE001 - this is the one place errors become exit codes
        return _report(exc, tracebacks=verbose or os.environ.get("CAPRL_DEBUG", "") not in ("", "0"))


def _report(exc: BaseException, *, tracebacks: bool) -> int:
    """One line on stderr for `exc`, its exit code from ERROR_TABLE; the traceback with
    --verbose or CAPRL_DEBUG=1 (which leaves llama.cpp's log off)."""
    for exc_type, code, message in ERROR_TABLE:
        if isinstance(exc, exc_type):
            if isinstance(exc, click.ClickException):
                exc.show()
            else:
                if code == EXIT_INTERRUPTED and sys.stderr.isatty():
                    click.echo(err=True)  # end a progress line first
                click.echo(message(exc) if callable(message) else message.format(exc=exc), err=True)
            if tracebacks and code == EXIT_FAILURE:
                traceback.print_exception(exc, file=sys.stderr)
            return code
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else EXIT_FAILURE
    # A bug in caprl-local: still one line, with the traceback only on request.
    click.echo(f"Error: unexpected {type(exc).__name__}: {exc} (set CAPRL_DEBUG=1 for the traceback)", err=True)
    if tracebacks:
        traceback.print_exception(exc, file=sys.stderr)
    return EXIT_FAILURE
