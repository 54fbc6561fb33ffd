"""The CLI against what comes from outside: escape sequences in names and messages, endless or odd
inputs, the signals a service manager or a closed terminal sends mid-batch."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import HANG_S, run_cli, run_on_a_terminal

from caprl_local.errors import ImageError
from caprl_local.images import load_image
from caprl_local.printable import printable, printable_text

#: What a hostile name or message carries: a clipboard write (OSC 52), a screen clear, a bell, a
#: forged second line, a bidirectional override and an undecodable byte.
HOSTILE = "x\x1b]52;c;aGVsbG8=\x07\x1b[2J\r\nError: forged\u202e\udcff"


@pytest.fixture(scope="module")
def model_args(tiny_model: tuple[Path, Path]) -> list[str]:
    model, mmproj = tiny_model
    return ["--model", str(model), "--mmproj", str(mmproj), "--threads", "1", "--max-tokens", "8"]


def _no_controls(text: str) -> None:
    for ch in ("\x1b", "\x07", "\r", "\u202e"):
        assert ch not in text, repr(text)


def test_printable_escapes_every_control_and_bounds_the_line() -> None:
    line = printable(HOSTILE)
    _no_controls(line)
    assert "\n" not in line and "\\x1b]52" in line and "\\n" in line and "\\xff" in line and "\\u202e" in line
    assert len(printable("a" * 100_000)) < 2100
    assert printable_text("two\nlines\tand \x1b[2J") == "two\nlines\tand \\x1b[2J"  # a caption keeps its lines


def test_names_from_outside_reach_the_terminal_escaped(model_args: list[str], images: Path, tmp_path: Path) -> None:
    """A file name with escape sequences, in a one-line error and in a batch's per-image errors."""
    missing = run_cli("caption", str(tmp_path / f"{HOSTILE}.jpg"), *model_args)
    assert missing.returncode == 1
    _no_controls(missing.stderr)
    assert len(missing.stderr.strip().splitlines()) == 1 and "forged" in missing.stderr

    folder = tmp_path / "batch"
    folder.mkdir()
    shutil.copy(images / "photo.jpg", folder / "good.jpg")
    (folder / f"{HOSTILE.rstrip(chr(0xDCFF))}.png").write_text("not an image")  # (byte names: test_outputs_hostile)
    batch = run_cli("caption", str(folder), *model_args, "--format", "jsonl")
    assert batch.returncode == 1, batch.stderr
    _no_controls(batch.stderr)
    lines = batch.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("Error: ") and lines[1].startswith("Captioned 1 of 2"), batch.stderr
    records = [json.loads(line) for line in batch.stdout.splitlines()]  # the record itself keeps the real name
    assert any(r["path"].endswith(".png") and "\x1b" in r["path"] for r in records)


def test_log_lines_are_escaped(capsys: pytest.CaptureFixture[str]) -> None:
    from caprl_local import console

    for verbose in (False, True):
        console.configure_logging(verbose)
        logging.getLogger("caprl_local").warning("metadata says %s", HOSTILE)
        err = capsys.readouterr().err
        _no_controls(err)
        assert err.count("\n") == 1 and "forged" in err
    console.configure_logging(False)


def test_an_endless_stdin_is_refused_before_the_model_loads(model_args: list[str]) -> None:
    with open("/dev/zero", "rb") as zero:
        result = subprocess.run([sys.executable, "-m", "caprl_local", "caption", "-", *model_args], stdin=zero,
                                capture_output=True, text=True, timeout=HANG_S)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines() == ["Error: <stdin>: stdin gives more than 512 MB, more than any image "
                                                  "this reads; give an image file"]
    empty = subprocess.run([sys.executable, "-m", "caprl_local", "caption", "-", *model_args], stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=HANG_S)
    assert empty.returncode == 1 and "stdin was empty" in empty.stderr


def _fifo(tmp_path: Path, data: bytes) -> Path:
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)

    def write() -> None:
        with open(fifo, "wb") as fh:
            fh.write(data)

    threading.Thread(target=write, daemon=True).start()
    return fifo


def test_fifos_devices_and_proc_files_are_read_for_what_they_hold(images: Path, tmp_path: Path) -> None:
    """A shell's <(...) is a FIFO: it is read (within a bound), and an empty one or a device is named as such."""
    photo = (images / "photo.jpg").read_bytes()
    assert load_image(_fifo(tmp_path, photo)).size == load_image(photo).size
    (tmp_path / "pipe.jpg").unlink()
    with pytest.raises(ImageError, match=r"nothing could be read from it \(a FIFO\)"):
        load_image(_fifo(tmp_path, b""))
    with pytest.raises(ImageError, match=r"nothing could be read from it \(a character device\)"):
        load_image("/dev/null")
    with pytest.raises(ImageError, match="not a recognised image format"):
        load_image("/proc/self/status")  # its size says 0 bytes, yet it holds text
    import socket

    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "sock.png"))
        with pytest.raises(ImageError, match="is a socket, not an image file"):
            load_image(tmp_path / "sock.png")
    with pytest.raises(ImageError, match="more than 1 MB"):
        from caprl_local.images import read_bounded

        with open("/dev/zero", "rb") as zero:
            read_bounded(zero, "/dev/zero", what="a character device", limit=1024 * 1024)


def test_the_output_dash_is_stdout_and_the_input_list_is_never_the_output(model_args: list[str], images: Path,
                                                                         tmp_path: Path) -> None:
    dash = run_cli("caption", str(images / "photo.jpg"), *model_args, "-o", "-", "--format", "jsonl", cwd=tmp_path)
    assert dash.returncode == 0 and json.loads(dash.stdout)["caption"], dash.stderr
    assert not (tmp_path / "-").exists()
    listing = tmp_path / "ds.jsonl"
    lines = [json.dumps({"image": str(images / "photo.jpg"), "id": i}) for i in range(3)]
    listing.write_text("\n".join(lines) + "\n")
    link = tmp_path / "same.jsonl"
    link.symlink_to(listing)
    for output in (listing, link):
        refused = run_cli("caption", "--from-list", str(listing), *model_args, "--format", "jsonl", "-o", str(output))
        assert refused.returncode == 2 and "is the --from-list file itself" in refused.stderr
    assert listing.read_text() == "\n".join(lines) + "\n"


def test_an_error_never_shares_a_line_with_the_loading_status(tiny_model: tuple[Path, Path], images: Path,
                                                              tmp_path: Path) -> None:
    model, mmproj = tiny_model
    broken = tmp_path / "cut.gguf"
    broken.write_bytes(model.read_bytes()[:50_000])  # refused while "Loading ..." shows
    code, shown = run_on_a_terminal(["caption", str(images / "photo.jpg"), "--model", str(broken), "--mmproj",
                                     str(mmproj), "--threads", "1"])
    assert code == 1
    before = shown[:shown.index("Error: ")]
    assert before == "" or before.endswith(("\n", "\r\x1b[K")), repr(shown)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_end_a_batch_like_ctrl_c(model_args: list[str], images: Path, tmp_path: Path,
                                                    signum: int) -> None:
    """The summary, every finished result whole, exit 130; the same command then finishes the rest."""
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(40):
        shutil.copy(images / "photo.jpg", folder / f"{i:02d}.jpg")
    out = tmp_path / "out.jsonl"
    args = [sys.executable, "-m", "caprl_local", "caption", str(folder), *model_args, "--max-tokens", "48",
            "--no-loop-guard", "--parallel", "1", "--format", "jsonl", "-o", str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + HANG_S
    while not (out.exists() and out.read_text().count("\n") >= 1) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the batch ended before it could be interrupted"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=HANG_S)
    assert proc.returncode == 130, err
    assert "Interrupted: " in err and "Traceback" not in err  # the summary counts captioned, failed, not finished
    records = [json.loads(line) for line in out.read_text().splitlines()]  # every line whole
    assert 1 <= len(records) < 40
    rerun = subprocess.run(args, capture_output=True, text=True, timeout=HANG_S, stdin=subprocess.DEVNULL)
    assert rerun.returncode == 0, rerun.stderr
    assert sorted(json.loads(line)["path"] for line in out.read_text().splitlines()) == \
        sorted(str(p) for p in folder.iterdir())


def test_an_endless_list_is_refused(model_args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A list on stdin (or a FIFO) with no line break, or with no end, is refused within a bound."""
    import io

    from caprl_local import inputs
    from caprl_local.errors import CaprlError

    with open("/dev/zero", "rb") as zero:
        result = subprocess.run([sys.executable, "-m", "caprl_local", "caption", "--from-list", "-", *model_args],
                                stdin=zero, capture_output=True, text=True, timeout=HANG_S)
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        "Error: <stdin>:1: a line of over 1 MB; a list holds one path or JSON object a line"]

    class Endless(io.RawIOBase):  # what `yes | caprl-local caption --from-list -` sends
        def readable(self) -> bool:
            return True

        def readinto(self, buffer: bytearray) -> int:  # type: ignore[override]
            buffer[:] = b"y\n" * (len(buffer) // 2)
            return len(buffer)

    monkeypatch.setattr(inputs, "MAX_LIST_BYTES", 8 << 20)
    stdin = io.TextIOWrapper(io.BufferedReader(Endless()))
    with pytest.raises(CaprlError, match="the list is over 8 MB"):
        inputs.collect_inputs([], list_file="-", stdin=stdin)
