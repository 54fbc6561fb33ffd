"""Videos into the prompt: the layout of frames and timestamp text per family (pure), the real llama.cpp
reading it on the tiny Qwen2.5-VL, Qwen3-VL and InternVL pairs (frames merged in time, passes of a few
frames equal to one), and the same caption as llama.cpp's own `llama-mtmd-cli --video` on the same clip."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from helpers import HANG_S, ROOT, load_script
from PIL import Image

from caprl_local import CaprlError, Captioner, EngineError, PromptTooLongError
from caprl_local.chat import ChatMessage, ChatVideo, assistant, name_of, render_chat, user, video_pieces, with_prompt
from caprl_local.engine import media
from caprl_local.families import FAMILIES
from caprl_local.families import video_form as form_for
from caprl_local.prompts import chatml
from caprl_local.videoprompt import INTERNVL, LLAMA_CPP, PLAIN, QWEN3_VL, VideoForm, image_groups, layout

tiny = load_script("make_tiny_model")
SHORT = {"max_tokens": 8, "repeat_penalty": 1.0}
ALIGN = {"qwen2vl": 28, "qwen3vl": 32}  # pixels per image token's side: patch x spatial merge


def frames_of(n: int, size: tuple[int, int], shift: float = 0.0) -> list[Image.Image]:
    """n different RGB frames of one size."""
    return [Image.effect_mandelbrot(size, (-2 + (shift + i * 0.05) % 1.5, -1.5 + i * 0.02 % 1, 1, 1.5), 40).convert("RGB")
            for i in range(n)]


def video(n: int, size: tuple[int, int], form: VideoForm, fps: float = 4.0, name: str = "") -> ChatVideo:
    return ChatVideo(frames_of(n, size), tuple(i / fps for i in range(n)), form, name)


# -- the layout (pure) -------------------------------------------------------------------------------


def test_qwen3_puts_the_pairs_mean_time_before_each_pair() -> None:
    assert layout([0, 0.5, 1, 1.5, 2], QWEN3_VL) == (
        "<0.2 seconds>", (0, 1), "<1.2 seconds>", (2, 3), "<2.0 seconds>", (4,))  # a lone last frame: its own time
    assert layout([3.0, 3.5], QWEN3_VL) == ("<3.2 seconds>", (0, 1))
    assert layout([61.0], QWEN3_VL) == ("<61.0 seconds>", (0,))


def test_llama_cpps_form_is_its_video_helpers() -> None:
    """mtmd-helper.cpp: "Video:", then a mark after the first frame at or past each 5 s (0 s included),
    which keeps that frame from its neighbour; the frames between marks go in pairs."""
    at_4fps = [i / 4 for i in range(26)]
    slots = layout(at_4fps, LLAMA_CPP)
    assert slots == ("Video:", (0,), "[0m0.00s]", *((i, i + 1) for i in range(1, 21, 2)), "[0m5.00s]",
                     (21, 22), (23, 24), (25,))
    assert image_groups(slots) == 14
    sparse = layout([0, 12, 70, 71], VideoForm("llama.cpp", every_s=5))  # one mark a frame, a mark on each time
    assert sparse == ("Video:", (0,), "[0m0.00s]", (1,), "[0m12.00s]", (2,), "[1m10.00s]", (3,), "[1m11.00s]")
    assert layout([0, 1, 2], VideoForm("llama.cpp", every_s=1.5)) == ("Video:", (0,), "[0m0.00s]", (1, 2), "[0m2.00s]")


def test_internvl_reads_each_frame_as_an_image_on_its_own_line() -> None:
    assert layout([0, 1, 2], INTERNVL) == ("Frame1: ", (0,), "\nFrame2: ", (1,), "\nFrame3: ", (2,))


def test_the_plain_form_is_pairs_alone() -> None:
    assert layout([0, 1, 2], PLAIN) == ((0, 1), (2,))
    assert layout([0, 1, 2, 3], VideoForm("none", merge=1)) == ((0,), (1,), (2,), (3,))


@pytest.mark.parametrize("n", [1, 2, 7, 8, 33])
def test_a_merging_form_costs_half_the_frames(n: int) -> None:
    timestamps = [i / 2 for i in range(n)]
    assert image_groups(layout(timestamps, QWEN3_VL)) == image_groups(layout(timestamps, PLAIN)) == math.ceil(n / 2)
    assert image_groups(layout(timestamps, INTERNVL)) == n


def test_each_family_has_its_form_and_others_none() -> None:
    assert (form_for("qwen3vl", "m"), form_for("qwen2vl", "m"), form_for("qwen3", "m")) == (QWEN3_VL, LLAMA_CPP, INTERNVL)
    assert {name for name, family in FAMILIES.items() if family.video} == {"qwen3vl", "qwen2vl", "qwen3"}
    for architecture in ("llama", "gemma3", ""):
        with pytest.raises(CaprlError) as info:
            form_for(architecture, "Other-7B.gguf")
        assert str(info.value) == "Other-7B.gguf: this model family cannot take video; use a Qwen-VL or InternVL model"


@pytest.mark.parametrize(("make", "words"), [
    (lambda: layout([], QWEN3_VL), "at least one frame"),
    (lambda: layout([0, 2, 1], QWEN3_VL), "frame 2 comes at 1s, before frame 1"),
    (lambda: layout([0, float("nan")], QWEN3_VL), "frame 1 has timestamp nan"),
    (lambda: layout([-1], QWEN3_VL), "frame 0 has timestamp -1"),
    (lambda: layout([True], QWEN3_VL), "frame 0 has timestamp True"),
    (lambda: VideoForm("srt"), "unknown video timestamp form 'srt'"),  # type: ignore[arg-type]
    (lambda: VideoForm("qwen3", merge=3), "1 or 2 frames"),
    (lambda: VideoForm("llama.cpp", every_s=0), "positive number of seconds"),
    (lambda: VideoForm("llama.cpp", every_s=float("inf")), "positive number of seconds"),
    (lambda: ChatVideo(frames_of(2, (28, 28)), (0.0,), QWEN3_VL), "2 frames has 1 timestamps"),
    (lambda: ChatVideo([Image.new("L", (28, 28))], [0.0], QWEN3_VL), "frame 0 is a L image; give RGB"),
    (lambda: ChatVideo(["x.png"], [0.0], QWEN3_VL), "frame 0 is str"),  # type: ignore[list-item]
    (lambda: ChatVideo([*frames_of(1, (28, 28)), *frames_of(1, (56, 28))], [0, 1], QWEN3_VL), "frame 1 is 56x28"),
    (lambda: ChatVideo(frames_of(1, (28, 28)), [0.0], "qwen3"), "a VideoForm"),  # type: ignore[arg-type]
    (lambda: ChatVideo(iter(frames_of(1, (28, 28))), [0.0], QWEN3_VL), "ChatVideo.of"),  # type: ignore[arg-type]
    (lambda: assistant_with_video(), "an assistant message cannot hold a video"),
])
def test_bad_videos_are_one_line_errors(make: Any, words: str) -> None:
    with pytest.raises(CaprlError) as info:
        make()
    assert words in str(info.value) and "\n" not in str(info.value)


def assistant_with_video() -> ChatMessage:
    return ChatMessage("assistant", (video(1, (28, 28), QWEN3_VL),))


def test_a_video_in_a_conversation() -> None:
    class Frame:  # caprl_local.video's Frame, as far as a ChatVideo cares
        def __init__(self, image: Image.Image, timestamp_s: float) -> None:
            self.image, self.timestamp_s = image, timestamp_s

    clip = ChatVideo.of([Frame(im, i * 0.5) for i, im in enumerate(frames_of(3, (56, 28)))], QWEN3_VL, name="clip.mp4")
    assert clip.timestamps == (0.0, 0.5, 1.0) and len(clip.frames) == 3
    turn = user(clip, "What happens?")
    assert turn.videos == (clip,) and turn.images == () and turn.media == (clip,) and turn.text == "What happens?"
    assert name_of((turn,)) == "clip.mp4"
    assert name_of((user(clip, frames_of(1, (28, 28))[0]),)) == "<conversation of 1 message, 1 image, 1 video>"
    assert name_of((user(ChatVideo(clip.frames, clip.timestamps, QWEN3_VL)),)) == "<video of 3 frames>"
    prompted = with_prompt((user(clip),), "Describe <image> please")  # the video where the images would go
    assert prompted[0].content == ("Describe ", clip, " please")
    pieces = render_chat((turn, assistant("A."), user("More?")), chatml)
    assert pieces is not None
    assert [(p.kind, p.text, len(p.frames)) for p in pieces[:6]] == [
        ("template", "<|im_start|>user\n", 0), ("stamp", "<0.2 seconds>", 0), ("frames", "", 2),
        ("stamp", "<1.0 seconds>", 0), ("frames", "", 1), ("text", "What happens?", 0)]
    assert pieces[2].frames == clip.frames[:2] and video_pieces(clip) == tuple(pieces[1:5])


def test_passes_end_after_whole_groups() -> None:
    clip = video(7, (28, 28), QWEN3_VL)
    pieces = render_chat((user(clip, "Go."),), chatml)
    assert pieces is not None
    runs = media.passes(pieces, most_frames=3)
    assert [sum(len(p.frames) for p in run) for run in runs] == [4, 3, 0]  # 2+2, 2+1, then the closing text
    assert [p for run in runs for p in run] == pieces
    assert media.passes(pieces) == [pieces]  # a short video: one pass


# -- the real llama.cpp ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(text model, mmproj) of a tiny random-weight CapRL-Qwen3VL-2B."""
    return tiny.write_tiny_pair(tmp_path_factory.mktemp("qwen3vl"), shape="tiny-qwen3vl")


@pytest.fixture(scope="module")
def qwen3_cap(qwen3: tuple[Path, Path]):
    with Captioner(*qwen3, threads=1) as cap:
        yield cap


@pytest.fixture(params=["qwen2vl", "qwen3vl"])
def cap(request: pytest.FixtureRequest, captioner: Captioner) -> Captioner:
    """The tiny Qwen2.5-VL (CapRL-3B) and Qwen3-VL (CapRL 2.0) captioners."""
    return captioner if request.param == "qwen2vl" else request.getfixturevalue("qwen3_cap")


def grid(cap: Captioner, cols: int = 4, rows: int = 3) -> tuple[int, int]:
    align = ALIGN[cap.architecture]
    return cols * align, rows * align


def texts_of(cap: Captioner, messages: tuple[ChatMessage, ...]) -> list[str]:
    """The prompt's text chunks as text, control tokens spelled out."""
    import ctypes

    import llama_cpp

    vocab = cap._live().session._vocab
    buf = ctypes.create_string_buffer(256)

    def piece(token: int) -> bytes:
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, True)
        return buf.raw[:max(n, 0)]

    chunks = cap._live().session.chunk_tokens(messages)
    return [b"".join(piece(t) for t in c).decode() for c in chunks if isinstance(c, list)]


@pytest.mark.parametrize("n", [7, 8])
def test_frames_merge_in_pairs(cap: Captioner, n: int) -> None:
    size = grid(cap)
    one = cap.chat([user(frames_of(1, size)[0], "Describe.")], **SHORT).image_tokens
    assert one == 4 * 3 and cap._live().session.frames_merged == 2
    form = form_for(cap.architecture, "tiny")
    result = cap.chat([user(video(n, size, form, name="clip"), "Describe.")], **SHORT)
    groups = image_groups(layout([i / 4 for i in range(n)], form))
    assert result.image_tokens == groups * one and result.image == "clip" and result.generated_tokens > 0
    for plain in (QWEN3_VL, PLAIN):  # a pair from the first frame on: half the frames, rounded up
        assert cap.chat([user(video(n, size, plain), "Describe.")], max_tokens=1).image_tokens == math.ceil(n / 2) * one


def test_the_text_chunks_carry_the_timestamps(cap: Captioner) -> None:
    clip = video(26, grid(cap), LLAMA_CPP)
    chunks = cap._live().session.chunk_tokens((user(clip, "Describe."),))
    kinds = "".join("t" if isinstance(c, list) else "i" for c in chunks)
    assert kinds == "t" + "it" * 14 and all(c == 12 for c in chunks if isinstance(c, int))
    texts = texts_of(cap, (user(clip, "Describe."),))
    assert texts[0] == "<|im_start|>user\nVideo:<|vision_start|>"
    assert texts[1] == "<|vision_end|>[0m0.00s]<|vision_start|>" and texts[11] == "<|vision_end|>[0m5.00s]<|vision_start|>"
    assert all(t == "<|vision_end|><|vision_start|>" for i, t in enumerate(texts[2:-1], 2) if i != 11)
    assert texts[-1] == "<|vision_end|>Describe.<|im_end|>\n<|im_start|>assistant\n"
    qwen3 = texts_of(cap, (user(video(5, grid(cap), QWEN3_VL)),))
    assert qwen3 == ["<|im_start|>user\n<0.1 seconds><|vision_start|>", "<|vision_end|><0.6 seconds><|vision_start|>",
                     "<|vision_end|><1.0 seconds><|vision_start|>", "<|vision_end|><|im_end|>\n<|im_start|>assistant\n"]


def test_the_same_greedy_caption_twice_and_in_passes(cap: Captioner, monkeypatch: pytest.MonkeyPatch) -> None:
    clip = video(9, grid(cap), form_for(cap.architecture, "tiny"))
    turns = [user(clip, "Describe.")]
    once = cap.chat(turns, **SHORT)
    again = cap.chat(turns, **SHORT)
    monkeypatch.setattr(media, "FRAMES_PER_PASS", 2)  # a pass per group or two
    tokenize, calls = media.tokenize, []

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append((kwargs.get("first", True), kwargs.get("placeholder", False)))
        return tokenize(*args, **kwargs)

    monkeypatch.setattr(media, "tokenize", counted)
    passes = cap.chat(turns, **SHORT)
    real = [first for first, placeholder in calls if not placeholder]
    assert len(real) > 3 and real[0] and not any(real[1:]) and len(calls) == len(real) + 1  # counted first, once
    assert (once.text, once.prompt_tokens, once.image_tokens) == (again.text, again.prompt_tokens, again.image_tokens)
    assert (passes.text, passes.prompt_tokens, passes.image_tokens) == (once.text, once.prompt_tokens, once.image_tokens)


def test_a_video_too_long_is_refused_before_any_frame_is_encoded(qwen3: tuple[Path, Path]) -> None:
    with Captioner(*qwen3, threads=1, n_ctx=256, parallel=1) as small:
        clip = video(64, (128, 96), QWEN3_VL)  # 32 pairs of 12 tokens: more than the context
        with pytest.raises(PromptTooLongError) as info:
            small.chat([user(clip, "Describe.")], **SHORT)
        assert info.value.needed > 256 and "the prompt needs" in str(info.value)
        assert small.chat([user(video(4, (128, 96), QWEN3_VL), "Describe.")], **SHORT).image_tokens == 24  # still serving


def test_internvl_takes_each_frame_as_an_image(tmp_path: Path) -> None:
    pair = tiny.write_tiny_pair(tmp_path, shape="tiny-internvl")
    with Captioner(*pair, threads=1) as cap:
        session = cap._live().session
        assert session.frames_merged == 1 and form_for(cap.architecture, "tiny") == INTERNVL
        clip = video(3, (448, 448), INTERNVL)  # one tile each, as InternVL reads a video's frames
        result = cap.chat([user(clip, "Describe.")], **SHORT)
        assert result.image_tokens == 3 * 256 and result.generated_tokens > 0
        texts = texts_of(cap, (user(clip, "Describe."),))
        assert texts[:3] == ["<|im_start|>user\nFrame1: <img>", "</img>\nFrame2: <img>", "</img>\nFrame3: <img>"]
        with pytest.raises(EngineError) as info:  # laid out for Qwen-VL's pairs: refused, not read apart from its times
            cap.chat([user(video(3, (448, 448), QWEN3_VL), "Describe.")], **SHORT)
        assert "laid out with 2 frames to an image" in str(info.value) and "\n" not in str(info.value)
        assert cap.chat([user(clip, "Describe.")], **SHORT).text == result.text  # and it goes on


# -- the same caption as llama.cpp's own llama-mtmd-cli --video --------------------------------------


MTMD_CLI = Path(os.environ.get("LLAMA_MTMD_CLI", ROOT / "build/llama.cpp/build/bin/llama-mtmd-cli"))


def _ffmpeg() -> str | None:
    found = shutil.which("ffmpeg")
    if found:
        return found
    try:
        import imageio_ffmpeg  # ships an ffmpeg binary

        return str(imageio_ffmpeg.get_ffmpeg_exe())
    except (ImportError, RuntimeError):
        return None


def _has_video(cli: Path) -> bool:
    """Whether the llama.cpp beside the binary was built with MTMD_VIDEO (only then has libmtmd ffprobe in it)."""
    libs = [*cli.parent.glob("libmtmd.so*"), *cli.parent.parent.glob("lib/libmtmd.so*")]
    return any(b"ffprobe" in lib.read_bytes() for lib in libs if lib.is_file())


@pytest.fixture(scope="module")
def ffmpeg_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with ffmpeg and ffprobe in it, as llama.cpp's video helper wants (--video-ffmpeg-dir);
    PyAV stands in for a missing ffprobe (scripts/ffprobe_shim.py)."""
    if not MTMD_CLI.is_file():
        pytest.skip(f"no llama-mtmd-cli at {MTMD_CLI} (scripts/build_mtmd_cli.sh builds it; or set LLAMA_MTMD_CLI)")
    if not _has_video(MTMD_CLI):
        pytest.skip(f"{MTMD_CLI} was built without video support (MTMD_VIDEO off)")
    pytest.importorskip("av", reason="writing the clip needs PyAV: pip install 'av>=14'")
    ffmpeg = _ffmpeg()
    if ffmpeg is None:
        pytest.skip("no ffmpeg binary (install ffmpeg, or pip install imageio-ffmpeg)")
    folder = tmp_path_factory.mktemp("ffmpeg")
    (folder / "ffmpeg").symlink_to(ffmpeg)
    ffprobe = shutil.which("ffprobe")
    if ffprobe:
        (folder / "ffprobe").symlink_to(ffprobe)
    else:
        shim = folder / "ffprobe"
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -I "{ROOT / "scripts/ffprobe_shim.py"}" "$@"\n')
        shim.chmod(0o755)
    return folder


def write_clip(path: Path, frames: list[Image.Image], fps: int) -> list[Image.Image]:
    """A lossless clip (PNG frames, RGB) of the frames at `fps`; the frames as decoded back from it."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("png", rate=Fraction(fps, 1))
        stream.width, stream.height, stream.pix_fmt = frames[0].width, frames[0].height, "rgb24"
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_image(frame)))
        out.mux(stream.encode())
    with av.open(str(path)) as clip:
        return [frame.to_image() for frame in clip.decode(video=0)]


def llama_mtmd_cli(model: Path, mmproj: Path, clip: Path, ffmpeg_dir: Path, *, prompt: str, n_predict: int,
                   fps: int) -> tuple[str, int, int]:
    """llama.cpp's own caption of the clip, greedy: (text, media tokens, prompt tokens)."""
    cmd = [str(MTMD_CLI), "-m", str(model), "--mmproj", str(mmproj), "--video", str(clip),
           "--video-ffmpeg-dir", str(ffmpeg_dir), "--video-fps", str(fps), "--video-timestamp-interval", "5000",
           "-p", prompt, "-n", str(n_predict), "--temp", "0", "--repeat-penalty", "1.0", "-t", "1", "-c", "4096",
           "--image-max-tokens", "1024", "--chat-template", "chatml", "-lv", "4"]
    for _ in range(5):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_S, cwd=clip.parent,
                              stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stderr[-3000:]
        prompt_tokens = re.search(r"prompt eval time =\s*[\d.]+ ms /\s*(\d+) tokens", done.stderr)
        # llama.cpp's logger writes from a thread it does not wait for at exit, so the last lines (the
        # closing blank lines on stdout, then the timings) may be lost: such a run is run again.
        if prompt_tokens and done.stdout.endswith("\n\n"):
            media_tokens = re.findall(r"decoding image batch \d+/\d+, n_tokens_batch = (\d+)", done.stderr)
            return done.stdout.strip(), sum(int(n) for n in media_tokens), int(prompt_tokens.group(1))
    raise AssertionError(f"llama-mtmd-cli's output was cut short five times:\n{done.stderr[-3000:]}")


@pytest.mark.parametrize(("shape", "seed"), [("tiny", 5), ("tiny-qwen3vl", 0)])  # weights whose captions vary
def test_the_caption_is_llama_mtmd_clis(shape: str, seed: int, ffmpeg_dir: Path, tmp_path: Path) -> None:
    """The same clip, frames and timestamps (llama.cpp's helper form) through caprl-local and through
    llama-mtmd-cli --video: the same media tokens, prompt tokens and greedy caption."""
    pair = tiny.write_tiny_pair(tmp_path, shape=shape, seed=seed)
    captions = set()
    with Captioner(*pair, threads=1, parallel=1) as cap:
        size = grid(cap)
        for n, fps, shift in ((26, 4, 0.0), (9, 2, 0.5)):
            sent = frames_of(n, size, shift)
            clip = tmp_path / f"clip-{n}.mov"
            decoded = write_clip(clip, sent, fps)
            assert [f.tobytes() for f in decoded] == [f.tobytes() for f in sent]  # lossless: the same pixels
            text, media_tokens, prompt_tokens = llama_mtmd_cli(*pair, clip, ffmpeg_dir, prompt="Describe.",
                                                               n_predict=16, fps=fps)
            ours = cap.chat([user(ChatVideo(decoded, [i / fps for i in range(n)], LLAMA_CPP), "Describe.")],
                            max_tokens=16, temperature=0, repeat_penalty=1.0)
            assert (ours.image_tokens, ours.prompt_tokens) == (media_tokens, prompt_tokens)
            assert ours.image_tokens == image_groups(layout([i / fps for i in range(n)], LLAMA_CPP)) * 12
            assert ours.text == text and text
            captions.add(text)
    assert len(captions) == 2  # the clips reach the model
