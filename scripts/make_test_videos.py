#!/usr/bin/env python3
"""Write small real video clips of every awkward kind a frame reader meets, plus broken ones (with PyAV).

    python scripts/make_test_videos.py OUT_DIR

Each clip kind is a function taking the folder (and returning the file's path), for tests to import.
Every frame shows its own number (see :func:`frame_number`), a red band along its top and a green one
down its left side, so that a test can tell which frame it got and which way up. Codecs are those the
installed PyAV wheel can encode (mpeg4, libvpx, mjpeg, ffv1, libx264 where present).
"""

from __future__ import annotations

import argparse
import math
import struct
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

#: The most frames a clip here has: frame_number() tells this many apart.
MOST_FRAMES = 60
_LEVELS = 4  # grey levels per digit cell (lossy codecs keep four levels apart)


def picture(width: int, height: int, number: int) -> np.ndarray:
    """A frame showing `number`: grey cells along the middle row encode it in base 4, a red band along
    the top, a green band down the left, blue elsewhere."""
    img = np.zeros((height, width, 3), np.uint8)
    img[...] = (40, 40, 200)
    img[: max(2, height // 6)] = (230, 30, 30)
    img[:, : max(2, width // 8)] = (30, 220, 30)
    for cell, value in enumerate(_digits(number)):
        x0, y0 = width // 4 + cell * width // 8, height * 2 // 5
        img[y0 : y0 + height // 5, x0 : x0 + width // 8] = 30 + value * 65
    return img


def _digits(number: int) -> list[int]:
    return [number // _LEVELS**k % _LEVELS for k in range(3)]


def frame_number(image: object) -> int:
    """The number picture() drew on an upright frame (a PIL image or an array), at any size."""
    arr = np.asarray(image).astype(np.float32)
    height, width = arr.shape[:2]
    number = 0
    for cell in range(3):
        x0, y0 = width // 4 + cell * width // 8, height * 2 // 5
        patch = arr[y0 + height // 20 : y0 + height // 5 - height // 20, x0 + width // 32 : x0 + width // 8 - width // 32]
        value = min(_LEVELS - 1, max(0, round((float(patch.mean()) - 30) / 65)))
        number += value * _LEVELS**cell
    return number


def encoder(*names: str) -> str:
    """The first of `names` this PyAV can encode with."""
    for name in names:
        try:
            av.Codec(name, "w")
            return name
        except Exception:  # noqa: BLE001 - PyAV raises an unknown-codec error of its own version's kind
            continue
    raise RuntimeError(f"none of the encoders {', '.join(names)} is in this PyAV")


def write_clip(path: Path, codec: str, *, size: tuple[int, int] = (64, 48), fps: int = 10, seconds: float = 2.0,
               pix_fmt: str = "yuv420p", times_ms: Sequence[int] | None = None, audio: bool = False,
               see_through: bool = False) -> Path:
    """A clip of `seconds` at `fps` (or frames at `times_ms`, milliseconds, for a variable rate);
    `see_through`: the right half of every frame transparent (for a pixel format with alpha)."""
    width, height = size
    count = len(times_ms) if times_ms is not None else round(seconds * fps)
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if times_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        sound = out.add_stream("aac", rate=16000) if audio else None
        for n in range(count):
            rgb = picture(width, height, n)
            if see_through:
                alpha = np.full((height, width, 1), 255, np.uint8)
                alpha[:, width // 2 :] = 0
                frame = av.VideoFrame.from_ndarray(np.concatenate([rgb, alpha], axis=2), format="rgba")
            else:
                frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            if times_ms is not None:
                frame.pts, frame.time_base = times_ms[n], Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
        if sound is not None:
            _write_tone(out, sound, seconds)
    return path


def _write_tone(out: av.container.OutputContainer, sound: av.audio.stream.AudioStream, seconds: float) -> None:
    samples = int(16000 * seconds)
    tone = (0.2 * np.sin(np.arange(samples) / 16000 * 2 * np.pi * 440)).astype(np.float32)
    chunk = sound.codec_context.frame_size or 1024
    for at in range(0, samples, chunk):
        part = av.AudioFrame.from_ndarray(tone[None, at : at + chunk], format="fltp", layout="mono")
        part.sample_rate, part.pts = 16000, at
        for packet in sound.encode(part):
            out.mux(packet)
    for packet in sound.encode():
        out.mux(packet)


# --- good clips, one per container -----------------------------------------------------------------------


def mp4(folder: Path) -> Path:
    return write_clip(folder / "clip.mp4", "mpeg4")


def h264(folder: Path) -> Path:
    return write_clip(folder / "h264.mp4", encoder("libx264", "libopenh264", "mpeg4"), size=(96, 64))


def webm(folder: Path) -> Path:
    return write_clip(folder / "clip.webm", encoder("libvpx", "libvpx-vp9"), size=(80, 60))


def avi(folder: Path) -> Path:
    return write_clip(folder / "clip.avi", "mjpeg", size=(64, 48), pix_fmt="yuvj420p")


def mov(folder: Path) -> Path:
    return write_clip(folder / "clip.mov", "mjpeg", size=(128, 96), pix_fmt="yuvj420p", seconds=1.0, fps=12)


def mkv(folder: Path) -> Path:
    return write_clip(folder / "clip.mkv", "ffv1", size=(160, 120), seconds=3.0)


def with_audio(folder: Path) -> Path:
    return write_clip(folder / "talk.mkv", "ffv1", audio=True)


def hd(folder: Path) -> Path:
    """1280x720, 2 seconds: the size a memory bound means something at."""
    return write_clip(folder / "hd.mp4", "mpeg4", size=(1280, 720), fps=25)


def transparent(folder: Path) -> Path:
    """Lossless with alpha: the right half of each frame transparent (shown on white, as images are)."""
    return write_clip(folder / "alpha.mkv", "ffv1", pix_fmt="yuva420p", see_through=True, seconds=1.0)


def rotated(folder: Path, degrees: int = -90) -> Path:
    """Stored 96x64 with a display matrix turning it `degrees` counter-clockwise (FFmpeg's and PyAV's sense).
    The default, -90, is a phone's portrait clip: shown 64x96, the stored picture turned clockwise."""
    path = write_clip(folder / ("rotated.mp4" if degrees == -90 else f"rotated{degrees % 360}.mp4"), "mpeg4", size=(96, 64))
    cos, sin = round(math.cos(math.radians(degrees))), round(math.sin(math.radians(degrees)))
    data = bytearray(path.read_bytes())
    at = data.find(b"tkhd") - 4
    matrix = at + (48 if data[at + 8] == 0 else 60)  # after the version 0 or 1 header fields
    struct.pack_into(">9i", data, matrix, cos << 16, -sin << 16, 0, sin << 16, cos << 16, 0, 0, 0, 1 << 30)
    path.write_bytes(bytes(data))
    return path


#: Frame times of vfr(), in milliseconds: bursts and pauses.
VFR_TIMES_MS = (0, 40, 80, 500, 520, 1300, 1350, 1400, 1900, 2600, 2650, 3000)


def vfr(folder: Path) -> Path:
    """A variable frame rate: frames at VFR_TIMES_MS, lossless, so each frame's number reads back exactly."""
    return write_clip(folder / "vfr.mkv", "ffv1", times_ms=VFR_TIMES_MS)


# --- lying and broken clips ------------------------------------------------------------------------------


def truncated(folder: Path) -> Path:
    """The first 40% of a 4-second Matroska clip: its first frames decode, its header says 4 s."""
    whole = write_clip(folder / "whole.mkv", "ffv1", seconds=4.0)
    data = whole.read_bytes()
    whole.unlink()
    (folder / "truncated.mkv").write_bytes(data[: len(data) * 2 // 5])
    return folder / "truncated.mkv"


def truncated_mp4(folder: Path) -> Path:
    """An MP4 cut short before its index (the moov box comes last): nothing of it can be read."""
    whole = write_clip(folder / "whole.mp4", "mpeg4")
    data = whole.read_bytes()
    whole.unlink()
    (folder / "cut.mp4").write_bytes(data[: data.find(b"moov") - 4])
    return folder / "cut.mp4"


def damaged(folder: Path) -> Path:
    """A Matroska clip with garbage over a stretch of its middle."""
    path = write_clip(folder / "damaged.mkv", "ffv1", seconds=3.0)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + len(data) // 8] = np.random.default_rng(0).integers(0, 256, len(data) // 8, np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path


def garbage(folder: Path) -> Path:
    path = folder / "garbage.mp4"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, np.uint8).tobytes())
    return path


def text(folder: Path) -> Path:
    path = folder / "notes.mov"
    path.write_text("not a video\n" * 40)
    return path


def empty(folder: Path) -> Path:
    path = folder / "empty.webm"
    path.write_bytes(b"")
    return path


def audio_only(folder: Path) -> Path:
    """Sound and no picture (an .mp4 that is really an .m4a)."""
    path = folder / "audio.mp4"
    with av.open(str(path), "w") as out:
        _write_tone(out, out.add_stream("aac", rate=16000), 1.0)
    return path


def no_frames(folder: Path) -> Path:
    """A video stream with not one frame in it."""
    path = folder / "noframes.mkv"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("ffv1", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        out.start_encoding()  # the header, written even though no packet follows
    return path


def _patched(path: Path, edits: Callable[[bytearray], None]) -> Path:
    data = bytearray(path.read_bytes())
    edits(data)
    path.write_bytes(bytes(data))
    return path


def _ebml_uint(data: bytearray, element: bytes, value: int, width: int) -> None:
    """Overwrite the value of a Matroska unsigned integer `element` stored in `width` bytes."""
    at = data.find(element + bytes([0x80 | width]))
    assert at >= 0, f"no element {element.hex()} of {width} bytes"
    data[at + len(element) + 1 : at + len(element) + 1 + width] = value.to_bytes(width, "big")


def huge(folder: Path) -> Path:
    """A Matroska header claiming frames 65535 pixels wide (the codec, ffv1, takes the size from it)."""
    path = write_clip(folder / "huge.mkv", "ffv1", size=(320, 240), seconds=0.5)
    return _patched(path, lambda d: _ebml_uint(d, b"\xb0", 0xFFFF, 2))  # PixelWidth


def bomb(folder: Path) -> Path:
    """A Matroska header claiming 8000x8000 frames: within 8192 a side, but 64 megapixels each."""
    path = write_clip(folder / "bomb.mkv", "ffv1", size=(320, 256), seconds=0.5)

    def edit(data: bytearray) -> None:
        _ebml_uint(data, b"\xb0", 8000, 2)  # PixelWidth
        _ebml_uint(data, b"\xba", 8000, 2)  # PixelHeight

    return _patched(path, edit)


def _duration(data: bytearray, seconds: float) -> None:
    """Overwrite a Matroska segment's Duration (a float of milliseconds, 4 or 8 bytes)."""
    for width, pack in ((8, ">d"), (4, ">f")):
        at = data.find(b"\x44\x89" + bytes([0x80 | width]))
        if at >= 0:
            data[at + 3 : at + 3 + width] = struct.pack(pack, seconds * 1000)
            return
    raise AssertionError("no Duration element")


def long_claim(folder: Path) -> Path:
    """2 seconds of video whose header claims 8."""
    return _patched(write_clip(folder / "claims8s.mkv", "ffv1"), lambda d: _duration(d, 8.0))


def no_duration(folder: Path) -> Path:
    """3 seconds of Matroska with no duration in its header (the Duration element made a Void one)."""

    def edit(data: bytearray) -> None:
        at = data.find(b"\x44\x89\x88")  # Duration, 8 bytes: as Void (0xEC), of 9 bytes, it spans the same 11
        assert at >= 0, "no 8-byte Duration element"
        data[at] = 0xEC

    return _patched(write_clip(folder / "noduration.mkv", "ffv1", seconds=3.0), edit)


def endless_claim(folder: Path) -> Path:
    """2 seconds of video whose header claims ten years."""
    return _patched(write_clip(folder / "decade.mkv", "ffv1"), lambda d: _duration(d, 10 * 365 * 86400.0))


def avi_long_claim(folder: Path) -> Path:
    """2 seconds (20 frames) of AVI whose headers claim 200 frames (20 s)."""
    path = write_clip(folder / "claims20s.avi", "mjpeg", pix_fmt="yuvj420p")

    def edit(data: bytearray) -> None:
        avih = data.find(b"avih")
        struct.pack_into("<I", data, avih + 8 + 16, 200)  # dwTotalFrames
        strh = data.find(b"strh")
        struct.pack_into("<I", data, strh + 8 + 32, 200)  # dwLength

    return _patched(path, edit)


GOOD: dict[str, Callable[[Path], Path]] = {
    "mp4": mp4, "h264": h264, "webm": webm, "avi": avi, "mov": mov, "mkv": mkv, "with_audio": with_audio,
    "transparent": transparent, "rotated": rotated, "vfr": vfr, "long_claim": long_claim, "avi_long_claim": avi_long_claim,
    "truncated": truncated, "damaged": damaged, "no_duration": no_duration,
}
BAD: dict[str, Callable[[Path], Path]] = {
    "truncated_mp4": truncated_mp4, "garbage": garbage, "text": text, "empty": empty, "audio_only": audio_only,
    "no_frames": no_frames, "huge": huge, "bomb": bomb, "endless_claim": endless_claim,
}


def write_all(folder: Path, *, with_hd: bool = False) -> Path:
    """Every clip kind into `folder` (the 720p one too if asked); returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for make in (*GOOD.values(), *BAD.values(), *((hd,) if with_hd else ())):
        make(folder)
    for degrees in (90, 180):  # the other turns (the default -90 is in GOOD)
        rotated(folder, degrees)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--hd", action="store_true", help="also a 1280x720 clip")
    args = parser.parse_args()
    write_all(args.out, with_hd=args.hd)
    for path in sorted(args.out.iterdir()):
        print(path)


if __name__ == "__main__":
    main()
