"""The caprl-local command in a subprocess, through the real llama.cpp: output, errors, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import BAD_IMAGE_ERRORS, HANG_S, load_script, run_cli, run_on_a_terminal

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
    code, shown = run_on_a_terminal(["caption", str(images / "alpha.png"), *model_args], stderr_too=False)
    assert code == 0
    assert shown.replace("\r\n", "\n") == piped.stdout


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


def test_a_folder_without_images(model_args: list[str], tmp_path: Path, images: Path) -> None:
    _one_line_error(run_cli("caption", str(tmp_path), *model_args), str(tmp_path), "no images in this folder")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.png").write_bytes((images / "alpha.png").read_bytes())
    _one_line_error(run_cli("caption", str(tmp_path), *model_args), "only in its sub-folders")
    _one_line_error(run_cli("caption", str(tmp_path / "*.jpg"), *model_args), "*.jpg: no file matches this pattern")


def test_a_mistyped_image_is_noticed_before_any_download(model_args: list[str], tmp_path: Path) -> None:
    """The model named does not exist anywhere: only the image check can have answered."""
    result = run_cli("caption", str(tmp_path / "photo.jgp"), "--model", "owner/no-such-repo")
    _one_line_error(result, f"{tmp_path / 'photo.jgp'}: no such file or folder")


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


def test_conventions_short_flags_version_and_stdin(model_args: list[str], images: Path, tiny_model: tuple[Path, Path],
                                                  captioner: Captioner) -> None:
    """-m -p -n -t as llama.cpp and llm spell them, -V, and - for an image on stdin."""
    model, mmproj = tiny_model
    expected = captioner.caption(images / "photo.jpg", max_tokens=9, prompt="<image>Describe it.").text
    short = run_cli("caption", str(images / "photo.jpg"), "-m", str(model), "--mmproj", str(mmproj), "-t", "1",
                    "-n", "9", "-p", "<image>Describe it.")
    assert short.returncode == 0 and short.stdout == expected + "\n", short.stderr
    piped = subprocess.run([sys.executable, "-m", "caprl_local", "caption", "-", "-m", str(model), "--mmproj",
                            str(mmproj), "-t", "1", "-n", "9", "-p", "<image>Describe it."],
                           input=(images / "photo.jpg").read_bytes(), capture_output=True, timeout=HANG_S)
    assert piped.returncode == 0 and piped.stdout.decode() == expected + "\n", piped.stderr
    from caprl_local import __version__

    assert run_cli("-V").stdout.strip().endswith(__version__)
    mixed = run_cli("caption", "-", str(images / "photo.jpg"), *model_args)
    assert mixed.returncode == 2 and "goes alone" in mixed.stderr


def test_options_that_do_nothing_say_so(model_args: list[str], images: Path) -> None:
    from caprl_local.engine import runtime_info

    result = run_cli("caption", str(images / "photo.jpg"), *model_args, "--quant", "Q8_0", "--imatrix")
    assert result.returncode == 0
    assert "Warning: --quant, --imatrix have no effect with a .gguf file as --model" in result.stderr
    if not runtime_info().gpu_offload:
        gpu = run_cli("caption", str(images / "photo.jpg"), *model_args, "--gpu-layers", "99")
        assert gpu.returncode == 0 and "gpu_layers=99 has no effect" in gpu.stderr


def test_help_tells_the_truth() -> None:
    top = run_cli("--help").stdout
    assert "bench" not in top  # a source checkout's tool, documented in the README
    helped = " ".join(run_cli("caption", "--help").stdout.split())
    assert "f16 (default)" not in helped and "[default: the model's" in helped
    assert "up to 8" not in helped and "-m, --model" in helped and "-n, --max-tokens" in helped


def test_stdin_lists_keep_their_paths_as_given(model_args: list[str], images: Path) -> None:
    result = run_cli("caption", "--from-list", "-", *model_args, "--format", "jsonl", input="photo.jpg\nalpha.png\n",
                     cwd=images)
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["path"] for line in result.stdout.splitlines()] == ["photo.jpg", "alpha.png"]


def test_a_file_output_of_one_image_holds_what_stdout_would(model_args: list[str], images: Path, tmp_path: Path) -> None:
    shown = run_cli("caption", str(images / "photo.jpg"), *model_args)
    for _ in range(2):  # and a second run replaces it, as `> x.txt` would
        assert run_cli("caption", str(images / "photo.jpg"), *model_args, "-o", str(tmp_path / "x.txt")).returncode == 0
        assert (tmp_path / "x.txt").read_text() == shown.stdout
