"""Captioner captions videos: a clip's path, its bytes or a Video value, alone or in a batch with images.

On the tiny Qwen2.5-VL, Qwen3-VL and InternVL pairs with clips scripts/make_test_videos.py writes
(several codecs and containers, a rotated one, a variable-frame-rate one, broken ones): a caption for
each good clip with what the model saw (Caption.video), the frames within the token budget and merged
in pairs where the family merges them, and a one-line error for each bad clip while the batch goes on.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import load_script

from caprl_local import Caption, Captioner, CaptionFailure, ImageError, Video
from caprl_local.clips import is_video_input
from caprl_local.prompts import VIDEO_PROMPT

pytest.importorskip("av", reason="videos need PyAV (the video extra)")

tiny = load_script("make_tiny_model")
clips = load_script("make_test_videos")
GOOD = ["mp4", "webm", "avi", "mov", "mkv", "with_audio", "rotated", "vfr"]
BAD = ["truncated_mp4", "garbage", "text", "empty", "audio_only", "no_frames", "huge", "bomb"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("clips")


@pytest.fixture(scope="module", params=["tiny", "tiny-qwen3vl", "tiny-internvl"])
def cap(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    pair = tiny.write_tiny_pair(tmp_path_factory.mktemp(request.param), shape=request.param)
    with Captioner(*pair, threads=1, parallel=2, isolate=False) as captioner:
        yield captioner


def grid(cap: Captioner) -> int:
    return getattr(cap._budget, "align", 0)


def test_a_clip_is_captioned_from_its_frames(cap: Captioner, folder: Path) -> None:
    clip = clips.mp4(folder)
    caption = cap.caption(clip, max_tokens=6)
    assert caption.text and caption.video is not None
    video = caption.video
    assert video.duration_s == pytest.approx(2.0, abs=0.2) and video.frames == 4 and video.fps == pytest.approx(2.0)
    assert caption.image_tokens == video.tokens > 0 and caption.prompt_tokens > video.tokens
    if cap.architecture == "qwen3":  # InternVL: each frame an image of its own, 256 tokens
        assert video.tokens == 4 * 256
    else:  # Qwen-VL: two frames fold into one image of the grid
        assert video.width % grid(cap) == 0 and video.height % grid(cap) == 0
        per_image = (video.width // grid(cap)) * (video.height // grid(cap))
        images = 2 if cap.architecture == "qwen3vl" else 3  # llama.cpp's form stands frame 0 alone
        assert video.tokens == images * per_image < 4 * per_image


def test_a_path_bytes_and_video_value_are_the_same_caption(cap: Captioner, folder: Path) -> None:
    clip = clips.mkv(folder)
    by_path = cap.caption(clip, max_tokens=6)
    assert cap.caption(clip.read_bytes(), max_tokens=6).text == by_path.text
    assert cap.caption(Video(clip.read_bytes(), name="clip"), max_tokens=6).text == by_path.text
    assert is_video_input(clip.read_bytes()) and not is_video_input(b"\x89PNG\r\n\x1a\n....")
    assert is_video_input(b"\x00\x00\x00\x08moov" + bytes(8))  # a QuickTime file from before MP4's ftyp


def test_a_video_prompt_defaults_to_capr_video_s_and_a_given_one_is_kept(cap: Captioner, folder: Path) -> None:
    clip, seen = clips.mp4(folder), []
    session = cap._live().session
    prompt_chat = session.prompt_chat

    def watch(seq, messages, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(messages[-1].text)
        return prompt_chat(seq, messages, *args, **kwargs)

    session.prompt_chat = watch  # type: ignore[method-assign]
    try:
        cap.caption(clip, max_tokens=2)
        cap.caption(clip, max_tokens=2, prompt="What happens?")
        cap.caption(clip, max_tokens=2, preset="video-dense")
    finally:
        session.prompt_chat = prompt_chat  # type: ignore[method-assign]
    assert seen[0] == VIDEO_PROMPT and seen[1] == "What happens?" and "[mm:ss]" in seen[2]


def test_a_mixed_batch_captions_the_good_and_names_the_bad(cap: Captioner, folder: Path, images: Path) -> None:
    inputs = [images / "photo.jpg", *(getattr(clips, kind)(folder) for kind in GOOD + BAD), images / "pixel.png"]
    results = list(cap.caption_many(inputs, max_tokens=4))
    assert [r.index for r in results] == list(range(len(inputs)))
    by_name = {Path(r.image).name: r for r in results}
    assert isinstance(results[0], Caption) and results[0].video is None
    assert isinstance(results[-1], Caption) and results[-1].video is None
    for result in results[1:1 + len(GOOD)]:
        assert isinstance(result, Caption), result
        assert result.video is not None and result.video.frames >= 2
    for result in results[1 + len(GOOD):-1]:
        assert isinstance(result, CaptionFailure), result
        assert "\n" not in result.error and Path(result.image).name in result.error
    assert "audio" in by_name["audio.mp4"].error  # type: ignore[union-attr]


def test_a_rotated_clip_is_read_upright(cap: Captioner, folder: Path) -> None:
    video = cap.caption(clips.rotated(folder), max_tokens=2).video
    assert video is not None and video.height > video.width  # stored 96x64, shown 64x96


def test_the_frames_keep_within_the_token_budget(tmp_path: Path, folder: Path) -> None:
    pair = tiny.write_tiny_pair(tmp_path, shape="tiny-qwen3vl")
    clip = clips.hd(folder)
    for most in (64, 300, 1000):
        with Captioner(*pair, threads=1, isolate=False, video_max_tokens=most) as cap:
            video = cap.caption(clip, max_tokens=2).video
            assert video is not None and 0 < video.tokens <= most and video.frames % 2 == 0
    with Captioner(*pair, threads=1, isolate=False, n_ctx=512) as cap:  # the context's room bounds it too
        caption = cap.caption(clip, max_tokens=64)
        assert caption.video is not None and caption.prompt_tokens + 64 <= 512
        with pytest.raises(ImageError, match=r"no room for a video; raise the context size"):
            cap.caption(clip, max_tokens=400)


def test_fewer_frames_per_second_take_fewer_frames(tmp_path: Path, folder: Path) -> None:
    pair = tiny.write_tiny_pair(tmp_path, shape="tiny-qwen3vl")
    clip = clips.mp4(folder)  # 2 s
    with Captioner(*pair, threads=1, isolate=False, video_fps=1.0, video_max_frames=2) as cap:
        video = cap.caption(clip, max_tokens=2).video
        assert video is not None and video.frames == 2
    with pytest.raises(Exception, match="video_fps"):
        Captioner(*pair, threads=1, isolate=False, video_fps=0)


def test_activity_counts_the_frames_read(cap: Captioner, folder: Path) -> None:
    before = cap.activity().frames
    video = cap.caption(clips.mp4(folder), max_tokens=2).video
    assert video is not None and cap.activity().frames == before + video.frames


def test_a_clip_that_ends_early_is_as_long_as_it_was_read(cap: Captioner, folder: Path) -> None:
    caption = cap.caption(clips.avi_long_claim(folder), max_tokens=2)  # 2 s, its header says 20
    assert caption.video is not None and caption.video.truncated
    assert caption.video.duration_s <= 3.0  # not the length its header claims
