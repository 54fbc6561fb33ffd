"""Caption datasets on a Ray cluster with Ray Data (the ``ray`` extra): one loaded Captioner per actor.

:func:`caption_dataset` adds ``caption`` and ``error`` columns (and a video's numbers) to a Ray Dataset,
in the style of Ray's own LLM processors; :class:`RayCaptioner` offers what the batch runner uses of a
Captioner, so ``caprl-local caption --ray`` writes the same outputs, resumes and isolates failures as a local
run. Ray schedules the work; each node resolves the model through its own cache (or a shared ``cache_dir``).

An actor that dies (killed, out of memory, a crash in llama.cpp) is restarted by Ray and its batch retried
there (Ray Data's actor-pool defaults: unlimited restarts and task retries); the other actors' batches are
kept. A small ledger actor remembers across those deaths which batches and images were begun and never
finished, so that a batch whose actor died :data:`BATCH_TRIES` times is captioned image by image, and an image
whose actor died while captioning it alone (:data:`IMAGE_TRIES` times) becomes that image's failure: a poison
image costs a bounded number of restarts, never the run.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
import ray
from ray.data.block import BlockAccessor
from typing_extensions import Unpack

from .captioning import ClosingContext, ImageFile
from .errors import Cancelled, CaprlError, EngineError
from .images import describe
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
from .results import Activity, Caption, CaptionFailure, Timings, VideoStats

log = logging.getLogger("caprl_local")

#: The columns caption_dataset adds, with their Arrow types: a column with no value in a batch
#: (``error`` when nothing failed, a video's for an image) is a typed null, never a NaN.
TYPES = {"caption": pa.string(), "error": pa.string(), "error_kind": pa.string(), "image_tokens": pa.int64(),
         "prompt_tokens": pa.int64(), "generated_tokens": pa.int64(), "finish_reason": pa.string(),
         "duration_s": pa.float64(), "frames": pa.int64(), "fps": pa.float64(), "frame_width": pa.int64(),
         "frame_height": pa.int64(), "video_tokens": pa.int64(), "truncated": pa.bool_()}
#: A video's columns and the fields of Caption.video they hold (by the names the JSONL records give them).
VIDEO_FIELDS = {"duration_s": "duration_s", "frames": "frames", "fps": "fps", "frame_width": "width",
                "frame_height": "height", "video_tokens": "tokens", "truncated": "truncated"}
COLUMNS = tuple(TYPES)

#: Whole tries of a batch whose actor dies; after them it is captioned image by image.
BATCH_TRIES = 2
#: Tries of an image alone whose actor dies; after them it is that image's failure.
IMAGE_TRIES = 1
#: Consecutive deaths of one actor while it loads the model before the run stops.
LOAD_TRIES = 3


class _Ledger:
    """What a run remembers across actor deaths (one per run, zero CPUs): the keys of the batches, images and model
    loads begun and never finished, and the first caprl-local error an actor met (Ray passes on only its text)."""

    def __init__(self) -> None:
        self.open: dict[str, int] = {}
        self.error: CaprlError | None = None

    def begin(self, key: str) -> int:
        """The earlier tries of `key` that never finished; counts this one."""
        self.open[key] = self.open.get(key, 0) + 1
        return self.open[key] - 1

    def end(self, key: str) -> None:
        self.open.pop(key, None)

    def fail(self, error: CaprlError) -> None:
        self.error = self.error or error

    def failure(self) -> CaprlError | None:
        return self.error


def _ledger() -> Any:
    """A ledger for one run, on this node where Ray can (the driver's node outlives the others)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=True)
    return ray.remote(num_cpus=0)(_Ledger).options(scheduling_strategy=here).remote()


class _CaptionActor:
    """A Ray Data actor: loads the model once, then captions batches of rows (Arrow tables)."""

    def __init__(self, model: str, image_column: str, fetch: FetchKwargs, engine: EngineKwargs, prompt: str | None,
                 generation: GenerationOptions, ledger: Any) -> None:
        self.image_column, self.generation, self.ledger = image_column, generation, ledger
        load = f"load:{ray.get_runtime_context().get_actor_id()}"  # one actor's id stays across its restarts
        try:
            if ray.get(ledger.begin.remote(load)) >= LOAD_TRIES:
                raise EngineError(f"{model}: a Ray actor died {LOAD_TRIES} times in a row loading it (out of memory, "
                                  "or a crash in llama.cpp): give each actor more memory, or run fewer per node")
            self._load(model, prompt, fetch, engine)
        except CaprlError as exc:
            ray.get(ledger.fail.remote(exc))  # the driver raises this one, typed, in place of Ray's text
            raise
        ray.get(ledger.end.remote(load))

    def _load(self, model: str, prompt: str | None, fetch: FetchKwargs, engine: EngineKwargs) -> None:
        from .engine import Captioner

        self.captioner = Captioner.from_pretrained(model, prompt=prompt, **fetch, **engine)

    def __call__(self, batch: pa.Table) -> pa.Table:
        images = [_plain(x) for x in BlockAccessor.for_block(batch).to_numpy(self.image_column)]
        key = _digest(images)  # the same rows on a retry, whichever actor gets them
        if ray.get(self.ledger.begin.remote(key)) < BATCH_TRIES:
            results = self._caption(images)
        else:  # its actor died each time: one image at a time finds the one that kills it
            log.warning("a batch of %d images killed its actor %d times: captioning them one by one", len(images),
                        BATCH_TRIES)
            results = [self._alone(image, f"{key}/{i}") for i, image in enumerate(images)]
        ray.get(self.ledger.end.remote(key))
        return _with_columns(batch, results)

    def _caption(self, images: list[Any]) -> list[Caption | CaptionFailure]:
        return list(self.captioner.caption_many(images, generation=self.generation))

    def _alone(self, image: Any, key: str) -> Caption | CaptionFailure:
        if ray.get(self.ledger.begin.remote(key)) >= IMAGE_TRIES:  # left open: a later retry skips it too
            name = describe(image)
            return CaptionFailure(image=name, kind="EngineError", error=(
                f"{name}: the Ray actor captioning it died each time ({BATCH_TRIES + IMAGE_TRIES} tries: a crash in "
                "llama.cpp, or out of memory); try it alone with a local run"))
        result = self._caption([image])[0]
        ray.get(self.ledger.end.remote(key))
        return result


def _digest(images: list[Any]) -> str:
    """A key for a batch's images: paths, encoded bytes or arrays."""
    h = hashlib.blake2b(digest_size=16)
    for image in images:
        data = (b"s" + image.encode("utf-8", "surrogateescape") if isinstance(image, str) else
                b"b" + bytes(image) if isinstance(image, (bytes, bytearray, memoryview)) else
                f"a{image.dtype}{image.shape}".encode() + image.tobytes() if isinstance(image, np.ndarray) else
                repr(image).encode())
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def _with_columns(batch: pa.Table, results: list[Caption | CaptionFailure]) -> pa.Table:
    """`batch` with the caption columns (replacing any of the same names); its own columns untouched."""
    rows = [{"caption": r.text, "image_tokens": r.image_tokens, "prompt_tokens": r.prompt_tokens,
             "generated_tokens": r.generated_tokens, "finish_reason": r.finish_reason,  # a video's numbers, or nulls
             **{column: getattr(r.video, name) for column, name in VIDEO_FIELDS.items() if r.video is not None}}
            if isinstance(r, Caption) else
            {"error": r.error, "error_kind": r.kind, "image_tokens": 0, "prompt_tokens": 0, "generated_tokens": 0}
            for r in results]
    for name, kind in TYPES.items():
        column = pa.array([row.get(name) for row in rows], type=kind)
        at = batch.schema.get_field_index(name)
        batch = batch.set_column(at, name, column) if at >= 0 else batch.append_column(name, column)
    return batch


def _quiet() -> None:
    """Ray's own progress lines and notices would mix with the run's: keep its errors only, and leave
    Ray Data's reports of a failed run (a stack trace) to the one-line error raised in their place."""
    context = ray.data.DataContext.get_current()  # imports ray.data, which sets up its loggers
    logging.getLogger("ray").setLevel(logging.ERROR)
    data = logging.ERROR if log.isEnabledFor(logging.DEBUG) else logging.CRITICAL
    for name in ("ray.data", "ray.data._internal.execution.streaming_executor"):
        logging.getLogger(name).setLevel(data)
    context.enable_progress_bars = False


#: Ray's switch for a single-node instance on the loopback address (read by its services at start).
_LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def init_local(**options: Any) -> None:
    """Start a Ray instance on this machine that listens on 127.0.0.1 only, with no dashboard.

    On Linux, Ray's own ``ray.init()`` binds its services to the machine's network address, where anyone who
    can reach it may run code as this user (Ray has no authentication). Call this before building a Dataset
    (Ray Data starts an instance of its own otherwise) when the work should stay on this machine; ``ray start
    --head`` makes a real cluster. `options` go to ``ray.init`` (``num_cpus``, say)."""
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
    """A numpy scalar from a batch as the plain Python value the captioner takes (arrays stay arrays)."""
    return value.item() if isinstance(value, np.generic) else value


def caption_dataset(ds: Any, *, model: str = DEFAULT_MODEL, image_column: str = "image", actors: int = 1,
                    cpus_per_actor: float | None = None, gpus_per_actor: float = 0, batch_size: int = 8,
                    generation: GenerationOptions | None = None, **options: Unpack[DatasetKwargs]) -> Any:
    """`ds` with caption columns (``caption``, ``error``, token counts, a video's numbers), captioned by `actors`
    Ray actors each holding one loaded Captioner. The image column holds paths (readable on the nodes) or encoded
    bytes, of images or videos; the other columns pass through as they are. Options are those of
    Captioner.from_pretrained (download, engine, the default prompt) and of caption (or one ``generation`` value);
    an actor's llama.cpp threads default to its CPUs. Call it with Ray started (:func:`init_local`, or
    ``ray.init`` for a cluster)."""
    return _caption_dataset(ds, _ledger(), model=model, image_column=image_column, actors=actors,
                            cpus_per_actor=cpus_per_actor, gpus_per_actor=gpus_per_actor, batch_size=batch_size,
                            generation=generation, **options)


def _caption_dataset(ds: Any, ledger: Any, *, model: str, image_column: str, actors: int, cpus_per_actor: float | None,
                     gpus_per_actor: float, batch_size: int, generation: GenerationOptions | None,
                     **options: Unpack[DatasetKwargs]) -> Any:
    fetch, engine, rest = split_pretrained(options)
    if "progress" in fetch:
        raise CaprlError("caption_dataset takes no progress callback: the actors download on their own nodes")
    prompt = rest.pop("prompt", None)
    opts = generation_of(generation, {**rest, "prompt": prompt} if generation is None else rest)
    cpus = cpus_per_actor or engine.get("threads") or 1
    engine.setdefault("threads", max(1, int(cpus)))
    # No restart or retry arguments: Ray Data's actor pool restarts a dead actor and retries its tasks
    # without end by default, and the ledger bounds what one batch or image may cost.
    return ds.map_batches(
        _CaptionActor, fn_constructor_kwargs={"model": model, "image_column": image_column, "fetch": fetch,
                                              "engine": engine, "prompt": prompt, "generation": opts,
                                              "ledger": ledger},
        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus, num_gpus=gpus_per_actor,
        batch_size=batch_size, batch_format="pyarrow")  # Arrow in and out: the other columns keep their types


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _lines(exc: BaseException) -> list[str]:
    """The non-empty lines of an exception's text, without terminal colours, each cut to a readable length."""
    lines = [line.strip() for line in _ANSI.sub("", str(exc)).splitlines() if line.strip()]
    return [line if len(line) <= 240 else line[:239] + "…" for line in lines] or [type(exc).__name__]


def _connect_error(address: str | None, exc: BaseException) -> CaprlError:
    """The one-line error for a Ray that could not be started or reached."""
    if address is None:
        return CaprlError(f"could not start a Ray instance on this machine: {_lines(exc)[0]}")
    if isinstance(exc, ConnectionError) and address == "auto":
        return CaprlError("no Ray cluster is running here to connect to (address 'auto'): start one with "
                          "`ray start --head`, or leave the address out to run Ray on this machine only")
    if isinstance(exc, SystemExit):  # Ray's driver gives up on an address with no cluster behind it this way
        return CaprlError(f"could not reach the Ray cluster at {address}: check the address and that the cluster is up")
    return CaprlError(f"could not connect to the Ray cluster at {address}: {_lines(exc)[0]}")


def _run_error(exc: Exception, ledger: Any) -> CaprlError:
    """The one-line error for a Ray run that stopped: the caprl-local error an actor met, if one did."""
    reported = None
    try:
        if ledger is not None:
            reported = ray.get(ledger.failure.remote(), timeout=30)
    except Exception:  # noqa: BLE001 - the ledger went with the cluster: Ray's own error says why
        pass
    if isinstance(reported, CaprlError):
        return reported
    lines = _lines(exc)
    if isinstance(exc, ray.exceptions.RayActorError) and getattr(exc, "actor_init_failed", False):
        return CaprlError(f"a Ray caption actor could not start: {lines[-1]}")  # the traceback's last line: its error
    if isinstance(exc, ray.exceptions.RayActorError):  # the first line says it died, the last how
        how = f" ({lines[-1]})" if len(lines) > 1 else ""
        return CaprlError(f"Ray gave up on a caption actor: {lines[0]}{how}; check the nodes' memory and the Ray "
                          "logs, then run again")
    detail = lines[-1] if isinstance(exc, ray.exceptions.RayTaskError) else lines[0]  # a traceback ends with its error
    return CaprlError(f"the Ray run stopped: {detail}")


def _log_cluster_notices() -> None:
    """Ray's driver prints its cluster's notices ("a worker died ...", "the task will be retried") on
    stdout, where results go, even with ``log_to_driver`` off: make them log records (INFO) instead."""
    from ray._private import worker

    printer = getattr(worker, "print_to_stdstream", None)
    if printer is None or getattr(printer, "caprl_local", False):
        return

    def notices(data: dict[str, Any], ignore_prefix: bool) -> None:
        if data.get("pid") != "raylet":
            printer(data, ignore_prefix)
            return
        for line in data.get("lines", ()):
            log.info("Ray: %s", _ANSI.sub("", str(line)))

    notices.caprl_local = True  # type: ignore[attr-defined]
    worker.print_to_stdstream = notices


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
        self._cancelled, self._tokens = threading.Event(), 0
        if not ray.is_initialized():
            _quiet()
            self._connect(address or os.environ.get("RAY_ADDRESS") or None)

    @staticmethod
    def _connect(address: str | None) -> None:
        quiet: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False}
        try:
            if address is None:  # a Ray instance on this machine, for this machine only, gone with this process
                init_local(**quiet)
            else:  # "auto", host:port or ray://: the cluster the user named
                ray.init(address=address, include_dashboard=False, **quiet)
        except (Exception, SystemExit) as exc:
            if ray.is_initialized():
                ray.shutdown()
            raise _connect_error(address, exc) from exc
        _log_cluster_notices()

    def activity(self) -> Activity:
        return Activity(generating=0, waiting=0, tokens=self._tokens)

    def cancel(self) -> None:
        self._cancelled.set()

    close = cancel  # nothing else to free: the actors go with their run

    def caption_many(self, images: Iterable[ImageFile], *, generation: GenerationOptions | None = None,
                     on_text: Callable[[str, str], None] | None = None,
                     progress: Callable[[int, int | None], None] | None = None, prefetch: int = 2,
                     **options: Unpack[GenerationKwargs]) -> Iterator[Caption | CaptionFailure]:
        """Caption image and video files (a video by its suffix) on the cluster, yielding each result as its batch
        comes back (with its ``index`` in `images`); Cancelled after cancel(). ``on_text`` receives each caption
        whole, as it comes back; ``prefetch`` is unused (the actors read the files). A run Ray gives up on raises
        one CaprlError (an actor's own error where it met one); what came back before it was yielded."""
        opts = generation_of(generation, options)  # a bad option fails here, before the cluster starts on it
        names = [os.fspath(image) for image in images]
        done = 0
        for row in self._rows(names, opts):
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
                video = VideoStats(**{f: _plain(row[c]) for c, f in VIDEO_FIELDS.items()}) if row["frames"] is not None else None
                yield Caption(text=row["caption"], image=row["image"], image_tokens=int(row["image_tokens"]),
                              prompt_tokens=int(row["prompt_tokens"]), generated_tokens=int(row["generated_tokens"]),
                              finish_reason=row["finish_reason"], timings=Timings(0, 0, 0, 0, 0, 0, 0),
                              index=int(row["index"]), video=video)
        if self._cancelled.is_set():
            raise Cancelled("cancelled")

    def _rows(self, names: list[str], generation: GenerationOptions) -> Iterator[dict[str, Any]]:
        """The result rows as Ray yields them; Ray's errors become one CaprlError each."""
        ledger = None
        try:
            ledger = _ledger()
            ds = ray.data.from_items([{"image": name, "index": i} for i, name in enumerate(names)])
            out = _caption_dataset(ds, ledger, model=self.source, image_column="image", actors=self.actors,
                                   cpus_per_actor=self.cpus, gpus_per_actor=self.gpus, batch_size=self.batch_size,
                                   generation=generation, **self.options)
            yield from out.iter_rows()
        except Exception as exc:
            if isinstance(exc, CaprlError) and not isinstance(exc, ray.exceptions.RayError):
                raise  # ours, raised before Ray ran anything
            raise _run_error(exc, ledger) from exc
