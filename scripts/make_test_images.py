#!/usr/bin/env python3
"""Write real image files of every awkward kind a captioner meets, plus broken ones.

    python scripts/make_test_images.py OUT_DIR

Good images: JPEG, PNG with alpha, EXIF-rotated JPEG, CMYK JPEG, 16-bit PNG, palette PNG
with transparency, animated GIF, a 1x1 PNG and a 6000x40 panorama. Broken ones: a truncated
JPEG, a text file named .jpg, an empty file, and a PNG whose header claims 400 megapixels
(a decompression bomb).
"""

from __future__ import annotations

import argparse
import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

#: Good files and their upright size (rotated.jpg is stored 400x200 with EXIF orientation 6).
GOOD = {
    "photo.jpg": (640, 480), "alpha.png": (320, 240), "rotated.jpg": (200, 400), "cmyk.jpg": (300, 300),
    "deep16.png": (256, 128), "palette.png": (200, 150), "animated.gif": (160, 120), "pixel.png": (1, 1),
    "panorama.png": (6000, 40),
}
BAD = ("truncated.jpg", "text.jpg", "empty.jpg", "bomb.png")


def scene(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A colourful synthetic picture: gradients, a disc and a bar, different per seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.empty((height, width, 3), np.float32)
    img[..., 0] = 255 * x / max(width - 1, 1)
    img[..., 1] = 255 * y / max(height - 1, 1)
    img[..., 2] = 128 + 127 * np.sin((x + y) / (8 + 8 * rng.random()))
    cx, cy, r = width * rng.uniform(0.3, 0.7), height * rng.uniform(0.3, 0.7), min(width, height) / 4
    img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.integers(0, 256, 3)
    img[int(height * 0.8) : int(height * 0.9), : width // 2] = (250, 250, 250)
    return img.clip(0, 255).astype(np.uint8)


def write_good(out: Path) -> None:
    Image.fromarray(scene(640, 480, 1)).save(out / "photo.jpg", quality=90)

    rgba = np.dstack([scene(320, 240, 2), np.tile(np.linspace(0, 255, 320, dtype=np.uint8), (240, 1))])
    Image.fromarray(rgba).save(out / "alpha.png")

    # Stored landscape 400x200 with EXIF orientation 6: viewers show it portrait, 200x400.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(scene(400, 200, 3)).save(out / "rotated.jpg", exif=exif.tobytes())

    Image.fromarray(scene(300, 300, 4)).convert("CMYK").save(out / "cmyk.jpg")

    deep = (np.linspace(0, 65535, 256 * 128, dtype=np.uint32).reshape(128, 256)).astype(np.uint16)
    Image.fromarray(deep).save(out / "deep16.png")  # mode I;16

    pal = Image.fromarray(scene(200, 150, 5)).quantize(16)
    pal.info["transparency"] = 0
    pal.save(out / "palette.png", transparency=0)

    frames = [Image.fromarray(scene(160, 120, s)).quantize(64) for s in (6, 7, 8)]
    frames[0].save(out / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)

    Image.new("RGB", (1, 1), (200, 30, 30)).save(out / "pixel.png")
    Image.fromarray(scene(6000, 40, 9)).save(out / "panorama.png")


def write_bad(out: Path) -> None:
    jpeg = (out / "photo.jpg").read_bytes()
    (out / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (out / "text.jpg").write_text("This is not an image, only text with a .jpg name.\n")
    (out / "empty.jpg").write_bytes(b"")
    (out / "bomb.png").write_bytes(png_header_only(20000, 20000))


def dds_unimplemented(width: int = 4, height: int = 4) -> bytes:
    """A well-formed DDS header whose pixel format (FourCC "XYZW") Pillow opens but cannot decode:
    it raises NotImplementedError, as it does for real DDS files in formats it lacks."""
    ddpf_fourcc, caps_texture = 0x4, 0x1000
    header = struct.pack("<7I", 124, 0x1007, height, width, 0, 0, 0) + b"\0" * 44
    header += struct.pack("<2I4s5I", 32, ddpf_fourcc, b"XYZW", 0, 0, 0, 0, 0) + struct.pack("<5I", caps_texture, 0, 0, 0, 0)
    return b"DDS " + header + b"\0" * (width * height)


def psd_two_layers(width: int = 64, height: int = 48) -> bytes:
    """A Photoshop file with two layers and its composite, uncompressed RGB (Pillow numbers a PSD's
    frames from 1, not 0: the composite is what a viewer shows)."""
    def planes(rgb: tuple[int, int, int]) -> list[bytes]:
        return [bytes([c]) * (width * height) for c in rgb]

    layers = [((200, 40, 40), b"back"), ((40, 40, 200), b"front")]
    records, data = b"", b""
    for colour, name in layers:
        channels = planes(colour)
        records += struct.pack(">4iH", 0, 0, height, width, 3)
        records += b"".join(struct.pack(">hI", i, 2 + len(ch)) for i, ch in enumerate(channels))
        pascal = bytes([len(name)]) + name
        pascal += b"\0" * (-len(pascal) % 4)
        extra = struct.pack(">II", 0, 0) + pascal  # no mask, no blending ranges, the name
        records += b"8BIMnorm" + struct.pack(">BBBBI", 255, 0, 0, 0, len(extra)) + extra
        data += b"".join(struct.pack(">H", 0) + ch for ch in channels)  # raw, channel by channel
    layer_info = struct.pack(">h", len(layers)) + records + data
    layer_info += b"\0" * (len(layer_info) % 2)
    layer_section = struct.pack(">I", len(layer_info)) + layer_info + struct.pack(">I", 0)
    out = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, height, width, 8, 3)
    out += struct.pack(">I", 0) + struct.pack(">I", 0)  # no colour mode data, no image resources
    out += struct.pack(">I", len(layer_section)) + layer_section
    return out + struct.pack(">H", 0) + b"".join(planes((40, 40, 200)))  # the composite: front on top


def tiff_codec_missing(width: int = 16, height: int = 16) -> bytes:
    """A TIFF whose strips claim WebP compression (50001): Pillow hands it to libtiff, which
    prints "WEBP compression support is not configured" from C when built without it."""
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 40)).save(buf, format="TIFF", compression="tiff_lzw")
    data = bytearray(buf.getvalue())
    ifd = struct.unpack_from("<I", data, 4)[0]
    for i in range(struct.unpack_from("<H", data, ifd)[0]):
        entry = ifd + 2 + 12 * i
        if struct.unpack_from("<H", data, entry)[0] == 259:  # Compression
            struct.pack_into("<H", data, entry + 8, 50001)
    return bytes(data)


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and header claiming width x height, with one tiny data chunk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def write_all(out_dir: Path | str) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_good(out)
    write_bad(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    out = write_all(parser.parse_args().out_dir)
    for name in [*GOOD, *BAD]:
        print(out / name)


if __name__ == "__main__":
    main()
