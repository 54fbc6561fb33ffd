"""The CLI's terminal: progress bars (tqdm), transient status lines, streamed text, log lines, Ctrl-C.

Everything here writes to stderr except the streamed caption, which is a result (stdout).
Bars and status lines appear only when a person watches (stderr is a terminal).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from dataclasses import asdict
from typing import Any, TextIO

import click
from tqdm import tqdm
from tqdm.contrib import DummyTqdmFile


def size(n: int | float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} KB"


def duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h {seconds // 60 % 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m {seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def status(message: str) -> None:
    """A transient line on stderr while something slow happens, only when a person watches."""
    if sys.stderr.isatty():
        click.echo(f"\r\033[K{message}", nl=False, err=True)


class DownloadBar:
    """Download progress on stderr: a tqdm bar per file for a person, one line per file otherwise."""

    def __init__(self) -> None:
        self.current: str | None = None
        self.bar: Any = None
        self.tty = sys.stderr.isatty()

    def __call__(self, p: Any) -> None:
        if p.filename != self.current:
            self.close()
            self.current = p.filename
            if not self.tty:
                click.echo(f"Downloading {p.filename} ({size(p.total or 0)})", err=True)
                return
            self.bar = tqdm(total=p.total, initial=p.downloaded, desc=p.filename, unit="B", unit_scale=True,
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
    """Where results for stdout go: with a progress bar showing, through tqdm, which clears
    the bar before each line and redraws it after."""
    return DummyTqdmFile(sys.stdout) if progress else sys.stdout


def loaded(captioner: Any, *, images: int | None = None) -> None:
    """One line on what the load chose (device, captions in flight, threads), on stderr."""
    where = "the GPU" if captioner.on_gpu else "the CPU"
    what = f"{images} image{'s' * (images != 1)}: " if images else ""
    width = captioner.parallel if images is None else min(captioner.parallel, images)
    in_flight = f"{width} captions in flight" if width > 1 else "1 caption at a time"
    click.echo(f"{what}{in_flight} on {where}, {captioner.threads} CPU thread{'s' * (captioner.threads > 1)}",
               err=True)


class BatchProgress:
    """Per-image error lines, a progress bar on a terminal, and the closing summary, on stderr.

    The bar moves as images finish, in any order, and a watcher thread shows the captions in
    flight and the tokens per second from the start, long before the first image is done.
    """

    POLL_S = 0.5

    def __init__(self, total: int, skipped: int, *, show: bool, quiet: bool) -> None:
        self.total, self.skipped, self.quiet = total, skipped, quiet
        self.bar = tqdm(total=total, initial=skipped, unit="image", file=sys.stderr, disable=not show,
                        dynamic_ncols=True, smoothing=0.1, leave=False)
        self.stop = threading.Event()
        self.watcher: threading.Thread | None = None

    def watch(self, captioner: Any) -> None:
        """Show what `captioner` is doing until the batch ends."""
        if not self.bar.disable:
            self.watcher = threading.Thread(target=self._watch, args=(captioner,), name="caprl-progress", daemon=True)
            self.watcher.start()

    def _watch(self, captioner: Any) -> None:
        tokens, at, rate = captioner.activity().tokens, time.monotonic(), None
        while not self.stop.wait(self.POLL_S):
            now = captioner.activity()
            t = time.monotonic()
            recent = (now.tokens - tokens) / max(t - at, 1e-6)
            rate = recent if rate is None else 0.8 * rate + 0.2 * recent  # steady, yet follows changes
            tokens, at = now.tokens, t
            self.bar.set_postfix_str(f"{now.generating} in flight, {rate:.1f} tokens/s", refresh=False)
            self.bar.refresh()

    def done(self, finished: int) -> None:
        """`finished` images of this run are done (in any order)."""
        self.bar.n = self.skipped + finished
        self.bar.refresh()

    def result(self, item: Any, record: dict[str, Any], summary: Any) -> None:
        if "error" in record:
            tqdm.write(f"Error: {record['error']}", file=sys.stderr)

    def finish(self, summary: Any) -> None:
        self.stop.set()
        if self.watcher is not None:
            self.watcher.join()
        self.bar.close()
        if self.quiet:
            return
        if summary is None:
            click.echo(f"Nothing to do: all {self.total} images already have a result "
                       "(--overwrite captions them again).", err=True)
            return
        ended = "Interrupted after" if summary.interrupted else "Captioned"
        looped = f", {summary.repeating} cut short for repeating themselves" if summary.repeating else ""
        click.echo(f"{ended} {summary.done} of {self.total} images ({self.skipped} skipped, {summary.failed} failed"
                   f"{looped}) in {duration(summary.seconds)}, {summary.images_per_minute:.1f} images/min.", err=True)


class Streamer:
    """Writes caption pieces to stdout as they come (to a terminal or a pipe alike)."""

    def __init__(self) -> None:
        self.started = False

    def __call__(self, piece: str) -> None:
        if not self.started:
            self.started = True
            status("")  # the caption replaces the "Reading the image" line
        click.echo(piece, nl=False)  # click flushes: a pipe sees each piece at once


def print_models(listings: list[Any], *, default: str) -> None:
    """`caprl-local models` as text: each model, its published quants (* cached) and cached files."""
    for item in listings:
        spec = item.spec
        mark = " (default)" if spec.name == default else ""
        click.echo(f"{spec.name}{mark}  [{spec.architecture}]  {spec.description}")
        click.echo(f"  repo: {spec.repo}" + (f"   imatrix: {spec.imatrix_repo}" if spec.imatrix_repo else ""))
        cached = {(c.repo, c.filename) for c in item.cached}
        if item.available is not None:
            quants = [f for f in item.available if not f.projector]
            shown = ", ".join(
                f"{'i1-' if f.imatrix else ''}{f.quant} {size(f.size)}{' *' if (f.repo, f.filename) in cached else ''}"
                for f in sorted(quants, key=lambda f: (f.imatrix, f.size))
            )
            click.echo(f"  quants: {shown or 'none published yet'}")
        elif item.error != "offline":
            click.echo(f"  quants: not listed ({item.error})")
        for c in item.cached:
            click.echo(f"  cached: {c.filename}  {size(c.size)}")
        if not item.cached:
            click.echo("  cached: nothing")


def listing_json(item: Any, *, default: str) -> dict[str, Any]:
    """`caprl-local models --json`: one model as a JSON object."""
    cached = {(c.repo, c.filename): c for c in item.cached}
    return {
        **asdict(item.spec),
        "default": item.spec.name == default,
        "available": None if item.available is None else [
            {**asdict(f), "cached": (f.repo, f.filename) in cached} for f in item.available
        ],
        "cached": [{**asdict(c), "path": str(c.path)} for c in item.cached],
        "cached_bytes": sum(c.size for c in item.cached),
        "error": item.error,  # why "available" is null: "offline", or what the Hub answered
    }


# --- the process: its log lines on stderr, Ctrl-C ---------------------------------------------


def configure_logging(verbose: bool) -> None:
    """Verbose: every log line on stderr. Otherwise only caprl-local's own warnings, as one-liners;
    third-party libraries' log output (huggingface_hub's, say) stays silent."""
    root = logging.getLogger()
    logging.captureWarnings(True)  # Python warnings (Pillow's about odd files) are log lines too
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


class GracefulInterrupt:
    """Ctrl-C while captioning: ask the captioner to stop at the next token, so the run ends
    cleanly with what is done written; a second Ctrl-C stops at once.

    (A KeyboardInterrupt raised by Python's default handler can land inside llama.cpp's log
    callback, where ctypes swallows it, and the Ctrl-C would be lost.)
    """

    def __init__(self) -> None:
        self.requested = False
        self.captioner: Any = None

    def __enter__(self) -> GracefulInterrupt:
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
