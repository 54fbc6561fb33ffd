"""Batch captioning through the CLI in a subprocess and through caption_many, on the tiny model."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import HANG_S, run_cli

from caprl_local import Caption, Captioner, CaptionFailure


@pytest.fixture(scope="module")
def model_args(tiny_model: tuple[Path, Path]) -> list[str]:
    model, mmproj = tiny_model
    return ["--model", str(model), "--mmproj", str(mmproj), "--threads", "1", "--max-tokens", "12"]


@pytest.fixture()
def folder(images: Path, tmp_path: Path) -> Path:
    """A copy of the test images, good and broken, in a folder of its own."""
    out = tmp_path / "photos"
    shutil.copytree(images, out)
    return out


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_folder_to_jsonl_marks_errors_and_exits_1(model_args: list[str], folder: Path) -> None:
    result = run_cli("caption", str(folder), *model_args, "--format", "jsonl")
    assert result.returncode == 1
    records = jsonl(result.stdout)
    paths = [r["path"] for r in records]
    assert paths == sorted(str(p) for p in folder.iterdir())  # one line per image, in order
    failed = {Path(r["path"]).name for r in records if "error" in r}
    assert failed == {"truncated.jpg", "text.jpg", "empty.jpg", "bomb.png"}
    good = [r for r in records if "caption" in r]
    assert all(r["caption"] and r["image_tokens"] > 0 and r["timings"]["total_s"] > 0 for r in good)
    assert all(r["prompt"] == "Please describe this image in detail" and r["model"] for r in records)
    assert sum(line.startswith("Error: ") for line in result.stderr.splitlines()) == 4
    assert "Captioned 9 of 13 images (0 skipped, 4 failed)" in result.stderr
    assert "\r" not in result.stderr and "[#" not in result.stderr  # no progress bar off a terminal


def test_sidecars_and_resume(model_args: list[str], folder: Path) -> None:
    first = run_cli("caption", str(folder), *model_args, "--sidecar", "--sidecar-ext", ".caption")
    assert first.returncode == 1  # the broken images
    assert first.stdout == ""  # sidecars only
    assert (folder / "photo.caption").read_text().strip()
    assert not (folder / "truncated.caption").exists()
    hidden = [p.name for p in folder.iterdir() if p.name.startswith(".")]
    assert hidden == [".caprl-local-sidecars.jsonl"]  # no temporary files left, only the prompts' index
    again = run_cli("caption", str(folder), *model_args, "--sidecar", "--sidecar-ext", ".caption", "--progress")
    assert "9 skipped" in again.stderr and "images" in again.stderr
    before = (folder / "photo.caption").stat().st_mtime_ns
    run_cli("caption", str(folder / "photo.jpg"), *model_args, "--sidecar", "--sidecar-ext", ".caption", "--overwrite")
    assert (folder / "photo.caption").stat().st_mtime_ns > before


def test_sidecars_written_for_another_prompt_are_redone(model_args: list[str], images: Path, tmp_path: Path) -> None:
    for name in ("photo.jpg", "alpha.png"):
        shutil.copy(images / name, tmp_path / name)
    (tmp_path / "mine.jpg").write_bytes((images / "cmyk.jpg").read_bytes())
    (tmp_path / "mine.txt").write_text("written by hand\n")  # not ours: left alone
    args = ["caption", str(tmp_path), *model_args, "--sidecar"]
    assert run_cli(*args).returncode == 0
    assert "Nothing to do" in run_cli(*args).stderr
    short = run_cli(*args, "--preset", "short")
    assert short.returncode == 0 and "Captioned 2 of 3 images (1 skipped" in short.stderr
    assert "another prompt" in short.stderr
    index = jsonl((tmp_path / ".caprl-local-sidecars.jsonl").read_text())
    assert [r["sidecar"] for r in index] == ["alpha.txt", "photo.txt"] * 2 and index[0]["prompt"] != index[2]["prompt"]
    assert (tmp_path / "mine.txt").read_text() == "written by hand\n"
    assert "Nothing to do" in run_cli(*args, "--preset", "short").stderr


def test_interrupted_run_resumes_with_one_result_per_image(model_args: list[str], images: Path, tmp_path: Path) -> None:
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(40):
        shutil.copy(images / ("photo.jpg" if i % 2 else "cmyk.jpg"), folder / f"img{i:02d}.jpg")
    out = tmp_path / "captions.jsonl"
    args = [sys.executable, "-m", "caprl_local", "caption", str(folder), *model_args, "--max-tokens", "200", "--no-loop-guard",
            "--format", "jsonl", "--output", str(out), "--sidecar"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + HANG_S  # no test measures time: wait for the work, however slow
    while time.monotonic() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 3):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=HANG_S)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "Interrupted: " in err  # each image counted: captioned, failed, not finished
    assert err.rstrip().splitlines()[-1].startswith("Interrupted: ") and "\n\n" not in err  # the summary ends it
    done = jsonl(out.read_text())
    assert 3 <= len(done) < 40
    assert out.read_text().endswith("\n")  # no half-written line
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]  # no half-written sidecar
    finish = subprocess.run(args, capture_output=True, text=True, timeout=HANG_S)
    assert finish.returncode == 0, finish.stderr
    records = jsonl(out.read_text())
    assert sorted(r["path"] for r in records) == sorted(str(p) for p in folder.glob("*.jpg"))  # each exactly once
    assert len({p.stem for p in folder.glob("*.txt")}) == 40
    assert f"{len(done)} skipped" in finish.stderr


def test_failed_images_are_retried_and_their_last_record_counts(model_args: list[str], folder: Path,
                                                                images: Path) -> None:
    out = folder.parent / "out.jsonl"
    run_cli("caption", str(folder), *model_args, "--format", "jsonl", "-o", str(out))
    first = out.read_bytes()
    shutil.copy(images / "photo.jpg", folder / "truncated.jpg")  # repaired
    second = run_cli("caption", str(folder), *model_args, "--format", "jsonl", "-o", str(out))
    assert out.read_bytes().startswith(first)  # appended to, never rewritten
    records = jsonl(out.read_text())
    assert len(records) == 13 + 4  # the four failures tried again, each a new record after its old one
    last = {r["path"]: r for r in records}
    assert len(last) == 13 and "caption" in last[str(folder / "truncated.jpg")]
    captions = [r["path"] for r in records if "caption" in r]
    assert len(captions) == len(set(captions)) == 10  # each image captioned once
    assert "9 skipped" in second.stderr
    nothing = run_cli("caption", str(folder / "photo.jpg"), *model_args, "--format", "jsonl", "-o", str(out))
    assert nothing.returncode == 0 and "Nothing to do" in nothing.stderr


def test_list_from_stdin(model_args: list[str], images: Path) -> None:
    listing = f"{images / 'photo.jpg'}\n\n# a comment\n{images / 'alpha.png'}\n"
    result = run_cli("caption", "--from-list", "-", *model_args, "--format", "jsonl", input=listing)
    assert result.returncode == 0, result.stderr
    assert [Path(r["path"]).name for r in jsonl(result.stdout)] == ["photo.jpg", "alpha.png"]


def test_jsonl_input_keeps_its_fields(model_args: list[str], images: Path, tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    shutil.copy(images / "photo.jpg", tmp_path / "imgs" / "a.jpg")
    dataset = tmp_path / "dataset.jsonl"
    dataset.write_text(
        json.dumps({"id": 7, "image": "imgs/a.jpg", "source": "web"}) + "\n"
        + json.dumps({"id": 8, "image": "imgs/missing.jpg"}) + "\n"
    )
    result = run_cli("caption", "--from-list", str(dataset), *model_args, "--format", "jsonl")
    assert result.returncode == 1
    first, second = jsonl(result.stdout)
    assert first["id"] == 7 and first["source"] == "web" and first["image"] == "imgs/a.jpg" and first["caption"]
    assert first["path"] == str(tmp_path / "imgs" / "a.jpg")  # relative to the list's folder
    assert second["id"] == 8 and "no such file" in second["error"]


def test_globs_recursion_and_text_output(model_args: list[str], images: Path, tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / ".hidden").mkdir()
    for target in ("a/one.jpg", "a/b/two.png", "a/.hidden/three.jpg", "a/notes.txt"):
        shutil.copy(images / "photo.jpg", tmp_path / target)
    flat = run_cli("caption", str(tmp_path / "a"), *model_args)
    assert flat.stdout.count("==> ") == 0 and flat.stdout.strip()  # one image: its caption alone, as for a file
    deep = run_cli("caption", str(tmp_path / "a"), "-r", *model_args, "-o", str(tmp_path / "out.txt"))
    assert deep.returncode == 0 and deep.stdout == ""
    text = (tmp_path / "out.txt").read_text()
    assert f"==> {tmp_path / 'a' / 'b' / 'two.png'} <==" in text and "three" not in text
    again = run_cli("caption", str(tmp_path / "a"), "-r", *model_args, "-o", str(tmp_path / "out.txt"))
    assert "Nothing to do" in again.stderr and (tmp_path / "out.txt").read_text() == text  # resumed, not doubled
    pattern = run_cli("caption", str(tmp_path / "a" / "**" / "*.png"), *model_args, "--format", "jsonl")
    assert [Path(r["path"]).name for r in jsonl(pattern.stdout)] == ["two.png"]


def test_caption_many_in_order_with_failures_and_progress(captioner: Captioner, images: Path) -> None:
    names = ["photo.jpg", "missing.jpg", "alpha.png", "truncated.jpg", "pixel.png", "cmyk.jpg", "photo.jpg"]
    seen: list[tuple[int, int | None]] = []
    results = list(captioner.caption_many([images / n for n in names], max_tokens=8,
                                          progress=lambda d, t: seen.append((d, t))))
    assert [type(r) for r in results] == [Caption, CaptionFailure, Caption, CaptionFailure, Caption, Caption, Caption]
    assert results[1].kind == "ImageError" and "missing.jpg" in results[1].error
    assert [r.image for r in results] == [str(images / n) for n in names]
    single = {n: captioner.caption(images / n, max_tokens=8).text for n in ("photo.jpg", "alpha.png", "cmyk.jpg")}
    assert results[0].text == results[6].text == single["photo.jpg"]
    assert results[2].text == single["alpha.png"] and results[5].text == single["cmyk.jpg"]
    assert seen == [(i, 7) for i in range(1, 8)]
    assert [r.text for r in captioner.caption_many(iter([images / "photo.jpg"]), max_tokens=8)] == [single["photo.jpg"]]


def test_unwritable_outputs_are_one_line_errors(model_args: list[str], images: Path, tmp_path: Path) -> None:
    missing_dir = tmp_path / "nope" / "out.jsonl"
    result = run_cli("caption", str(images / "photo.jpg"), str(images / "cmyk.jpg"), *model_args,
                     "--format", "jsonl", "-o", str(missing_dir))
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith("Error: ")
    assert str(missing_dir) in result.stderr and "Traceback" not in result.stderr


def test_file_names_with_unicode_line_breaks_resume(tmp_path: Path) -> None:
    """U+0085 and U+2028 are line breaks to str.splitlines: a JSONL line holding one must still count as one."""
    from caprl_local.inputs import BatchItem, read_list
    from caprl_local.outputs import JsonlOutput

    names = ["caf\u0085e.jpg", "line\u2028sep.png", "plain.jpg"]
    out = tmp_path / "out.jsonl"
    first = JsonlOutput(str(out))
    for name in names:
        first.write(BatchItem(str(tmp_path / name)), {"path": str(tmp_path / name), "caption": "x", "prompt": "p"})
    first.close()
    again = JsonlOutput(str(out))
    assert all(again.has(BatchItem(str(tmp_path / name)), "p") for name in names)
    again.close()
    assert len(out.read_text(encoding="utf-8").split("\n")) == 4  # kept whole, nothing rewritten or dropped
    listed = read_list("\n".join(names) + "\n", tmp_path, "list")
    assert [Path(i.path).name for i in listed] == names


@pytest.mark.parametrize(("fmt", "room"), [("jsonl", 900), ("text", 250)])  # about one record's worth
def test_a_full_disk_is_one_line_and_loses_nothing(model_args: list[str], images: Path, tmp_path: Path,
                                                    fmt: str, room: int) -> None:
    """Writes fail part-way (a file size limit, as a full disk does): one clear line, only whole records
    kept, and the same command run again finishes with one record per image."""
    import resource

    def small_disk() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (room, room))

    out = tmp_path / f"out.{fmt}"
    args = [sys.executable, "-m", "caprl_local", "caption", *(str(images / n) for n in ("photo.jpg", "alpha.png", "cmyk.jpg")),
            *model_args, "--format", fmt, "--output", str(out)]
    full = subprocess.run(args, capture_output=True, text=True, timeout=HANG_S, preexec_fn=small_disk)
    lines = full.stderr.strip().splitlines()
    assert full.returncode == 1 and "Traceback" not in full.stderr and "unexpected" not in full.stderr, full.stderr
    assert lines[-1].startswith(f"Error: {out}: cannot write results")
    text = out.read_text()
    assert text == "" or text.endswith("\n")  # no record cut short
    again = subprocess.run(args, capture_output=True, text=True, timeout=HANG_S)
    assert again.returncode == 0, again.stderr
    final = out.read_text()
    if fmt == "jsonl":
        assert sorted(Path(r["path"]).name for r in jsonl(final)) == ["alpha.png", "cmyk.jpg", "photo.jpg"]
    else:
        assert sorted(Path(h).name for h in re.findall(r"^==> (.*) <==$", final, re.M)) == [
            "alpha.png", "cmyk.jpg", "photo.jpg"]


def test_one_output_file_has_one_writer(model_args: list[str], images: Path, tmp_path: Path) -> None:
    from filelock import FileLock

    out = tmp_path / "out.jsonl"
    args = ["caption", str(images / "photo.jpg"), str(images / "alpha.png"), *model_args, "--format", "jsonl", "-o", str(out)]
    with FileLock(tmp_path / ".out.jsonl.lock"):  # as a run writing the file holds it
        busy = run_cli(*args)
    assert busy.returncode == 1 and busy.stderr.strip().splitlines() == [
        f"Error: {out}: another caprl-local run is writing this file; wait for it to finish, "
        "or write to another file"]
    assert not out.exists()  # the second run touched nothing
    assert run_cli(*args).returncode == 0 and len(jsonl(out.read_text())) == 2


def test_images_that_would_share_a_sidecar_each_keep_their_caption(model_args: list[str], images: Path,
                                                                   tmp_path: Path) -> None:
    folder = tmp_path / "shots"
    folder.mkdir()
    shutil.copy(images / "photo.jpg", folder / "photo.jpg")
    shutil.copy(images / "alpha.png", folder / "photo.png")
    shutil.copy(images / "cmyk.jpg", folder / "other.jpg")
    first = run_cli("caption", str(folder), *model_args, "--sidecar")
    assert first.returncode == 0, first.stderr
    assert "Warning: photo.jpg, photo.png would all be captioned into photo.txt; writing photo.jpg.txt, " \
           "photo.png.txt instead" in first.stderr
    written = sorted(p.name for p in folder.glob("*.txt"))
    assert written == ["other.txt", "photo.jpg.txt", "photo.png.txt"]
    assert (folder / "photo.jpg.txt").read_text() != (folder / "photo.png.txt").read_text()
    again = run_cli("caption", str(folder), *model_args, "--sidecar")
    assert "Nothing to do" in again.stderr


def test_a_read_only_folder_is_one_line(model_args: list[str], images: Path, tmp_path: Path) -> None:
    """Sidecars and an output in a read-only folder: one clear line each, not an "unexpected" error.
    (Root ignores file modes, so the folder is mounted read-only in a mount namespace of its own.)"""
    if not shutil.which("unshare"):
        pytest.skip("needs unshare (util-linux) to mount a folder read-only")
    folder = tmp_path / "ro"
    folder.mkdir()
    shutil.copy(images / "photo.jpg", folder / "photo.jpg")
    caption = [sys.executable, "-m", "caprl_local", "caption", str(folder), *model_args]
    script = (f"mount --bind {folder} {folder} && mount -o remount,bind,ro {folder} || exit 99\n"
              f"{' '.join(caption)} --sidecar; echo \"exit $?\"\n"
              f"{' '.join(caption)} --format jsonl -o {folder / 'out.jsonl'}; echo \"exit $?\"\n")
    result = subprocess.run(["unshare", "-m", "bash", "-c", script], capture_output=True, text=True, timeout=HANG_S)
    if result.returncode == 99 or "unshare failed" in result.stderr or "Operation not permitted" in result.stderr:
        pytest.skip(f"cannot mount a read-only folder here: {result.stderr.strip()[:200]}")
    assert result.stdout.split() == ["exit", "1", "exit", "1"], result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"Error: {folder / 'photo.txt'}: cannot write results (Read-only file system); check the folder and free space, "
        "then run the same command again to continue",
        f"Error: {folder / 'out.jsonl'}: cannot write results (Read-only file system); check the folder and free space, "
        "then run the same command again to continue"], result.stderr


def test_captions_cut_short_for_repeating_are_counted(model_args: list[str], images: Path) -> None:
    args = ["caption", str(images / "photo.jpg"), str(images / "alpha.png"), *model_args, "--max-tokens", "300",
            "--format", "jsonl"]
    guarded = run_cli(*args)
    assert [json.loads(line)["finish_reason"] for line in guarded.stdout.splitlines()] == ["repetition"] * 2
    assert "(0 skipped, 0 failed, 2 cut short for repeating themselves)" in guarded.stderr
    free = run_cli(*args, "--no-loop-guard")
    assert [json.loads(line)["finish_reason"] for line in free.stdout.splitlines()] == ["length"] * 2
