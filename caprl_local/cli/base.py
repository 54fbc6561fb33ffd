"""What the commands share: the command group, exit codes, option groups and their types."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from .._version import __version__
from ..options import MIN_N_CTX, EngineOptions, default
from ..registry import DEFAULT_MODEL

# Exit codes: 0 success, 1 failure, 2 usage, 130 interrupted.
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


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


class ShardType(click.ParamType):
    """I/N: shard I (from 1) of N."""

    name = "I/N"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, int]:
        if isinstance(value, tuple):
            return value
        index, _, count = str(value).partition("/")
        if not (index.isdigit() and count.isdigit() and 1 <= int(index) <= int(count)):
            self.fail(f"{value!r} is not I/N with 1 <= I <= N (e.g. 2/8)", param, ctx)
        return int(index), int(count)


class StdoutClosed(Exception):
    """The reader of stdout went away (`caprl-local caption ... | head`): the run stops, quietly."""


class _Commands(click.Group):
    """The command group; a closed stdout reaches the error table as StdoutClosed (click would end the
    process itself, with exit code 1)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError as exc:
            raise StdoutClosed(str(exc)) from exc


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
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


#: Where models are cached (every command that reads or writes the cache).
cache_dir_option = click.option(
    "--cache-dir", type=click.Path(file_okay=False, path_type=str), envvar="CAPRL_LOCAL_HOME",
    help="Where models are cached [default: the platform's cache dir; env CAPRL_LOCAL_HOME].")

#: Options that choose and fetch model files (caption, serve, pull).
model_options = _options(
    click.option("--quant", help="Quantization, e.g. Q4_K_M (default: the model's default)."),
    click.option("--imatrix", is_flag=True, help="Use the imatrix (i1) quants."),
    click.option("--mmproj-quant", help="Vision projector precision: f16 or Q8_0 (lighter) "
                                        "[default: the model's, see `caprl-local models`]."),
    cache_dir_option,
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
    # -ngl is one option name, as llama.cpp spells it (click matches it whole, never as -n with "gl").
    click.option("--gpu-layers", "-ngl", "--n-gpu-layers", "gpu_layers",
                 type=AutoOrNumber(-1, "-1 for all layers, 0 for none"),
                 default=default(EngineOptions, "gpu_layers"), show_default=True,
                 help="Layers to offload to the GPU: auto (all, if llama.cpp has GPU support), 0 for CPU, or N."),
    click.option("--threads", "-t", type=click.IntRange(min=1),
                 help="CPU threads [default: one per physical core, less the cores other programs keep busy]."),
    click.option("--max-image-tokens", "image_max_tokens", type=click.IntRange(min=1),
                 default=default(EngineOptions, "image_max_tokens"), show_default=True,
                 help="Cap on tokens per image; large images are scaled down to fit."),
    click.option("--ctx-size", "-c", "n_ctx", type=click.IntRange(min=MIN_N_CTX), default=default(EngineOptions, "n_ctx"),
                 show_default=True, help="Context of each caption in tokens: prompt, image or video, and caption together."),
    click.option("--fps", "video_fps", type=click.FloatRange(min=0, max=60, min_open=True),
                 default=default(EngineOptions, "video_fps"), show_default=True,
                 help="Frames a second taken from a video (Qwen-VL's processors sample at 2 fps; fewer frames "
                      "where --max-frames or the token budget says so)."),
    click.option("--max-frames", "video_max_frames", type=click.IntRange(min=2),
                 default=default(EngineOptions, "video_max_frames"), show_default=True,
                 help="Most frames taken from one video; a longer one is sampled more sparsely (CapRL-Video is "
                      "evaluated on up to 128 frames)."),
    click.option("--max-video-tokens", "video_max_tokens", type=click.IntRange(min=16),
                 default=default(EngineOptions, "video_max_tokens"),
                 help="Cap on a video's image tokens; fewer and smaller frames to fit [default: what each caption's "
                      "context leaves after the prompt and --max-tokens; raise -c/--ctx-size for long clips]."),
    click.option("--device-sampling", "-bs", "--backend-sampling", "device_sampling", is_flag=True,
                 help="Choose each token on the GPU inside llama.cpp's decode (its experimental backend sampling); "
                      "greedy captions are unchanged. Measure before using it."),
    click.option("--verbose", "-v", is_flag=True, help="Show llama.cpp's log, timings and tracebacks."),
)
ENGINE_NAMES = ("gpu_layers", "threads", "image_max_tokens", "n_ctx", "video_fps", "video_max_frames", "video_max_tokens",
                "device_sampling", "verbose")


def warn_unused(registry_name: str | None, **chosen: Any) -> None:
    """Options that choose files mean nothing for a model given as a file: say so."""
    given = [f"--{name.replace('_', '-')}" for name, value in chosen.items() if value]
    if registry_name is None and given:
        click.echo(f"Warning: {', '.join(given)} ha{'ve' if len(given) > 1 else 's'} no effect with a .gguf file "
                   "as --model", err=True)
