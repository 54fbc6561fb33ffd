"""Text from outside made safe to show: control characters escaped, one line, bounded.

Names from a Hub listing, GGUF metadata echoed in llama.cpp's messages, file names and
servers' answers are data. Printed raw, an escape sequence in one of them can rewrite the
terminal (``ESC[2J``), write the clipboard (OSC 52) or forge extra message lines (a newline).
Everything that reaches a terminal or a one-line message goes through here first.
"""

from __future__ import annotations

import re

#: C0 and C1 control characters, DEL, and the Unicode controls that reorder or hide text
#: (bidirectional overrides and isolates, zero-width joiners used to disguise names), and
#: lone surrogates (a file name's undecodable bytes, as os.fsdecode gives them).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ud800-\udfff]")
_UNSAFE_KEEP_LINES = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff\ud800-\udfff]")

#: The longest message line shown; the rest is cut with a note of how much was left out.
MAX_LINE = 2000

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\x1b": "\\x1b"}


def _escape(match: re.Match[str]) -> str:
    ch = match.group()
    code = ord(ch)
    if ch in _NAMED:
        return _NAMED[ch]
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte of a file name: show the byte itself
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: object, *, limit: int | None = MAX_LINE) -> str:
    """`text` as one line with every control character escaped (``\\x1b``, ``\\n``), cut to `limit`."""
    line = _UNSAFE.sub(_escape, str(text))
    if limit is not None and len(line) > limit:
        line = f"{line[:limit]}... ({len(line) - limit:,} more characters)"
    return line


def printable_text(text: str) -> str:
    """Multi-line text (a caption) for a terminal: line breaks and tabs kept, other controls escaped."""
    return _UNSAFE_KEEP_LINES.sub(_escape, text)
