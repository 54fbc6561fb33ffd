"""The video frame reader: real clips of every container and awkward kind (scripts/make_test_videos.py),
read the way a Qwen-VL model is fed: timestamps, sizes on the grid, the token budget, rotation, bounds."""

from __future__ import annotations

import http.server
import itertools
import logging
import math
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from helpers import load_script
from PIL import Image

from caprl_local.errors import Cancelled, ImageError
from caprl_local.video import Frame, is_video, probe_video, read_frames
from caprl_local.videoplan import DEFAULT_FPS, VideoInfo, VideoPlan, plan_video

pytest.importorskip("av", reason="PyAV, the video extra, is not installed (pip install '.[video]')")

ALIGNS = (28, 32)  # Qwen2.5-VL (14 x 2) and Qwen3-VL (16 x 2)


@pytest.fixture(scope="module")
def videos() -> ModuleType:
    return load_script("make_test_videos")


@pytest.fixture(scope="module")
def clips(videos: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return videos.write_all(tmp_path_factory.mktemp("videos"))


def _read(path: Path | bytes, **plan: object) -> tuple[VideoInfo, VideoPlan, list[Frame]]:
    info = probe_video(path)
    chosen = plan_video(info, **{"align": 28, **plan})  # type: ignore[arg-type]
    return info, chosen, list(read_frames(path, chosen, info=info))


def _assert_fits(plan: VideoPlan, frames: list[Frame], align: int, max_tokens: int) -> None:
    w, h = plan.frame_size
    assert w % align == 0 and h % align == 0 and w >= align and h >= align
    assert plan.tokens == len(plan.timestamps) // plan.merge * (w // align) * (h // align) <= max_tokens
    assert len(frames) % plan.merge == 0 and len(frames) >= plan.merge
    assert all(f.image.mode == "RGB" and f.image.size == (w, h) for f in frames)
    assert [f.index for f in frames] == list(range(len(frames)))


# --- what a clip is --------------------------------------------------------------------------------------


def test_videos_are_known_by_their_suffix() -> None:
    assert all(is_video(f"clip{s}") for s in (".mp4", ".MOV", ".mkv", ".webm", ".Avi"))
    assert not any(is_video(n) for n in ("a.gif", "a.jpg", "a.png", "mp4", "a.mp4.txt"))
    assert is_video(Path("dir.d") / "x.mp4")


@pytest.mark.parametrize(("kind", "size", "fps", "seconds"), [
    ("mp4", (64, 48), 10, 2.0), ("h264", (96, 64), 10, 2.0), ("webm", (80, 60), 10, 2.0), ("avi", (64, 48), 10, 2.0),
    ("mov", (128, 96), 12, 1.0), ("mkv", (160, 120), 10, 3.0),
])
def test_probe_reads_each_container(videos: ModuleType, tmp_path: Path, kind: str, size: tuple[int, int], fps: int,
                                    seconds: float) -> None:
    path = videos.GOOD[kind](tmp_path)
    info = probe_video(path)
    assert (info.width, info.height, info.rotation, info.has_audio) == (*size, 0, False)
    assert info.fps == pytest.approx(fps) and info.duration_s == pytest.approx(seconds, abs=0.15)
    assert info.codec and info.n_frames_hint in (0, round(fps * seconds))
    assert probe_video(path.read_bytes()) == info  # bytes read as the file does


def test_a_clip_without_a_duration_is_measured(videos: ModuleType, clips: Path) -> None:
    info, plan, frames = _read(clips / "noduration.mkv", fps=2.0)
    assert info.duration_s == pytest.approx(3.0, abs=0.11) and len(frames) == 6
    assert [videos.frame_number(f.image) for f in frames] == [math.floor(t * 10 + 1e-6) for t in plan.timestamps]


def test_probe_sees_the_sound(clips: Path) -> None:
    assert probe_video(clips / "talk.mkv").has_audio


# --- which frames, at what size ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["clip.mp4", "h264.mp4", "clip.webm", "clip.avi", "clip.mov", "clip.mkv", "talk.mkv"])
@pytest.mark.parametrize("align", ALIGNS)
def test_each_frame_is_the_one_shown_at_its_time(videos: ModuleType, clips: Path, name: str, align: int) -> None:
    info, plan, frames = _read(clips / name, fps=5.0, align=align)
    _assert_fits(plan, frames, align, 16384)
    assert [f.timestamp_s for f in frames] == list(plan.timestamps)
    assert plan.timestamps[0] == 0 and plan.timestamps[-1] <= info.duration_s
    assert len(frames) == len(plan.timestamps) == round(info.duration_s * 5 / 2) * 2  # 5 frames a second
    for frame in frames:  # constant rate: frame n is shown from n / fps on
        shown = math.floor(frame.timestamp_s * info.fps + 1e-6)
        assert videos.frame_number(frame.image) == shown, (frame, shown)
        assert frame.source_s == pytest.approx(shown / info.fps) and not frame.repeated


def test_a_variable_frame_rate_is_read_by_timestamps(videos: ModuleType, clips: Path) -> None:
    _, plan, frames = _read(clips / "vfr.mkv", fps=4.0)
    times = [t / 1000 for t in videos.VFR_TIMES_MS]
    assert len(frames) == len(plan.timestamps) >= 8
    for frame in frames:
        shown = max(n for n, t in enumerate(times) if t <= frame.timestamp_s + 1e-9)  # the last frame not after it
        assert videos.frame_number(frame.image) == shown and frame.source_s == pytest.approx(times[shown])


def test_bytes_give_the_frames_a_path_gives(clips: Path) -> None:
    _, plan, from_path = _read(clips / "clip.webm", fps=3.0)
    from_bytes = list(read_frames((clips / "clip.webm").read_bytes(), plan))
    assert [np.asarray(f.image).tobytes() for f in from_bytes] == [np.asarray(f.image).tobytes() for f in from_path]


def test_more_threads_read_the_same_frames(clips: Path) -> None:
    _, plan, one = _read(clips / "h264.mp4", fps=4.0)
    two = list(read_frames(clips / "h264.mp4", plan, threads=2))
    assert [f.source_s for f in two] == [f.source_s for f in one]


@pytest.mark.parametrize(("name", "turn"), [("rotated.mp4", 270), ("rotated90.mp4", 90), ("rotated180.mp4", 180)])
def test_each_rotation_is_undone(videos: ModuleType, clips: Path, name: str, turn: int) -> None:
    """Every quarter turn a display matrix asks for: the frame looks like the stored picture so turned."""
    info, plan, frames = _read(clips / name, fps=2.0)
    assert info.rotation == turn and (info.width, info.height) == ((96, 64) if turn == 180 else (64, 96))
    for frame in frames:
        number = math.floor(frame.timestamp_s * 10 + 1e-6)
        expected = Image.fromarray(videos.picture(96, 64, number)).rotate(turn, expand=True).resize(plan.frame_size)
        assert np.abs(np.asarray(frame.image).astype(int) - np.asarray(expected).astype(int)).mean() < 12, frame


def test_a_rotated_clip_is_shown_upright(videos: ModuleType, clips: Path) -> None:
    """Stored 96x64 with a display matrix of -90 degrees, as a phone holds a portrait clip: shown 64x96,
    turned clockwise, so that the stored top (red) is on the right and the stored left (green) on top."""
    info, plan, frames = _read(clips / "rotated.mp4", fps=2.0)
    assert (info.width, info.height, info.rotation) == (64, 96, 270)
    assert plan.frame_size[0] < plan.frame_size[1]
    upright = np.asarray(frames[0].image).astype(int)
    h, w = upright.shape[:2]
    assert upright[1, w // 2, 1] > 150 > upright[1, w // 2, 0]  # green along the top
    assert upright[h // 2, w - 2, 0] > 150 > upright[h // 2, w - 2, 1]  # red down the right
    assert upright[h // 2, 1, 2] > 150  # blue down the left
    stored = [videos.frame_number(f.image.transpose(Image.Transpose.ROTATE_90)) for f in frames]
    assert stored == [math.floor(t * 10 + 1e-6) for t in plan.timestamps]


def test_transparency_is_shown_on_white(clips: Path) -> None:
    _, _, frames = _read(clips / "alpha.mkv")
    pixels = np.asarray(frames[0].image).astype(int)
    w = pixels.shape[1]
    assert (pixels[:, w * 3 // 4] > 245).all()
    assert pixels[pixels.shape[0] // 2, w // 8 + 4, 1] < 245  # the opaque half keeps its colours


# --- clips that lie or break --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["claims8s.mkv", "claims20s.avi"])
def test_a_header_claiming_more_than_there_is_ends_at_the_real_end(videos: ModuleType, clips: Path, name: str,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    info = probe_video(clips / name)
    assert info.duration_s > 7  # the claim; the clip holds 2 s
    plan = plan_video(info, fps=5.0, align=28)
    with caplog.at_level(logging.WARNING, logger="caprl_local"):
        stream = read_frames(clips / name, plan, info=info)
        frames = list(stream)
    assert 8 <= len(frames) <= 12 and len(frames) % 2 == 0  # about 2 s at 5 a second
    assert all(f.source_s < 2.0 for f in frames) and stream.dropped == len(plan.timestamps) - len(frames) + stream.padded
    assert stream.truncated and not stream.damaged
    assert [videos.frame_number(f.image) for f in frames if not f.repeated] == \
        [math.floor(f.timestamp_s * 10 + 1e-6) for f in frames if not f.repeated]
    assert any(str(clips / name) in r.getMessage() and "ends" in r.getMessage() for r in caplog.records)


def test_a_truncated_clip_gives_the_frames_it_has(clips: Path, caplog: pytest.LogCaptureFixture) -> None:
    info = probe_video(clips / "truncated.mkv")  # 4 s said, 40% there
    plan = plan_video(info, fps=5.0, align=28)
    with caplog.at_level(logging.WARNING, logger="caprl_local"):
        stream = read_frames(clips / "truncated.mkv", plan, info=info)
        frames = list(stream)
    assert 2 <= len(frames) < len(plan.timestamps) and len(frames) % 2 == 0
    assert stream.truncated and stream.dropped > 0
    assert caplog.records and all("\n" not in r.getMessage() for r in caplog.records)


def test_a_damaged_stretch_is_skipped(videos: ModuleType, clips: Path) -> None:
    """Garbage over the middle of a clip: the frames on both sides are read, and the lost stretch shows the
    last frame before it, as a player would. (`damaged` says so where FFmpeg reports the damage: FFmpeg 8
    does; FFmpeg 7's Matroska reader skips to the next good cluster without a word.)"""
    info = probe_video(clips / "damaged.mkv")
    plan = plan_video(info, fps=5.0, align=28)
    stream = read_frames(clips / "damaged.mkv", plan, info=info)
    frames = list(stream)
    assert len(frames) == len(plan.timestamps) and frames[-1].source_s > 2.5
    assert all(videos.frame_number(f.image) == round(f.source_s * 10) for f in frames)
    assert stream.truncated == stream.damaged


def test_an_odd_count_delivered_is_completed_by_the_last_frame(clips: Path) -> None:
    """The clip ends after 2 s: the planned 3.5 s goes, and the third frame is repeated to fill its pair."""
    plan = VideoPlan(fps=1.0, timestamps=(0.0, 0.5, 1.0, 3.5), frame_size=(56, 56), tokens=8, merge=2)
    stream = read_frames(clips / "clip.mp4", plan)
    frames = list(stream)
    assert [(f.timestamp_s, f.repeated) for f in frames] == [(0.0, False), (0.5, False), (1.0, False), (1.0, True)]
    assert np.array_equal(np.asarray(frames[3].image), np.asarray(frames[2].image))
    assert (stream.dropped, stream.padded) == (1, 1)


# Each bad clip, and the words its one-line error must have.
BAD = [
    ("cut.mp4", "not a video file"), ("garbage.mp4", "not a video file"), ("notes.mov", "not a video file"),
    ("empty.webm", "empty"), ("audio.mp4", "only audio"), ("noframes.mkv", "no frames"), ("huge.mkv", "65535x240"),
    ("bomb.mkv", "8000x8000"), ("decade.mkv", "hours"), ("missing.mp4", "no such file"), (".", "directory"),
]


@pytest.mark.parametrize(("name", "words"), BAD)
def test_bad_clips_fail_in_one_line_naming_the_file(clips: Path, name: str, words: str) -> None:
    path = clips / name
    for attempt in (lambda: probe_video(path),
                    lambda: list(read_frames(path, VideoPlan(2.0, (0.0, 0.5), (56, 56), 4, 2)))):
        with pytest.raises(ImageError) as info:
            attempt()
        message = str(info.value)
        assert str(path) in message and words in message and "\n" not in message, message


@pytest.mark.parametrize("data", [b"", b"\x00" * 3000, b"RIFF\x10\x00\x00\x00AVI LIST"])
def test_bad_bytes_fail_in_one_line(data: bytes) -> None:
    with pytest.raises(ImageError) as info:
        probe_video(data)
    assert f"<{len(data)} bytes>" in str(info.value) and "\n" not in str(info.value)


def test_a_list_naming_other_files_opens_none(clips: Path, tmp_path: Path) -> None:
    """A concat list or playlist dressed as an .mp4 would have FFmpeg read other files or fetch URLs."""
    hits: list[str] = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server name
            hits.append(self.path)
            self.send_error(404)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/clip.mp4"
        (tmp_path / "list.mp4").write_text(f"ffconcat version 1.0\nfile '{clips / 'clip.mp4'}'\nfile '{url}'\n")
        (tmp_path / "list.mkv").write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\n{url}\n#EXT-X-ENDLIST\n")
        for name in ("list.mp4", "list.mkv"):
            with pytest.raises(ImageError, match="not a video file"):
                probe_video(tmp_path / name)
    finally:
        server.shutdown()
        server.server_close()
    assert hits == []


def test_without_pyav_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch, clips: Path) -> None:
    monkeypatch.setitem(sys.modules, "av", None)  # an import of it fails as a missing package's does
    with pytest.raises(ImageError) as info:
        probe_video(clips / "clip.mp4")
    message = str(info.value)
    assert "PyAV" in message and "caprl-local[video]" in message and "pip install '.[video]'" in message
    assert "\n" not in message


def test_a_cancel_or_a_spent_deadline_stops_the_read(clips: Path) -> None:
    _, plan, _ = _read(clips / "clip.mkv")
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled, match="clip.mkv: cancelled"):
        list(read_frames(clips / "clip.mkv", plan, cancelled=stop))
    with pytest.raises(Cancelled):
        list(read_frames(clips / "clip.mkv", plan, cancelled=lambda: True))
    with pytest.raises(ImageError, match="took more than"):
        list(read_frames(clips / "clip.mkv", plan, deadline_s=0))


def test_an_endless_stream_is_cut_at_the_bounds(clips: Path, monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """Packets are counted, whatever their timestamps say (a looping stream's go round and round)."""
    import caprl_local.video as video

    _, plan, _ = _read(clips / "clip.mkv", fps=5.0)
    monkeypatch.setattr(video, "MIN_PACKETS", 6)
    monkeypatch.setattr(video, "PACKETS_PER_SECOND", 0)
    with caplog.at_level(logging.WARNING, logger="caprl_local"):
        stream = read_frames(clips / "clip.mkv", plan)
        frames = list(stream)
    assert 2 <= len(frames) <= 6 and stream.truncated and all(f.source_s <= 0.6 for f in frames)
    assert any("bound" in r.getMessage() for r in caplog.records)


def test_a_fifo_is_refused_before_it_is_opened(tmp_path: Path) -> None:
    import os

    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    os.mkfifo(tmp_path / "pipe.mp4")  # opening it would wait for a writer
    with pytest.raises(ImageError, match="not a regular file"):
        probe_video(tmp_path / "pipe.mp4")


def test_a_closed_stream_closes_its_file(clips: Path) -> None:
    _, plan, _ = _read(clips / "clip.mkv")
    with read_frames(clips / "clip.mkv", plan) as stream:
        first = next(stream)
    assert first.index == 0
    with pytest.raises(StopIteration):
        next(stream)


# --- memory ------------------------------------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the memory in use from /proc")
def test_a_720p_read_holds_a_few_frames_not_the_video(videos: ModuleType, tmp_path: Path) -> None:
    """50 frames of 1280x720: decoded whole they would take 138 MB (and 85 MB more resized); read and
    dropped one by one, the memory in use grows by no more than a few frames' worth."""
    path = videos.hd(tmp_path)
    info = probe_video(path)
    plan = plan_video(info, fps=25.0, max_frames=50, max_tokens=10**6, align=28)
    assert len(plan.timestamps) == 50 and plan.frame_size == (1008, 560)
    stream = read_frames(path, plan, info=info)
    next(stream)
    next(stream)
    before = _rss()
    most = before
    for frame in stream:
        assert frame.image.size == plan.frame_size
        del frame
        most = max(most, _rss())
    frame_bytes = 1280 * 720 * 3
    assert most - before < 12 * frame_bytes, f"grew by {(most - before) / 2**20:.0f} MiB"


# --- the plan ----------------------------------------------------------------------------------------------


def _info(duration: float, size: tuple[int, int] = (1920, 1080), fps: float = 30.0) -> VideoInfo:
    return VideoInfo(duration, fps, size[0], size[1], 0, round(duration * fps), "h264", False)


def test_the_default_rate_is_qwens_two_a_second() -> None:
    plan = plan_video(_info(10.0, (640, 360)), align=28)
    assert DEFAULT_FPS == 2.0 and len(plan.timestamps) == 20 and plan.fps == pytest.approx(2.0)
    assert plan.timestamps[0] == 0 and plan.timestamps[-1] == pytest.approx(10 - 1 / 30)


def _plans() -> Iterator[tuple[VideoInfo, dict[str, int | float]]]:
    sizes = [(1920, 1080), (1080, 1920), (64, 48), (1, 1), (8192, 16), (16, 8192), (3000, 3000)]
    durations = [0.0, 0.04, 0.5, 1.5, 3.3, 61.0, 3600.0, 86400.0]
    for size, duration, fps, (max_tokens, max_frames), align, merge in itertools.product(
            sizes, durations, [0.0, 1.0, 29.97], [(16384, 128), (4096, 32), (300, 128), (8, 8), (100000, 7)], ALIGNS, [1, 2]):
        if max_frames >= merge:
            yield _info(duration, size, fps), {"max_tokens": max_tokens, "max_frames": max_frames, "align": align,
                                                "merge": merge, "fps": 2.0}


def test_every_plan_fits_its_budget() -> None:
    for info, options in _plans():
        plan = plan_video(info, **options)  # type: ignore[arg-type]
        align, merge, count = int(options["align"]), int(options["merge"]), len(plan.timestamps)
        w, h = plan.frame_size
        groups = count // merge
        assert count % merge == 0 and merge <= count <= int(options["max_frames"]), (info, options, plan)
        assert w % align == 0 and h % align == 0 and w >= align and h >= align, (info, options, plan)
        assert plan.tokens == groups * (w // align) * (h // align) <= options["max_tokens"], (info, options, plan)
        assert (w // align) * (h // align) >= min(8, int(options["max_tokens"])), (info, options, plan)  # llama.cpp's least
        assert list(plan.timestamps) == sorted(plan.timestamps) and plan.timestamps[0] == 0, (info, options, plan)
        assert plan.timestamps[-1] <= max(info.duration_s, 0.0), (info, options, plan)
        if info.fps and info.duration_s:  # never more frames than the clip has, unless it has fewer than a group
            assert count <= max(merge, round(info.duration_s * info.fps)), (info, options, plan)


def test_frames_shrink_before_any_is_dropped() -> None:
    long = _info(600.0)
    full = plan_video(long, align=28)  # 128 frames: 64 pairs of 256 tokens fit 16384
    assert len(full.timestamps) == 128 and full.tokens <= 16384 and full.tokens_per_group >= 128
    tight = plan_video(long, align=28, max_tokens=4096)  # 64 pairs would get 64 tokens, under the 128 floor
    groups = len(tight.timestamps) // 2
    assert groups < 64 and tight.tokens <= 4096 < (groups + 1) * tight.tokens_per_group  # as many as fit, no more
    assert tight.tokens_per_group >= 100  # shrunk to about the floor (128 tokens; the resize rounds down), not below
    assert tight.timestamps[0] == 0 and tight.timestamps[-1] == full.timestamps[-1]  # both ends still covered
    gaps = np.diff(tight.timestamps)
    assert gaps.max() - gaps.min() < 1e-3  # evenly spread
    small = plan_video(_info(600.0, (64, 48)), align=28, max_tokens=4096)  # a small frame costs little: all stay
    assert len(small.timestamps) == 128


def test_a_plan_refuses_nonsense_options() -> None:
    for options in ({"fps": 0.0}, {"fps": float("nan")}, {"max_frames": 1}, {"max_tokens": 4}, {"align": 0}):
        with pytest.raises(ValueError):
            plan_video(_info(2.0), **{"align": 28, **options})  # type: ignore[arg-type]
