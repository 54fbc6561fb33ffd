"""The ``caprl-local`` command: a thin client of the library.

Results go to stdout, everything else to stderr. Errors are turned into
messages and exit codes in one place, :func:`main`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import asdict
from typing import Any

import click

from . import __version__
from .errors import CaprlError
from .prompts import PRESETS

# Exit codes: 0 success, 1 failure, 2 usage, 130 interrupted.
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

# Exception type -> (exit code, message; "{exc}" is the exception's text); first match wins.
# Usage errors print click's own usage message.
ERROR_TABLE: tuple[tuple[type[BaseException], int, str], ...] = (
    (click.UsageError, EXIT_USAGE, ""),
    (KeyboardInterrupt, EXIT_INTERRUPTED, "Interrupted."),
    (click.exceptions.Abort, EXIT_INTERRUPTED, "Interrupted."),
    (CaprlError, EXIT_FAILURE, "Error: {exc}"),
    (MemoryError, EXIT_FAILURE, "Error: out of memory; lower --max-image-tokens or use a smaller quant"),
)


class GpuLayersType(click.ParamType):
    """'auto' or a whole number of layers (-1 for all)."""

    name = "auto|N"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str | int:
        if isinstance(value, int) or value == "auto":
            return value
        try:
            number = int(value)
        except ValueError:
            self.fail(f"{value!r} is neither 'auto' nor a number of layers", param, ctx)
        if number < -1:
            self.fail(f"{number} is not a valid layer count (use -1 for all, 0 for none)", param, ctx)
        return number


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="caprl-local")
def cli() -> None:
    """Caption images locally with the CapRL models, through llama.cpp."""


@cli.command()
@click.argument("image", type=click.Path(dir_okay=True, path_type=str))
@click.option("--model", "model_path", required=True, type=click.Path(path_type=str), metavar="PATH.gguf",
              help="The CapRL text model GGUF (e.g. CapRL-3B.Q4_K_M.gguf).")
@click.option("--mmproj", "mmproj_path", required=True, type=click.Path(path_type=str), metavar="PATH.gguf",
              help="Its vision projector GGUF (e.g. CapRL-3B.mmproj-f16.gguf).")
@click.option("--prompt", help="Your own instruction; '<image>' marks where the image goes (default: first).")
@click.option("--preset", type=click.Choice(list(PRESETS)), help="A ready-made prompt [default: detailed, CapRL's own].")
@click.option("--max-tokens", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Stop after this many new tokens.")
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
              help="0 is greedy decoding; higher values sample more freely.")
@click.option("--seed", type=int, help="Seed for sampling (with --temperature > 0).")
@click.option("--gpu-layers", type=GpuLayersType(), default="auto", show_default=True,
              help="Layers to offload to the GPU: auto (all, if llama.cpp has GPU support), 0 for CPU, or N.")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads [default: all available].")
@click.option("--max-image-tokens", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Cap on tokens per image; large images are scaled down to fit.")
@click.option("--verbose", "-v", is_flag=True, help="Show llama.cpp's log, timings and tracebacks.")
def caption(
    image: str,
    model_path: str,
    mmproj_path: str,
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
    """Caption IMAGE and print the caption to stdout."""
    if prompt is not None and preset is not None:
        raise click.UsageError("use either --prompt or --preset, not both")
    from .engine import Captioner  # imported here so that --help stays instant

    _status(f"Loading {os.path.basename(model_path)} ...")
    with Captioner(model_path, mmproj_path, gpu_layers=gpu_layers, threads=threads,  # type: ignore[arg-type]
                   image_max_tokens=max_image_tokens, verbose=verbose) as cap:
        _status("")
        on_text = _Streamer() if sys.stdout.isatty() else None  # stream only to a person
        result = cap.caption(image, prompt=prompt, preset=preset, max_tokens=max_tokens,
                             temperature=temperature, seed=seed, on_text=on_text)
        click.echo(result.text if on_text is None else "")
        if verbose:
            t = result.timings
            click.echo(
                f"{result.image_tokens} image tokens, {result.prompt_tokens} prompt tokens, "
                f"{result.generated_tokens} generated; encode {t.image_encode_s:.2f}s, "
                f"prompt {t.prompt_tokens_per_s:.1f} tok/s, generation {t.generation_tokens_per_s:.1f} tok/s",
                err=True,
            )


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


def _status(message: str) -> None:
    """A transient status line on stderr, only when a person is watching."""
    if sys.stderr.isatty():
        click.echo(f"\r\033[K{message}", nl=False, err=True)


def _verbose_requested(argv: list[str]) -> bool:
    return "--verbose" in argv or "-v" in argv


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI, map every failure to a message and an exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = _verbose_requested(args)
    if verbose:
        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format="%(name)s: %(message)s")
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
