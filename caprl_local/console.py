"""The CLI's terminal: progress bars (tqdm), transient status lines, streamed text, log lines, Ctrl-C.

Everything here writes to stderr except the streamed caption, which is a result (stdout).
Bars and status lines appear only when a person watches (stderr is a terminal).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, cast

import click
from tqdm import tqdm
from tqdm.contrib import DummyTqdmFile

from .interrupts import GracefulInterrupt
from .printable import human_size, printable, printable_text

if TYPE_CHECKING:
    from .batch import BatchSummary
    from .captioning import Captioning
    from .inputs import BatchItem
    from .results import Activity, Caption
    from .transfer import DownloadProgress

__all__ = ["BatchProgress", "CaptionStages", "DownloadBar", "GracefulInterrupt", "Streamer", "clear_status",
           "configure_logging", "counted", "duration", "inputs", "loaded", "results_stream", "say", "stage", "status"]


def duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h {seconds // 60 % 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m {seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


_status_shown = False  # a transient line is on the terminal, with no newline after it yet
_LINE = threading.RLock()  # a status line redrawn from a watcher thread never lands inside another message


def status(message: str) -> None:
    """A transient line on stderr while something slow happens, only when a person watches
    (`message` is escaped: it may name a file)."""
    global _status_shown
    if sys.stderr.isatty():
        with _LINE:
            click.echo(f"\r\033[K{printable(message, limit=200)}", nl=False, err=True)
            _status_shown = bool(message)


def clear_status() -> None:
    """Take a transient line off the terminal, so that the next message starts a line of its own."""
    if _status_shown:
        status("")


def say(text: object) -> None:
    """One message line on stderr: escaped, and never glued to a status line."""
    with _LINE:
        clear_status()
        click.echo(printable(text), err=True)


class DownloadBar:
    """Download progress on stderr: a tqdm bar per file for a person, one line per file otherwise."""

    def __init__(self) -> None:
        self.current: str | None = None
        self.bar: Any = None
        self.tty = sys.stderr.isatty()

    def __call__(self, p: DownloadProgress) -> None:
        if p.filename != self.current:
            self.close()
            self.current = p.filename
            if not self.tty:
                say(f"Downloading {p.filename} ({human_size(p.total or 0)})")
                return
            clear_status()
            self.bar = tqdm(total=p.total, initial=p.downloaded, desc=printable(p.filename, limit=60), unit="B", unit_scale=True,
                            unit_divisor=1000, file=sys.stderr, dynamic_ncols=True, leave=True)
        if self.bar is not None:
            self.bar.update(p.downloaded - self.bar.n)
            if p.total and p.downloaded >= p.total:
                self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def results_stream(*, progress: bool) -> TextIO:
    """Where results for stdout go. On a terminal: with a progress bar showing, through tqdm, which
    clears the bar before each line and redraws it after, and with control characters shown rather
    than obeyed (a caption is a model's text, a path a folder's name). A pipe or a file gets the bytes,
    straight: the bar is drawn on stderr only, and nothing of it ever goes into the results."""
    if not sys.stdout.isatty():
        return sys.stdout
    return cast(TextIO, _Shown(DummyTqdmFile(sys.stdout) if progress else sys.stdout))


class _Shown:
    """A text stream that escapes what it passes to a terminal (see printable_text)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        return self.stream.write(printable_text(text))

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def counted(n: int, noun: str) -> str:
    """`n` and its noun, plural unless one ("1 video", "3 images")."""
    return f"{n} {noun}{'s' * (n != 1)}"


def inputs(total: int, videos: int) -> str:
    """How many inputs there are, as a person says it: "3 images", "2 videos", "5 images and videos"."""
    if not videos:
        return counted(total, "image")
    return counted(total, "video") if videos == total else f"{total} images and videos"


def loaded(captioner: Captioning, *, images: int | None = None, videos: int = 0) -> None:
    """One line on what the load chose (device, captions in flight, threads), on stderr; `images` counts
    the inputs, `videos` those of them that are videos."""
    where = "the GPU" if captioner.on_gpu else "the CPU"
    what = f"{inputs(images, videos)}: " if images else ""
    width = captioner.parallel if images is None else min(captioner.parallel, images)
    in_flight = f"{width} captions in flight" if width > 1 else "1 caption at a time"
    click.echo(f"{what}{in_flight} on {where}, {captioner.threads} CPU thread{'s' * (captioner.threads > 1)}",
               err=True)


class BatchProgress:
    """Per-input error lines, a progress bar on a terminal, and the closing summary, on stderr.

    The bar moves as inputs finish, in any order, and a watcher thread names what the engine does from
    the start, long before the first one is done: reading images or a video, encoding one, or generating
    (tokens/s). `videos`: how many of the `total` inputs are videos; `order`: the inputs still to caption, in
    the order the batch takes them (input order), so that a video being read is named.
    """

    POLL_S = 0.5

    def __init__(self, total: int, skipped: int, *, show: bool, quiet: bool, videos: int = 0,
                 order: Sequence[BatchItem] = ()) -> None:
        self.total, self.skipped, self.quiet, self.videos = total, skipped, quiet, videos
        self.order, self.written = order, 0  # results come out in `order`: the next one is what is read or made
        self.bar = tqdm(total=total, initial=skipped, unit="image" if not videos else "input", file=sys.stderr,
                        disable=not show, dynamic_ncols=True, smoothing=0.1, leave=False)
        self.stop = threading.Event()
        self.watcher: threading.Thread | None = None

    def watch(self, captioner: Captioning) -> None:
        """Show what `captioner` is doing until the batch ends."""
        if not self.bar.disable:
            self.watcher = threading.Thread(target=self._watch, args=(captioner,), name="caprl-progress", daemon=True)
            self.watcher.start()

    def _watch(self, captioner: Captioning) -> None:
        before = captioner.activity()
        at, rate = time.monotonic(), None
        while not self.stop.wait(self.POLL_S):
            now = captioner.activity()
            t = time.monotonic()
            # Measured over generating alone: reading or encoding an image makes no tokens, and says so instead.
            if not (now.encoding or before.encoding) and (before.generating or now.tokens > before.tokens):
                recent = (now.tokens - before.tokens) / max(t - at, 1e-6)
                rate = recent if rate is None else 0.8 * rate + 0.2 * recent  # steady, yet follows changes
            before, at = now, t
            self.bar.set_postfix_str(stage(now, rate, video=self._next_video()), refresh=False)
            self.bar.refresh()

    def _next_video(self) -> str | None:
        """The name of the next result's input, if it is a video. Results come in input order and the
        reading thread reads in that order: with nothing in flight, that input is the one being read; with one
        caption in flight, it is that one."""
        upcoming = self.order[self.written] if self.written < len(self.order) else None
        return printable(Path(upcoming.path).name, limit=40) if upcoming is not None and upcoming.media == "video" else None

    def done(self, finished: int) -> None:
        """`finished` inputs of this run are done (in any order)."""
        self.bar.n = self.skipped + finished
        self.bar.refresh()

    def result(self, item: BatchItem, record: dict[str, Any], summary: BatchSummary) -> None:
        self.written += 1
        if "error" in record:
            error = str(record["error"])
            if item.path not in error and printable(item.path) not in error:  # "needs PyAV": which input it was
                error = f"{item.path}: {error}"
            tqdm.write(printable(f"Error: {error}"), file=sys.stderr)

    def finish(self, summary: BatchSummary | None) -> None:
        self.stop.set()
        if self.watcher is not None:
            self.watcher.join()
        self.bar.close()
        if not self.quiet:
            with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone; the outputs are whole
                self._summary(summary)

    def _summary(self, summary: BatchSummary | None) -> None:
        if summary is None:
            click.echo(f"Nothing to do: all {inputs(self.total, self.videos)} already have a result "
                       "(--overwrite captions them again).", err=True)
            return
        looped = f", {summary.repeating} cut short for repeating themselves" if summary.repeating else ""
        done, failed, skipped = summary.done, summary.failed, self.skipped
        left = self.total - skipped - done - failed  # every input counted once, as on the bar
        made = self._made(summary)  # with videos: what of each kind, and their frames (images alone: as it was)
        if summary.interrupted:
            counts = f"Interrupted: {done} captioned{f' ({made})' if made else ''}, {failed} failed, {left} not " \
                     f"finished ({skipped} skipped"
        else:
            what = f"{self.total} images" if not self.videos else inputs(self.total, self.videos)
            counts = f"Captioned {done} of {what}{f', {made}' if made else ''} ({skipped} skipped, {failed} failed" + \
                (f", {left} not finished" if left else "")
        noun = "images" if not self.videos else "videos" if self.videos == self.total else "captions"
        click.echo(f"{counts}{looped}) in {duration(summary.seconds)}, {summary.images_per_minute:.1f} {noun}/min.",
                   err=True)

    def _made(self, summary: BatchSummary) -> str:
        """What a run with videos captioned: "3 images and 2 videos from 48 frames" ("from 48 frames" if all are
        videos); "" for images alone."""
        frames = [f"from {counted(summary.frames, 'frame')}"] if summary.frames else []
        if not self.videos or self.videos == self.total:
            return " ".join(frames)
        kinds = [counted(n, noun) for n, noun in ((summary.images, "image"), (summary.videos, "video")) if n]
        return " ".join([" and ".join(kinds), *frames]) if kinds else ""


def stage(now: Activity, rate: float | None, *, video: str | None = None) -> str:
    """What the engine is doing, in a few words (the bar's postfix); `video`: the video next in order, if the next
    input is one (read while nothing is in flight, encoded while it is the one caption in flight)."""
    if video is not None and now.encoding == now.generating == 1 and not now.waiting:
        return f"encoding video {video}" + (f", {counted(now.frames, 'frame')} read" if now.frames else "")
    if now.encoding:
        busy = now.generating - now.encoding
        return f"encoding {now.encoding} image{'s' * (now.encoding > 1)}" + (f", {busy} generating" if busy else "")
    if now.generating:  # the rate once measured over generating alone
        return f"{now.generating} generating" + ("" if rate is None else f", {rate:.1f} tokens/s") + \
            (f", {counted(now.frames, 'frame')} read" if now.frames else "")
    if video is not None:  # its frames are being read and sampled (a remote captioner's: sent, and read there)
        return f"reading video {video}"
    if rate:  # captions made elsewhere, counted as their tokens come back
        return f"{rate:.1f} tokens/s"
    return "reading images"


class Streamer:
    """Writes caption pieces to stdout as they come (to a terminal or a pipe alike), and keeps what it wrote."""

    def __init__(self) -> None:
        self.started = self.tty = False
        self.pieces: list[str] = []
        self.lock = threading.Lock()  # the first piece and a status line from CaptionStages: one at a time

    def __call__(self, piece: str) -> None:
        if not self.started:
            with self.lock:
                self.started = True
                self.tty = sys.stdout.isatty()
                if self.tty:
                    status("")  # the caption replaces the status line; with stdout elsewhere, the line goes on
        self.pieces.append(piece)
        # A caption is the model's text: on a terminal its control characters are shown, not obeyed.
        click.echo(printable_text(piece) if self.tty else piece, nl=False)  # click flushes: a pipe sees each piece

    def ended(self, result: Caption) -> None:
        """When the loop guard cut the caption back, say so on stderr, and where: the text streamed
        went on past the cut (it was out before the loop showed)."""
        streamed, text = "".join(self.pieces), result.text
        if result.finish_reason == "repetition" and streamed.strip() != text:
            say(f"Note: the caption fell into a loop and was cut back to its first round: it is the first {len(text)} "
                f"characters ({_words(text)}) of the text {'above' if self.tty else 'on stdout'}, and the "
                f"{_words(streamed[len(text):])} streamed after them are not part of it (-o, --sidecar and --format "
                "jsonl save the cut caption)")


def _words(text: str) -> str:
    return f"{(n := len(text.split()))} word{'s' * (n != 1)}"


class CaptionStages:
    """The status line while one caption is made (stderr, when a person watches): reading the image (or reading and
    sampling the video: `media`), encoding it (a minute on a CPU), generating, from the captioner's activity. Once
    the caption streams to this terminal it is the line; with stdout elsewhere the line goes on, with the tokens so
    far, until the caption ends."""

    POLL_S = 0.25

    def __init__(self, captioner: Captioning, streamer: Streamer, *, media: str = "image") -> None:
        self.captioner, self.streamer, self.media = captioner, streamer, media
        self.stop = threading.Event()
        self.watcher: threading.Thread | None = None

    def __enter__(self) -> CaptionStages:
        status("Reading the video and sampling its frames ..." if self.media == "video" else "Reading the image ...")
        if sys.stderr.isatty():
            self.watcher = threading.Thread(target=self._watch, name="caprl-stages", daemon=True)
            self.watcher.start()
        return self

    def _watch(self) -> None:
        first = self.captioner.activity()
        base, frames, shown = first.tokens, first.frames, ""
        while not self.stop.wait(self.POLL_S):
            now = self.captioner.activity()
            if not (now.encoding or now.generating or self.streamer.started):
                continue  # still reading it, in the caller's thread
            read = f" ({counted(now.frames - frames, 'frame')})" if now.frames > frames else ""
            line = f"Encoding the {self.media}{read} ..." if now.encoding else \
                f"Generating the caption ({now.tokens - base} tokens) ..."
            with self.streamer.lock:
                if self.stop.is_set() or (self.streamer.started and self.streamer.tty):
                    return
                if line != shown:
                    status(line)
                    shown = line

    def __exit__(self, *exc: object) -> None:
        with self.streamer.lock:
            self.stop.set()
        if self.watcher is not None:
            self.watcher.join()
        if not (self.streamer.started and self.streamer.tty):  # once the caption shows, the line is its own
            status("")


# --- the process: its log lines on stderr (Ctrl-C: interrupts.GracefulInterrupt) -----------------


class _Printable(logging.Formatter):
    """Log lines as one escaped line each: a record may quote llama.cpp, a file name or a server."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # logging's name
        return printable(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:  # with -v, a traceback keeps its lines
        return "\n".join(printable(line, limit=None) for line in super().formatException(ei).splitlines())


class _TerminalHandler(logging.StreamHandler):
    """Writes to stderr at the time of the record (tests and pytest swap sys.stderr), after
    taking a status line off the terminal."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        with _LINE:
            clear_status()
            super().emit(record)


def configure_logging(verbose: bool) -> None:
    """Verbose: every log line on stderr. Otherwise only caprl-local's own warnings, as one-liners;
    third-party libraries' log output (huggingface_hub's, say) stays silent. Either way, each line
    is escaped (see printable.py)."""
    root = logging.getLogger()
    ours = logging.getLogger("caprl_local")
    for logger in (root, ours):  # configured again (main() called twice in one process): not twice over
        for old in [h for h in logger.handlers if isinstance(h, _TerminalHandler)]:
            logger.removeHandler(old)
    logging.captureWarnings(True)  # Python warnings (Pillow's about odd files) are log lines too
    handler = _TerminalHandler()
    if verbose:
        handler.setFormatter(_Printable("%(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.DEBUG)
        ours.setLevel(logging.NOTSET)
        ours.propagate = True
        return
    root.addHandler(logging.NullHandler())  # no "last resort" printing of others' warnings
    handler.setFormatter(_Printable("Warning: %(message)s"))
    ours.addHandler(handler)
    ours.setLevel(logging.WARNING)
    ours.propagate = False
