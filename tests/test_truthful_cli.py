"""What `caprl-local caption` shows tells the truth: a caption the loop guard cut back is said to be cut,
a large photo is read at a reduced scale (a real bomb is refused, with the limit), the summary counts
every image once, the status line and the bar name the stage, and results to a pipe carry no bar."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import HANG_S, run_cli, run_on_a_terminal
from PIL import Image

from caprl_local import console
from caprl_local.errors import ImageError
from caprl_local.images import MAX_PIXELS, load_image, peek_image
from caprl_local.results import Activity

NOTE = re.compile(r"Note: the caption fell into a loop and was cut back to its first round: it is the first (\d+) "
                  r"characters \((\d+) words?\) of the text (above|on stdout), and the (\d+) words? streamed after them are "
                  r"not part of it \(-o, --sidecar and --format jsonl save the cut caption\)")


@pytest.fixture()
def model_args(tiny_model: tuple[Path, Path]) -> list[str]:
    model, mmproj = tiny_model
    return ["--model", str(model), "--mmproj", str(mmproj), "--threads", "1"]


# -- 1. one image on stdout, cut back by the loop guard ------------------------------------------


def test_a_caption_cut_back_for_looping_says_so_and_where(model_args: list[str], images: Path, tmp_path: Path) -> None:
    """The random tiny model falls into a loop on photo.jpg within 300 tokens (as tests/test_scheduler.py relies on)."""
    photo = tmp_path / "photo.jpg"
    shutil.copy(images / "photo.jpg", photo)
    args = ["caption", str(photo), *model_args, "--max-tokens", "300"]
    streamed = run_cli(*args)
    assert streamed.returncode == 0, streamed.stderr
    saved = run_cli(*args, "--format", "jsonl", "-o", str(tmp_path / "out.jsonl"), "--sidecar")
    assert saved.returncode == 0, saved.stderr
    record = json.loads((tmp_path / "out.jsonl").read_text())
    caption = record["caption"]
    assert record["finish_reason"] == "repetition" and (tmp_path / "photo.txt").read_text().strip() == caption
    # stdout went on past the cut; stderr says where the caption ends, and that the files hold only that much
    text = streamed.stdout.rstrip("\n")
    assert text.startswith(caption) and len(text) > len(caption)
    notes = [line for line in streamed.stderr.splitlines() if line.startswith("Note:")]
    assert len(notes) == 1, streamed.stderr
    found = NOTE.fullmatch(notes[0])
    assert found, notes[0]
    chars, words, where, after = int(found[1]), int(found[2]), found[3], int(found[4])
    assert (chars, words, where) == (len(caption), len(caption.split()), "on stdout")
    assert text[:chars] == caption and after == len(text[chars:].split()) > 0
    # without the guard nothing is cut, and nothing said
    free = run_cli(*args, "--no-loop-guard")
    assert free.returncode == 0 and "Note:" not in free.stderr and free.stdout.startswith(caption)


def test_on_a_terminal_the_note_follows_the_caption_on_a_line_of_its_own(model_args: list[str], images: Path) -> None:
    code, raw = run_on_a_terminal(["caption", str(images / "photo.jpg"), *model_args, "--max-tokens", "300"])
    assert code == 0, raw
    lines = raw.replace("\r\n", "\n").split("\n")
    notes = [i for i, line in enumerate(lines) if "Note: the caption fell into a loop" in line]
    assert len(notes) == 1, raw
    assert lines[notes[0]].lstrip("\r\x1b[K").startswith("Note:") and "of the text above" in lines[notes[0]]


def test_a_caption_that_does_not_loop_gets_no_note(model_args: list[str], images: Path) -> None:
    result = run_cli("caption", str(images / "alpha.png"), *model_args, "--max-tokens", "12")
    assert result.returncode == 0 and result.stdout.strip() and "Note:" not in result.stderr, result.stderr


# -- 2. large photos and decompression bombs ---------------------------------------------------


def _encoded(size: tuple[int, int], fmt: str, mode: str = "RGB", **save: object) -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, 90 if mode == "L" else (200, 40, 30)).save(out, fmt, **save)  # one colour: quick to write
    return out.getvalue()


@pytest.mark.parametrize("size", [(12000, 9000), (9000, 12000), (14000, 10500)])
def test_a_large_jpeg_up_to_the_limit_decodes_at_a_reduced_scale(size: tuple[int, int]) -> None:
    """Over Pillow's 89-megapixel bomb limit, within MAX_PIXELS: read at 1/2 scale (or smaller), not refused."""
    data = _encoded(size, "JPEG")
    assert size[0] * size[1] <= MAX_PIXELS
    whole = load_image(data)
    assert whole.mode == "RGB" and whole.width * whole.height <= Image.MAX_IMAGE_PIXELS
    assert abs(whole.width / whole.height - size[0] / size[1]) < 0.01 and whole.getpixel((5, 5))[0] > 150
    assert load_image(data, draft_pixels=1_000_000).width <= size[0] // 4  # the budget's draft as before
    assert peek_image(data) == ("JPEG", *size, 0)  # the server's header check takes it too


def test_a_large_jpeg_is_captioned_from_the_command_line(model_args: list[str], tmp_path: Path) -> None:
    photo = tmp_path / "big.jpg"
    photo.write_bytes(_encoded((12000, 9000), "JPEG"))
    result = run_cli("caption", str(photo), *model_args, "--max-tokens", "4")
    assert result.returncode == 0 and result.stdout.strip(), result.stderr
    assert "decompression bomb" not in result.stderr


@pytest.mark.parametrize(("size", "fmt", "mode", "save", "words"), [
    ((12000, 9000), "PNG", "L", {}, "a 12000x9000 PNG (108 megapixels) is decoded whole, and the limit for that is 89 "
                                    "megapixels"),
    ((12000, 9000), "JPEG", "RGB", {"progressive": True}, "progressive or multi-scan JPEG (108 megapixels) is decoded "
                                                          "whole, and the limit for that is 89 megapixels"),
    ((13000, 13000), "JPEG", "L", {}, "13000x13000 is 169 megapixels, over the 150-megapixel limit"),
    ((15000, 13000), "JPEG", "L", {}, "195 megapixels, over the 150-megapixel limit"),
])
def test_a_real_bomb_is_refused_in_one_line_that_states_the_limit(size: tuple[int, int], fmt: str, mode: str,
                                                                  save: dict[str, object], words: str) -> None:
    data = _encoded(size, fmt, mode, **save)
    for attempt in (lambda: load_image(data), lambda: load_image(data, draft_pixels=1_000_000), lambda: peek_image(data)):
        with pytest.raises(ImageError) as info:
            attempt()
        message = str(info.value)
        assert "\n" not in message and words in message and message.endswith("; downscale it first"), message
        assert "too large to decode safely" in message or "megapixel limit" in message


def test_a_bomb_on_the_command_line_is_one_error_line(model_args: list[str], tmp_path: Path) -> None:
    bomb = tmp_path / "wide.png"
    bomb.write_bytes(_encoded((12000, 9000), "PNG", "L"))
    result = run_cli("caption", str(bomb), *model_args, "--max-tokens", "4")
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "limit for that is 89 megapixels" in result.stderr, result.stderr


# -- 3. progress: counts, stages, streams -------------------------------------------------------


def test_an_interrupted_batch_accounts_for_every_image(model_args: list[str], images: Path, tmp_path: Path) -> None:
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(2):
        shutil.copy(images / "photo.jpg", folder / f"a{i}.jpg")
    out = tmp_path / "out.jsonl"
    args = [sys.executable, "-m", "caprl_local", "caption", str(folder), *model_args, "--max-tokens", "40",
            "--no-loop-guard", "--parallel", "1", "--format", "jsonl", "-o", str(out)]
    assert subprocess.run(args, capture_output=True, text=True, timeout=HANG_S).returncode == 0  # 2 to skip later
    for i in range(24):
        shutil.copy(images / ("photo.jpg" if i % 3 else "truncated.jpg"), folder / f"b{i:02d}.jpg")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + HANG_S
    while not (out.read_text().count("\n") >= 2 + 3) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the batch ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=HANG_S)
    assert proc.returncode == 130, err
    last = err.rstrip().splitlines()[-1]
    found = re.fullmatch(r"Interrupted: (\d+) captioned, (\d+) failed, (\d+) not finished \((\d+) skipped\) in .+, "
                         r"[\d.]+ images/min\.", last)
    assert found, err
    captioned, failed, left, skipped = map(int, found.groups())
    assert skipped == 2 and captioned + failed + left + skipped == 26  # every image once
    records = [json.loads(line) for line in out.read_text().splitlines()][2:]  # this run's results
    assert captioned == sum("caption" in r for r in records) and failed == sum("error" in r for r in records)
    assert failed >= 1 and left >= 1


def test_the_summary_of_a_finished_batch_is_unchanged(model_args: list[str], images: Path) -> None:
    result = run_cli("caption", str(images / "photo.jpg"), str(images / "truncated.jpg"), *model_args,
                     "--max-tokens", "4", "--format", "jsonl")
    assert result.returncode == 1
    assert re.fullmatch(r"Captioned 1 of 2 images \(0 skipped, 1 failed\) in \d+s, [\d.]+ images/min\.",
                        result.stderr.strip().splitlines()[-1]), result.stderr


class ScriptedCaptioner:
    """Activity only, from a script of snapshots; the last one goes on, its tokens growing if it generates."""

    def __init__(self, *snapshots: Activity) -> None:
        self.snapshots = list(snapshots)

    def activity(self) -> Activity:
        if len(self.snapshots) > 1:
            return self.snapshots.pop(0)
        last = self.snapshots[0]
        if last.generating and not last.encoding and last.tokens:
            self.snapshots[0] = Activity(last.generating, last.waiting, last.tokens + 40)
        return last


def _wait_for(progress: console.BatchProgress, text: str,
              monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, list[str]]:
    seen, shown = threading.Event(), []
    original = progress.bar.refresh

    def refresh(*args: object, **kwargs: object) -> None:
        original(*args, **kwargs)
        shown.append(str(progress.bar))
        if text in shown[-1]:
            seen.set()

    monkeypatch.setattr(progress.bar, "refresh", refresh)
    return seen, shown


def test_the_bar_names_the_stage_instead_of_zero_tokens_per_second(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(console.BatchProgress, "POLL_S", 0.01)
    progress = console.BatchProgress(5, 0, show=True, quiet=True)
    seen, shown = _wait_for(progress, "tokens/s", monkeypatch)
    progress.watch(ScriptedCaptioner(Activity(0, 0, 0), Activity(0, 0, 0), Activity(1, 0, 0, encoding=1),
                                     Activity(1, 0, 0, encoding=1), Activity(3, 0, 0, encoding=2),
                                     Activity(3, 0, 40), Activity(3, 0, 80)))
    assert seen.wait(HANG_S)
    progress.finish(None)
    postfixes = [s.split(", ", 1)[-1] if "encoding" not in s else s[s.index("encoding"):] for s in shown]
    assert any("reading images" in s for s in shown), shown
    assert any(p.startswith("encoding 1 image") and "tokens/s" not in p for p in postfixes), shown
    assert any("encoding 2 images, 1 generating" in s for s in shown), shown
    assert re.search(r"3 generating, [\d.]+ tokens/s", shown[-1]) and not any("0.0 tokens/s" in s for s in shown), shown


class TtyStringIO(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_status_line_of_one_caption_names_each_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading (before the engine has it), encoding, then generating, with the tokens so far while stdout is a pipe."""
    err = TtyStringIO()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(console.CaptionStages, "POLL_S", 0.01)
    streamer = console.Streamer()
    script = ScriptedCaptioner(Activity(0, 0, 100), Activity(0, 0, 100), Activity(1, 0, 100, encoding=1),
                               Activity(1, 0, 100, encoding=1), Activity(1, 0, 107), Activity(0, 0, 0))
    with console.CaptionStages(script, streamer) as stages:  # type: ignore[arg-type]
        deadline = time.monotonic() + HANG_S
        while "Generating the caption (7 tokens) ..." not in err.getvalue() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stages.watcher is not None
    shown = [line for line in err.getvalue().split("\r\x1b[K") if line]
    assert shown == ["Reading the image ...", "Encoding the image ...", "Generating the caption (7 tokens) ..."]
    assert err.getvalue().endswith("\r\x1b[K")  # taken off at the end


def _stderr_on_a_terminal(args: list[str]) -> tuple[int, str, str]:
    """Run the CLI with stdout a pipe and stderr a pseudo-terminal: (exit code, stdout, what the terminal got)."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "caprl_local", *args], stdout=subprocess.PIPE, stderr=slave,
                            stdin=subprocess.DEVNULL, env={**os.environ, "TERM": "xterm"})
    os.close(slave)
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    out, _ = proc.communicate(timeout=HANG_S)
    reader.join(HANG_S)
    os.close(master)
    return proc.returncode, out.decode(), b"".join(chunks).decode("utf-8", "replace")


def test_results_to_a_pipe_carry_no_bar_while_the_bar_draws_on_stderr(model_args: list[str], images: Path) -> None:
    names = ["photo.jpg", "alpha.png", "cmyk.jpg", "palette.png"]
    code, out, terminal = _stderr_on_a_terminal(["caption", *[str(images / n) for n in names], *model_args,
                                                 "--max-tokens", "24", "--format", "jsonl"])
    assert code == 0, terminal
    assert "\r" in terminal and "/4" in terminal  # the bar was drawn, on stderr
    assert "\x1b" not in out and "\r" not in out  # and nothing of it went into the results
    assert [json.loads(line)["path"] for line in out.splitlines()] == [str(images / n) for n in names]
    assert "Captioned 4 of 4 images (0 skipped, 0 failed" in terminal


def test_one_caption_to_a_pipe_is_plain_text_while_the_status_line_is_on_stderr(model_args: list[str],
                                                                                 images: Path) -> None:
    code, out, terminal = _stderr_on_a_terminal(["caption", str(images / "alpha.png"), *model_args, "--max-tokens", "12"])
    assert code == 0, terminal
    assert out.strip() and "\x1b" not in out and "\r" not in out
    assert out == run_cli("caption", str(images / "alpha.png"), *model_args, "--max-tokens", "12").stdout
    assert "Reading the image ..." in terminal and terminal.endswith("\r\x1b[K")  # named, then taken off
