"""The options of a caption and of a loaded model: each defined once, with its default and check.

Pure values, free of llama.cpp: the engine, the batch runner and the CLI all read them from here.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Literal, TypedDict, TypeVar

from .errors import CaprlError

if TYPE_CHECKING:
    from .transfer import ProgressCallback

GpuLayers = int | Literal["auto"]
Parallel = int | Literal["auto"]

#: Default cap on image tokens. llama.cpp allows Qwen2.5-VL 4096 (a 12-MP photo then needs
#: tens of GB for the vision encoder); 1024 tokens is about a megapixel, ample for captions.
DEFAULT_MAX_IMAGE_TOKENS = 1024
#: CapRL's own evaluation lets a caption run to 2048 new tokens (dense charts and infographics need them).
DEFAULT_MAX_TOKENS = 2048
DEFAULT_N_CTX = 4096
MIN_N_CTX = 256


def positive(name: str, value: Any, *, allow_none: bool = False, minimum: int = 1) -> None:
    """Raise CaprlError unless `value` is a whole number >= minimum (or None, when allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise CaprlError(f"{name} must be a whole number of at least {minimum}, not {value!r}")


def auto_or_positive(name: str, value: Any, *, minimum: int = 1) -> None:
    if value != "auto":
        positive(name, value, minimum=minimum)


@dataclass(frozen=True, kw_only=True)
class GenerationOptions:
    """How one caption is generated. ``prompt`` None means the model's own caption prompt."""

    prompt: str | None = None
    preset: str | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0  # greedy, like Qwen2.5-VL's generation config (top_k=1)
    top_p: float = 0.95
    seed: int | None = None
    repeat_penalty: float = 1.05  # Qwen2.5-VL's generation config uses 1.05
    stop: tuple[str, ...] = ()  # the caption ends before the first of these strings
    loop_guard: bool = True  # end a caption that repeats itself (see engine/scheduler.py); off with ignore_eos
    ignore_eos: bool = False  # always generate max_tokens (for benchmarks)
    # A video's prompt where it is not `prompt` (a batch of both); None: `prompt`, or CapRL-Video's when none is given.
    video_prompt: str | None = None

    def __post_init__(self) -> None:
        positive("max_tokens", self.max_tokens)
        if self.video_prompt is not None and not (isinstance(self.video_prompt, str) and self.video_prompt.strip()):
            raise CaprlError("the video prompt is empty; give some text or leave it out for CapRL-Video's default")
        if self.prompt is not None and self.preset is not None:
            raise CaprlError("give either a prompt or a preset, not both")
        if not self.temperature >= 0 or not 0 < self.top_p <= 1 or not self.repeat_penalty > 0:
            raise CaprlError("temperature must be >= 0, top_p in (0, 1] and repeat_penalty > 0")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise CaprlError(f"seed must be a whole number, not {self.seed!r}")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop) or len(self.stop) > 8:
            raise CaprlError(f"stop must be a sequence of at most 8 non-empty strings, not {self.stop!r}")
        object.__setattr__(self, "stop", tuple(self.stop))  # a list given by a caller stays hashable

    def resolved(self, default: str) -> GenerationOptions:
        """These options with the prompt spelt out: the prompt given, the preset's, or `default`."""
        from .prompts import resolve_prompt

        return dataclasses.replace(self, prompt=resolve_prompt(prompt=self.prompt, preset=self.preset, default=default),
                                   preset=None)


@dataclass(frozen=True, kw_only=True)
class EngineOptions:
    """How a model is loaded; fixed for the life of a Captioner."""

    gpu_layers: GpuLayers = "auto"  # auto: every layer, if llama.cpp was built with GPU offload
    threads: int | None = None  # None: every CPU this process may use
    n_ctx: int = DEFAULT_N_CTX  # tokens per caption: prompt, image and caption
    parallel: Parallel = "auto"  # captions decoded together; auto: as the device and memory allow
    flash_attn: bool | None = None  # None: let llama.cpp decide
    image_min_tokens: int | None = None
    image_max_tokens: int | None = DEFAULT_MAX_IMAGE_TOKENS
    repack: bool | None = None  # llama.cpp's repacked weight layouts; None: the engine's choice
    warmup: bool = True
    verbose: bool = False  # llama.cpp's log lines at their own level instead of DEBUG
    isolate: bool = True  # a pair's first load on this machine runs in a child process (see engine/probe.py)
    device_sampling: bool = False  # llama.cpp's backend sampling: tokens chosen inside the decode (engine/device_sampling.py)
    # Videos (caprl_local/clips.py): frames per second taken, at most this many, within this many image tokens
    # (None: what each caption's context leaves after its prompt and new tokens).
    video_fps: float = 2.0  # what Qwen2.5-VL and Qwen3-VL are trained with (their processors' fps=2)
    video_max_frames: int = 128  # as CapRL-Video is evaluated
    video_max_tokens: int | None = None

    def __post_init__(self) -> None:
        auto_or_positive("gpu_layers", self.gpu_layers, minimum=-1)
        auto_or_positive("parallel", self.parallel)
        positive("threads", self.threads, allow_none=True)
        positive("image_min_tokens", self.image_min_tokens, allow_none=True)
        positive("image_max_tokens", self.image_max_tokens, allow_none=True)
        positive("n_ctx", self.n_ctx, minimum=MIN_N_CTX)
        positive("video_max_frames", self.video_max_frames, minimum=2)
        positive("video_max_tokens", self.video_max_tokens, allow_none=True, minimum=16)
        if isinstance(self.video_fps, bool) or not isinstance(self.video_fps, (int, float)) \
                or not 0 < self.video_fps <= 60:
            raise CaprlError(f"video_fps must be a number of frames per second above 0 and at most 60, not {self.video_fps!r}")


# The same options as keyword arguments (``**options: Unpack[GenerationKwargs]``), so that an IDE completes them
# and a type checker catches a misspelt one. tests/test_contract.py keeps each the mirror of its dataclass.


class GenerationKwargs(TypedDict, total=False):
    """The fields of :class:`GenerationOptions`, as keyword arguments."""

    prompt: str | None
    preset: str | None
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    repeat_penalty: float
    stop: tuple[str, ...]
    loop_guard: bool
    ignore_eos: bool
    video_prompt: str | None


class EngineKwargs(TypedDict, total=False):
    """The fields of :class:`EngineOptions`, as keyword arguments."""

    gpu_layers: GpuLayers
    threads: int | None
    n_ctx: int
    parallel: Parallel
    flash_attn: bool | None
    image_min_tokens: int | None
    image_max_tokens: int | None
    repack: bool | None
    warmup: bool
    verbose: bool
    isolate: bool
    device_sampling: bool
    video_fps: float
    video_max_frames: int
    video_max_tokens: int | None


class FetchKwargs(TypedDict, total=False):
    """What ``download_model`` takes besides the name: which files, from where, and how."""

    mmproj: str | os.PathLike[str] | None
    quant: str | None
    imatrix: bool
    mmproj_quant: str | None
    cache_dir: str | os.PathLike[str] | None
    offline: bool
    progress: ProgressCallback | None
    token: str | None
    verify: bool


class PretrainedKwargs(EngineKwargs, FetchKwargs, total=False):
    """What ``Captioner.from_pretrained`` takes: the engine's options, ``download_model``'s and the default prompt."""

    prompt: str | None


class DatasetKwargs(PretrainedKwargs, GenerationKwargs, total=False):
    """What ``caption_dataset`` takes: each actor's ``from_pretrained`` options and the caption options."""


def split_pretrained(options: Mapping[str, Any]) -> tuple[FetchKwargs, EngineKwargs, dict[str, Any]]:
    """(download_model's options, the engine's, the rest) of `options`, by the names declared above."""
    fetch = {k: v for k, v in options.items() if k in FetchKwargs.__optional_keys__}
    engine = {k: v for k, v in options.items() if k in EngineKwargs.__optional_keys__}
    rest = {k: v for k, v in options.items() if k not in fetch and k not in engine}
    return FetchKwargs(**fetch), EngineKwargs(**engine), rest  # type: ignore[typeddict-item]


def generation_of(value: GenerationOptions | None, options: Mapping[str, Any]) -> GenerationOptions:
    """The one GenerationOptions of a call: ``generation=`` as given, or built from keyword options (not both)."""
    if value is None:
        return make(GenerationOptions, options)
    if options:
        raise CaprlError(f"give the caption options either as generation= or as keywords, not both "
                         f"(here {', '.join(sorted(options))} too)")
    if not isinstance(value, GenerationOptions):
        raise CaprlError(f"generation must be a GenerationOptions, not {type(value).__name__}")
    return value


Options = TypeVar("Options", GenerationOptions, EngineOptions)


def make(cls: type[Options], options: Mapping[str, Any]) -> Options:
    """``cls(**options)`` with an unknown name as a CaprlError listing the known ones."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise CaprlError(f"unknown option {unknown[0]!r}; known: {', '.join(sorted(known))}")
    return cls(**options)


def default(cls: type[Any], name: str) -> Any:
    """The default of one option, for help texts that show it."""
    return next(f.default for f in fields(cls) if f.name == name)
