"""The public Captioner: a loaded CapRL model pair, shared by any number of threads.

Every way of asking for a caption (caption, stream, submit, caption_many) is a thin layer
over the one scheduler: images are read and resized in the caller's thread (or read ahead
in a background one), then decoded together with whatever else is in flight.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sized
from pathlib import Path

from PIL import Image
from typing_extensions import Unpack

from ..captioning import ClosingContext
from ..chat import ChatMessage, ChatVideo, conversation, name_of, prepared, with_prompt
from ..clips import Video, VideoInput, is_video_input, prepare_video
from ..errors import Cancelled, EngineError
from ..families import check_model_files, video_form
from ..hub import ModelFiles, download_model
from ..images import ImageInput, describe, load_ahead
from ..options import (
    EngineKwargs,
    EngineOptions,
    GenerationKwargs,
    GenerationOptions,
    PretrainedKwargs,
    generation_of,
    make,
    split_pretrained,
)
from ..prompts import VIDEO_PROMPT, resolve_prompt
from ..registry import DEFAULT_MODEL
from ..results import Activity, Caption, CaptionFailure, VideoStats
from .handle import CaptionHandle, Tagged, cancel_on_close, failure, finished, outcome
from .lifetime import close_later
from .probe import check_first_load
from .scheduler import Request, Scheduler, TextSink
from .session import Session


class Captioner(ClosingContext):
    """A loaded CapRL model pair that captions images and videos.

    One instance may be shared between threads: captions asked for at the same time are
    decoded together, up to ``parallel`` at once, and the rest wait their turn in order.

        with Captioner("CapRL-3B.Q4_K_M.gguf", "CapRL-3B.mmproj-f16.gguf") as cap:
            print(cap.caption("photo.jpg").text)
            print(cap.caption("clip.mp4").text)  # a video: its sampled frames in one prompt

    Options (keyword only, see :class:`~caprl_local.options.EngineOptions`): gpu_layers,
    threads, n_ctx, parallel, flash_attn, image_min_tokens, image_max_tokens, repack, warmup,
    verbose, isolate, device_sampling, video_fps, video_max_frames, video_max_tokens; ``prompt`` is
    the default caption prompt (CapRL's own if not given); ``cache_dir`` where the first-load check
    keeps its verdicts (the model cache's folder).
    """

    def __init__(self, model_path: str | os.PathLike[str], mmproj_path: str | os.PathLike[str], *,
                 prompt: str | None = None, cache_dir: str | os.PathLike[str] | None = None,
                 **options: Unpack[EngineKwargs]) -> None:
        self._scheduler: Scheduler | None = None
        self._frames_lock = threading.Lock()  # videos are read in callers' and prefetch threads
        self._frames_read = 0  # video frames read and sampled so far, for progress displays
        self.options = make(EngineOptions, options)
        self.default_prompt = resolve_prompt(prompt=prompt)
        pair = check_model_files(model_path, mmproj_path)
        self.model_path, self.mmproj_path = Path(model_path), Path(mmproj_path)
        self.architecture = pair.model.architecture
        self.files = ModelFiles(self.model_path, self.mmproj_path, architecture=self.architecture)
        self._budget = pair.budget(self.options)
        if self.options.isolate:
            check_first_load(self.model_path, self.mmproj_path, self.options, cache_dir=cache_dir)
        self._session = Session(self.model_path, self.mmproj_path, pair.model, self.options)
        try:  # from here on the scheduler owns the session, and frees it when closed
            self._scheduler = Scheduler(self._session, verbose=self.options.verbose)
        except BaseException:
            self._session.close()
            raise

    @classmethod
    def from_pretrained(cls, name: str = DEFAULT_MODEL, **options: Unpack[PretrainedKwargs]) -> Captioner:
        """Load a model by registry name (``caprl-3b``), Hub repo (``owner/name``) or .gguf path,
        downloading and verifying it first if it is not cached (unless offline).

        Options of :func:`~caprl_local.download_model` (mmproj, quant, imatrix, mmproj_quant,
        cache_dir, offline, progress, token) choose and fetch the files; the rest load them.
        """
        fetch, engine, rest = split_pretrained(options)
        files = download_model(name, **fetch)
        prompt = rest.pop("prompt", files.prompt)
        if rest:  # mypy catches these; a caller without it gets the same answer as Captioner(...) gives
            make(EngineOptions, rest)
        captioner = cls(files.model, files.mmproj, prompt=prompt, cache_dir=fetch.get("cache_dir"), **engine)
        captioner.files = files
        return captioner

    # -- what the load decided --

    @property
    def parallel(self) -> int:
        """How many captions are decoded together."""
        return self._session.slots

    @property
    def n_ctx(self) -> int:
        """Tokens of context per caption."""
        return self._session.n_ctx

    @property
    def threads(self) -> int:
        return self._session.threads

    @property
    def n_gpu_layers(self) -> int:
        return self._session.n_gpu_layers

    @property
    def on_gpu(self) -> bool:
        return self._session.on_gpu

    @property
    def weight_layout(self) -> str:
        return self._session.weight_layout

    @property
    def chat_format(self) -> str:
        return self._session.chat_format

    @property
    def load_seconds(self) -> float:
        return self._session.load_seconds

    # -- captions --

    def caption(self, image: ImageInput | Video, *, on_text: Callable[[str], None] | None = None,
                generation: GenerationOptions | None = None, **options: Unpack[GenerationKwargs]) -> Caption:
        """Caption one image (a path, bytes, PIL image or numpy array) or video (a path with a video suffix,
        a clip's bytes, or a :class:`~caprl_local.clips.Video`).

        Options (see :class:`~caprl_local.options.GenerationOptions`): prompt, preset,
        max_tokens, temperature, top_p, seed, repeat_penalty, stop, loop_guard, ignore_eos, video_prompt; or all
        of them as one ``generation`` value. ``on_text``, if given, receives each piece of text as it is generated,
        in this thread.
        """
        return finished(self._start(image, generation_of(generation, options)), on_text)

    def stream(self, image: ImageInput | Video, *, generation: GenerationOptions | None = None,
               **options: Unpack[GenerationKwargs]) -> Generator[str, None, None]:
        """Caption one image, yielding pieces of text as they are generated (options as for caption).
        Closing the generator early cancels the caption."""
        return cancel_on_close(self._start(image, generation_of(generation, options)))

    def submit(self, image: ImageInput | Video, *, sink: TextSink | None = None, generation: GenerationOptions | None = None,
               **options: Unpack[GenerationKwargs]) -> CaptionHandle:
        """Start captioning one image and return at once with its handle (options as for caption).

        The image is read here, in the calling thread: an unreadable one raises ImageError. With
        ``sink``, the text goes to ``sink.put(piece)`` as it is generated, then ``sink.put(None)`` once the
        result is ready (on the decode loop's thread, so put must not block: an event loop's
        ``call_soon_threadsafe``, say); the handle is then not iterable.
        """
        return self._start(image, generation_of(generation, options), sink=sink)

    def submit_chat(self, messages: Iterable[ChatMessage], *, sink: TextSink | None = None,
                    generation: GenerationOptions | None = None, **options: Unpack[GenerationKwargs]) -> CaptionHandle:
        """Start answering a conversation (ChatMessage values, see :mod:`caprl_local.chat`: system, user and
        assistant turns, any number of images in user turns, none too) and return at once with its handle.

        It is rendered through the model's own chat template; the messages' text is always text (typed
        control tokens or media markers are never markup). The prompt (the one given, a preset's, or the
        default) is added to the last user turn only when no message carries text of its own, so that
        ``submit_chat([user(image)])`` is ``submit(image)`` exactly (a conversation holding a video gets
        CapRL-Video's prompt by default). The images are read and sized here, in the calling thread (a bad one
        raises ImageError); a video's frames come sampled already (:meth:`prepare_video`); sink and options as
        for submit.
        """
        epoch, turns = self._live().epoch, conversation(messages)
        opts = self._resolved(generation_of(generation, options), video=any(m.videos for m in turns))
        name, t0 = name_of(turns), time.perf_counter()  # named by the images as given, before they are read
        turns = prepared(with_prompt(turns, opts.prompt), self._budget.prepare)
        request = Request(None, name, opts, load_s=time.perf_counter() - t0, epoch=epoch, messages=turns)
        if sink is not None:
            request.sink = sink
        return self._submit(request)

    def chat(self, messages: Iterable[ChatMessage], *, on_text: Callable[[str], None] | None = None,
             generation: GenerationOptions | None = None, **options: Unpack[GenerationKwargs]) -> Caption:
        """Answer a conversation (see submit_chat) and return the Caption: its image_tokens are those of all
        its images. ``on_text`` and options as for caption."""
        return finished(self.submit_chat(messages, generation=generation, **options), on_text)

    def _start(self, image: ImageInput | Video, given: GenerationOptions, *, sink: TextSink | None = None) -> CaptionHandle:
        epoch = self._live().epoch
        t0 = time.perf_counter()
        opts = self._resolved(given, video=is_video_input(image))
        loaded = self._load(image, opts)
        return self._submit(self._request(image, loaded, opts, load_s=time.perf_counter() - t0, epoch=epoch, sink=sink))

    def prepare_video(self, source: VideoInput, *, generation: GenerationOptions | None = None,
                      deadline_s: float | None = None, cancelled: Callable[[], bool] | None = None,
                      ) -> tuple[ChatVideo, VideoStats]:
        """A video's frames sampled as a caption of it would take them (this Captioner's video_fps,
        video_max_frames, video_max_tokens and the room its context leaves after ``generation``'s
        max_tokens), for a conversation (``user(video, text)``), and what of the clip they hold.
        ``deadline_s``: seconds the reading may take; ``cancelled``: stop reading once it returns True.
        ImageError for a clip that cannot be read; CaprlError for a family that takes no video."""
        opts = self._resolved(generation or GenerationOptions(), video=True)
        return self._video(source, opts, deadline_s=deadline_s, cancelled=cancelled)

    def _load(self, source: ImageInput | Video, opts: GenerationOptions) -> Image.Image | tuple[ChatVideo, VideoStats]:
        """Read an input for a caption: an image sized for the projector, or a video's frames (ImageError if it
        cannot be read; CaprlError for a video on a family that takes none)."""
        if not is_video_input(source):
            return self._budget.prepare(source)  # type: ignore[arg-type]
        return self._video(source, opts)  # type: ignore[arg-type]  # a video input: a path, bytes or Video

    def _video(self, source: VideoInput, opts: GenerationOptions, *, deadline_s: float | None = None,
               cancelled: Callable[[], bool] | None = None) -> tuple[ChatVideo, VideoStats]:
        form = video_form(self.architecture, self.model_path.name)
        video = prepare_video(source, form=form, budget=self._budget, options=self.options, n_ctx=self.n_ctx,
                              max_new_tokens=opts.max_tokens, deadline_s=deadline_s, cancelled=cancelled)
        with self._frames_lock:
            self._frames_read += video[1].frames
        return video

    def _request(self, source: ImageInput | Video, loaded: Image.Image | tuple[ChatVideo, VideoStats],
                 opts: GenerationOptions, *, load_s: float, epoch: int, sink: TextSink | None = None) -> Request:
        """The request for a loaded input: a caption of its image, or of its video (in its own prompt's turn)."""
        name = source.describe() if isinstance(source, Video) else describe(source)
        if isinstance(loaded, Image.Image):
            request = Request(loaded, name, opts, load_s=load_s, epoch=epoch)
        else:
            video, stats = loaded
            request = Request(None, name, opts, load_s=load_s, epoch=epoch, video=stats,
                              messages=(ChatMessage("user", (video, opts.prompt or VIDEO_PROMPT)),))
        if sink is not None:
            request.sink = sink
        return request

    def caption_many(
        self,
        images: Iterable[ImageInput],
        *,
        generation: GenerationOptions | None = None,
        on_text: Callable[[str, str], None] | None = None,
        progress: Callable[[int, int | None], None] | None = None,
        prefetch: int = 2,
        **options: Unpack[GenerationKwargs],
    ) -> Iterator[Caption | CaptionFailure]:
        """Caption many images, yielding one result per image in input order, each with its ``index`` there
        (options as for caption).

        An image that cannot be read or captioned yields a CaptionFailure instead of raising.
        Up to ``parallel`` captions are in flight at once, a finished one's slot taking the next
        image, while the next ``prefetch`` images are read and resized in a background thread.
        ``on_text(image, piece)`` receives each caption's text as it is generated, and
        ``progress(done, total)`` each image as it finishes, in whatever order they finish (total
        is None when ``images`` has no length); both are called in this thread, while it waits.
        Cancelled (from :meth:`cancel`) ends the run, raised once every result finished before it
        has been yielded (in input order, leaving out the images it cut short: match results to
        inputs by their ``index``).
        """
        scheduler = self._live()
        given, epoch = generation_of(generation, options), scheduler.epoch
        image_opts, video_opts = self._resolved(given, video=False), self._resolved(given, video=True)
        total = len(images) if isinstance(images, Sized) else None
        window = self.parallel + 1  # one more than the slots: the next is ready when a slot frees
        events: queue.SimpleQueue[tuple[int, str | None]] = queue.SimpleQueue()  # (index, piece or the end)
        running: dict[int, Request] = {}
        results: dict[int, Caption | CaptionFailure] = {}
        finished = yielded = 0
        cancelled: list[Cancelled] = []

        def settle(index: int, outcome: Caption | CaptionFailure) -> None:
            nonlocal finished
            results[index] = dataclasses.replace(outcome, index=index)
            finished += 1
            if progress is not None:
                progress(finished, total)

        def collect(*, block: bool) -> None:
            """Take the events that came in; with `block`, wait until one caption ends."""
            while running:
                try:
                    index, piece = events.get(block=block)
                except queue.Empty:
                    return
                if piece is not None:
                    if on_text is not None:
                        on_text(running[index].name, piece)
                    continue
                try:
                    settle(index, outcome(running.pop(index)))
                except Cancelled as exc:  # the run ends, once every result finished before it is out
                    cancelled.append(exc)
                    for request in running.values():
                        scheduler.cancel(request)
                    block = True
                    continue
                block = False

        def in_order() -> Iterator[Caption | CaptionFailure]:
            nonlocal yielded
            while yielded in results:
                yield results.pop(yielded)
                yielded += 1

        def the_rest() -> Iterator[Caption | CaptionFailure]:
            """After a cancel: every result that was finished, in input order, over the gaps; then Cancelled."""
            for index in sorted(results):
                yield results.pop(index)
            raise cancelled[0]

        try:
            def load(source: ImageInput | Video) -> Image.Image | tuple[ChatVideo, VideoStats]:
                return self._load(source, video_opts if is_video_input(source) else image_opts)

            for index, (source, item) in enumerate(load_ahead(images, load=load, ahead=max(prefetch, window))):
                if isinstance(item, BaseException):
                    settle(index, failure(source.describe() if isinstance(source, Video) else describe(source), item))
                else:
                    sink = Tagged(events, index, text=on_text is not None)
                    opts = video_opts if is_video_input(source) else image_opts
                    request = self._request(source, item[0], opts, load_s=item[1], epoch=epoch, sink=sink)
                    running[index] = request
                    self._submit(request)
                collect(block=len(running) >= window)
                yield from in_order()
                if cancelled:
                    yield from the_rest()
            while running:
                collect(block=True)
                yield from in_order()
            yield from the_rest() if cancelled else in_order()
        finally:
            for request in running.values():  # stopped early (Cancelled, Ctrl-C, the caller broke off)
                scheduler.cancel(request)

    def activity(self) -> Activity:
        """What the engine is doing now (for progress displays); cheap, from any thread."""
        assert self._scheduler is not None
        in_flight, encoding, waiting, tokens = self._scheduler.activity()  # after close too: a display may ask
        return Activity(generating=in_flight, waiting=waiting, tokens=tokens, encoding=encoding, frames=self._frames_read)

    def cancel(self) -> None:
        """Stop every caption in progress or waiting, at the next token; their calls raise Cancelled.

        Safe to call from any thread or a signal handler. Later calls work as usual.
        """
        if self._scheduler is not None:
            self._scheduler.cancel_all()

    def close(self) -> None:
        """Stop the captions in flight and free the model. Safe to call twice, from several threads at
        once (each returns once it is freed) and from the scheduler's thread (which frees it as it stops).
        In a forked child it frees nothing: the model is the parent's."""
        if self._scheduler is not None:
            self._scheduler.close()

    def __del__(self) -> None:
        # The garbage collector runs this in any thread (the scheduler's own included) at any allocation, and at
        # interpreter exit while daemon threads may be inside llama.cpp: here nothing may wait, lock or free. The
        # closer thread closes it; at exit the atexit hook did already; a forked child has nothing of its own to free.
        try:
            scheduler = getattr(self, "_scheduler", None)
            if scheduler is not None and not scheduler.closed and not sys.is_finalizing() and not scheduler.forked:
                close_later(scheduler)
        except Exception:  # noqa: BLE001 - at interpreter exit the modules may already be gone
            pass

    # -- internals --

    def _live(self) -> Scheduler:
        """The scheduler; EngineError if this Captioner is closed or was made in another process."""
        scheduler = self._scheduler
        assert scheduler is not None  # set by __init__
        scheduler.check_process()
        if scheduler.closed:
            raise EngineError(scheduler.closed)
        return scheduler

    def _resolved(self, given: GenerationOptions, *, video: bool) -> GenerationOptions:
        """A call's options with its prompt spelt out: for a video its video_prompt, else the one given, else the
        image default or, for a video, CapRL-Video's plain prompt."""
        if video and given.video_prompt is not None:
            return dataclasses.replace(given, prompt=given.video_prompt, preset=None)
        return given.resolved(VIDEO_PROMPT if video else self.default_prompt)

    def _submit(self, request: Request) -> CaptionHandle:
        scheduler = self._live()
        scheduler.submit(request)
        return CaptionHandle(request, scheduler)
