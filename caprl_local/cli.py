"""The ``caprl-local`` command: a thin client of the library.

Results go to stdout, everything else to stderr. Errors are turned into
messages and exit codes in one place, :func:`main`.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import click

from . import __version__
from .errors import Cancelled, CaprlError
from .prompts import PRESETS
from .registry import DEFAULT_MODEL

# Exit codes: 0 success, 1 failure, 2 usage, 130 interrupted.
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

# Exception type -> (exit code, message; "{exc}" is the exception's text); first match wins.
# Usage errors print click's own usage message.
ERROR_TABLE: tuple[tuple[type[BaseException], int, str], ...] = (
    (click.UsageError, EXIT_USAGE, ""),
    (KeyboardInterrupt, EXIT_INTERRUPTED, "Interrupted."),
    (Cancelled, EXIT_INTERRUPTED, "Interrupted."),
    (click.exceptions.Abort, EXIT_INTERRUPTED, "Interrupted."),
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
@click.version_option(__version__, "--version", prog_name="caprl-local")
def cli() -> None:
    """Caption images locally with the CapRL models, through llama.cpp."""


def model_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Options that choose and fetch model files, shared by caption and pull."""
    options = [
        click.option("--quant", help="Quantization, e.g. Q4_K_M (default: the model's default)."),
        click.option("--imatrix", is_flag=True, help="Use the imatrix (i1) quants."),
        click.option("--mmproj-quant", help="Vision projector precision: f16 (default) or Q8_0 (lighter)."),
        click.option("--cache-dir", type=click.Path(file_okay=False, path_type=str), envvar="CAPRL_LOCAL_HOME",
                     help="Where models are cached [default: the platform's cache dir; env CAPRL_LOCAL_HOME]."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@cli.command()
@click.argument("images", nargs=-1, type=click.Path(path_type=str))
@click.option("--model", "model", default=DEFAULT_MODEL, envvar="CAPRL_LOCAL_MODEL", show_default=True,
              metavar="NAME|REPO|PATH",
              help="A model name from `caprl-local models`, a Hub repo (owner/name), or a .gguf file.")
@click.option("--mmproj", "mmproj_path", type=click.Path(path_type=str), metavar="PATH.gguf",
              help="The vision projector, with --model PATH.gguf [default: the *mmproj*.gguf beside it].")
@model_options
@click.option("--offline", is_flag=True, help="Never touch the network; use cached files only.")
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
                   "(auto: as many as memory allows, up to 8).")
@click.option("--progress/--quiet", "progress", default=None,
              help="Force the progress bar on or off [default: on when stderr is a terminal].")
@click.option("--prompt", help="Your own instruction; '<image>' marks where the image goes (default: first).")
@click.option("--preset", type=click.Choice(list(PRESETS)), help="A ready-made prompt [default: the model's own].")
@click.option("--max-tokens", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Stop after this many new tokens.")
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
              help="0 is greedy decoding; higher values sample more freely.")
@click.option("--seed", type=int, help="Seed for sampling (with --temperature > 0).")
@click.option("--gpu-layers", type=AutoOrNumber(-1, "-1 for all layers, 0 for none"), default="auto", show_default=True,
              help="Layers to offload to the GPU: auto (all, if llama.cpp has GPU support), 0 for CPU, or N.")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads [default: all available].")
@click.option("--max-image-tokens", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Cap on tokens per image; large images are scaled down to fit.")
@click.option("--verbose", "-v", is_flag=True, help="Show llama.cpp's log, timings and tracebacks.")
def caption(
    images: tuple[str, ...],
    model: str,
    mmproj_path: str | None,
    quant: str | None,
    imatrix: bool,
    mmproj_quant: str | None,
    cache_dir: str | None,
    offline: bool,
    recursive: bool,
    list_file: str | None,
    fmt: str,
    output: str | None,
    sidecar: bool,
    sidecar_ext: str,
    overwrite: bool,
    parallel: str | int,
    progress: bool | None,
    prompt: str | None,
    preset: str | None,
    max_tokens: int,
    temperature: float,
    seed: int | None,
    gpu_layers: str | int,
    threads: int | None,
    max_image_tokens: int,
    verbose: bool,
) -> None:
    """Caption IMAGES (files, folders or glob patterns) and print the captions.

    One image: its caption on stdout. Many: each written as it is done; the same command
    run again (after Ctrl-C, say) skips images that already have a --sidecar or a line in
    the --output file. The model is fetched and verified on first use, then cached: later
    runs need no network.
    """
    if prompt is not None and preset is not None:
        raise click.UsageError("use either --prompt or --preset, not both")
    if not images and list_file is None:
        raise click.UsageError("give images, folders or glob patterns, or --from-list FILE")
    from .batch import collect_inputs
    from .engine import Captioner  # imported here so that --help stays instant
    from .hub import download_model
    from .prompts import DEFAULT_PROMPT, resolve_prompt

    items = collect_inputs(images, recursive=recursive, list_file=list_file, stdin=sys.stdin)
    if not items:
        where = ", ".join(images) or list_file
        raise CaprlError(f"no images found in {where}" + ("" if recursive else " (add --recursive for sub-folders)"))
    files = download_model(model, mmproj=mmproj_path, quant=quant, imatrix=imatrix, mmproj_quant=mmproj_quant,
                           cache_dir=cache_dir, offline=offline, progress=_DownloadBar())
    prompt_text = resolve_prompt(prompt=prompt, preset=preset, default=files.prompt or DEFAULT_PROMPT)
    options: dict[str, Any] = dict(max_tokens=max_tokens, temperature=temperature, seed=seed)
    engine = dict(gpu_layers=gpu_layers, threads=threads, image_max_tokens=max_image_tokens, verbose=verbose)
    single = len(images) == 1 and [i.path for i in items] == list(images)  # one file, not a folder or pattern

    def load(in_flight: bool = False) -> Any:
        _status(f"Loading {files.model.name} ...")
        # Several captions in flight: the weight layout made for matrix products many rows wide.
        captioner = Captioner(files.model, files.mmproj, repack=True if in_flight else None, **engine)  # type: ignore[arg-type]
        _status("")
        return captioner

    with _GracefulInterrupt() as interrupt:
        if single and fmt == "text" and not (output or sidecar or list_file):
            with interrupt.watch(load()) as cap:
                _caption_one(cap, images[0], prompt_text, options, verbose)
            return
        _caption_batch(lambda in_flight: interrupt.watch(load(in_flight)), files, items, prompt_text, options, parallel=parallel, fmt=fmt,
                       output=output, sidecar=sidecar, sidecar_ext=sidecar_ext, overwrite=overwrite,
                       progress=progress)


class _GracefulInterrupt:
    """Ctrl-C while captioning: ask the captioner to stop at the next token, so the run ends
    cleanly with what is done written; a second Ctrl-C stops at once.

    (A KeyboardInterrupt raised by Python's default handler can land inside llama.cpp's log
    callback, where ctypes swallows it, and the Ctrl-C would be lost.)
    """

    def __init__(self) -> None:
        self.requested = False
        self.captioner: Any = None

    def __enter__(self) -> _GracefulInterrupt:
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self.previous)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested or self.captioner is None:
            self.requested = True
            raise KeyboardInterrupt
        self.requested = True
        self.captioner.cancel()

    def watch(self, captioner: Any) -> Any:
        self.captioner = captioner
        if self.requested:  # Ctrl-C came while the model was loading
            captioner.close()
            raise KeyboardInterrupt
        return captioner


def _caption_one(cap: Any, image: str, prompt: str, options: dict[str, Any], verbose: bool) -> None:
    on_text = _Streamer() if sys.stdout.isatty() else None  # stream only to a person
    _status("Reading the image ...")  # on a CPU the vision encoder can take a minute
    try:
        result = cap.caption(image, prompt=prompt, on_text=on_text, **options)
    finally:
        if on_text is None or not on_text.started:  # once the caption shows, the line is its own
            _status("")
    click.echo(result.text if on_text is None else "")
    if verbose:
        t = result.timings
        click.echo(
            f"{result.image_tokens} image tokens, {result.prompt_tokens} prompt tokens, "
            f"{result.generated_tokens} generated; encode {t.image_encode_s:.2f}s, "
            f"prompt {t.prompt_tokens_per_s:.1f} tok/s, generation {t.generation_tokens_per_s:.1f} tok/s",
            err=True,
        )


def _caption_batch(load: Callable[[bool], Any], files: Any, items: list[Any], prompt: str, options: dict[str, Any],
                   *, parallel: str | int, fmt: str, output: str | None, sidecar: bool, sidecar_ext: str,
                   overwrite: bool, progress: bool | None) -> None:
    from .batch import JsonlOutput, SidecarOutput, TextOutput, run_batch, split_done

    outputs: list[Any] = []
    if sidecar:
        outputs.append(SidecarOutput(sidecar_ext, overwrite=overwrite))
    if fmt == "jsonl":
        outputs.append(JsonlOutput(output, overwrite=overwrite, stream=sys.stdout))
    elif output or not sidecar:
        outputs.append(TextOutput(output, overwrite=overwrite, stream=sys.stdout))
    todo, skipped = split_done(items, outputs, prompt)
    reporter = _BatchReporter(len(items), skipped, show=sys.stderr.isatty() if progress is None else progress)
    summary = None
    try:
        if todo:
            model_name = files.name or files.model.name
            with load(len(todo) > 1 and parallel != 1) as cap:
                n = cap.auto_parallel() if parallel == "auto" else parallel
                summary = run_batch(cap, todo, outputs, prompt=prompt, model=model_name, quant=files.quant,
                                    on_result=reporter.result, parallel=min(n, len(todo)), **options)
    finally:
        for out in outputs:
            if hasattr(out, "close"):
                out.close()
    reporter.finish(summary, quiet=progress is False)
    if summary is not None and summary.interrupted:
        raise KeyboardInterrupt
    if summary is not None and summary.failed:
        raise SystemExit(EXIT_FAILURE)


@cli.command()
@click.argument("model", default=DEFAULT_MODEL, metavar="MODEL")
@model_options
def pull(model: str, quant: str | None, imatrix: bool, mmproj_quant: str | None, cache_dir: str | None) -> None:
    """Download MODEL (a name or owner/repo) and its vision projector, verify and cache them.

    Prints the two local paths. An interrupted pull resumes where it stopped.
    """
    from .hub import download_model

    files = download_model(model, quant=quant, imatrix=imatrix, mmproj_quant=mmproj_quant,
                           cache_dir=cache_dir, progress=_DownloadBar())
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
        click.echo(json.dumps([_listing_json(item) for item in listings], indent=2))
        return
    for item in listings:
        spec = item.spec
        mark = " (default)" if spec.name == DEFAULT_MODEL else ""
        click.echo(f"{spec.name}{mark}  [{spec.architecture}]  {spec.description}")
        click.echo(f"  repo: {spec.repo}" + (f"   imatrix: {spec.imatrix_repo}" if spec.imatrix_repo else ""))
        cached = {(c.repo, c.filename) for c in item.cached}
        if item.available is not None:
            quants = [f for f in item.available if not f.projector]
            shown = ", ".join(
                f"{'i1-' if f.imatrix else ''}{f.quant} {_size(f.size)}{' *' if (f.repo, f.filename) in cached else ''}"
                for f in sorted(quants, key=lambda f: (f.imatrix, f.size))
            )
            click.echo(f"  quants: {shown or 'none published yet'}")
        elif item.error != "offline":
            click.echo(f"  quants: not listed ({item.error})")
        for c in item.cached:
            click.echo(f"  cached: {c.filename}  {_size(c.size)}")
        if not item.cached:
            click.echo("  cached: nothing")
    click.echo(f"\n* cached. Cache: {cache_root(cache_dir)}", err=True)
    click.echo(f"Your own models go in {user_models_path()}", err=True)


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []},
             add_help_option=False)
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
    click.echo(f"Removed {len(removed)} file(s), freed {_size(sum(c.size for c in removed))}.", err=True)


def _listing_json(item: Any) -> dict[str, Any]:
    cached = {(c.repo, c.filename): c for c in item.cached}
    return {
        **asdict(item.spec),
        "default": item.spec.name == DEFAULT_MODEL,
        "available": None if item.available is None else [
            {**asdict(f), "cached": (f.repo, f.filename) in cached} for f in item.available
        ],
        "cached": [{**asdict(c), "path": str(c.path)} for c in item.cached],
        "cached_bytes": sum(c.size for c in item.cached),
    }


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} KB"


class _BatchReporter:
    """Per-image error lines, a progress bar on a terminal, and the closing summary, on stderr."""

    def __init__(self, total: int, skipped: int, *, show: bool) -> None:
        self.total, self.skipped, self.show = total, skipped, show
        self.started = time.monotonic()

    def result(self, item: Any, record: dict[str, Any], summary: Any) -> None:
        if "error" in record:
            self._clear()
            click.echo(f"Error: {record['error']}", err=True)
        if self.show:
            done = self.skipped + summary.done + summary.failed
            left = self.total - done
            rate = (summary.done + summary.failed) / max(time.monotonic() - self.started, 1e-6)
            bar = "#" * int(24 * done / max(self.total, 1))
            click.echo(f"\r\033[K[{bar:<24}] {done}/{self.total} images  {60 * rate:.1f}/min  "
                       f"ETA {_duration(left / rate) if rate > 0 else '?'}", nl=False, err=True)

    def _clear(self) -> None:
        if self.show:
            click.echo("\r\033[K", nl=False, err=True)

    def finish(self, summary: Any, *, quiet: bool) -> None:
        self._clear()
        if quiet:
            return
        if summary is None:
            click.echo(f"Nothing to do: all {self.total} images already have a result "
                       "(--overwrite captions them again).", err=True)
            return
        ended = "Interrupted after" if summary.interrupted else "Captioned"
        click.echo(f"{ended} {summary.done} of {self.total} images ({self.skipped} skipped, {summary.failed} failed) "
                   f"in {_duration(summary.seconds)}, {summary.images_per_minute:.1f} images/min.", err=True)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h {seconds // 60 % 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m {seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class _DownloadBar:
    """Renders download progress on stderr: a live bar for a person, one line per file otherwise."""

    def __init__(self) -> None:
        self.current: str | None = None
        self.started = 0.0
        self.tty = sys.stderr.isatty()

    def __call__(self, p: Any) -> None:
        now = time.monotonic()
        if p.filename != self.current:
            self.current, self.started, self.first = p.filename, now, p.downloaded
            if not self.tty:
                click.echo(f"Downloading {p.filename} ({_size(p.total or 0)})", err=True)
        if not self.tty:
            return
        total = p.total or 0
        frac = p.downloaded / total if total else 0.0
        rate = (p.downloaded - self.first) / max(now - self.started, 1e-6)
        eta = (total - p.downloaded) / rate if rate > 0 and total else 0
        bar = "#" * int(frac * 24)
        line = (f"\r\033[K{p.filename}  [{bar:<24}] {frac:4.0%}  {_size(p.downloaded)}/{_size(total)}"
                f"  {rate / 1e6:.1f} MB/s  ETA {eta:.0f}s")
        click.echo(line, nl=p.downloaded >= total > 0, err=True)


def _status(message: str) -> None:
    """A transient line on stderr while something slow happens, only when a person watches."""
    if sys.stderr.isatty():
        click.echo(f"\r\033[K{message}", nl=False, err=True)


class _Streamer:
    """Writes caption pieces to stdout as they come, trimmed as the finished caption is."""

    def __init__(self) -> None:
        self.started = False
        self.pending = ""  # whitespace held back until more text follows it

    def __call__(self, piece: str) -> None:
        text = self.pending + piece
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
            if self.started:
                _status("")  # the caption replaces the "Reading the image" line
        body = text.rstrip()
        self.pending = text[len(body):]
        click.echo(body, nl=False)


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


def _configure_logging(verbose: bool) -> None:
    """Verbose: every log line on stderr. Otherwise only caprl-local's own warnings, as one-liners;
    third-party libraries' log output (huggingface_hub's, say) stays silent."""
    root = logging.getLogger()
    if verbose:
        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format="%(name)s: %(message)s")
        return
    root.addHandler(logging.NullHandler())  # no "last resort" printing of others' warnings
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("Warning: %(message)s"))
    ours = logging.getLogger("caprl_local")
    ours.addHandler(handler)
    ours.setLevel(logging.WARNING)
    ours.propagate = False


def _verbose_requested(argv: list[str]) -> bool:
    return "--verbose" in argv or "-v" in argv


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI, map every failure to a message and an exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = _verbose_requested(args)
    _configure_logging(verbose)
    try:
        code = cli.main(args=args, prog_name="caprl-local", standalone_mode=False)
        return code if isinstance(code, int) else EXIT_OK
    except BrokenPipeError:
        # stdout closed early (e.g. piped into `head`): stop quietly.
        sys.stdout = open(os.devnull, "w")
        return EXIT_FAILURE
    except BaseException as exc:  # noqa: BLE001 - this is the one place errors become exit codes
        return _report(exc, verbose)


def _report(exc: BaseException, verbose: bool) -> int:
    for exc_type, code, message in ERROR_TABLE:
        if isinstance(exc, exc_type):
            if isinstance(exc, click.ClickException):
                exc.show()
            else:
                if code == EXIT_INTERRUPTED and sys.stderr.isatty():
                    click.echo(err=True)  # end a progress line first
                click.echo(message.format(exc=exc), err=True)
            if verbose and code == EXIT_FAILURE:
                logging.getLogger("caprl_local").error("traceback", exc_info=exc)
            return code
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else EXIT_FAILURE
    # A bug in caprl-local: still one line, with the traceback only on request.
    click.echo(f"Error: unexpected {type(exc).__name__}: {exc} (run with --verbose for details)", err=True)
    if verbose:
        logging.getLogger("caprl_local").error("traceback", exc_info=exc)
    return EXIT_FAILURE
