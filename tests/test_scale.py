"""CapRL-2M scale: shards that do not depend on how a path is spelled, lists read a line at a time,
and a resume index of keys that never rewrites a big output. Runs the real inputs, outputs and CLI."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from helpers import HANG_S, ROOT, run_cli

from caprl_local import Captioner
from caprl_local.batch import OutputOptions, caption_batch
from caprl_local.errors import CaprlError
from caprl_local.inputs import BatchItem, collect_inputs, gather_inputs, shard_name, shard_of
from caprl_local.options import GenerationOptions
from caprl_local.outputs import JsonlOutput, TextOutput
from caprl_local.sidecars import SidecarOutput

PROMPT = "Please describe this image in detail"


@pytest.fixture()
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tmp/imgs: 120 (empty) images, 20 of them in a sub-folder, a hidden one, a text file; tmp/link -> imgs.
    The working folder is tmp (planning never opens an image)."""
    imgs = tmp_path / "imgs"
    (imgs / "sub").mkdir(parents=True)
    for i in range(100):
        (imgs / f"{i:03d}.jpg").touch()
    for i in range(20):
        (imgs / "sub" / f"s{i:02d}.png").touch()
    (imgs / ".hidden.jpg").touch()
    (imgs / "notes.txt").touch()
    (tmp_path / "link").symlink_to("imgs")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def partition(args: list[str], count: int, **options: Any) -> list[set[str]]:
    """The images (by key) in each of `count` shards, each collected as a machine would."""
    return [{i.key for i in collect_inputs(args, shard=(k, count), **options)} for k in range(1, count + 1)]


def covered_once(shards: list[set[str]], everything: set[str]) -> None:
    counts = Counter(key for shard in shards for key in shard)
    assert set(counts) == everything and set(counts.values()) == {1}, "every image in exactly one shard"


# --- shard membership --------------------------------------------------------------------------------------

FOLDER_SPELLINGS = ["imgs", "imgs/", "./imgs", "./imgs//", "{tmp}/imgs", "{tmp}/imgs/", "link", "{tmp}/link/"]


@pytest.mark.parametrize("recursive", [False, True])
@pytest.mark.parametrize("count", [3, 7])
def test_a_folder_splits_the_same_however_it_is_spelled(tree: Path, recursive: bool, count: int) -> None:
    spellings = [s.format(tmp=tree) for s in FOLDER_SPELLINGS]
    names = [[sorted(shard_name(i) for i in collect_inputs([s], recursive=recursive, shard=(k, count)))
              for k in range(1, count + 1)] for s in spellings]
    assert all(n == names[0] for n in names[1:])  # the same images in the same shards
    everything = {i.key for i in collect_inputs(["imgs"], recursive=recursive)}
    assert len(everything) == (120 if recursive else 100)
    # each shard on a "machine" of its own, each spelling the folder its way (a symlink resolves to the same files)
    mixed = [{os.path.realpath(i.path) for i in collect_inputs([spellings[k % len(spellings)]], recursive=recursive,
                                                              shard=(k + 1, count))} for k in range(count)]
    covered_once(mixed, {os.path.realpath(k) for k in everything})
    assert all(mixed)  # 100 images over 7 shards: none empty


def test_a_pattern_splits_by_the_path_below_its_fixed_folder(tree: Path) -> None:
    patterns = ["imgs/**/*.png", f"{tree}/imgs/**/*.png", "./imgs/**/*.png", "link/**/*.png", "imgs//sub/*.png"]
    names = [[sorted(shard_name(i) for i in collect_inputs([p], shard=(k, 3))) for k in (1, 2, 3)] for p in patterns[:4]]
    assert all(n == names[0] for n in names[1:])
    assert sorted(n for shard in names[0] for n in shard) == sorted(f"sub/s{i:02d}.png" for i in range(20))
    deeper = [sorted(shard_name(i) for i in collect_inputs([patterns[4]], shard=(k, 3))) for k in (1, 2, 3)]
    assert sorted(n for shard in deeper for n in shard) == sorted(f"s{i:02d}.png" for i in range(20))
    wild = [[sorted(shard_name(i) for i in collect_inputs([p], shard=(k, 3))) for k in (1, 2, 3)]
            for p in ("im*/0*.jpg", f"{tree}/im*/0*.jpg")]  # a wildcard in the folder: the path below the fixed part
    assert wild[0] == wild[1] and sum(map(len, wild[0])) == 100


def test_files_named_directly_split_by_their_file_name(tree: Path) -> None:
    relative = [f"imgs/{i:03d}.jpg" for i in range(40)]
    spellings = [relative, [f"{tree}/{p}" for p in relative], [f"./{p}" for p in relative], [f"link/{p[5:]}" for p in relative]]
    names = [[sorted(shard_name(i) for i in collect_inputs(s, shard=(k, 4))) for k in range(1, 5)] for s in spellings]
    assert all(n == names[0] for n in names[1:])
    covered_once([{os.path.realpath(i.key) for i in collect_inputs(spellings[k], shard=(k + 1, 4))} for k in range(4)],
                 {str(tree / p) for p in relative})


def make_list(tree: Path, name: str = "ds.jsonl") -> Path:
    """A list in its own folder, entries relative to it, as JSONL objects and plain lines, with duplicates."""
    folder = tree / "data"
    folder.mkdir(exist_ok=True)
    lines = []
    for i in range(300):
        entry = f"../imgs/{i % 100:03d}.jpg" if i < 100 else f"shots/{i:04d}.jpg"
        lines.append(json.dumps({"id": i, "image": entry, "source": "web"}) if i % 2 else entry)
    lines += ["# a comment", "", lines[7], lines[8]]  # each already listed
    listing = folder / name
    listing.write_text("\n".join(lines) + "\n")
    return listing


def test_a_list_splits_the_same_however_it_is_named(tree: Path) -> None:
    listing = make_list(tree)
    (tree / "list-link.jsonl").symlink_to(listing)
    names = ["data/ds.jsonl", str(listing), "./data//ds.jsonl", "list-link.jsonl", f"{tree}/data/../data/ds.jsonl"]
    everything = {i.key for i in collect_inputs([], list_file=names[0])}
    assert len(everything) == 300
    for count in (2, 5, 1000):
        parts = [[sorted(shard_name(i) for i in collect_inputs([], list_file=n, shard=(k, count)))
                  for k in range(1, count + 1)] for n in names[:3]]
        assert all(p == parts[0] for p in parts[1:])
        covered_once([{i.key for i in collect_inputs([], list_file=names[k % 3], shard=(k + 1, count))}
                      for k in range(count)], everything)
    # named through a link, or by a path with '..' in it: the entries as written decide, not where they lead
    assert [sorted(shard_name(i) for i in collect_inputs([], list_file=n, shard=(1, 5))) for n in names[3:]] == \
        [sorted(shard_name(i) for i in collect_inputs([], list_file=names[0], shard=(1, 5)))] * 2


def test_a_list_on_stdin_splits_as_the_same_list_in_a_file(tree: Path) -> None:
    listing = make_list(tree)
    for k in (1, 2, 3):
        stdin = io.TextIOWrapper(io.BytesIO(listing.read_bytes()))
        piped = [shard_name(i) for i in collect_inputs([], list_file="-", stdin=stdin, shard=(k, 3))]
        assert piped == [shard_name(i) for i in collect_inputs([], list_file=str(listing), shard=(k, 3))]


def test_items_made_by_hand_split_by_their_normalized_path() -> None:
    items = [BatchItem(f"images/{i:05d}.jpg") for i in range(300)]
    spelled = [BatchItem(f"./images//{i:05d}.jpg") for i in range(300)]
    assert [[i.path[-9:] for i in shard_of(items, k, 3)] for k in (1, 2, 3)] == \
        [[i.path[-9:] for i in shard_of(spelled, k, 3)] for k in (1, 2, 3)]
    with pytest.raises(CaprlError, match="between 1 and 3"):
        collect_inputs(["x"], shard=(4, 3))


# --- lists, streamed -------------------------------------------------------------------------------------

def test_a_shard_keeps_only_its_own_items_and_their_fields(tree: Path) -> None:
    listing = make_list(tree)
    whole = gather_inputs([], list_file=str(listing))
    assert whole.listed == 302 and len(whole.items) == 300  # two lines named an image again
    assert [i.extra.get("id") for i in whole.items[:4]] == [None, 1, None, 3] and whole.items[1].source == str(listing)
    for k in (1, 2, 3):
        part = gather_inputs([], list_file=str(listing), shard=(k, 3))
        assert part.listed == 302  # every line read and checked
        assert part.items == shard_of(whole.items, k, 3)  # the same items, fields and order, each once
        assert len({i.key for i in part.items}) == len(part.items)


def test_a_bad_line_is_an_error_whichever_shard_it_falls_in(tree: Path) -> None:
    listing = tree / "ds.jsonl"
    good = [json.dumps({"image": f"{i}.jpg"}) for i in range(50)]
    for bad, message in (('{"image": "x.jpg", "id": ', "ds.jsonl:31: not valid JSON"),
                         ('{"id": 3}', 'ds.jsonl:31: the JSON object has no "image" path'),
                         ('{"image": 3}', 'ds.jsonl:31: the JSON object has no "image" path'),
                         ('{"a": ' * 100_000 + "1" + "}" * 100_000, "ds.jsonl:31: not valid JSON")):
        listing.write_text("\n".join([*good[:30], bad, *good[30:]]) + "\n")
        for k in range(1, 6):
            with pytest.raises(CaprlError) as caught:
                collect_inputs([], list_file=str(listing), shard=(k, 5))
            assert str(caught.value).startswith(f"{listing.parent}/{message}") and "\n" not in str(caught.value)


def test_list_bounds_are_per_line_and_on_what_a_run_keeps(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from caprl_local import inputs

    listing = tree / "long.txt"
    listing.write_bytes(b"a.jpg\n" + b"b" * ((1 << 20) + 10) + b".jpg\nc.jpg\n")
    with pytest.raises(CaprlError, match=r"long.txt:2: a line of over 1 MB; a list holds one path"):
        collect_inputs([], list_file=str(listing), shard=(1, 1000))
    listing.write_bytes(b"".join(b"img/%06d.jpg\n" % i for i in range(20_000)))  # 300 KB
    monkeypatch.setattr(inputs, "MAX_KEPT_BYTES", 100_000)
    with pytest.raises(CaprlError, match="the lines kept for this run are over .*; caption the list in shards"):
        collect_inputs([], list_file=str(listing))
    assert sum(len(collect_inputs([], list_file=str(listing), shard=(k, 4))) for k in range(1, 5)) == 20_000
    monkeypatch.setattr(inputs, "MAX_LIST_LINES", 10_000)
    with pytest.raises(CaprlError, match="the list is over 10,000 lines"):
        collect_inputs([], list_file=str(listing), shard=(1, 1000))
    assert inputs.MAX_LIST_BYTES >= 32 << 30  # two million lines of 16 KB each: far past any real list


MEASURE = r"""
import json, resource, sys
sys.path.insert(0, sys.argv[1])
from caprl_local.inputs import collect_inputs
from caprl_local.outputs import JsonlOutput
items = collect_inputs([], list_file=sys.argv[2], shard=(1, 1000))
out = JsonlOutput(sys.argv[3], items=items)
done = sum(out.has(i, sys.argv[4]) for i in items)
out.close()
# This process's own peak (VmHWM: its memory since exec; ru_maxrss would carry the forking parent's, pytest's, over)
hwm = [int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")]
peak = hwm[0] if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"items": len(items), "done": done, "mb": peak / 1024}))
"""


def test_planning_a_shard_of_a_big_list_holds_the_shard_only(tmp_path: Path) -> None:
    """300,000 JSONL lines with fields and an output of 200,000 records: the planning process stays near its
    bare size (about 20 MB; the whole list and output held in memory took over 700 MB)."""
    listing, out = tmp_path / "ds.jsonl", tmp_path / "out.jsonl"
    with open(listing, "w") as fh:
        for i in range(300_000):
            fh.write(json.dumps({"id": i, "image": f"img/{i:07d}.jpg", "url": f"http://127.0.0.1:9/{i}.jpg",
                                 "width": 640, "height": 480, "sha256": f"{i:064x}"}) + "\n")
    with open(out, "w") as fh:
        for i in range(200_000):
            fh.write(json.dumps({"id": i, "path": str(tmp_path / f"img/{i:07d}.jpg"), "caption": "a cat " * 40,
                                 "prompt": PROMPT} if i % 100 else
                                {"path": str(tmp_path / f"img/{i:07d}.jpg"), "error": "bad", "error_kind": "ImageError",
                                 "prompt": PROMPT}) + "\n")
    before = out.stat()
    done = subprocess.run([sys.executable, "-P", "-c", MEASURE, str(ROOT), str(listing), str(out), PROMPT],
                          capture_output=True, text=True, timeout=HANG_S)
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    shard = collect_inputs([], list_file=str(listing), shard=(1, 1000))
    keys = [int(Path(i.path).stem) for i in shard]
    assert figures["items"] == len(shard) and figures["done"] == sum(k < 200_000 and k % 100 != 0 for k in keys)
    assert figures["mb"] < 150, figures
    after = out.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)


# --- resume: an index of keys, records appended --------------------------------------------------------------

def line(path: str, prompt: str = PROMPT, *, failed: bool = False, **extra: Any) -> str:
    fields = {"error": "x: truncated", "error_kind": "ImageError"} if failed else {"caption": f"a caption of {path}"}
    return json.dumps({**extra, "path": path, **fields, "prompt": prompt}) + "\n"


def test_the_last_record_for_an_image_and_prompt_counts(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text(line("/d/a.jpg", failed=True) + line("/d/a.jpg")  # failed, then captioned
                   + line("/d/b.jpg") + line("/d/b.jpg", failed=True)  # captioned, then failed (an --overwrite run)
                   + line("/d/c.jpg", "other") + line("/d/c.jpg", failed=True)  # another prompt stays done
                   + "\n" + line("/d/e.jpg", failed=True))
    before = out.read_bytes()
    output = JsonlOutput(str(out))
    try:
        assert output.has(BatchItem("/d/a.jpg"), PROMPT)
        assert not output.has(BatchItem("/d/b.jpg"), PROMPT)
        assert output.has(BatchItem("/d/c.jpg"), "other") and not output.has(BatchItem("/d/c.jpg"), PROMPT)
        assert not output.has(BatchItem("/d/e.jpg"), PROMPT)
    finally:
        output.close()
    assert out.read_bytes() == before  # read, never rewritten
    wanted = JsonlOutput(str(out), items=[BatchItem("/d/a.jpg")])  # the index holds the images asked about only
    try:
        assert wanted.done == {("/d/a.jpg", PROMPT)}
    finally:
        wanted.close()


def test_a_failed_image_captioned_again_is_appended_not_rewritten(captioner: Captioner, images: Path,
                                                                  tmp_path: Path) -> None:
    shutil.copy(images / "pixel.png", tmp_path / "good.png")
    shutil.copy(images / "truncated.jpg", tmp_path / "later.jpg")
    items = [BatchItem(str(tmp_path / "good.png")), BatchItem(str(tmp_path / "later.jpg"))]
    out = tmp_path / "out.jsonl"
    mine = '{"note": "a line of mine, kept", "path": "/elsewhere/x.jpg", "caption": "by hand"}\n'
    out.write_text(mine)
    generation = GenerationOptions(prompt=PROMPT, max_tokens=3)

    def run() -> Any:
        return caption_batch(captioner, items, outputs=OutputOptions(format="jsonl", path=str(out)),
                             stream=io.StringIO(), generation=generation)

    first = run()
    assert first is not None and (first.done, first.failed) == (1, 1)
    written, inode = out.read_bytes(), out.stat().st_ino
    shutil.copy(images / "photo.jpg", tmp_path / "later.jpg")  # repaired
    second = run()
    assert second is not None and (second.done, second.failed) == (1, 0)
    assert out.stat().st_ino == inode and out.read_bytes().startswith(written)  # appended to, in place
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert records[0] == json.loads(mine) and [("caption" in r, Path(r["path"]).name) for r in records[1:]] == \
        [(True, "good.png"), (False, "later.jpg"), (True, "later.jpg")]
    assert run() is None  # everything done


def test_a_record_cut_by_a_crash_is_cut_off_in_place(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    whole = line("/d/a.jpg") + line("/d/b.jpg", failed=True)
    out.write_text(whole + line("/d/c.jpg")[:30])
    inode = out.stat().st_ino
    output = JsonlOutput(str(out))
    try:
        assert output.has(BatchItem("/d/a.jpg"), PROMPT) and not output.has(BatchItem("/d/c.jpg"), PROMPT)
        output.write(BatchItem("/d/c.jpg"), json.loads(line("/d/c.jpg")))
    finally:
        output.close()
    assert out.stat().st_ino == inode and out.read_text() == whole + line("/d/c.jpg")


def test_a_last_line_without_its_newline_gets_one_before_the_next_record(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text(line("/d/a.jpg").rstrip("\n"))
    output = JsonlOutput(str(out))
    try:
        assert output.has(BatchItem("/d/a.jpg"), PROMPT)
        output.write(BatchItem("/d/b.jpg"), json.loads(line("/d/b.jpg")))
    finally:
        output.close()
    assert out.read_text() == line("/d/a.jpg") + line("/d/b.jpg")
    untouched = tmp_path / "done.jsonl"
    untouched.write_text(line("/d/a.jpg").rstrip("\n"))
    JsonlOutput(str(untouched)).close()  # nothing written: nothing changed
    assert untouched.read_text() == line("/d/a.jpg").rstrip("\n")


def test_a_line_not_ours_deep_in_a_big_output_is_refused_untouched(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    records = [line(f"/d/{i}.jpg", failed=i % 7 == 0) for i in range(20_000)]
    for bad, number in (("garbage\n", 15_001), ('{"image": "a.jpg"}\n', 15_001), ("x" * (70 << 20) + "\n", 15_001),
                        ('{"path": "/d/cut.jpg", "capt', 20_001)):
        text = "".join(records[:15_000]) + bad + "".join(records[15_000:]) if number < 20_000 else "".join(records) + \
            bad + records[0]  # a cut line that is not the last is not a crash's
        out.write_text(text)
        for overwrite in (False, True):
            with pytest.raises(CaprlError, match=f"line {number} is not a caprl-local result"):
                JsonlOutput(str(out), overwrite=overwrite, items=[BatchItem("/d/1.jpg")])
            assert out.read_text() == text
    assert os.listdir(tmp_path) == ["out.jsonl"]


def test_overwrite_rewrites_only_the_records_of_the_images_captioned_again(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    kept = [line("/d/a.jpg"), "\n", line("/d/b.jpg", failed=True), '{"path": "/d/c.jpg", "caption": "hand", "x": 1}\n']
    out.write_text(kept[0] + line("/d/z.jpg") + kept[1] + kept[2] + line("/d/z.jpg", failed=True) + kept[3]
                   + line("/d/z.jpg", "other") + '{"path": "/d/cut.jpg", "cap')
    output = JsonlOutput(str(out), overwrite=True, items=[BatchItem("/d/z.jpg")])
    try:
        assert not output.has(BatchItem("/d/z.jpg"), PROMPT)
        output.write(BatchItem("/d/z.jpg"), json.loads(line("/d/z.jpg")))
    finally:
        output.close()
    assert out.read_text() == "".join(kept) + line("/d/z.jpg")


def test_a_text_output_is_resumed_a_line_at_a_time(tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    out.write_text("==> /d/a.jpg <==\ncaption\n\n" + "x" * ((64 << 20) + 5) + "==> /d/hidden.jpg <==\n\n"
                   "==> /d/b.jpg <==\nlast, without its newline")
    output = TextOutput(str(out), items=[BatchItem("/d/a.jpg"), BatchItem("/d/b.jpg"), BatchItem("/d/hidden.jpg")])
    try:
        assert output.has(BatchItem("/d/a.jpg"), PROMPT) and output.has(BatchItem("/d/b.jpg"), PROMPT)
        assert not output.has(BatchItem("/d/hidden.jpg"), PROMPT)  # inside a caption's line, not a header
        assert output.newline == b"\n"
    finally:
        output.close()


def test_the_sidecar_index_read_for_some_images_still_answers_for_others(tmp_path: Path) -> None:
    folder = tmp_path / "ds"
    folder.mkdir()
    names = [f"{i:04d}" for i in range(2000)]
    for name in names:
        (folder / f"{name}.png").touch()
        (folder / f"{name}.txt").write_text("old\n")
    (folder / SidecarOutput.INDEX).write_text("".join(
        json.dumps({"sidecar": f"{n}.txt", "prompt": "P1" if int(n) % 2 else "P2"}) + "\n" for n in names))
    sidecars = SidecarOutput(items=[BatchItem(str(folder / "0001.png")), BatchItem(str(folder / "0002.png"))])
    assert sidecars.has(BatchItem(str(folder / "0001.png")), "P1")
    assert not sidecars.has(BatchItem(str(folder / "0002.png")), "P1")
    assert len(sidecars.prompts[folder][0]) == 2  # only the sidecars this run asked about
    assert not sidecars.has(BatchItem(str(folder / "0004.png")), "P1")  # not asked about at first: read again
    assert sidecars.has(BatchItem(str(folder / "0005.png")), "P1") and len(sidecars.prompts[folder][0]) == 2000


# --- the command line ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_args(tiny_model: tuple[Path, Path]) -> list[str]:
    model, mmproj = tiny_model
    return ["--model", str(model), "--mmproj", str(mmproj), "--threads", "1", "--max-tokens", "2", "--format", "jsonl"]


def test_machines_spelling_the_folder_and_list_differently_caption_each_image_once(
        model_args: list[str], images: Path, tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(15):
        shutil.copy(images / "pixel.png", folder / f"{i:02d}.png")
    (tmp_path / "mnt").symlink_to(folder)
    listing = tmp_path / "all.txt"
    listing.write_text("".join(f"imgs/{i:02d}.png\n" for i in range(15)))
    machines = {"folder": ["imgs", f"{folder}/", "./mnt"], "list": ["all.txt", str(listing), "./all.txt"]}
    for kind, spellings in machines.items():
        for k, spelled in enumerate(spellings, 1):
            given = [spelled] if kind == "folder" else ["--from-list", spelled]
            done = run_cli("caption", *given, *model_args, "-o", f"{kind}-{k}.jsonl", "--shard", f"{k}/3", cwd=tmp_path)
            assert done.returncode == 0, done.stderr
        paths = [os.path.realpath(tmp_path / json.loads(x)["path"]) for k in (1, 2, 3)
                 for x in (tmp_path / f"{kind}-{k}.jsonl").read_text().splitlines()]
        assert sorted(paths) == sorted(str(p) for p in folder.iterdir()), kind  # each image exactly once


def test_an_empty_list_and_an_empty_shard(model_args: list[str], tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    empty = run_cli("caption", "--from-list", str(tmp_path / "empty.txt"), *model_args)
    assert empty.returncode == 1 and "the list names no images" in empty.stderr
    (tmp_path / "one.txt").write_text("a.png\n")
    other = next(k for k in (1, 2) if not collect_inputs([], list_file=str(tmp_path / "one.txt"), shard=(k, 2)))
    nothing = run_cli("caption", "--from-list", str(tmp_path / "one.txt"), *model_args, "--shard", f"{other}/2")
    assert nothing.returncode == 0 and "Nothing to do" in nothing.stderr, nothing.stderr


def test_the_shard_help_says_what_decides_a_shard() -> None:
    text = " ".join(run_cli("caption", "--help").stdout.split())
    assert "the entry as written" in text and "its path inside it" in text and "file name" in text


def test_the_scale_bench_runs(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_scale.py"), "--sizes", "3k,5k", "--outputs", "2k",
                           "--dir", str(tmp_path), "--json", str(tmp_path / "figures.json")],
                          capture_output=True, text=True, timeout=HANG_S)
    assert done.returncode == 0, done.stderr
    figures = json.loads((tmp_path / "figures.json").read_text())
    assert [r["run"] for r in figures["runs"]][:3] == ["imports only", "plain list, 3,000 lines", "JSONL list, 3,000 lines"]
    assert all(r["peak_rss_mb"] > 0 and not r["rewritten"] for r in figures["runs"])
    assert "| peak RSS MB |" in done.stdout and os.listdir(tmp_path) == ["figures.json"]
