"""`caprl-local caption` as users of Unix tools, llama.cpp and dataset tools expect it: a closed stdout,
NUL-separated lists, `-` for stdin and stdout, llama.cpp's flag names, and a dataset's own fields."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
from helpers import HANG_S, run_cli

from caprl_local import Captioner


@pytest.fixture(scope="module")
def model_args(tiny_model: tuple[Path, Path]) -> list[str]:
    model, mmproj = tiny_model
    return ["--model", str(model), "--mmproj", str(mmproj), "--threads", "1", "--max-tokens", "6"]


@pytest.fixture(scope="module")
def folder(images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six good images, two of them with names a line-based list cannot hold."""
    out = tmp_path_factory.mktemp("folder")
    for n, name in enumerate(["a.jpg", "b c.jpg", "line\nbreak.jpg", " lead.jpg", "#hash.png", "f.jpg"]):
        shutil.copy(images / ("photo.jpg" if n % 2 == 0 else "alpha.png"), out / name)
    return out


def _jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "caprl_local", *args]


# --- a closed stdout ---------------------------------------------------------------------------------------


def _closed_early(args: list[str], *, read: int, cwd: Path | None = None) -> tuple[int, bytes, bytes]:
    """Run the CLI with stdout a pipe that is closed after `read` bytes (0: before anything is written)."""
    proc = subprocess.Popen(_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            cwd=cwd)
    assert proc.stdout is not None and proc.stderr is not None
    got = proc.stdout.read(read) if read else b""
    proc.stdout.close()  # the reader goes away, as `head` does
    err = proc.stderr.read()
    return proc.wait(timeout=HANG_S), got, err


@pytest.mark.parametrize("read", [0, 3])
def test_a_closed_stdout_ends_a_batch_quietly(model_args: list[str], folder: Path, read: int) -> None:
    code, got, err = _closed_early(["caption", str(folder), *model_args, "--parallel", "1"], read=read)
    assert (code, err) == (0, b""), err.decode()
    assert len(got) == read


def test_a_closed_stdout_ends_one_caption_quietly(model_args: list[str], images: Path) -> None:
    code, _, err = _closed_early(["caption", str(images / "photo.jpg"), *model_args], read=0)
    assert (code, err) == (0, b""), err.decode()


def test_a_closed_stdout_keeps_the_sidecars_written(model_args: list[str], images: Path, tmp_path: Path) -> None:
    for name in ("one.jpg", "two.jpg", "three.jpg"):
        shutil.copy(images / "photo.jpg", tmp_path / name)
    code, _, err = _closed_early(["caption", str(tmp_path), *model_args, "--parallel", "1", "--sidecar",
                                  "--format", "jsonl"], read=0)
    assert (code, err) == (0, b""), err.decode()
    # The first result reached its sidecar before stdout failed; it is whole, and a rerun skips it.
    assert (tmp_path / "one.txt").read_text().strip()
    again = run_cli("caption", str(tmp_path), *model_args, "--sidecar", "--format", "jsonl", "--quiet")
    assert again.returncode == 0, again.stderr
    assert all((tmp_path / f"{name}.txt").exists() for name in ("one", "two", "three"))


def test_piped_into_head(model_args: list[str], folder: Path) -> None:
    head = shutil.which("head")
    if head is None:
        pytest.skip("no head")
    with subprocess.Popen([head, "-n", "1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE) as reader:
        writer = subprocess.Popen(_command("caption", str(folder), *model_args, "--json", "--parallel", "1"),
                                  stdout=reader.stdin, stderr=subprocess.PIPE)
        assert reader.stdin is not None and reader.stdout is not None and writer.stderr is not None
        reader.stdin.close()  # only the two of them hold the pipe
        first = reader.stdout.read()
        err = writer.stderr.read()
        assert (writer.wait(timeout=HANG_S), err) == (0, b""), err.decode()
    assert len(_jsonl(first.decode())) == 1


# --- NUL-separated lists -----------------------------------------------------------------------------------


def test_null_separated_lists_from_stdin_and_files(model_args: list[str], folder: Path, tmp_path: Path) -> None:
    names = sorted(str(p) for p in folder.iterdir())
    listed = b"".join(os.fsencode(n) + b"\0" for n in names)
    piped = subprocess.run(_command("caption", "--from-list", "-", "-0", *model_args, "--format", "jsonl"),
                           input=listed, capture_output=True, timeout=HANG_S)
    assert piped.returncode == 0, piped.stderr.decode()
    records = _jsonl(piped.stdout.decode())
    assert sorted(r["path"] for r in records) == names and all(r["caption"] for r in records)
    (tmp_path / "list0").write_bytes(listed[:-1])  # the last path may lack its NUL
    from_file = run_cli("caption", "--from-list", str(tmp_path / "list0"), "--null", *model_args, "--json")
    assert from_file.returncode == 0, from_file.stderr
    assert sorted(r["path"] for r in _jsonl(from_file.stdout)) == names


@pytest.mark.parametrize("size", ["small", "large"])
def test_a_null_separated_list_without_the_flag_says_so(model_args: list[str], folder: Path, tmp_path: Path,
                                                        size: str) -> None:
    names = [str(p) for p in folder.iterdir()] * (1 if size == "small" else 20000)  # large: over 1 MB, no line break
    listed = b"".join(os.fsencode(n) + b"\0" for n in names)
    (tmp_path / "list0").write_bytes(listed)
    for source, stdin in ((str(tmp_path / "list0"), None), ("-", listed)):
        result = subprocess.run(_command("caption", "--from-list", source, *model_args), input=stdin,
                                capture_output=True, timeout=HANG_S)
        lines = result.stderr.decode().strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1, result.stderr
        assert lines[0].startswith("Error: ") and "NUL" in lines[0] and "-0" in lines[0]


def test_binary_data_as_a_list_is_no_null_separated_list(model_args: list[str], images: Path) -> None:
    result = run_cli("caption", "--from-list", str(images / "photo.jpg"), *model_args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and "no text" in lines[0] and "-0" not in lines[0], result.stderr


def test_null_needs_a_list(model_args: list[str], images: Path) -> None:
    result = run_cli("caption", str(images / "photo.jpg"), "-0", *model_args)
    assert result.returncode == 2 and "--from-list" in result.stderr


def test_null_entries_are_taken_as_they_are(tmp_path: Path) -> None:
    import io

    from caprl_local.inputs import collect_inputs

    raw = b"{not json}\0#not a comment\0 spaced \0\0last"
    items = collect_inputs([], list_file="-", stdin=io.TextIOWrapper(io.BytesIO(raw)), null=True)
    assert [i.path for i in items] == ["{not json}", "#not a comment", " spaced ", "last"]
    text = io.StringIO("a\0b\0")  # a text stream with no bytes beneath it
    assert [i.path for i in collect_inputs([], list_file="-", stdin=text, null=True)] == ["a", "b"]


# --- '-' for stdin and stdout ------------------------------------------------------------------------------


def test_dash_is_stdin_and_stdout(model_args: list[str], images: Path, tmp_path: Path) -> None:
    data = (images / "photo.jpg").read_bytes()
    for fmt in (["--format", "jsonl"], ["--json", "-o", "-"]):
        result = subprocess.run(_command("caption", "-", *model_args, *fmt), input=data, capture_output=True,
                                timeout=HANG_S, cwd=tmp_path)
        assert result.returncode == 0, result.stderr.decode()
        (record,) = _jsonl(result.stdout.decode())
        assert record["path"] == "<stdin>" and record["caption"] and record["finish_reason"]
    assert not (tmp_path / "-").exists()
    broken = subprocess.run(_command("caption", "-", *model_args, "--json"), input=b"not an image at all",
                            capture_output=True, timeout=HANG_S)
    (record,) = _jsonl(broken.stdout.decode())
    assert broken.returncode == 1 and record["path"] == "<stdin>" and record["error"] and "caption" not in record
    assert len(broken.stderr.decode().strip().splitlines()) == 1
    alone = run_cli("caption", "-", "--json", "-o", str(tmp_path / "out.jsonl"), *model_args)
    assert alone.returncode == 2 and "goes alone" in alone.stderr


# --- llama.cpp's flag names --------------------------------------------------------------------------------


def _params(command: click.Command, *args: str) -> dict:
    with command.make_context(command.name or "", list(args)) as ctx:
        return ctx.params


def test_llama_cpp_flag_names_parse_as_theirs() -> None:
    from caprl_local.cli import caption
    from caprl_local.cli.serve import serve

    params = _params(caption, "x.jpg", "-ngl", "0", "-c", "1024", "--temp", "0.4", "-s", "7", "--image", "y.jpg",
                     "--image", "z.jpg", "--json")
    assert (params["gpu_layers"], params["n_ctx"], params["temperature"], params["seed"]) == (0, 1024, 0.4, 7)
    assert params["extra_images"] == ("y.jpg", "z.jpg") and params["as_json"]
    assert params["max_tokens"] == 2048  # -ngl is not -n gl
    assert _params(caption, "x.jpg", "-ngl=12", "--ctx-size", "512")["gpu_layers"] == 12
    assert _params(caption, "x.jpg", "--n-gpu-layers", "-1", "-n", "9")["gpu_layers"] == -1
    assert _params(caption, "x.jpg", "-n9")["max_tokens"] == 9  # -n still clusters as before
    assert _params(serve, "-ngl", "3", "-c", "2048")["n_ctx"] == 2048
    for wrong in (["-c", "100"], ["--top-k", "40"]):  # too small a context; top-k is no option of the engine
        with pytest.raises(click.UsageError):
            _params(caption, "x.jpg", *wrong)


def test_llama_cpp_flag_names_work(tiny_model: tuple[Path, Path], images: Path, captioner: Captioner) -> None:
    model, mmproj = tiny_model
    expected = captioner.caption(images / "photo.jpg", max_tokens=6).text
    result = run_cli("caption", "-m", str(model), "--mmproj", str(mmproj), "-t", "1", "-n", "6", "-ngl", "0",
                     "-c", "2048", "--temp", "0", "-s", "3", "--image", str(images / "photo.jpg"), "--json")
    assert result.returncode == 0, result.stderr
    (record,) = _jsonl(result.stdout)
    assert record["caption"] == expected
    clash = run_cli("caption", str(images / "photo.jpg"), "--json", "--format", "text", "-m", str(model))
    assert clash.returncode == 2 and "--json" in clash.stderr


# --- a dataset's own fields --------------------------------------------------------------------------------


def _dataset(path: Path, images: Path, field: str = "caption") -> Path:
    rows = [{"image": str(images / "photo.jpg"), "id": 1, field: "a person's caption"},
            {"image": str(images / "alpha.png"), "id": 2, field: "another"},
            {"image": str(images / "missing.jpg"), "id": 3, field: "of no image"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("field", ["caption", "alt_text"])
def test_a_list_field_is_never_replaced_by_the_caption(images: Path, tmp_path: Path, field: str) -> None:
    listing = _dataset(tmp_path / "ds.jsonl", images, field)
    args = ["--from-list", str(listing), "--format", "jsonl", "--model", str(tmp_path / "no-such-model.gguf")]
    if field != "caption":
        args += ["--caption-field", field]
    result = run_cli("caption", *args)  # refused before any model is looked for
    assert result.returncode == 2, result.stderr
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert f'"{field}"' in error and "--caption-field" in error and str(listing) in error


def test_a_named_caption_field_keeps_the_list_and_resumes(model_args: list[str], images: Path, tmp_path: Path) -> None:
    listing = _dataset(tmp_path / "ds.jsonl", images)
    out = tmp_path / "out.jsonl"
    first = run_cli("caption", "--from-list", str(listing), *model_args, "--json", "--caption-field", "generated",
                    "-o", str(out))
    assert first.returncode == 1, first.stderr  # the missing image
    records = _jsonl(out.read_text())
    assert [r["caption"] for r in records] == ["a person's caption", "another", "of no image"]
    assert records[0]["generated"] and records[1]["generated"] and "generated" not in records[2]
    assert "no such file" in records[2]["error"]
    again = run_cli("caption", "--from-list", str(listing), *model_args, "--json", "--caption-field", "generated",
                    "-o", str(out))
    assert again.returncode == 1, again.stderr
    # Done images are skipped; the failed one is tried again, its new record appended.
    assert [r["id"] for r in _jsonl(out.read_text())] == [1, 2, 3, 3]
    # The same file resumed for another field: ours, not done for it, and not refused as another tool's.
    other = run_cli("caption", "--from-list", str(listing), *model_args, "--json", "--caption-field", "short",
                    "-o", str(out))
    assert other.returncode == 1 and "not a caprl-local result" not in other.stderr, other.stderr
    assert sum("short" in r for r in _jsonl(out.read_text())) == 2


def test_text_and_sidecars_hold_the_new_caption_only(model_args: list[str], images: Path, tmp_path: Path,
                                                     captioner: Captioner) -> None:
    for name in ("p.jpg", "q.jpg"):
        shutil.copy(images / "photo.jpg", tmp_path / name)
    (tmp_path / "bad.jpg").write_text("not an image")
    rows = [{"image": name, "caption": f"old {name}"} for name in ("p.jpg", "q.jpg", "bad.jpg")]
    listing = tmp_path / "ds.jsonl"
    listing.write_text("".join(json.dumps(r) + "\n" for r in rows))
    expected = captioner.caption(images / "photo.jpg", max_tokens=6).text
    for field in ("caption", "mine"):
        text = run_cli("caption", "--from-list", str(listing), *model_args, "--caption-field", field, "--sidecar",
                       "--overwrite", "--parallel", "1", "-o", str(tmp_path / f"{field}.txt"))
        assert text.returncode == 1, text.stderr  # bad.jpg
        written = (tmp_path / f"{field}.txt").read_text()
        assert "old " not in written and expected in written
        assert (tmp_path / "p.txt").read_text() == expected + "\n" and not (tmp_path / "bad.txt").exists()


def test_caption_field_must_be_a_free_name(model_args: list[str], images: Path) -> None:
    for name in ("path", "error", ""):
        result = run_cli("caption", str(images / "photo.jpg"), *model_args, "--caption-field", name)
        assert result.returncode == 2 and "--caption-field" in result.stderr, result.stderr


# --- help --------------------------------------------------------------------------------------------------


def test_every_option_has_help() -> None:
    from caprl_local.cli import caption

    assert all(p.help for p in caption.params if isinstance(p, click.Option)), \
        [p.name for p in caption.params if isinstance(p, click.Option) and not p.help]
    shown = run_cli("caption", "--help")
    assert shown.returncode == 0
    for flag in ("-ngl, --gpu-layers, --n-gpu-layers", "-c, --ctx-size", "--temperature, --temp", "-s, --seed",
                 "--image FILE", "-0, --null", "--json", "--caption-field NAME"):
        assert flag in shown.stdout, flag
    assert "--top-k" not in shown.stdout
