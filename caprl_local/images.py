"""Turn whatever a caller hands us into an upright 8-bit RGB Pillow image.

This is the only module that decodes images. Every failure becomes an
:class:`ImageError` whose message names the input.
"""

from __future__ import annotations

import io
import os
import stat
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

_WARNINGS_LOCK = threading.Lock()

ImageInput = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, Image.Image, np.ndarray]

#: Refuse images above this many pixels before decoding them (a 12-MP photo is 12e6;
#: Pillow's own bomb limit is 89e6 and only warns below twice that).
MAX_PIXELS = 150_000_000

#: The most bytes read from a stream, a FIFO or a device for one image (held in memory whole
#: before decoding; a file on disk is read by Pillow only as far as it needs).
MAX_STREAM_BYTES = 512 * 1024 * 1024

T = TypeVar("T")

_BACKGROUND = (255, 255, 255)  # transparent areas are shown on white, as viewers do


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
        try:
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
        except FileNotFoundError as exc:
            raise ImageError(f"{name}: no such file; check the path") from exc
        except PermissionError as exc:
            raise ImageError(f"{name}: permission denied; check the file's permissions") from exc
        except OSError as exc:
            raise ImageError(f"{name}: cannot read file ({exc.strerror or exc})") from exc
        if not data:
            raise ImageError(f"{name}: file is empty (0 bytes); re-export or re-download it" if kind == "a file"
                             else f"{name}: nothing could be read from it ({kind}); give an image file")
        return _decode(io.BytesIO(data), name, max_pixels, draft_pixels)
    raise ImageError(f"{name}: unsupported image input; pass a path, bytes, a PIL image or a numpy array")


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


def fit_to_budget(size: tuple[int, int], *, align: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The size llama.cpp's Qwen-VL preprocessor gives an image ("smart resize"): sides in
    multiples of `align`, area within [min_pixels, max_pixels], aspect ratio kept."""
    w, h = size
    w_bar, h_bar = max(align, round(w / align) * align), max(align, round(h / align) * align)
    if w_bar * h_bar > max_pixels:
        beta = (w * h / max_pixels) ** 0.5
        w_bar = max(align, int(w / beta / align) * align)
        h_bar = max(align, int(h / beta / align) * align)
    elif w_bar * h_bar < min_pixels:
        beta = (min_pixels / (w * h)) ** 0.5
        w_bar = -(-w * beta // align) * align
        h_bar = -(-h * beta // align) * align
    return int(w_bar), int(h_bar)


@dataclass(frozen=True)
class ImageBudget:
    """How llama.cpp's Qwen-VL preprocessor sizes an image for a projector and a token cap:
    sides in multiples of `align` pixels (patch x merge), area between the token limits.

    :meth:`prepare` does that work here instead, where it can run ahead in another thread,
    leaving llama.cpp nothing to resize.
    """

    align: int
    min_pixels: int
    max_pixels: int
    max_aspect: float  # a strip more than one token high per this many tokens wide gets padded

    #: llama.cpp's own limits on image tokens for Qwen-VL projectors.
    LLAMA_MAX_TOKENS = 4096
    LLAMA_MIN_TOKENS = 8

    @classmethod
    def for_tokens(cls, *, align: int, min_tokens: int | None, max_tokens: int | None) -> ImageBudget:
        most = max_tokens or cls.LLAMA_MAX_TOKENS
        least = min(min_tokens or cls.LLAMA_MIN_TOKENS, most)
        return cls(align, least * align**2, most * align**2, 0.95 * most)

    def prepare(self, image: ImageInput) -> Image.Image:
        """Load an image and fit it to the budget the way llama.cpp would: pad strips too thin
        for the cap (llama.cpp never shrinks a side below one token), then downscale to the
        exact size llama.cpp's preprocessor picks."""
        rgb = pad_to_aspect(load_image(image, draft_pixels=self.max_pixels), self.max_aspect)
        size = fit_to_budget(rgb.size, align=self.align, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        if size[0] * size[1] < rgb.width * rgb.height:
            rgb = rgb.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
        return rgb


@dataclass(frozen=True)
class TiledBudget:
    """How llama.cpp's InternVL preprocessor spends tokens: the image cut into a grid of `tile`-pixel
    tiles plus an overview, `per_tile` tokens each. :meth:`prepare` picks the grid InternVL would
    (the closest aspect ratio) among those the token cap allows, and resizes the image to it
    exactly, so that llama.cpp's tiling lands on that grid: a 12-megapixel photo or a 6000x40
    strip costs no more than the cap."""

    tile: int
    per_tile: int
    max_tiles: int

    @classmethod
    def for_tokens(cls, *, tile: int, per_tile: int, max_tokens: int | None, most_tiles: int = 12) -> TiledBudget:
        cap = max_tokens or per_tile * (most_tiles + 1)
        return cls(tile, per_tile, max(1, min(most_tiles, cap // per_tile - 1)))  # one tile's worth for the overview

    def grid(self, width: int, height: int) -> tuple[int, int]:
        """Tiles across and down: InternVL's choice (closest aspect ratio; on a tie, the larger grid if
        the image has the pixels for it)."""
        ratio, area = width / height, width * height
        grids = sorted(((i, j) for i in range(1, self.max_tiles + 1) for j in range(1, self.max_tiles // i + 1)),
                       key=lambda g: (g[0] * g[1], g))
        best, best_diff = (1, 1), float("inf")
        for i, j in grids:
            diff = abs(ratio - i / j)
            if diff < best_diff or (diff == best_diff and area > 0.5 * self.tile**2 * i * j):
                best, best_diff = (i, j), diff
        return best

    def prepare(self, image: ImageInput) -> Image.Image:
        rgb = load_image(image, draft_pixels=self.max_tiles * self.tile**2)
        across, down = self.grid(*rgb.size)
        size = (across * self.tile, down * self.tile)
        return rgb if rgb.size == size else rgb.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def load_ahead(
    sources: Iterable[T], *, load: Callable[[T], Image.Image], ahead: int = 2
) -> Iterator[tuple[T, tuple[Image.Image, float] | Exception]]:
    """Yield (source, (image, seconds to load)) in order, loading up to `ahead` images in a
    background thread while the caller works on the current one; a failed load yields the
    exception instead. Pillow releases the GIL while decoding, so the overlap is real."""

    def timed(source: T) -> tuple[Image.Image, float]:
        t0 = time.perf_counter()
        return load(source), time.perf_counter() - t0

    it = iter(sources)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="caprl-prefetch") as pool:
        pending: deque[tuple[T, Future[tuple[Image.Image, float]]]] = deque()
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


def _result(source: T, future: Future[tuple[Image.Image, float]]) -> tuple[T, tuple[Image.Image, float] | Exception]:
    try:
        return source, future.result()
    except Exception as exc:  # noqa: BLE001 - handed to the caller, who reports it per image
        return source, exc


def pad_to_aspect(img: Image.Image, max_ratio: float) -> Image.Image:
    """Pad the short side with white so that the long side is at most max_ratio times it.

    llama.cpp never shrinks an image side below one token, so a strip thinner than the
    token budget allows would get more image tokens than asked for; padding keeps the cap.
    """
    w, h = img.size
    if max(w, h) <= max_ratio * min(w, h):
        return img
    side = int(np.ceil(max(w, h) / max_ratio))
    size = (w, side) if w >= h else (side, h)
    canvas = Image.new("RGB", size, _BACKGROUND)
    canvas.paste(img, ((size[0] - w) // 2, (size[1] - h) // 2))
    return canvas


def _decode(fh: BinaryIO, name: str, max_pixels: int, draft_pixels: int | None) -> Image.Image:
    try:
        # Pillow only warns about a decompression bomb below twice its pixel limit: make that an
        # error. catch_warnings changes process-wide state, so it is held briefly (open reads the
        # header only) and by one thread at a time (images are read in several threads).
        with _WARNINGS_LOCK, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fh)
        _check_size(img, name, max_pixels)
        if draft_pixels and img.format == "JPEG" and img.width * img.height > 4 * draft_pixels:
            scale = (draft_pixels / (img.width * img.height)) ** 0.5
            img.draft("RGB", (int(img.width * scale) + 1, int(img.height * scale) + 1))
        img.load()  # decode now, while the file is open, so truncation is caught here
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{name}: image is too large to decode safely (a decompression bomb?); downscale it first") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"{name}: not a recognised image format (is it really an image?)") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Pillow reports truncated or corrupt data as OSError/SyntaxError/ValueError.
        raise ImageError(f"{name}: corrupt or truncated image data ({exc}); re-export or re-download it") from exc
    except Exception as exc:  # noqa: BLE001 - whatever else hostile input makes Pillow raise is this image's failure
        raise _unreadable(name, exc) from exc
    return _normalise(img, name, max_pixels)


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
        background = Image.new("RGB", img.size, _BACKGROUND)
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


# --- libtiff's messages -----------------------------------------------------------------------

_TIFF_HANDLERS: list[object] = []  # the ctypes callbacks, kept alive for the life of the process


def capture_libtiff_messages(logger_name: str = "caprl_local.tiff") -> bool:
    """Send the messages libtiff prints from C ("WEBP compression support is not configured")
    to a logger instead of stderr. Process-wide, so it is the application's (the CLI's) call.

    Pillow raises its own error for the same file, so the messages are logged at DEBUG. Returns
    whether the handlers were installed (only where Pillow's libtiff can be found and va_list is
    passed as a pointer: Linux and macOS on x86-64 and ARM).
    """
    import ctypes
    import ctypes.util
    import logging
    import platform
    import sys

    if _TIFF_HANDLERS:
        return True
    if sys.platform not in ("linux", "darwin") or platform.machine().lower() not in (
            "x86_64", "amd64", "aarch64", "arm64"):
        return False
    try:
        lib = _libtiff(ctypes.util.find_library("tiff"))
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
    except OSError:
        return False
    if lib is None:
        return False
    vsnprintf = libc.vsnprintf
    vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]
    log = logging.getLogger(logger_name)
    handler_type = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p)

    def handle(module: bytes | None, fmt: bytes | None, args: int | None) -> None:
        buf = ctypes.create_string_buffer(512)
        if fmt is not None:
            vsnprintf(buf, len(buf), fmt, args)
        where = (module or b"").decode("utf-8", "replace")
        log.debug("libtiff: %s%s", f"{where}: " if where else "", buf.value.decode("utf-8", "replace"))

    callback = handler_type(handle)
    for setter in ("TIFFSetErrorHandler", "TIFFSetWarningHandler"):
        getattr(lib, setter).argtypes = [handler_type]
        getattr(lib, setter).restype = ctypes.c_void_p
        getattr(lib, setter)(callback)
    _TIFF_HANDLERS.append(callback)
    return True


def _libtiff(system: str | None) -> object | None:
    """The libtiff Pillow decodes with: the copy bundled in its wheel, else the system's."""
    import ctypes

    from PIL import features

    if not features.check_codec("libtiff"):
        return None
    root = Path(Image.__file__).resolve().parent
    bundled = sorted([*root.parent.glob("pillow.libs/libtiff*"), *root.glob(".dylibs/libtiff*")])
    for path in [*map(str, bundled), *([system] if system else [])]:
        with suppress(OSError, AttributeError):
            lib = ctypes.CDLL(path)
            lib.TIFFSetErrorHandler  # noqa: B018 - the symbol must be there
            return lib
    return None
