"""Videos through the command line and the batch: one clip, folders and lists mixing images and videos, the
JSONL fields a dataset keeps, budgets, kill -9 and resume, sidecars, shards, progress, and PyAV missing.

The real CLI in a subprocess on the tiny Qwen2.5-VL and Qwen3-VL pairs, with clips from scripts/make_test_videos.py.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import HANG_S, load_script, run_cli

pytest.importorskip("av")

from caprl_local import console  # noqa: E402 - after the skip: these tests need PyAV
from caprl_local.inputs import BatchItem, collect_inputs  # noqa: E402
from caprl_local.prompts import DEFAULT_PROMPT, VIDEO_PROMPT  # noqa: E402
from caprl_local.results import Activity  # noqa: E402

clips = load_script("make_test_videos")
VIDEO_FIELDS = {"media", "duration_s", "frames", "fps", "frame_width", "frame_height", "video_tokens"}
SHORT = ["--threads", "1", "--max-tokens", "8", "--repeat-penalty", "1"]
#: Clips a batch captions (some of them cut short, or lying about their length), and those that fail, with the
#: words of their one-line error.
GOOD = {"mp4": "clip.mp4", "h264": "h264.mp4", "webm": "clip.webm", "avi": "clip.avi", "mov": "clip.mov",
        "mkv": "clip.mkv", "with_audio": "talk.mkv", "rotated": "rotated.mp4", "vfr": "vfr.mkv",
        "truncated": "truncated.mkv", "long_claim": "claims8s.mkv", "avi_long_claim": "claims20s.avi",
        "damaged": "damaged.mkv"}
CUT_SHORT = {"truncated.mkv", "claims8s.mkv", "claims20s.avi", "damaged.mkv"}  # each says "truncated": true
BAD = {"garbage": ("garbage.mp4", "not a video file"), "truncated_mp4": ("cut.mp4", "not a video file"),
       "audio_only": ("audio.mp4", "only audio"), "no_frames": ("noframes.mkv", "before any frame"),
       "huge": ("huge.mkv", "more than this reads"), "bomb": ("bomb.mkv", "megapixels"),
       "endless_claim": ("decade.mkv", "hours"),
       "empty": ("empty.webm", "empty")}
IMAGES = ("photo.jpg", "alpha.png", "animated.gif")  # an animated GIF stays an image


def args_of(pair: tuple[Path, Path]) -> list[str]:
    return ["--model", str(pair[0]), "--mmproj", str(pair[1]), *SHORT]


@pytest.fixture(scope="module")
def qwen25(tiny_model: tuple[Path, Path]) -> list[str]:
    return args_of(tiny_model)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    pair = load_script("make_tiny_model").write_tiny_pair(tmp_path_factory.mktemp("qwen3vl"), shape="tiny-qwen3vl")
    return args_of(pair)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory, images: Path) -> Path:
    """Images (one broken) beside clips of every container, codec and oddity, good and bad."""
    folder = tmp_path_factory.mktemp("mixed")
    for name in (*IMAGES, "truncated.jpg"):
        shutil.copy(images / name, folder / name)
    for kind in (*GOOD, *BAD):
        getattr(clips, kind)(folder)
    return folder


def jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("Error: ")]


@pytest.mark.parametrize("family", ["qwen25", "qwen3"])
def test_one_clip_prints_its_caption(family: str, request: pytest.FixtureRequest, mixed: Path) -> None:
    args = request.getfixturevalue(family)
    result = run_cli("caption", str(mixed / "clip.mp4"), *args, "-v")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert any(line.startswith("4 frames of the 2.00 s video at 2 fps") for line in result.stderr.splitlines()), \
        result.stderr
    with open(mixed / "clip.webm", "rb") as clip:  # on stdin: told by its bytes, kept as a batch writes it
        piped = subprocess.run([sys.executable, "-m", "caprl_local", "caption", "-", "--json", *args], stdin=clip,
                               capture_output=True, text=True, timeout=HANG_S)
    assert piped.returncode == 0, piped.stderr
    record = json.loads(piped.stdout)
    assert record["media"] == "video" and record["prompt"] == VIDEO_PROMPT and record["frames"] == 4


def test_a_mixed_folder_to_jsonl(qwen25: list[str], mixed: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    result = run_cli("caption", str(mixed), *qwen25, "--json", "-o", str(out))
    assert result.returncode == 1, result.stderr  # the bad ones failed; the batch went on
    records = {Path(r["path"]).name: r for r in jsonl(out)}
    assert len(records) == len(list(mixed.iterdir()))  # one record per input
    for name in GOOD.values():
        r = records[name]
        assert isinstance(r["caption"], str) and VIDEO_FIELDS <= r.keys(), r
        assert r["media"] == "video" and r["prompt"] == VIDEO_PROMPT and r["frames"] >= 1 and r["fps"] > 0
        assert r["image_tokens"] == r["video_tokens"] > 0 and r["duration_s"] > 0
        assert r.get("truncated") is (True if name in CUT_SHORT else None), r
    assert (records["rotated.mp4"]["frame_width"], records["rotated.mp4"]["frame_height"]) == (84, 112)  # upright
    for name in IMAGES:  # images' records are as they always were
        assert "caption" in records[name] and not VIDEO_FIELDS & records[name].keys()
        assert records[name]["prompt"] == DEFAULT_PROMPT
    failed = {name: r for name, r in records.items() if "error" in r}
    assert failed.keys() == {name for name, _ in BAD.values()} | {"truncated.jpg"}
    for name, words in BAD.values():
        assert failed[name]["media"] == "video" and failed[name]["error_kind"] == "ImageError"
        assert words in failed[name]["error"] and "\n" not in failed[name]["error"]
    lines = errors(result.stderr)
    assert len(lines) == len(failed) and all(any(name in line for line in lines) for name in failed), result.stderr
    frames = sum(r.get("frames", 0) for r in records.values())
    assert (f"Captioned {len(records) - len(failed)} of {len(records)} images and videos, 3 images and {len(GOOD)} "
            f"videos from {frames} frames (0 skipped, {len(failed)} failed)") in result.stderr.splitlines()[-1]
    assert "Traceback" not in result.stderr


def test_text_output_names_each_video(qwen25: list[str], mixed: Path, tmp_path: Path) -> None:
    folder = tmp_path / "few"
    folder.mkdir()
    for name in ("clip.mp4", "photo.jpg"):
        shutil.copy(mixed / name, folder / name)
    (folder / "deeper").mkdir()
    shutil.copy(mixed / "clip.webm", folder / "deeper" / "clip.webm")
    result = run_cli("caption", str(folder), *qwen25)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("==> ") == 2 and f"==> {folder / 'clip.mp4'} <==" in result.stdout
    assert "Captioned 2 of 2 images and videos, 1 image and 1 video from 4 frames" in result.stderr
    deep = run_cli("caption", str(folder), *qwen25, "-r", "--format", "jsonl")
    assert [Path(r["path"]).name for r in map(json.loads, deep.stdout.splitlines())] == ["clip.mp4", "clip.webm",
                                                                                          "photo.jpg"]


def test_budgets_and_temporal_merging(qwen3: list[str], mixed: Path, tmp_path: Path) -> None:
    """Qwen3-VL merges frames in pairs: N frames of a w x h grid of 32-pixel cells cost N/2 x the grid."""
    out = tmp_path / "out.jsonl"
    names = [str(mixed / name) for name in ("clip.mkv", "clip.mp4", "vfr.mkv", "photo.jpg")]
    plain = run_cli("caption", *names, *qwen3, "--json", "-o", str(out), "--fps", "4")
    assert plain.returncode == 0, plain.stderr
    for r in jsonl(out)[:3]:
        grid = (r["frame_width"] // 32) * (r["frame_height"] // 32)
        assert r["video_tokens"] == math.ceil(r["frames"] / 2) * grid, r
        assert r["frames"] > 4 and r["fps"] > 2  # --fps reached the engine
    capped = tmp_path / "capped.jsonl"
    small = run_cli("caption", *names, *qwen3, "--json", "-o", str(capped), "--fps", "4", "--max-video-tokens", "64",
                    "--max-frames", "6")
    assert small.returncode == 0, small.stderr
    videos = jsonl(capped)[:3]
    assert all(r["video_tokens"] <= 64 and r["frames"] <= 6 for r in videos), videos
    assert all(r["frames"] >= 2 for r in videos)


def test_a_list_names_videos_and_keeps_its_fields(qwen25: list[str], mixed: Path, tmp_path: Path) -> None:
    listing = tmp_path / "list.jsonl"
    listing.write_text(json.dumps({"video": str(mixed / "clip.mov"), "id": 1}) + "\n"
                       + json.dumps({"image": str(mixed / "vfr.mkv"), "id": 2}) + "\n"
                       + json.dumps({"image": str(mixed / "photo.jpg"), "id": 3}) + "\n")
    result = run_cli("caption", "--from-list", str(listing), *qwen25, "--json")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(r["id"] for r in records) == [1, 2, 3]
    assert [r.get("media") for r in sorted(records, key=lambda r: r["id"])] == ["video", "video", None]
    plain = tmp_path / "list.txt"
    plain.write_text("clip.mp4\nmissing.mp4\n")
    shutil.copy(mixed / "clip.mp4", tmp_path / "clip.mp4")
    listed = run_cli("caption", "--from-list", str(plain), *qwen25, "--json")
    assert listed.returncode == 1
    got = {Path(r["path"]).name: r for r in map(json.loads, listed.stdout.splitlines())}
    assert got["clip.mp4"]["frames"] == 4 and got["missing.mp4"]["media"] == "video" and "error" in got["missing.mp4"]


def test_sidecars_beside_videos(qwen25: list[str], mixed: Path, tmp_path: Path) -> None:
    folder = tmp_path / "side"
    folder.mkdir()
    for name in ("clip.mp4", "clip.mkv", "rotated.mp4", "photo.jpg"):
        shutil.copy(mixed / name, folder / name)
    first = run_cli("caption", str(folder), *qwen25, "--sidecar")
    assert first.returncode == 0 and first.stdout == "", first.stderr
    assert (folder / "rotated.txt").read_text().strip() and (folder / "photo.txt").read_text().strip()
    assert (folder / "clip.mp4.txt").is_file() and (folder / "clip.mkv.txt").is_file()  # two clips, one stem
    again = run_cli("caption", str(folder), *qwen25, "--sidecar")
    assert again.returncode == 0
    assert "Nothing to do: all 4 images and videos already have a result" in again.stderr
    asked = run_cli("caption", str(folder), *qwen25, "--sidecar", "--prompt", "Name the colours.")
    assert "Captioned 4 of 4" in asked.stderr  # another prompt is other work


def test_shards_split_a_mixed_folder_the_same_way_again(qwen25: list[str], mixed: Path, tmp_path: Path) -> None:
    halves = []
    for k in (1, 2):
        out = tmp_path / f"shard{k}.jsonl"
        run = run_cli("caption", str(mixed), *qwen25, "--json", "-o", str(out), "--shard", f"{k}/2")
        assert run.returncode in (0, 1), run.stderr
        halves.append({Path(r["path"]).name for r in jsonl(out)})
    assert halves[0] and halves[1] and not halves[0] & halves[1]
    assert halves[0] | halves[1] == {p.name for p in mixed.iterdir()}
    assert any(n.endswith(".mp4") for n in halves[0]) or any(n.endswith(".mp4") for n in halves[1])
    link = tmp_path / "elsewhere"
    link.symlink_to(mixed)  # the folder spelt another way, on another machine
    again = tmp_path / "again.jsonl"
    run = run_cli("caption", "elsewhere/", *qwen25, "--json", "-o", str(again), "--shard", "1/2", cwd=tmp_path)
    assert run.returncode in (0, 1), run.stderr
    assert {Path(r["path"]).name for r in jsonl(again)} == halves[0]
    assert {Path(i.path).name for i in collect_inputs([str(mixed)], shard=(1, 2))} == halves[0]


def test_kill_9_mid_batch_then_resume(qwen25: list[str], mixed: Path, tmp_path: Path) -> None:
    folder = tmp_path / "many"
    folder.mkdir()
    kinds = ["clip.mp4", "photo.jpg", "clip.mkv", "garbage.mp4", "vfr.mkv", "alpha.png", "clip.webm"]
    good = set()
    for i in range(35):
        name = kinds[i % len(kinds)]
        copy = folder / f"{i:02d}{Path(name).suffix}"
        shutil.copy(mixed / name, copy)
        if name != "garbage.mp4":
            good.add(str(copy))
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "caprl_local", "caption", str(folder), *qwen25, "--max-tokens", "48",
           "--no-loop-guard", "--json", "-o", str(out), "--sidecar", "--parallel", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + HANG_S
    while proc.poll() is None and time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 4):
        time.sleep(0.02)
    assert proc.poll() is None, "the batch ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=HANG_S)
    text = out.read_text()
    ended = text[: text.rfind("\n") + 1]
    assert all(json.loads(line) for line in ended.splitlines())  # every whole line intact
    before = len(ended.splitlines())
    assert before < 35, "the batch finished before the kill"
    rest = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_S, stdin=subprocess.DEVNULL)
    assert rest.returncode == 1 and "Traceback" not in rest.stderr, rest.stderr  # the garbage clips fail
    records = jsonl(out)  # every line whole
    captions: dict[str, int] = {}
    for r in records:
        if "caption" in r:
            captions[r["path"]] = captions.get(r["path"], 0) + 1
    assert set(captions) == good and set(captions.values()) == {1}  # each one once, the rest finished
    for path in good:
        assert Path(path).with_suffix(".txt").read_text().strip()
    assert not list(folder.glob(".*.tmp"))


def test_without_pyav_a_video_fails_with_one_line(qwen25: list[str], mixed: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    hidden = tmp_path / "hidden" / "av"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('PyAV is not installed here', name='av')\n")
    monkeypatch.setenv("PYTHONPATH", str(hidden.parent))
    out = tmp_path / "out.jsonl"
    result = run_cli("caption", str(mixed / "clip.mp4"), str(mixed / "photo.jpg"), *qwen25, "--json", "-o", str(out))
    assert result.returncode == 1, result.stderr
    records = {Path(r["path"]).name: r for r in jsonl(out)}
    assert "caption" in records["photo.jpg"]
    assert "needs PyAV" in records["clip.mp4"]["error"] and "install" in records["clip.mp4"]["error"]
    assert errors(result.stderr) == [f"Error: {mixed / 'clip.mp4'}: {records['clip.mp4']['error']}"]
    alone = run_cli("caption", str(mixed / "clip.mp4"), *qwen25)
    assert alone.returncode == 1 and len(alone.stderr.strip().splitlines()) == 1 and "needs PyAV" in alone.stderr


def test_a_bad_clips_name_is_escaped(qwen25: list[str], mixed: Path, tmp_path: Path) -> None:
    folder = tmp_path / "odd"
    folder.mkdir()
    shutil.copy(mixed / "garbage.mp4", folder / "bad\x1b[31mred.mp4")
    shutil.copy(mixed / "clip.mp4", folder / "good.mp4")
    result = run_cli("caption", str(folder), *qwen25)
    assert result.returncode == 1
    assert "\x1b" not in result.stderr and len(errors(result.stderr)) == 1 and "red.mp4" in result.stderr


def test_the_video_options_are_the_engines_and_serves() -> None:
    for command in ("caption", "serve"):
        shown = " ".join(run_cli(command, "--help").stdout.split())
        assert "--fps" in shown and "--max-frames" in shown and "--max-video-tokens" in shown
    shown = " ".join(run_cli("caption", "--help").stdout.split())
    assert "2 fps" in shown and "128" in shown and "-c/--ctx-size" in shown


class Idle:
    """A captioner with nothing in flight (reading its next input)."""

    def activity(self) -> Activity:
        return Activity(generating=0, waiting=0, tokens=0)


def test_the_bar_names_a_video_being_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(console.BatchProgress, "POLL_S", 0.01)
    order = [BatchItem("in/clip\x1b[2J.mp4"), BatchItem("in/photo.jpg")]
    progress = console.BatchProgress(2, 0, show=True, quiet=True, videos=1, order=order)
    shown: list[str] = []
    seen = threading.Event()
    original = progress.bar.refresh

    def refresh(*args: object, **kwargs: object) -> None:
        original(*args, **kwargs)
        shown.append(str(progress.bar))
        if "reading video" in shown[-1]:
            seen.set()

    monkeypatch.setattr(progress.bar, "refresh", refresh)
    progress.watch(Idle())  # type: ignore[arg-type]
    assert seen.wait(HANG_S)
    progress.finish(None)
    assert any("reading video clip" in s and "\x1b" not in s for s in shown), shown
    assert console.stage(Activity(1, 0, 0, encoding=1), None, video="clip.mp4") == "encoding video clip.mp4"
    assert console.stage(Activity(0, 0, 50), 12.0) == "12.0 tokens/s"  # images: as before


def test_an_image_batch_reads_as_before(qwen25: list[str], images: Path) -> None:
    result = run_cli("caption", str(images / "photo.jpg"), str(images / "truncated.jpg"), *qwen25, "--json")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("Captioned 1 of 2 images (0 skipped, 1 failed) in ")
    assert "media" not in result.stdout
