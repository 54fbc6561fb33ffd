"""What a person sees on a terminal: the bar never shares a line with a caption, progress shows
from the start, and a single caption streams piece by piece."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest
from helpers import HANG_S, run_on_a_terminal

from caprl_local import console
from caprl_local.results import Activity


def screen(raw: str) -> list[str]:
    """The lines a terminal would show for `raw`: carriage returns overwrite, ESC[K clears to the
    end of the line, ESC[nA moves up n lines."""
    lines: list[list[str]] = [[]]
    row = col = 0
    i = 0
    while i < len(raw):
        if raw.startswith("\x1b[", i):
            j = i + 2
            while j < len(raw) and not raw[j].isalpha():
                j += 1
            if raw[j] == "K":
                del lines[row][col:]
            elif raw[j] == "A":
                row = max(0, row - int(raw[i + 2:j] or 1))
            i = j + 1
            continue
        ch = raw[i]
        if ch == "\r":
            col = 0
        elif ch == "\n":
            row += 1
            col = 0
            if row == len(lines):
                lines.append([])
        else:
            line = lines[row]
            line.extend(" " * (col - len(line)))
            line[col:col + 1] = [ch]
            col += 1
        i += 1
    return ["".join(line).rstrip() for line in lines]


def test_the_bar_never_shares_a_line_with_a_caption(tiny_model: tuple[Path, Path], images: Path) -> None:
    model, mmproj = tiny_model
    names = ["photo.jpg", "alpha.png", "cmyk.jpg", "palette.png"]
    code, raw = run_on_a_terminal(["caption", *[str(images / n) for n in names], "--model", str(model),
                                   "--mmproj", str(mmproj), "--threads", "1", "--max-tokens", "60"])
    assert code == 0, raw
    assert "\r" in raw  # a bar was drawn
    shown = screen(raw)
    headers = [line for line in shown if "==>" in line]
    assert headers == [f"==> {images / n} <==" for n in names], shown
    for line in shown:
        if "==>" not in line and "Captioned" not in line and "captions in flight" not in line:
            assert not re.search(r"\d+/\d+|image/s|images/min|in flight", line), shown
    assert shown[0].startswith("4 images: 4 captions in flight on the CPU, 1 CPU thread")  # what auto chose


class FakeCaptioner:
    """Activity only: what the progress watcher reads."""

    def __init__(self) -> None:
        self.tokens = 0

    def activity(self) -> Activity:
        self.tokens += 40
        return Activity(generating=3, waiting=2, tokens=self.tokens)


def test_progress_shows_from_the_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before any image is done: captions in flight and tokens per second; then images in any order."""
    monkeypatch.setattr(console.BatchProgress, "POLL_S", 0.01)
    progress = console.BatchProgress(5, 0, show=True, quiet=True)
    seen = threading.Event()
    original = progress.bar.refresh

    def refresh(*args: object, **kwargs: object) -> None:
        original(*args, **kwargs)
        if "3 generating, " in str(progress.bar):
            seen.set()

    monkeypatch.setattr(progress.bar, "refresh", refresh)
    progress.watch(FakeCaptioner())
    assert seen.wait(HANG_S)
    # the stage named (was "3 in flight"): captions generating, as against reading or encoding an image
    assert re.search(r"3 generating, [\d.]+ tokens/s", str(progress.bar)) and progress.bar.n == 0
    progress.done(2)  # two images finished, whichever they were
    assert progress.bar.n == 2
    progress.finish(None)
    assert progress.watcher is not None and not progress.watcher.is_alive()


def test_a_streamed_caption_is_written_piece_by_piece(capsys: pytest.CaptureFixture[str]) -> None:
    streamer = console.Streamer()
    for piece in ("A red", " house", " by the sea."):
        streamer(piece)
        assert capsys.readouterr().out == piece  # written (and flushed) at once, pipe or terminal
