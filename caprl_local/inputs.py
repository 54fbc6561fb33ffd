"""What to caption: files, folders, glob patterns and list files (one path or JSON object a line) as items.

Pure: reads the file system and list files, touches nothing else. A file, folder or pattern
named directly that gives no image is an error at once (before any model is downloaded); a
missing file in a list stays an item, reported with the results, so that one stale line does
not stop a dataset.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from .errors import CaprlError

#: File name extensions taken from folders (files named explicitly are tried whatever their name).
IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff",
    ".tga", ".ppm", ".pgm", ".pbm", ".ico", ".avif", ".jp2",
})


@dataclass(frozen=True)
class BatchItem:
    """One image to caption, with the other fields of its JSONL input line, if any."""

    path: str
    extra: Mapping[str, Any] = field(default_factory=dict)
    source: str | None = field(default=None, compare=False, repr=False)  # the list file it came from

    @property
    def key(self) -> str:
        """The image's identity for resuming, whatever the working directory."""
        return os.path.abspath(self.path)


def collect_inputs(
    args: Iterable[str], *, recursive: bool = False, list_file: str | None = None, stdin: TextIO | None = None
) -> list[BatchItem]:
    """Expand files, folders and glob patterns, then the lines of a list file, into items.

    A list holds one path per line, or JSON objects with an ``image`` field (the CapRL-2M
    layout), whose other fields are kept; relative paths are taken from the list's folder.
    A list is UTF-8; bytes that are not (a file name in another encoding) stand for themselves,
    as os.fsdecode reads them. The same image named twice is captioned once.
    """
    items: list[BatchItem] = []
    for arg in args:
        items += _expand(arg, recursive)
    if list_file is not None:
        if list_file == "-":
            buffer = getattr(stdin, "buffer", None)  # the bytes, so that a name in another encoding survives
            text = _read_list_bytes(buffer, "<stdin>") if buffer is not None else (stdin.read() if stdin else "")
            items += read_list(text, Path(), "<stdin>")  # paths as given
        else:
            try:
                with open(list_file, "rb") as fh:
                    text = _read_list_bytes(fh, list_file)
            except OSError as exc:
                raise CaprlError(f"{list_file}: cannot read the list ({exc.strerror or exc})") from exc
            items += [BatchItem(i.path, i.extra, source=list_file)
                      for i in read_list(text, Path(list_file).parent, list_file)]
    unique: dict[str, BatchItem] = {}
    for item in items:
        unique.setdefault(item.key, item)  # the first mention wins; dicts keep order
    return list(unique.values())


#: Bounds on a list: a stream with no end (`yes | caprl-local caption --from-list -`) or without a
#: line break (/dev/zero) must not fill the memory. CapRL-2M's own list is about 300 MB.
MAX_LIST_BYTES = 1 << 30
MAX_LINE_BYTES = 1 << 20


def _read_list_bytes(stream: BinaryIO, source: str) -> str:
    """A list's text, read in blocks within MAX_LIST_BYTES and MAX_LINE_BYTES a line, decoded as
    UTF-8 with other bytes standing for themselves (as os.fsdecode reads a name)."""
    data, line_start = bytearray(), 0
    while block := stream.read(1 << 20):
        data += block
        if len(data) > MAX_LIST_BYTES:
            raise CaprlError(f"{source}: the list is over {MAX_LIST_BYTES >> 20} MB; split it into several lists")
        last_break = data.rfind(b"\n", line_start)
        if last_break >= 0:
            line_start = last_break + 1
        if len(data) - line_start > MAX_LINE_BYTES:
            line = data.count(b"\n", 0, line_start) + 1
            raise CaprlError(f"{source}:{line}: a line of over {MAX_LINE_BYTES >> 20} MB; a list holds one path or "
                             "JSON object a line")
    return bytes(data).decode("utf-8", "surrogateescape").removeprefix("\ufeff")  # a BOM, as some editors write


def _expand(arg: str, recursive: bool) -> list[BatchItem]:
    """The images one argument names; raises CaprlError when it names none."""
    path = Path(arg)
    if path.is_dir():
        found = path.rglob("*") if recursive else path.iterdir()
        files = sorted(
            p for p in found
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            deeper = not recursive and any(p.is_dir() and not p.name.startswith(".") for p in path.iterdir())
            raise CaprlError(f"{arg}: no images in this folder" + (", only in its sub-folders (search them "
                                                                   "recursively)" if deeper else ""))
        return [BatchItem(str(p)) for p in files]
    if path.exists():
        return [BatchItem(arg)]
    if glob.has_magic(arg):
        matched = [BatchItem(p) for p in sorted(glob.glob(arg, recursive=True)) if Path(p).is_file()]
        if not matched:
            raise CaprlError(f"{arg}: no file matches this pattern")
        return matched
    raise CaprlError(f"{arg}: no such file or folder")


def read_list(text: str, base: Path, source: str) -> list[BatchItem]:
    items = []
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines: a path may hold U+0085
        line = line.strip(" \t\r\f\v")  # ASCII blanks only: U+0085 may end a file name
        if not line or line.startswith("#"):
            continue
        extra: dict[str, Any] = {}
        if line.startswith("{"):
            try:
                extra = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CaprlError(f"{source}:{number}: not valid JSON ({exc.msg})") from exc
            if not isinstance(extra.get("image"), str):
                raise CaprlError(f"{source}:{number}: the JSON object has no \"image\" path")
            line = extra["image"]
        path = Path(line).expanduser()
        items.append(BatchItem(str(path if path.is_absolute() else base / path), extra))
    return items


def shard_of(items: list[BatchItem], index: int, count: int) -> list[BatchItem]:
    """Shard `index` (1-based) of `count`: a fixed 1/count of the items, chosen by a hash of each
    image's path as given, so that the same list split on several machines is covered exactly
    once, whatever the order of its lines, run after run."""
    if not 1 <= index <= count:
        raise CaprlError(f"shard {index}/{count}: the shard must be between 1 and {count}")
    return [item for item in items
            if int.from_bytes(hashlib.sha256(item.path.encode("utf-8", "surrogateescape")).digest()[:8], "big")
            % count == index - 1]
