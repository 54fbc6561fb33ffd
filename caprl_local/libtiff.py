"""libtiff's messages: what it prints from C becomes log records (the application's call, process-wide)."""

from __future__ import annotations

from contextlib import suppress
from pathlib import Path

from PIL import Image

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
