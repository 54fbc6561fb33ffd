"""What to caption: files, folders, glob patterns and list files (one path or JSON object a line) as items.

Items are images and videos alike (a folder gives both: see :mod:`caprl_local.inputkinds`).
Pure: reads the file system and list files, touches nothing else. A file, folder or pattern
named directly that gives nothing to caption is an error at once (before any model is downloaded); a
missing file in a list stays an item, reported with the results, so that one stale line does
not stop a dataset.

Built for lists of millions of lines split over many machines: a list is read line by line and
only the items of this run's shard are kept (with their fields); each item's shard follows a
name that is the same on every machine, however its folder or list is spelled there.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, TextIO

from .errors import CaprlError
from .inputkinds import IMAGE_EXTENSIONS, MEDIA_EXTENSIONS, Media, media_in, media_of, pattern_root

__all__ = ["IMAGE_EXTENSIONS", "MAX_KEPT_BYTES", "MAX_LINE_BYTES", "MAX_LIST_BYTES", "MAX_LIST_LINES", "MEDIA_EXTENSIONS",
           "BatchItem", "Collected", "Media", "collect_inputs", "gather_inputs", "loads_line", "read_list", "shard_index",
           "shard_name", "shard_of"]

log = logging.getLogger("caprl_local")


class _NoFields(Mapping[str, Any]):
    """The fields of an item that has none: one mapping shared by all (a plain list has millions)."""

    def __getitem__(self, key: str) -> Any:
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0

    def __contains__(self, key: object) -> bool:
        return False  # without raising KeyError first: asked of every item of a list

    def __repr__(self) -> str:
        return "{}"

    def __reduce__(self) -> str:
        return "_NO_FIELDS"  # pickled as the one shared object


_NO_FIELDS = _NoFields()


@dataclass(frozen=True, slots=True)
class BatchItem:
    """One image or video to caption, with the other fields of its JSONL input line, if any.

    ``shard_key`` is the name that picks the item's shard (see :func:`shard_name`); the
    collectors set it, and an item made by hand falls back to its path, normalized."""

    path: str
    extra: Mapping[str, Any] = field(default_factory=lambda: _NO_FIELDS)
    source: str | None = field(default=None, compare=False, repr=False)  # the list file it came from
    shard_key: str | None = field(default=None, compare=False, repr=False)

    @property
    def key(self) -> str:
        """The input's identity for resuming, whatever the working directory."""
        return os.path.abspath(self.path)

    @property
    def media(self) -> Media:
        """"video" or "image", by its name, as the Captioner tells them apart."""
        return media_of(self.path)


@dataclass(frozen=True)
class Collected:
    """The items of one run (its shard, each image once), and how many entries its list had in all."""

    items: list[BatchItem]
    listed: int = 0  # entries (not blank, not comments) of the list file, in every shard


def collect_inputs(
    args: Iterable[str], *, recursive: bool = False, list_file: str | None = None, stdin: TextIO | None = None,
    shard: tuple[int, int] | None = None, null: bool = False,
) -> list[BatchItem]:
    """Expand files, folders and glob patterns, then the lines of a list file, into items.

    A list holds one path per line, or JSON objects with an ``image`` field (the CapRL-2M
    layout; or ``video``), whose other fields are kept; relative paths are taken from the list's folder.
    A list is UTF-8; bytes that are not (a file name in another encoding) stand for themselves,
    as os.fsdecode reads them. The same image named twice is captioned once. ``shard=(i, n)``
    keeps shard i (from 1) of n only, as :func:`shard_of` would, without holding the others.
    ``null=True`` reads a list of paths each ended by a NUL byte instead (as ``find -print0`` writes
    it, and ``xargs -0`` reads it): each taken as it is, with no JSON, comments or blanks trimmed.
    """
    return gather_inputs(args, recursive=recursive, list_file=list_file, stdin=stdin, shard=shard, null=null).items


def gather_inputs(
    args: Iterable[str], *, recursive: bool = False, list_file: str | None = None, stdin: TextIO | None = None,
    shard: tuple[int, int] | None = None, null: bool = False,
) -> Collected:
    """:func:`collect_inputs`, also telling how many entries the list had (an empty shard of a list
    is not an empty list)."""
    keep = _Keeper(shard)
    for arg in args:
        _expand(arg, recursive, keep)
    if list_file == "-":
        buffer = getattr(stdin, "buffer", None)  # the bytes, so that a name in another encoding survives
        if null:
            lines = _null_entries(buffer.read1 if buffer is not None else lambda n: _encoded(stdin, n), "<stdin>")
        else:
            lines = _stream_lines(buffer, "<stdin>") if buffer is not None else _text_lines(stdin, "<stdin>")
        _read_entries(lines, Path(), "<stdin>", keep, None, raw=null)  # paths as given
    elif list_file is not None:
        try:
            with open(list_file, "rb") as fh:
                entries = _null_entries(fh.read1, list_file) if null else _stream_lines(fh, list_file)
                _read_entries(entries, Path(list_file).parent, list_file, keep, list_file, raw=null)
        except OSError as exc:
            raise CaprlError(f"{list_file}: cannot read the list ({exc.strerror or exc})") from exc
    return Collected(list(keep.kept.values()), keep.listed)


def read_list(text: str, base: Path, source: str, *, shard: tuple[int, int] | None = None) -> list[BatchItem]:
    """The items of a list already read (each image once; relative paths taken from `base`)."""
    keep = _Keeper(shard)
    _read_entries(iter(text.removeprefix("\ufeff").split("\n")), base, source, keep, None)  # not splitlines: U+0085
    return list(keep.kept.values())


def shard_name(item: BatchItem) -> str:
    """The name an item's shard is chosen by: the same on every machine and for every spelling of the
    folder or list it came from. For an image in a folder, its path inside the folder given; for a
    glob pattern's match, its path below the pattern's fixed folder; for a list's entry, the entry as
    the list writes it (the ``image`` field or the line); for a file named directly, its file name.
    Each is normalized (``./a.jpg`` is ``a.jpg``, ``imgs//a.jpg`` is ``imgs/a.jpg``)."""
    return item.shard_key if item.shard_key is not None else _normal(item.path)


def shard_index(name: str, count: int) -> int:
    """Which of `count` shards (from 0) a name falls in: a hash, so the split is fixed and even."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8", "surrogateescape")).digest()[:8], "big") % count


def shard_of(items: Iterable[BatchItem], index: int, count: int) -> list[BatchItem]:
    """Shard `index` (1-based) of `count`: a fixed 1/count of the items, chosen by a hash of each
    item's :func:`shard_name`, so that the same inputs split on several machines are covered exactly
    once, whatever the order of a list's lines or how each machine spells its paths, run after run."""
    _check_shard(index, count)
    return [item for item in items if shard_index(shard_name(item), count) == index - 1]


def _check_shard(index: int, count: int) -> None:
    if not 1 <= index <= count:
        raise CaprlError(f"shard {index}/{count}: the shard must be between 1 and {count}")


def _normal(name: str) -> str:
    """A name as every machine writes it, as pathlib spells it: '/' between parts, no '.' parts, no doubled
    or trailing '/' ('..' stays: through a symlink, a/../b is not b)."""
    if os.sep != "/":
        name = name.replace(os.sep, "/")
    if name.startswith(".") or "/." in name or "//" in name or name.endswith("/"):  # only when it may change it
        name = str(PurePosixPath(name))
    return name


_SCAN: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def loads_line(text: str) -> Any:
    """json.loads of one line with no blanks around it, without its layers of Python (a list of two
    million lines spends most of its reading here); raises json.JSONDecodeError or RecursionError."""
    try:
        value, end = _SCAN(text, 0)
    except StopIteration as exc:
        raise json.JSONDecodeError("Expecting value", text, exc.value) from None
    if end != len(text):
        raise json.JSONDecodeError("Extra data", text, end)
    return value


#: Bounds on a list. It is read a line at a time and keeps only this run's items, so its length costs
#: time, not memory: the bound on the whole is there so that a stream with no end (`yes | caprl-local
#: caption --from-list -`) ends in an error, and it lies far past any real list (CapRL-2M's 2 million
#: lines are under 1 GB, even with long fields: 64 GB would be 32 KB a line). What a run keeps is
#: bounded apart, and a line (/dev/zero has no line break) by itself.
MAX_LIST_BYTES = 1 << 36
MAX_LIST_LINES = 1 << 27
MAX_KEPT_BYTES = 1 << 30  # the lines of the items one run holds: what used to bound a whole list
MAX_LINE_BYTES = 1 << 20
_BLANKS = " \t\r\n\f\v"  # ASCII blanks only: U+0085 may end a file name


def _size(n: int) -> str:
    return f"{n >> 30} GB" if n >= 1 << 30 else f"{n >> 20} MB"


def _stream_lines(stream: BinaryIO, source: str) -> Iterator[str]:
    """A list's lines, read one at a time within the bounds above (split at b"\\n" only), decoded as
    UTF-8 with other bytes standing for themselves (as os.fsdecode reads a name)."""
    total = 0
    for number in range(1, MAX_LIST_LINES + 2):
        raw = stream.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        total += len(raw)
        if b"\0" in raw and _nul_separated(raw):  # before the line's bound: such a list is one line as long as itself
            raise _nul_error(source, number, raw)
        _check_bounds(source, number, total, len(raw), raw.endswith(b"\n"))
        text = raw.decode("utf-8", "surrogateescape")
        yield text.removeprefix("\ufeff") if number == 1 else text  # a BOM, as some editors write


def _text_lines(stdin: TextIO | None, source: str) -> Iterator[str]:
    """The lines of a text stream that has no bytes beneath it (a StringIO), within the same bounds."""
    total = 0
    for number in range(1, MAX_LIST_LINES + 2):
        line = stdin.readline(MAX_LINE_BYTES + 1) if stdin is not None else ""
        if not line:
            return
        total += len(line)
        _check_bounds(source, number, total, len(line), line.endswith("\n"))
        yield line.removeprefix("\ufeff") if number == 1 else line


def _encoded(stdin: TextIO | None, size: int) -> bytes:
    return stdin.read(size).encode("utf-8", "surrogateescape") if stdin is not None else b""


def _null_entries(read: Callable[[int], bytes], source: str) -> Iterator[str]:
    """The entries of a NUL-separated list, each as it is (decoded as _stream_lines decodes a line), within
    the bounds of a list's lines; the last may lack its NUL."""
    total, number, pending = 0, 0, b""
    while True:
        chunk = read(1 << 16)
        total += len(chunk)
        *ended, pending = (pending + chunk).split(b"\0") if chunk else (pending, b"")
        for raw in ended:
            number += 1
            _check_bounds(source, number, total, len(raw), True)
            yield raw.decode("utf-8", "surrogateescape")
        if len(pending) > MAX_LINE_BYTES:
            raise CaprlError(f"{source}:{number + 1}: an entry of over {_size(MAX_LINE_BYTES)} with no NUL byte after "
                             "it; a NUL-separated list ends each path with one (find -print0)")
        if not chunk:
            return


_CONTROLS = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]")  # in no name (but tab and line feed): binary data


def _nul_separated(raw: bytes) -> bool:
    """Whether bytes with NULs are names a NUL apart (find -print0), not binary data or only NULs (/dev/zero)."""
    names = raw.replace(b"\0", b"")
    return bool(names.strip()) and _CONTROLS.search(names) is None


def _nul_error(source: str, number: int, line: bytes) -> CaprlError:
    if _nul_separated(line):
        return CaprlError(f"{source}:{number}: the list holds NUL bytes, so its paths are NUL-separated "
                          "(find -print0); read it with -0 (--null)")
    return CaprlError(f"{source}:{number}: NUL bytes among others that are no text: a list is text, one path or "
                      "JSON object a line")


def _check_bounds(source: str, number: int, total: int, size: int, ended: bool) -> None:
    if size > MAX_LINE_BYTES and not ended:
        raise CaprlError(f"{source}:{number}: a line of over {_size(MAX_LINE_BYTES)}; a list holds one path or "
                         "JSON object a line")
    if total > MAX_LIST_BYTES:
        raise CaprlError(f"{source}: the list is over {_size(MAX_LIST_BYTES)}; split it into several lists")
    if number > MAX_LIST_LINES:
        raise CaprlError(f"{source}: the list is over {MAX_LIST_LINES:,} lines; split it into several lists")


class _Keeper:
    """The items one run keeps: those of its shard, each image (by key) once, the first mention winning."""

    def __init__(self, shard: tuple[int, int] | None) -> None:
        if shard is not None:
            _check_shard(*shard)
        self.index, self.count = (shard[0] - 1, shard[1]) if shard is not None else (0, 1)
        self.kept: dict[str, BatchItem] = {}  # dicts keep order
        self.listed = 0
        self.kept_bytes = 0

    def takes(self, name: str) -> bool:
        return self.count == 1 or shard_index(name, self.count) == self.index

    def add(self, item: BatchItem, cost: int = 0, source: str = "") -> None:
        key = item.key
        if key in self.kept:
            return
        self.kept_bytes += cost
        if self.kept_bytes > MAX_KEPT_BYTES:
            raise CaprlError(f"{source}: the lines kept for this run are over {_size(MAX_KEPT_BYTES)}; caption the "
                             "list in shards, a part of it in each run")
        self.kept[key] = item


def _read_entries(lines: Iterator[str], base: Path, source: str, keep: _Keeper, list_file: str | None, *,
                  raw: bool = False) -> None:
    """Add a list's entries of this shard to `keep`; every line is checked, only this shard's are kept.
    `raw`: each entry is a path as it is (a NUL-separated list), never JSON, a comment or trimmed."""
    for number, line in enumerate(lines, 1):
        if not raw:
            line = line.strip(_BLANKS)
            if "\0" in line:
                raise _nul_error(source, number, line.encode("utf-8", "surrogateescape"))
        if not line or (not raw and line.startswith("#")):
            continue
        keep.listed += 1
        extra: dict[str, Any] | None = None
        if line.startswith("{") and not raw:
            try:
                extra = loads_line(line)
            except json.JSONDecodeError as exc:
                raise CaprlError(f"{source}:{number}: not valid JSON ({exc.msg})") from exc
            except RecursionError as exc:
                raise CaprlError(f"{source}:{number}: not valid JSON (nested too deeply)") from exc
            entry: str | None = _entry_of(extra)
            if entry is None:
                raise CaprlError(f"{source}:{number}: the JSON object has no \"image\" path (nor a \"video\" one)")
        else:
            entry = line
        name = _normal(entry)
        if not keep.takes(name):
            continue
        path = Path(entry)
        with suppress(RuntimeError):  # ~user of no such user: the name stays as written (and is not found)
            path = path.expanduser()
        keep.add(BatchItem(str(path if path.is_absolute() else base / path), extra or _NO_FIELDS, source=list_file,
                           shard_key=name), len(line), source)


def _entry_of(record: Any) -> str | None:
    """The path a list's JSON object names: its "image" field (CapRL-2M's), else its "video" field."""
    if not isinstance(record, dict):
        return None
    for name in ("image", "video"):
        if isinstance(record.get(name), str):
            return str(record[name])
    return None


def _expand(arg: str, recursive: bool, keep: _Keeper) -> None:
    """Add the images and videos of this shard that one argument names; raises CaprlError when it names none."""
    path = Path(arg)
    if path.is_dir():
        found = []
        seen = False
        for parts in media_in(arg, recursive):
            seen = True
            name = "/".join(parts)
            if keep.takes(name):
                found.append(parts)
        if not seen:
            deeper = not recursive and any(p.is_dir() and not p.name.startswith(".") for p in path.iterdir())
            raise CaprlError(f"{arg}: no images in this folder, nor videos" + (
                ": they are only in its sub-folders (search them recursively)" if deeper else ""))
        for parts in sorted(found):  # as pathlib sorts paths: part by part
            keep.add(BatchItem(str(path.joinpath(*parts)), shard_key="/".join(parts)))
        return
    if path.exists():
        name = os.path.basename(_normal(arg))
        if keep.takes(name):
            keep.add(BatchItem(arg, shard_key=name))
        return
    if glob.has_magic(arg):
        root = pattern_root(arg)
        matched: list[tuple[str, str]] = []
        seen = False
        for match in glob.iglob(arg, recursive=True):
            name = _normal(os.path.relpath(match, root))
            if keep.takes(name):
                if os.path.isfile(match):
                    matched.append((match, name))
                    seen = True
            elif not seen:
                seen = os.path.isfile(match)
        if not seen:
            raise CaprlError(f"{arg}: no file matches this pattern")
        for match, name in sorted(matched):
            keep.add(BatchItem(match, shard_key=name))
        return
    raise CaprlError(f"{arg}: no such file or folder")
