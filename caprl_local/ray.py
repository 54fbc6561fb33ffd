"""Caption datasets on a Ray cluster with Ray Data (the ``ray`` extra): one loaded Captioner per actor.

:func:`caption_dataset` adds ``caption`` and ``error`` columns to a Ray Dataset, in the style of
Ray's own LLM processors; :class:`RayCaptioner` offers what the batch runner uses of a Captioner,
so ``caprl-local caption --ray`` writes the same outputs, resumes and isolates failures as a
local run. Ray schedules the work; each node resolves the model through its own cache (or a
shared ``cache_dir``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import ray
from typing_extensions import Unpack

from .captioning import ClosingContext, ImageFile
from .errors import Cancelled, CaprlError
from .options import (
    DatasetKwargs,
    EngineKwargs,
    FetchKwargs,
    GenerationKwargs,
    GenerationOptions,
    PretrainedKwargs,
    generation_of,
    split_pretrained,
)
from .registry import DEFAULT_MODEL
from .results import Activity, Caption, CaptionFailure, Timings

log = logging.getLogger("caprl_local")

#: The columns caption_dataset adds.
COLUMNS = ("caption", "error", "error_kind", "image_tokens", "prompt_tokens", "generated_tokens", "finish_reason")


class _CaptionActor:
    """A Ray Data actor: loads the model once, then captions batches of rows."""

    def __init__(self, model: str, image_column: str, fetch: FetchKwargs, engine: EngineKwargs, prompt: str | None,
                 generation: GenerationOptions) -> None:
        from .engine import Captioner

        self.captioner = Captioner.from_pretrained(model, prompt=prompt, **fetch, **engine)
        self.image_column, self.generation = image_column, generation

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        images = [_plain(x) for x in batch[self.image_column]]
        out: dict[str, list[Any]] = {name: [] for name in COLUMNS}
        for result in self.captioner.caption_many(images, generation=self.generation):
            if isinstance(result, Caption):
                row: dict[str, Any] = {
                    "caption": result.text, "error": None, "error_kind": None, "image_tokens": result.image_tokens,
                    "prompt_tokens": result.prompt_tokens, "generated_tokens": result.generated_tokens,
                    "finish_reason": result.finish_reason}
            else:
                row = {"caption": None, "error": result.error, "error_kind": result.kind, "image_tokens": 0,
                       "prompt_tokens": 0, "generated_tokens": 0, "finish_reason": None}
            for name in COLUMNS:
                out[name].append(row[name])
        return {**{k: list(v) for k, v in batch.items()}, **out}


def _quiet() -> None:
    """Ray's own progress lines and notices would mix with the run's: keep its errors only."""
    context = ray.data.DataContext.get_current()  # imports ray.data, which sets up its loggers
    for name in ("ray", "ray.data", "ray.data._internal.execution.streaming_executor"):
        logging.getLogger(name).setLevel(logging.ERROR)
    context.enable_progress_bars = False


#: Ray's switch for a single-node instance on the loopback address (read by its services at start).
_LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def init_local(**options: Any) -> None:
    """Start a Ray instance on this machine that listens on 127.0.0.1 only, with no dashboard.

    On Linux, Ray's own ``ray.init()`` binds its services to the machine's network address,
    where anyone who can reach it may run code as this user (Ray has no authentication).
    Call this before building a Dataset (Ray Data starts an instance of its own otherwise) when
    the work should stay on this machine; ``ray start --head`` makes a real cluster. `options`
    go to ``ray.init`` (``num_cpus``, say).
    """
    from ray._private import ray_constants  # the switch's value, read by Ray at import

    previous = os.environ.get(_LOOPBACK_SWITCH)
    switch = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    os.environ[_LOOPBACK_SWITCH] = "0"  # inherited by the services ray.init starts
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, **options)
    finally:
        if previous is None:
            os.environ.pop(_LOOPBACK_SWITCH, None)
        else:
            os.environ[_LOOPBACK_SWITCH] = previous
        if switch is not None:
            ray_constants.ENABLE_RAY_CLUSTER = switch


def _plain(value: Any) -> Any:
    """A numpy scalar from a batch as the plain Python value the captioner takes."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (str, bytes)) else value


def caption_dataset(ds: Any, *, model: str = DEFAULT_MODEL, image_column: str = "image", actors: int = 1,
                    cpus_per_actor: float | None = None, gpus_per_actor: float = 0, batch_size: int = 8,
                    generation: GenerationOptions | None = None, **options: Unpack[DatasetKwargs]) -> Any:
    """`ds` with caption columns (``caption``, ``error``, token counts), captioned by `actors` Ray
    actors each holding one loaded Captioner. The image column holds paths (readable on the
    nodes) or encoded bytes. Options are those of Captioner.from_pretrained (download, engine, the
    default prompt) and of caption (or one ``generation`` value); an actor's llama.cpp threads default
    to its CPUs."""
    fetch, engine, rest = split_pretrained(options)
    if "progress" in fetch:
        raise CaprlError("caption_dataset takes no progress callback: the actors download on their own nodes")
    prompt = rest.pop("prompt", None)
    opts = generation_of(generation, {**rest, "prompt": prompt} if generation is None else rest)
    cpus = cpus_per_actor or engine.get("threads") or 1
    engine.setdefault("threads", max(1, int(cpus)))
    return ds.map_batches(
        _CaptionActor, fn_constructor_kwargs={"model": model, "image_column": image_column, "fetch": fetch,
                                              "engine": engine, "prompt": prompt, "generation": opts},
        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus, num_gpus=gpus_per_actor,
        batch_size=batch_size, batch_format="numpy",
        max_restarts=0)  # an actor that dies fails its images' run, which the same command resumes


class RayCaptioner(ClosingContext):
    """Captions image files with caption_dataset on a Ray cluster; see the module docstring."""

    parallel = 1
    on_gpu = False

    def __init__(self, model: str, *, address: str | None = None, actors: int = 1, cpus_per_actor: float | None = None,
                 gpus_per_actor: float = 0, batch_size: int = 4, **options: Unpack[PretrainedKwargs]) -> None:
        self.source = model
        self.options = options  # the download and engine options, for each actor
        self.model = Path(model).name if model.lower().endswith(".gguf") else model  # as results name it
        self.actors, self.cpus, self.gpus, self.batch_size = actors, cpus_per_actor, gpus_per_actor, batch_size
        self.threads = int(cpus_per_actor or options.get("threads") or 1)
        self._cancelled = threading.Event()
        self._tokens = 0
        if not ray.is_initialized():
            _quiet()
            quiet: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False}
            address = address or os.environ.get("RAY_ADDRESS") or None
            if address is None:  # a Ray instance on this machine, for this machine only, gone with this process
                init_local(**quiet)
            else:  # "auto", host:port or ray://: the cluster the user named
                ray.init(address=address, include_dashboard=False, **quiet)

    def activity(self) -> Activity:
        return Activity(generating=0, waiting=0, tokens=self._tokens)

    def cancel(self) -> None:
        self._cancelled.set()

    def close(self) -> None:
        self.cancel()

    def caption_many(self, images: Iterable[ImageFile], *, generation: GenerationOptions | None = None,
                     on_text: Callable[[str, str], None] | None = None,
                     progress: Callable[[int, int | None], None] | None = None, prefetch: int = 2,
                     **options: Unpack[GenerationKwargs]) -> Iterator[Caption | CaptionFailure]:
        """Caption image files on the cluster, yielding each result as its batch comes back (with its
        ``index`` in `images`); Cancelled after cancel(). ``on_text`` receives each caption whole, as it
        comes back; ``prefetch`` is unused (the actors read the images)."""
        opts = generation_of(generation, options)  # a bad option fails here, before the cluster starts on it
        names = [os.fspath(image) for image in images]
        ds = ray.data.from_items([{"image": name, "index": i} for i, name in enumerate(names)])
        out = caption_dataset(ds, model=self.source, actors=self.actors, cpus_per_actor=self.cpus,
                              gpus_per_actor=self.gpus, batch_size=self.batch_size, generation=opts, **self.options)
        done = 0
        for row in out.iter_rows():
            if self._cancelled.is_set():
                raise Cancelled("cancelled")
            done += 1
            if progress is not None:
                progress(done, len(names))
            self._tokens += int(row["generated_tokens"] or 0)
            if row["error"] is not None:
                yield CaptionFailure(image=row["image"], error=row["error"], kind=row["error_kind"], index=int(row["index"]))
            else:
                if on_text is not None:
                    on_text(row["image"], row["caption"])
                yield Caption(text=row["caption"], image=row["image"], image_tokens=int(row["image_tokens"]),
                              prompt_tokens=int(row["prompt_tokens"]), generated_tokens=int(row["generated_tokens"]),
                              finish_reason=row["finish_reason"], timings=Timings(0, 0, 0, 0, 0, 0, 0),
                              index=int(row["index"]))
        if self._cancelled.is_set():
            raise Cancelled("cancelled")
