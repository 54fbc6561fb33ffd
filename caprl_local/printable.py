"""Text from outside made safe to show: control characters escaped, one line, bounded.

Names from a Hub listing, GGUF metadata echoed in llama.cpp's messages, file names and
servers' answers are data. Printed raw, an escape sequence in one of them can rewrite the
terminal (``ESC[2J``), write the clipboard (OSC 52) or forge extra message lines (a newline).
Everything that reaches a terminal or a one-line message goes through here first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")

#: The longest message line shown; the rest is cut with a note of how much was left out.
MAX_LINE = 2000

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(ch: str) -> str:
    """One character that is not printable, as an escape: controls, line and paragraph separators,
    format characters that reorder or hide text (bidirectional overrides, zero-width joiners), and a
    lone surrogate, which is an undecodable byte of a file name (os.fsdecode): shown as that byte."""
    code = ord(ch)
    if ch in _NAMED:
        return _NAMED[ch]
    if 0xDC80 <= code <= 0xDCFF:
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _escape(text: str, keep: str = "") -> str:
    if text.isprintable():  # the common case, at C speed
        return text
    return "".join(c if c.isprintable() or c in keep else _escaped(c) for c in text)


def printable(text: object, *, limit: int | None = MAX_LINE) -> str:
    """`text` as one line with every character that is not printable escaped (``\\x1b``, ``\\n``), cut to `limit`."""
    line = _escape(str(text))
    if limit is not None and len(line) > limit:
        line = f"{line[:limit]}... ({len(line) - limit:,} more characters)"
    return line


def printable_text(text: str) -> str:
    """Multi-line text (a caption) for a terminal: line breaks and tabs kept, other controls escaped."""
    return _escape(text, keep="\n\t")


def shown(text: object, limit: int = 200) -> str:
    """Text from outside quoted in a message the library builds: escaped as by printable, a backslash
    doubled (so that no escape can be faked), cut to `limit` characters."""
    full = str(text)
    out = _escape(full[:limit].replace("\\", "\\\\"))
    return out + (f"... ({len(full):,} characters)" if len(full) > limit else "")


def some(items: Sequence[T], show: Callable[[T], str], *, most: int = 20) -> str:
    """The first `most` items, shown and joined by commas, and how many more there are: a list from
    outside (a listing of 400,000 files, say) still makes one short line."""
    text = ", ".join(show(item) for item in items[:most])
    return text + (f" and {len(items) - most:,} more" if len(items) > most else "")


def human_size(n: int | float) -> str:
    """A byte count for people: 950 B, 12 KB, 1.5 MB, 2.05 GB (quants of one model differ by tenths of a GB)."""
    size = float(n)
    for unit, digits in (("B", 0), ("KB", 0), ("MB", 1)):
        if size < 1000:
            return f"{size:.{digits}f} {unit}"
        size /= 1000
    return f"{size:.2f} GB"
