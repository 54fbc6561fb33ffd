"""Batch outputs never lose or mangle a user's data: files that are not ours, devices, FIFOs and
symlinks, names that are not UTF-8 or are as long as a file system allows, names with line breaks,
and a cut sidecar index. Runs the real outputs with the tiny model."""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from helpers import HANG_S, run_cli

from caprl_local import Captioner
from caprl_local.batch import BatchSummary, OutputOptions, caption_batch
from caprl_local.errors import CaprlError
from caprl_local.inputs import BatchItem, collect_inputs
from caprl_local.options import GenerationOptions
from caprl_local.outputs import JsonlOutput, TextOutput, open_outputs, write_atomic

PROMPT = "Please describe this image in detail"
INDEX = ".caprl-local-sidecars.jsonl"


def run(captioner: Captioner, items: list[BatchItem], prompt: str = PROMPT, **options: Any) -> BatchSummary | None:
    """Caption the items not yet done into the outputs named by `options`, as the CLI's batch does."""
    return caption_batch(captioner, items, outputs=OutputOptions(**options), stream=io.StringIO(),
                         generation=GenerationOptions(prompt=prompt, max_tokens=3))


def copies(images: Path, folder: Path, names: list[str | bytes], source: str = "pixel.png") -> list[BatchItem]:
    """Copies of one test image under the given names (bytes: not necessarily UTF-8)."""
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for name in names:
        path = os.fsdecode(os.path.join(os.fsencode(folder), os.fsencode(name)))
        shutil.copy(images / source, path)
        items.append(BatchItem(path))
    return items


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().decode("utf-8").splitlines() if line.strip()]


# --- files that are not ours -----------------------------------------------------------------------------

OUR_LINE = json.dumps({"path": "/data/a.jpg", "caption": "a cat", "prompt": PROMPT}) + "\n"
NOT_OURS = {
    "notes": "# My notes\n\nWritten by hand, no JSON at all.\n",
    "other tool": '{"image": "a.jpg", "label": "cat"}\n{"image": "b.jpg", "label": "dog"}\n',
    "one bad line": OUR_LINE + "garbage in the middle\n" + OUR_LINE.replace("a.jpg", "b.jpg"),
    "an array": OUR_LINE + '["path", "caption"]\n',
    "no newline": OUR_LINE + '{"id": 3, "image": "c.jpg"}',
    "binary": "\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
}


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("content", list(NOT_OURS), ids=list(NOT_OURS))
def test_a_jsonl_output_holding_other_data_is_refused_and_left_alone(tmp_path: Path, content: str,
                                                                     overwrite: bool) -> None:
    out = tmp_path / "notes.md"
    out.write_bytes(NOT_OURS[content].encode("utf-8", "surrogateescape"))
    before = out.read_bytes()
    with pytest.raises(CaprlError) as caught:
        open_outputs(OutputOptions(format="jsonl", path=str(out), overwrite=overwrite), stream=io.StringIO(),
                     items=[BatchItem(str(tmp_path / "x.jpg")), BatchItem(str(tmp_path / "y.jpg"))])
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{out}: line ") and "another file" in message
    assert out.read_bytes() == before
    assert os.listdir(tmp_path) == ["notes.md"]  # not even a lock file is left beside it


def test_failed_lines_stay_and_only_a_record_cut_by_a_crash_is_dropped(tmp_path: Path) -> None:
    caption = b'{"path": "/data/caf\xff.jpg", "caption": "raw bytes from another run", "prompt": "p"}\n'
    other_prompt = b'{"id": 1, "path": "/data/b.jpg", "caption": "b", "prompt": "q"}\n'
    failed = json.dumps({"path": "/data/c.jpg", "error": "c.jpg: truncated", "error_kind": "ImageError"}).encode()
    out = tmp_path / "out.jsonl"
    out.write_bytes(caption + b"\n" + failed + b"\n" + other_prompt + b'{"path": "/data/d.jpg", "capt')
    output = JsonlOutput(str(out))
    try:
        assert output.has(BatchItem(os.fsdecode(b"/data/caf\xff.jpg")), "p")
        assert output.has(BatchItem("/data/b.jpg"), "q") and not output.has(BatchItem("/data/b.jpg"), "p")
        assert not output.has(BatchItem("/data/c.jpg"), "")
    finally:
        output.close()
    # byte for byte, blank line and all: the failed line stays (a later caption is appended after it)
    assert out.read_bytes() == caption + b"\n" + failed + b"\n" + other_prompt


def test_overwrite_replaces_the_records_of_the_images_captioned_only(captioner: Captioner, images: Path,
                                                                     tmp_path: Path) -> None:
    items = copies(images, tmp_path / "imgs", ["one.png", "two.png"])
    out = tmp_path / "out.jsonl"
    kept = json.dumps({"path": "/elsewhere/old.jpg", "caption": "from last year", "prompt": PROMPT}) + "\n"
    out.write_text(kept)
    assert run(captioner, items, format="jsonl", path=str(out)).done == 2
    summary = run(captioner, items[:1], format="jsonl", path=str(out), overwrite=True)
    assert summary is not None and summary.done == 1
    assert out.read_text().startswith(kept)
    assert sorted(r["path"] for r in records(out)) == sorted(["/elsewhere/old.jpg", items[0].path, items[1].path])


def test_the_list_being_read_is_never_an_output(captioner: Captioner, images: Path, tmp_path: Path) -> None:
    copies(images, tmp_path / "imgs", [f"{i:02d}.png" for i in range(3)])
    dataset = tmp_path / "ds.jsonl"
    dataset.write_text("".join(json.dumps({"id": i, "image": f"imgs/{i:02d}.png"}) + "\n" for i in range(40)))
    before = dataset.read_bytes()
    (tmp_path / "link.jsonl").symlink_to(dataset)
    os.link(dataset, tmp_path / "hard.jsonl")
    items = collect_inputs([], list_file=str(dataset))
    for fmt in ("jsonl", "text"):
        for name in ("ds.jsonl", "link.jsonl", "hard.jsonl"):
            with pytest.raises(CaprlError, match="is the list of images being captioned"):
                run(captioner, items, format=fmt, path=str(tmp_path / name), overwrite=True)
            bare = [BatchItem(i.path, i.extra) for i in items]  # the list named by the caller instead
            with pytest.raises(CaprlError, match="is the list of images being captioned"):
                run(captioner, bare, format=fmt, path=str(tmp_path / name), inputs=(str(dataset),))
    assert dataset.read_bytes() == before and (tmp_path / "link.jsonl").is_symlink()


def test_an_image_being_captioned_is_never_an_output(captioner: Captioner, images: Path, tmp_path: Path) -> None:
    items = copies(images, tmp_path, ["shot.png", "other.png"])
    before = Path(items[0].path).read_bytes()
    for fmt, some in (("text", items[:1]), ("text", items), ("jsonl", items)):
        with pytest.raises(CaprlError, match="is an image or video being captioned"):
            run(captioner, some, format=fmt, path=items[0].path, overwrite=True)
    with pytest.raises(CaprlError, match="over an image being captioned"):
        run(captioner, items, sidecar=True, sidecar_ext=".png", overwrite=True)
    with pytest.raises(CaprlError, match="also the sidecar"):
        run(captioner, items, format="jsonl", path=str(tmp_path / "shot.txt"), sidecar=True)
    assert Path(items[0].path).read_bytes() == before and sorted(os.listdir(tmp_path)) == ["other.png", "shot.png"]


def test_notes_given_as_a_jsonl_output_on_the_command_line(tiny_model: tuple[Path, Path], images: Path,
                                                           tmp_path: Path) -> None:
    notes = tmp_path / "notes.md"
    notes.write_text("# Shopping\n- milk\n")
    args = ["caption", str(images / "pixel.png"), str(images / "alpha.png"), "--model", str(tiny_model[0]),
            "--mmproj", str(tiny_model[1]), "-t", "1", "-n", "3", "--format", "jsonl", "-o", str(notes)]
    for extra in ([], ["--overwrite"]):
        result = run_cli(*args, *extra)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith(f"Error: {notes}: line 1 is not a caprl-local result")
    assert notes.read_text() == "# Shopping\n- milk\n"


# --- devices, FIFOs and symlinks ---------------------------------------------------------------------------

def _no_replacement(path: str, kind: Any) -> None:
    st = os.lstat(path)
    assert kind(st.st_mode), f"{path} is no longer what it was: {stat.filemode(st.st_mode)}"


@pytest.mark.skipif(not os.path.exists("/dev/null"), reason="no /dev/null")
def test_dev_null_stays_a_device(captioner: Captioner, images: Path, tmp_path: Path) -> None:
    items = copies(images, tmp_path, ["a.png", "b.png"])
    listing = sorted(os.listdir("/dev"))
    for fmt in ("jsonl", "text"):
        for _ in range(2):  # the second run finds nothing to resume from, so it captions again
            summary = run(captioner, items, format=fmt, path="/dev/null", overwrite=True)
            assert summary is not None and summary.done == 2
            _no_replacement("/dev/null", stat.S_ISCHR)
    assert sorted(os.listdir("/dev")) == listing  # no lock file, no temporary file


def test_a_device_node_of_our_own_is_written_into(captioner: Captioner, images: Path, tmp_path: Path) -> None:
    node = tmp_path / "devs" / "null"
    node.parent.mkdir()
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        os.close(os.open(node, os.O_WRONLY))  # a file system mounted nodev makes the node, then refuses it
    except (AttributeError, OSError) as exc:
        pytest.skip(f"cannot make a device node here: {exc}")
    items = copies(images, tmp_path / "imgs", ["a.png", "b.png"])
    for fmt in ("jsonl", "text"):
        assert run(captioner, items, format=fmt, path=str(node), overwrite=True).done == 2
        _no_replacement(str(node), stat.S_ISCHR)
    assert os.listdir(node.parent) == ["null"]


@pytest.mark.parametrize("fmt", ["jsonl", "text"])
def test_a_fifo_output_is_written_as_a_stream(captioner: Captioner, images: Path, tmp_path: Path, fmt: str) -> None:
    fifo = tmp_path / "pipe" / "results"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    items = copies(images, tmp_path / "imgs", ["a.png", "b.png", "c.png"])
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    summary = run(captioner, items, format=fmt, path=str(fifo))
    reader.join(HANG_S)
    assert summary is not None and summary.done == 3 and received
    text = received[0].decode("utf-8")
    if fmt == "jsonl":
        assert [json.loads(line)["path"] for line in text.splitlines()] == [i.path for i in items]
    else:
        assert [line[4:-4] for line in text.splitlines() if line.startswith("==> ")] == [i.path for i in items]
    _no_replacement(str(fifo), stat.S_ISFIFO)
    assert os.listdir(fifo.parent) == ["results"]


def test_a_symlinked_output_keeps_its_link_and_its_target_gets_the_results(captioner: Captioner, images: Path,
                                                                           tmp_path: Path) -> None:
    items = copies(images, tmp_path / "imgs", ["a.png", "b.png"]) + [BatchItem(str(tmp_path / "imgs" / "gone.png"))]
    (tmp_path / "data").mkdir()
    (tmp_path / "work").mkdir()
    for fmt in ("jsonl", "text"):
        target = tmp_path / "data" / f"real.{fmt}"
        link = tmp_path / "work" / f"out.{fmt}"
        link.symlink_to(os.path.relpath(target, link.parent))  # dangling at first: the target is made
        first = run(captioner, items, format=fmt, path=str(link))
        assert first is not None and first.done == 2 and first.failed == 1
        second = run(captioner, items, format=fmt, path=str(link))  # JSONL: the failure is tried again, appended
        assert second is not None and second.done == 0 and second.failed == 1
        assert link.is_symlink() and target.is_file() and not target.is_symlink()
        if fmt == "jsonl":
            assert sorted(r["path"] for r in records(target)) == sorted([*(i.path for i in items), items[2].path])
        assert target.read_text().count(f"==> {items[0].path} <==") == (fmt == "text")
    assert sorted(os.listdir(tmp_path / "work")) == ["out.jsonl", "out.text"]  # the locks are beside the targets
    assert not [n for n in os.listdir(tmp_path / "data") if n.endswith(".tmp")]


def test_stdout_named_as_an_output_receives_the_results(tiny_model: tuple[Path, Path], images: Path) -> None:
    args = ["caption", str(images / "pixel.png"), str(images / "alpha.png"), "--model", str(tiny_model[0]),
            "--mmproj", str(tiny_model[1]), "-t", "1", "-n", "3", "--format", "jsonl"]
    was_link = os.path.islink("/dev/stdout")
    for output in (["-o", "/dev/stdout", "--overwrite"], ["-o", "-"]):
        result = run_cli(*args, *output)
        assert result.returncode == 0, result.stderr
        assert [Path(json.loads(line)["path"]).name for line in result.stdout.splitlines()] == ["pixel.png", "alpha.png"]
    assert os.path.islink("/dev/stdout") == was_link


def test_the_file_stdout_or_stderr_goes_to_is_written_through_them(tiny_model: tuple[Path, Path], images: Path,
                                                                    tmp_path: Path) -> None:
    """`-o /dev/stderr 2>log`, `-o /dev/stdout --overwrite >>file`, `-o file >>file`: the results go through the
    descriptor the shell opened, so nothing is written over at offset 0, truncated or replaced."""
    args = [sys.executable, "-m", "caprl_local", "caption", str(images / "pixel.png"), str(images / "alpha.png"),
            "--model", str(tiny_model[0]), "--mmproj", str(tiny_model[1]), "-t", "1", "-n", "3"]
    log = tmp_path / "log.jsonl"
    with open(log, "w") as err:
        done = subprocess.run([*args, "--format", "jsonl", "-o", "/dev/stderr"], stderr=err, stdout=subprocess.PIPE,
                              timeout=HANG_S)
    assert done.returncode == 0
    lines = log.read_text().splitlines()
    assert [Path(json.loads(line)["path"]).name for line in lines[:2]] == ["pixel.png", "alpha.png"], lines
    assert lines[2].startswith("Captioned 2 of 2")
    kept = tmp_path / "app.txt"
    for output in ("/dev/stdout", str(kept)):
        kept.write_text("old line kept\n")
        with open(kept, "a") as out:
            done = subprocess.run([*args, "-o", output, "--overwrite"], stdout=out, stderr=subprocess.PIPE,
                                  timeout=HANG_S)
        assert done.returncode == 0, done.stderr
        text = kept.read_text()
        assert text.startswith("old line kept\n==> ") and text.count("==> ") == 2, text


def test_planted_sidecar_links_and_nodes_are_replaced_never_written_through(captioner: Captioner, images: Path,
                                                                            tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("do not touch\n")
    (outside / "victim.jsonl").write_text("precious\n")
    items = copies(images, tmp_path / "ds", ["linked.png", "dangling.png", "fifo.png", "plain.png"])
    folder = tmp_path / "ds"
    (folder / "linked.txt").symlink_to(outside / "secret")
    (folder / "dangling.txt").symlink_to(outside / "made-through-a-link")
    os.mkfifo(folder / "fifo.txt")  # no reader: writing into it would hang
    (folder / INDEX).symlink_to(outside / "victim.jsonl")
    summary = run(captioner, items, sidecar=True)
    assert summary is not None and summary.done == 3  # the link to a file counts as a sidecar written by hand
    assert (folder / "linked.txt").is_symlink()
    for name in ("dangling.txt", "fifo.txt", "plain.txt", INDEX):
        _no_replacement(str(folder / name), stat.S_ISREG)
    assert run(captioner, items, sidecar=True, overwrite=True).done == 4
    _no_replacement(str(folder / "linked.txt"), stat.S_ISREG)
    assert (outside / "secret").read_text() == "do not touch\n" and (outside / "victim.jsonl").read_text() == "precious\n"
    assert sorted(os.listdir(outside)) == ["secret", "victim.jsonl"]
    assert run(captioner, items, sidecar=True) is None  # all done


def test_a_folder_in_the_way_of_a_sidecar_costs_that_sidecar_only(captioner: Captioner, images: Path, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "ds"
    items = copies(images, folder, ["a.png", "b.png"])
    (folder / "a.txt").mkdir()
    (folder / INDEX).mkdir()
    summary = run(captioner, items, format="jsonl", path=str(tmp_path / "out.jsonl"), sidecar=True)
    assert summary is not None and summary.done == 2 and len(records(tmp_path / "out.jsonl")) == 2
    assert (folder / "b.txt").read_text().strip() and (folder / "a.txt").is_dir()
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("a.txt: cannot write this sidecar" in m for m in warned), warned


# --- names that are not UTF-8 ---------------------------------------------------------------------------

NOT_UTF8: list[str | bytes] = [b"bad\xff.png", b"latin-caf\xe9.png", b"\x80\x81start.png", "ok.png"]


def test_names_that_are_not_utf8_are_captioned_and_resume(captioner: Captioner, images: Path, tmp_path: Path) -> None:
    items = copies(images, tmp_path / "imgs", NOT_UTF8)
    out, text = tmp_path / "out.jsonl", tmp_path / "out.txt"
    assert run(captioner, items, format="jsonl", path=str(out), sidecar=True).done == 4
    assert run(captioner, items, format="text", path=str(text)).done == 4
    assert [r["path"] for r in records(out)] == [i.path for i in items]  # valid UTF-8, read back exactly
    text.read_bytes().decode("utf-8")
    (tmp_path / "imgs" / INDEX).read_bytes().decode("utf-8")
    for item in items:
        assert Path(item.path).with_suffix(".txt").read_text().strip()
    assert run(captioner, items, format="jsonl", path=str(out), sidecar=True) is None
    assert run(captioner, items, format="text", path=str(text)) is None


def test_outputs_holding_bytes_that_are_not_utf8_are_read(tmp_path: Path) -> None:
    name = os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9.png")
    line = b'{"path": "' + os.fsencode(name) + b'", "caption": "c", "prompt": "p", "note": "\xfe"}\n'
    (tmp_path / "out.jsonl").write_bytes(line)
    (tmp_path / "out.txt").write_bytes(b"==> " + os.fsencode(name) + b" <==\nc\xff\n\n")
    jsonl = JsonlOutput(str(tmp_path / "out.jsonl"))
    text = TextOutput(str(tmp_path / "out.txt"))
    try:
        assert jsonl.has(BatchItem(name), "p") and text.has(BatchItem(name), "p")
    finally:
        jsonl.close()
        text.close()
    assert (tmp_path / "out.jsonl").read_bytes() == line


def test_lists_with_names_that_are_not_utf8(images: Path, tmp_path: Path) -> None:
    items = copies(images, tmp_path / "imgs", NOT_UTF8)
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"\xef\xbb\xbf" + b"".join(os.fsencode(i.path) + b"\n" for i in items))  # with a BOM
    found = collect_inputs([], list_file=str(listing))
    assert [i.path for i in found] == [i.path for i in items] and all(os.path.isfile(i.path) for i in found)


def test_a_name_that_is_not_utf8_on_the_command_line(tiny_model: tuple[Path, Path], images: Path,
                                                     tmp_path: Path) -> None:
    items = copies(images, tmp_path, [b"bad\xff.png", "good.png"])
    args = ["caption", *(i.path for i in items), "--model", str(tiny_model[0]), "--mmproj", str(tiny_model[1]),
            "-t", "1", "-n", "3", "--format", "jsonl", "-o", str(tmp_path / "out.jsonl"), "--sidecar"]
    first = run_cli(*args)
    assert first.returncode == 0 and "unexpected" not in first.stderr, first.stderr
    again = run_cli(*args)
    assert again.returncode == 0 and "Nothing to do" in again.stderr, again.stderr


# --- long names ---------------------------------------------------------------------------------------------

LONG = ["a" * 251 + ".png", "é" * 118 + ".jpeg", "漢" * 82 + ".png", "b" * 248 + ".png", "c" * 247 + ".jpg",
        "c" * 247 + ".png", "d" * 255]


@pytest.mark.parametrize("ext", [".txt", ".caption"])
def test_names_as_long_as_the_file_system_allows(captioner: Captioner, images: Path, tmp_path: Path, ext: str) -> None:
    assert all(240 <= len(name.encode()) <= 255 for name in LONG)
    items = copies(images, tmp_path / "imgs", LONG)
    out = tmp_path / ("o" * 249 + ".jsonl")  # its lock's name would be longer than 255 bytes
    summary = run(captioner, items, format="jsonl", path=str(out), sidecar=True, sidecar_ext=ext)
    assert summary is not None and summary.done == len(LONG) and summary.failed == 0
    assert run(captioner, items, format="text", path=str(tmp_path / ("t" * 251 + ".txt"))).done == len(LONG)
    names = os.listdir(tmp_path / "imgs")
    assert all(len(os.fsencode(n)) <= 255 for n in names) and not [n for n in names if n.endswith(".tmp")]
    sidecars = [n for n in names if n.endswith(ext)]
    assert len(sidecars) == len(LONG)  # each its own, the shared and the shortened ones too
    assert all((tmp_path / "imgs" / n).read_text().strip() for n in sidecars)
    assert len(records(out)) == len(LONG)
    assert run(captioner, items, format="jsonl", path=str(out), sidecar=True, sidecar_ext=ext) is None


def test_temporary_names_are_short_and_unique_across_threads(tmp_path: Path) -> None:
    names = [("x" * 250 + f"{i:05d}") for i in range(8)]
    threads = [threading.Thread(target=write_atomic, args=(tmp_path / n, f"text {n}\n")) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG_S)
    assert sorted(os.listdir(tmp_path)) == sorted(names)
    assert all((tmp_path / n).read_text() == f"text {n}\n" for n in names)


# --- names in text headers, and the sidecar index -----------------------------------------------------------

ODD = ["new\nline.png", "back\\slash.png", '"quoted".png', "tab\there.png", "esc\x1b[31m.png", "caf\u0085e.png",
       "a <== b.png", "==> x <==.png", "cr\rhere.png", "\udcffraw.png"]


def test_text_headers_read_back_whatever_the_name(captioner: Captioner, images: Path, tmp_path: Path) -> None:
    items = copies(images, tmp_path / "imgs", ODD)
    out = tmp_path / "out.txt"
    assert run(captioner, items, format="text", path=str(out)).done == len(ODD)
    text = out.read_bytes().decode("utf-8")
    assert sum(line.startswith("==> ") for line in text.split("\n")) == len(ODD)  # each header one line
    assert run(captioner, items, format="text", path=str(out)) is None
    assert out.read_bytes().decode("utf-8") == text  # nothing captioned again, nothing appended


def test_a_text_output_without_a_last_newline_keeps_its_line(captioner: Captioner, images: Path,
                                                            tmp_path: Path) -> None:
    items = copies(images, tmp_path / "imgs", ["a.png", "b.png"])
    out = tmp_path / "notes.txt"
    out.write_text("my own line, no newline")
    assert run(captioner, items, format="text", path=str(out)).done == 2
    assert out.read_text().startswith(f"my own line, no newline\n==> {items[0].path} <==\n")
    assert run(captioner, items, format="text", path=str(out)) is None


@pytest.mark.parametrize("cut", ["end", "prompt", "name", "opening"])
def test_a_cut_index_line_never_hides_a_sidecar(captioner: Captioner, images: Path, tmp_path: Path, cut: str) -> None:
    folder = tmp_path / "ds"
    items = copies(images, folder, ["a.png", "b.png", "c.png"])
    assert run(captioner, items, sidecar=True, prompt="first").done == 3
    index = folder / INDEX
    data = index.read_bytes()
    last = data.rstrip(b"\n").rfind(b"\n") + 1
    line = data[last:]
    at = {"end": len(line) - 3, "prompt": line.index(b'"prompt"') + 5, "name": line.index(b"c.t") + 2,
          "opening": 3}[cut]
    index.write_bytes(data[:last + at])
    # A line cut after the name's start leaves that sidecar to be written again; one cut before
    # it says nothing, and the sidecar counts as written by hand (done), as one the index never knew.
    lost = cut == "opening"
    more = copies(images, folder, ["d.png"])  # appended after the cut line: it must not be swallowed
    assert run(captioner, items + more, sidecar=True, prompt="first").done == (1 if lost else 2)
    lines = index.read_bytes().split(b"\n")
    assert json.loads(lines[-2])["sidecar"] == "d.txt"
    summary = run(captioner, items + more, sidecar=True, prompt="second")
    assert summary is not None and summary.done == (3 if lost else 4)  # captioned for the new prompt
    assert run(captioner, items + more, sidecar=True, prompt="second") is None


def test_an_index_line_cut_inside_a_name_never_runs_into_the_next_entry(captioner: Captioner, images: Path,
                                                                        tmp_path: Path) -> None:
    """An index from an older writer: a cut entry with the next one on the same line."""
    folder = tmp_path / "ds"
    items = copies(images, folder, ["a.png", "c.png", "d.png"])
    for name in "acd":
        (folder / f"{name}.txt").write_text("old\n")
    (folder / INDEX).write_text('{"sidecar": "a.txt", "prompt": "P1"}\n'
                                '{"sidecar": "c.t{"sidecar": "d.txt", "prompt": "P1"}\n')
    summary = run(captioner, items, sidecar=True, prompt="P2")
    assert summary is not None and summary.done == 3  # d.txt was written for P1, c.txt's entry was cut: all redone


def test_hand_written_sidecars_stay_done_beside_a_cut_index(captioner: Captioner, images: Path,
                                                           tmp_path: Path) -> None:
    folder = tmp_path / "ds"
    items = copies(images, folder, ["a.png", "mine.png"])
    (folder / "mine.txt").write_text("written by hand\n")
    (folder / INDEX).write_bytes(b'{"sidecar": "a.txt", "prompt": "old"}\n{"sidecar": "a.t')
    summary = run(captioner, items, sidecar=True)
    assert summary is not None and summary.done == 1
    assert (folder / "mine.txt").read_text() == "written by hand\n"


if sys.platform == "win32":  # pragma: no cover - FIFOs, device nodes and these names are POSIX things
    pytestmark = pytest.mark.skip("POSIX file system behaviour")


def test_a_killed_writers_temporary_files_are_removed_by_the_next_run(tmp_path: Path) -> None:
    """kill -9 between a sidecar's temporary file and its rename leaves the file; the next write into that folder
    (in another process) removes it, and never a live writer's, nor another machine's."""
    from caprl_local import safefiles

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host, me = safefiles._HOST, os.getpid()
    other_host = ("0" if host[0] != "0" else "1") + host[1:]
    stale = tmp_path / f".caprl-{host}-{gone.pid}-{'a' * 16}.tmp"
    live = tmp_path / f".caprl-{host}-{me}-{'b' * 16}.tmp"
    elsewhere = tmp_path / f".caprl-{other_host}-{gone.pid}-{'c' * 16}.tmp"
    mine = tmp_path / ".caprl-notes.tmp"  # not a name this project writes
    for path in (stale, live, elsewhere, mine):
        path.write_bytes(b"half a sidecar")
    code = "import sys; from pathlib import Path; from caprl_local.safefiles import write_atomic; " \
           "write_atomic(Path(sys.argv[1]), 'x')"
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "a.txt")], check=True, timeout=HANG_S)
    assert (tmp_path / "a.txt").read_text() == "x"
    assert not stale.exists() and live.exists() and elsewhere.exists() and mine.exists()
