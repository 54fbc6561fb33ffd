"""Turn whatever a caller hands us into an upright 8-bit RGB Pillow image.

This is the only module that decodes images. Every failure becomes an
:class:`ImageError` whose message names the input.
"""

from __future__ import annotations

import io
import os
import re
import stat
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO, TypeVar, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError
from .printable import printable

_WARNINGS_LOCK = threading.Lock()

ImageInput = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, Image.Image, np.ndarray]

#: Refuse images above this many pixels before decoding them (a 12-MP photo is 12e6). Pillow's own bomb
#: limit, 89e6, holds for images decoded whole; a baseline JPEG, decoded at a reduced scale, may have up to this.
MAX_PIXELS = 150_000_000

#: The most bytes read from a stream, a FIFO or a device for one image (held in memory whole
#: before decoding; a file on disk is read by Pillow only as far as it needs).
MAX_STREAM_BYTES = 512 * 1024 * 1024

T = TypeVar("T")
R = TypeVar("R")

BACKGROUND = (255, 255, 255)  # transparent areas are shown on white, as viewers do


def describe(source: object) -> str:
    """A short name for an image input, for messages."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    if isinstance(source, Image.Image):
        return f"<PIL image {source.mode} {source.width}x{source.height}>"
    if isinstance(source, np.ndarray):
        return f"<array {source.dtype} {'x'.join(map(str, source.shape))}>"
    return f"<{type(source).__name__}>"


def load_image(source: ImageInput, *, max_pixels: int = MAX_PIXELS, draft_pixels: int | None = None) -> Image.Image:
    """Load a path, encoded bytes, PIL image or numpy array as an RGB image.

    EXIF orientation is applied, transparency is flattened onto white,
    animations give their first frame and high-bit-depth images are scaled to 8 bits.
    ``draft_pixels``: the image will be shrunk to about this area anyway, so a large JPEG
    may be decoded at a reduced scale (much faster) as long as it stays at least that big.
    """
    name = describe(source)
    if isinstance(source, np.ndarray):
        return _from_array(source, name)
    if isinstance(source, Image.Image):
        return _normalise(source, name, max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageError(f"{name}: no image data (empty input)")
        return _decode(io.BytesIO(bytes(source)), name, max_pixels, draft_pixels)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        with read_errors(name):
            st = path.stat()
            if stat.S_ISDIR(st.st_mode):
                raise ImageError(f"{name}: is a directory, not an image file")
            if stat.S_ISSOCK(st.st_mode):
                raise ImageError(f"{name}: is a socket, not an image file")
            if stat.S_ISREG(st.st_mode) and st.st_size > 0:
                with open(path, "rb") as fh:
                    return _decode(fh, name, max_pixels, draft_pixels)
            # A FIFO (a shell's <(...)), a device, or a file whose size says 0 but holds data (/proc):
            # read what it gives, within a bound, then decode that.
            kind = _kind(st.st_mode)
            with open(path, "rb") as fh:
                data = read_bounded(fh, name, what=kind)
        if not data:
            raise ImageError(f"{name}: file is empty (0 bytes); re-export or re-download it" if kind == "a file"
                             else f"{name}: nothing could be read from it ({kind}); give an image file")
        return _decode(io.BytesIO(data), name, max_pixels, draft_pixels)
    raise ImageError(f"{name}: unsupported image input; pass a path, bytes, a PIL image or a numpy array")


@contextmanager
def read_errors(name: str) -> Iterator[None]:
    """An OSError reading input `name` (an image's file, a video's) as its one-line ImageError."""
    try:
        yield
    except FileNotFoundError as exc:
        raise ImageError(f"{name}: no such file; check the path") from exc
    except PermissionError as exc:
        raise ImageError(f"{name}: permission denied; check the file's permissions") from exc
    except OSError as exc:
        raise ImageError(f"{name}: cannot read file ({printable(exc.strerror or str(exc), limit=160)})") from exc


def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "a file"


def read_bounded(stream: BinaryIO, name: str, *, what: str = "the stream", limit: int = MAX_STREAM_BYTES) -> bytes:
    """Everything `stream` gives, up to `limit` bytes; more is an ImageError (an endless device
    or pipe, say /dev/zero, must not fill the memory)."""
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise ImageError(f"{name}: {what} gives more than {limit // (1024 * 1024)} MB, more than any image this "
                         "reads; give an image file")
    return data


def load_ahead(
    sources: Iterable[T], *, load: Callable[[T], R], ahead: int = 2
) -> Iterator[tuple[T, tuple[R, float] | Exception]]:
    """Yield (source, (what `load` made of it, seconds to load)) in order, loading up to `ahead` in a
    background thread while the caller works on the current one; a failed load yields the
    exception instead. Pillow releases the GIL while decoding, so the overlap is real."""

    def timed(source: T) -> tuple[R, float]:
        t0 = time.perf_counter()
        return load(source), time.perf_counter() - t0

    it = iter(sources)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="caprl-prefetch") as pool:
        pending: deque[tuple[T, Future[tuple[R, float]]]] = deque()
        try:
            for source in it:
                pending.append((source, pool.submit(timed, source)))
                if len(pending) > ahead:
                    yield _result(*pending.popleft())
            while pending:
                yield _result(*pending.popleft())
        finally:
            for _, future in pending:  # the caller stopped early (Ctrl-C, break): drop the rest
                future.cancel()


def _result(source: T, future: Future[tuple[R, float]]) -> tuple[T, tuple[R, float] | Exception]:
    try:
        return source, future.result()
    except Exception as exc:  # noqa: BLE001 - handed to the caller, who reports it per image
        return source, exc


def _decode(fh: BinaryIO, name: str, max_pixels: int, draft_pixels: int | None) -> Image.Image:
    try:
        img = _open(fh, name, max_pixels)
        _check_size(img, name, max_pixels)
        if img.format in _REDUCIBLE:
            scale = _draft_scale(img.width, img.height, draft_pixels)
            if scale > 1:  # libjpeg decodes at 1/2, 1/4 or 1/8 scale directly: far less memory and time
                img.draft("RGB", (img.width // scale, img.height // scale))
        img.load()  # decode now, while the file is open, so truncation is caught here
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bomb(name, exc, max_pixels) from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"{name}: not a recognised image format (is it really an image?)") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Pillow reports truncated or corrupt data as OSError/SyntaxError/ValueError.
        raise ImageError(f"{name}: corrupt or truncated image data ({exc}); re-export or re-download it") from exc
    except Exception as exc:  # noqa: BLE001 - whatever else hostile input makes Pillow raise is this image's failure
        raise _unreadable(name, exc) from exc
    return _normalise(img, name, max_pixels)


#: Formats libjpeg decodes at a reduced scale (an MPO is a camera's JPEG with a second picture after it).
_REDUCIBLE = ("JPEG", "MPO")

#: How much of a JPEG's start is read to find its first scan (its metadata segments come before it).
_HEAD_BYTES = 2 * 1024 * 1024


def _open(fh: BinaryIO, name: str, max_pixels: int) -> Image.Image:
    """Image.open (which reads the header only), with Pillow's decompression-bomb warning an error, except
    for a JPEG that is decoded at a reduced scale (see _draft_scale): one of those up to `max_pixels` is
    taken. catch_warnings changes process-wide state, so it is held briefly and by one thread at a time
    (images are read in several threads)."""
    start = fh.tell()
    try:
        with _WARNINGS_LOCK, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(fh)
    except Image.DecompressionBombWarning as exc:
        warning = exc
    fh.seek(start)
    with _WARNINGS_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(fh)
    _check_size(img, name, max_pixels)  # over our own limit: said as such
    if img.format not in _REDUCIBLE or not _jpeg_one_scan(_head(fh, start)):
        raise _bomb(name, warning, max_pixels, img)
    return img


def _head(fh: BinaryIO, start: int) -> bytes:
    """The first bytes of the file from `start`, leaving its position where it was (Pillow's reader)."""
    at = fh.tell()
    try:
        fh.seek(start)
        return fh.read(_HEAD_BYTES)
    finally:
        fh.seek(at)


def _draft_scale(width: int, height: int, draft_pixels: int | None) -> int:
    """The reduced scale (1, 2, 4 or 8) to decode a JPEG at: as small as the budget allows (the image is
    shrunk to about ``draft_pixels`` anyway, and stays at least that big), and small enough to stay within
    Pillow's decompression-bomb limit whatever the budget (a 108-megapixel photo decodes at 1/2 scale)."""
    pixels, scale = width * height, 1
    if draft_pixels and pixels > 4 * draft_pixels:
        f = (draft_pixels / pixels) ** 0.5
        fits = min(width // (int(width * f) + 1), height // (int(height * f) + 1))  # as Pillow's draft picks
        scale = next(s for s in (8, 4, 2, 1) if fits >= s)
    limit = Image.MAX_IMAGE_PIXELS
    while limit and scale < 8 and pixels > limit * scale * scale:
        scale *= 2
    return scale


def _bomb(name: str, exc: Exception, max_pixels: int, img: Image.Image | None = None) -> ImageError:
    """The one-line refusal of an image over the pixels decoded whole safely, stating the limit."""
    limit = Image.MAX_IMAGE_PIXELS or max_pixels
    if img is not None:
        kind = "progressive or multi-scan JPEG" if img.format in _REDUCIBLE else (img.format or "image")
        return ImageError(
            f"{name}: image is too large to decode safely (a decompression bomb?): a {img.width}x{img.height} {kind} "
            f"({img.width * img.height / 1e6:.0f} megapixels) is decoded whole, and the limit for that is "
            f"{limit / 1e6:.0f} megapixels (a baseline JPEG, read at a reduced scale, may have up to {max_pixels / 1e6:.0f}); "
            "downscale it first")
    if isinstance(exc, Image.DecompressionBombError):  # over twice Pillow's limit, so over ours too
        limit = min(max_pixels, 2 * limit)
    found = re.search(r"\((\d+) pixels\)", str(exc))  # Pillow's message names the size it saw
    size = f"{int(found.group(1)) / 1e6:.0f} megapixels, " if found else ""
    return ImageError(f"{name}: image is too large to decode safely (a decompression bomb?): {size}over the "
                      f"{limit / 1e6:.0f}-megapixel limit; downscale it first")


def _unreadable(name: str, exc: Exception) -> ImageError:
    """The error for an image Pillow fails on in a way of its own (NotImplementedError for a
    format it lacks, MemoryError, OverflowError...), as its own fuzz tests expect of hostile files."""
    if isinstance(exc, MemoryError):
        return ImageError(f"{name}: not enough memory to decode this image; downscale it first")
    return ImageError(f"{name}: cannot decode this image ({type(exc).__name__}: {exc}); convert it to PNG or JPEG")


def _check_size(img: Image.Image, name: str, max_pixels: int) -> None:
    if img.width * img.height > max_pixels:
        raise ImageError(
            f"{name}: {img.width}x{img.height} is {img.width * img.height / 1e6:.0f} megapixels, "
            f"over the {max_pixels / 1e6:.0f}-megapixel limit; downscale it first"
        )
    if img.width < 1 or img.height < 1:
        raise ImageError(f"{name}: image has no pixels ({img.width}x{img.height})")


def _normalise(img: Image.Image, name: str, max_pixels: int) -> Image.Image:
    _check_size(img, name, max_pixels)
    try:
        if getattr(img, "n_frames", 1) > 1 and img.tell() > 0:
            with suppress(EOFError):  # frames may be numbered from 1 (a PSD's layers): keep what is shown
                img.seek(0)
        img = ImageOps.exif_transpose(img) or img
        return _to_rgb(img)
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageError(f"{name}: corrupt image data ({exc}); re-export or re-download it") from exc
    except Exception as exc:  # noqa: BLE001 - as in _decode
        raise _unreadable(name, exc) from exc


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        img = _scale_to_8bit(img)
    elif mode == "PA":
        img = img.convert("RGBA")
    elif mode in ("RGBa", "La"):
        img = img.convert("RGBA" if mode == "RGBa" else "LA")
    if img.mode in ("RGBA", "LA"):
        background = Image.new("RGB", img.size, BACKGROUND)
        background.paste(img.convert("RGBA"), mask=img.getchannel("A"))
        return background
    return img.convert("RGB")


def _scale_to_8bit(img: Image.Image) -> Image.Image:
    """Map 16/32-bit integer or float greyscale onto 0..255 (Pillow would clip instead)."""
    arr = np.asarray(img).astype(np.float64)
    if img.mode.startswith("I;16"):
        arr = arr / 257.0
    else:
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))


def _from_array(arr: np.ndarray, name: str) -> Image.Image:
    """Accept HxW, HxWx1, HxWx3 or HxWx4 arrays of uint8 (or floats in 0..1, or uint16)."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)) or arr.size == 0:
        raise ImageError(f"{name}: expected an HxW, HxWx3 or HxWx4 array")
    if arr.dtype == np.uint16:
        arr = (arr / 257.0 + 0.5).astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ImageError(f"{name}: array contains NaN or infinite values")
        arr = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise ImageError(f"{name}: unsupported array dtype {arr.dtype}; use uint8, uint16 or float in 0..1")
    return _to_rgb(Image.fromarray(np.ascontiguousarray(arr)))  # mode follows the shape: L, RGB or RGBA


# --- an encoded image's header ----------------------------------------------------------------


def peek_image(data: bytes) -> tuple[str, int, int, int]:
    """An encoded image's format, width and height from its header (nothing is decoded), and the pixels
    decoding it holds in memory at full scale: width x height, or a TIFF tile's area where that is larger
    (a 16x16 TIFF may declare 16384x16384 tiles: 800 MB), and 0 where load_image's reduced-scale decode
    (``draft_pixels``) bounds it: a sequential JPEG whose one scan holds every component. A progressive,
    lossless or multi-scan JPEG is decoded whole (libjpeg buffers every coefficient first: 300 MB for 88
    megapixels). ImageError if the header is unreadable, over MAX_PIXELS, or over Pillow's bomb limit and not such
    a JPEG."""
    name = describe(data)
    if not data:
        raise ImageError(f"{name}: no image data (empty input)")
    try:
        with _open(io.BytesIO(data), name, MAX_PIXELS) as img:  # as in _decode: a bomb is refused, a large JPEG taken
            kind, (width, height) = img.format or "image", img.size
            tags = getattr(img, "tag_v2", None) if kind == "TIFF" else None
            tile = (int(tags.get(322, 0)), int(tags.get(323, 0))) if tags is not None else (0, 0)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bomb(name, exc, MAX_PIXELS) from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"{name}: not a recognised image format (is it really an image?)") from exc
    except Exception as exc:  # noqa: BLE001 - whatever a hostile header makes Pillow raise is this image's failure
        raise ImageError(f"{name}: corrupt image header ({type(exc).__name__}: {exc}); re-export or re-download it") from exc
    if kind in _REDUCIBLE and _jpeg_one_scan(data):
        return kind, width, height, 0
    return kind, width, height, max(width * height, tile[0] * tile[1])


def _jpeg_one_scan(data: bytes) -> bool:
    """Whether a JPEG's frame is sequential (baseline, extended or arithmetic) and its first scan holds
    every component (libjpeg's test for a file it can decode without a whole-image coefficient buffer)."""
    i, components = 2, -1
    for _ in range(4096):  # the segments before the first scan; a header with more is not one to trust
        if i + 4 > len(data) or data[i] != 0xFF:
            return False
        marker = data[i + 1]
        if marker == 0xFF:  # a fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # no length: TEM, RSTn, SOI
            i += 2
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        segment = data[i + 4:i + 2 + length]
        if marker in (0xC0, 0xC1, 0xC9):  # sequential frames
            components = segment[5] if len(segment) > 5 else -1
        elif 0xC2 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # progressive, lossless, hierarchical
            return False
        elif marker == 0xDA:  # the first scan
            return len(segment) > 0 and segment[0] == components
        i += 2 + length
    return False
