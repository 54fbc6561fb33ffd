"""The caprl-local command in a subprocess, through the real llama.cpp: output, errors, exit codes."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import BAD_IMAGE_ERRORS, HANG_S, load_script, run_cli

from caprl_local import Captioner


@pytest.fixture(scope="module")
def model_args(tiny_model: tuple[Path, Path]) -> list[str]:
    model, mmproj = tiny_model
    return ["--model", str(model), "--mmproj", str(mmproj), "--threads", "1", "--max-tokens", "16"]


def _one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0]


def test_caption_prints_the_caption_and_nothing_else(
    model_args: list[str], images: Path, captioner: Captioner
) -> None:
    result = run_cli("caption", str(images / "photo.jpg"), *model_args)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # llama.cpp's log is silenced
    expected = captioner.caption(images / "photo.jpg", max_tokens=16).text
    assert result.stdout == expected + "\n"
    again = run_cli("caption", str(images / "photo.jpg"), *model_args, "--seed", "3")
    assert again.stdout == result.stdout


@pytest.mark.parametrize("name", ["rotated.jpg", "cmyk.jpg", "deep16.png", "animated.gif", "pixel.png", "panorama.png"])
def test_caption_awkward_formats(model_args: list[str], images: Path, name: str) -> None:
    result = run_cli("caption", str(images / name), *model_args, "--gpu-layers", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_streams_to_a_terminal(model_args: list[str], images: Path) -> None:
    piped = run_cli("caption", str(images / "alpha.png"), *model_args)
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "caprl_local", "caption", str(images / "alpha.png"), *model_args],
        stdout=slave, stderr=subprocess.PIPE, env={**os.environ, "TERM": "dumb"},
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=HANG_S) == 0
    os.close(master)
    assert b"".join(chunks).decode().replace("\r\n", "\n") == piped.stdout


def test_max_image_tokens_and_verbose_stats(model_args: list[str], images: Path) -> None:
    result = run_cli("caption", str(images / "photo.jpg"), *model_args, "--max-image-tokens", "48", "-v")
    assert result.returncode == 0, result.stderr
    stats = [line for line in result.stderr.splitlines() if line[:1].isdigit() and "image tokens" in line]
    assert stats and int(stats[0].split()[0]) <= 48
    assert "caprl_local.llama" in result.stderr  # verbose shows llama.cpp's log


def test_presets_and_prompts(model_args: list[str], images: Path) -> None:
    for extra in (["--preset", "short"], ["--preset", "document"], ["--prompt", "<image>Name the colours."]):
        result = run_cli("caption", str(images / "photo.jpg"), *model_args, *extra)
        assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(("name", "words"), BAD_IMAGE_ERRORS)
def test_bad_images_fail_with_one_line(model_args: list[str], images: Path, name: str, words: str) -> None:
    path = str(images / name)
    _one_line_error(run_cli("caption", path, *model_args), path, words)


def test_libtiff_messages_are_not_printed_raw(model_args: list[str], tmp_path: Path) -> None:
    """libtiff prints from C ("WEBP compression support is not configured"); the CLI routes it
    to the log, so the image's own one-line error is all there is."""
    tif = tmp_path / "webp.tif"
    tif.write_bytes(load_script("make_test_images").tiff_codec_missing())
    _one_line_error(run_cli("caption", str(tif), *model_args), str(tif))


def test_a_folder_without_images(model_args: list[str], tmp_path: Path) -> None:
    _one_line_error(run_cli("caption", str(tmp_path), *model_args), str(tmp_path), "no images found")


def test_bad_model_files_fail_with_one_line(tiny_model: tuple[Path, Path], images: Path, tmp_path: Path) -> None:
    model, mmproj = tiny_model
    photo = str(images / "photo.jpg")
    _one_line_error(run_cli("caption", photo, "--model", str(model), "--mmproj", str(tmp_path / "x.gguf")), "no such file")
    _one_line_error(run_cli("caption", photo, "--model", str(model), "--mmproj", str(model)), "is a text model")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(model.read_bytes()[:50_000])
    _one_line_error(run_cli("caption", photo, "--model", str(cut), "--mmproj", str(mmproj)), str(cut), "truncated")


@pytest.mark.parametrize(
    "args",
    [
        ["caption"],
        ["caption", "x.jpg", "--model", "nope.gguf", "--mmproj", "p", "--temperature", "-1"],
        ["caption", "x.jpg", "--model", "m", "--mmproj", "p", "--gpu-layers", "lots"],
        ["caption", "x.jpg", "--model", "m", "--mmproj", "p", "--prompt", "a", "--preset", "short"],
        ["caption", "x.jpg", "--model", "m", "--mmproj", "p", "--preset", "nope"],
        ["caption", "x.jpg", "--model", "m", "--mmproj", "p", "--max-tokens", "0"],
        ["frobnicate"],
    ],
)
def test_usage_errors_exit_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from caprl_local import cli

    assert cli.main(args) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Usage" in err and out == ""


def test_info_works_without_a_gpu() -> None:
    result = run_cli("info")
    assert result.returncode == 0, result.stderr
    assert "llama-cpp-python" in result.stdout and "GPU offload" in result.stdout
    data = json.loads(run_cli("info", "--json").stdout)
    assert data["llama_cpp_python_version"] == "0.3.36"
    assert isinstance(data["gpu_offload"], bool) and data["devices"]


def test_version_and_help() -> None:
    from caprl_local import __version__

    assert __version__ in run_cli("--version").stdout
    for flag in ("-h", "--help"):
        result = run_cli(flag)
        assert result.returncode == 0 and "caption" in result.stdout and "info" in result.stdout
    result = run_cli("caption", "-h")
    assert "--max-image-tokens" in result.stdout and "--gpu-layers" in result.stdout


def test_ctrl_c_exits_130_without_a_traceback(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                              model_args: list[str], images: Path) -> None:
    from caprl_local import cli
    from caprl_local.engine import Captioner

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Captioner, "caption", interrupted)
    assert cli.main(["caption", str(images / "photo.jpg"), *model_args]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "Interrupted." and "Traceback" not in err


def test_error_table_puts_subclasses_before_their_bases() -> None:
    """The first matching row wins: Cancelled (a CaprlError) must come before CaprlError."""
    from caprl_local.cli import ERROR_TABLE, EXIT_INTERRUPTED

    types = [row[0] for row in ERROR_TABLE]
    for i, earlier in enumerate(types):
        for later in types[i + 1:]:
            assert not issubclass(later, earlier), f"{later.__name__} is shadowed by {earlier.__name__}"
    codes = {row[0]: row[1] for row in ERROR_TABLE}
    from caprl_local import Cancelled

    assert codes[Cancelled] == codes[KeyboardInterrupt] == EXIT_INTERRUPTED


def test_caprl_debug_shows_the_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    from caprl_local import cli

    args = ["caption", str(tmp_path / "x.jpg"), "--model", str(tmp_path / "m.gguf"), "--mmproj", str(tmp_path / "p.gguf")]
    assert cli.main(args) == 1
    assert "Traceback" not in capsys.readouterr().err
    monkeypatch.setenv("CAPRL_DEBUG", "1")
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and "Traceback" in err and "caprl_local.llama" not in err
