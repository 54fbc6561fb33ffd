"""Where a batch's results go: JSONL, plain text and sidecar files, each record whole or not at all.

An existing output tells which images are done (for resuming); one run at a time writes a
file; files we write appear atomically or are appended to record by record. A line we did not
write is never removed: a JSONL file holding one is refused. ``-o`` follows a symlink to the
file it names; a device, FIFO or socket is written as a stream (no resume, no lock, no rename).
Any file name, UTF-8 or not, is written so that it reads back the same, and files stay UTF-8.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, TextIO

from .errors import CaprlError
from .inputs import BatchItem
from .safefiles import (
    NOT_TEXT,
    as_text,
    deferred_interrupt,
    fit_name,
    json_line,
    name_max,
    read_bytes,
    read_lines,
    u_escape,
    write_atomic,
    write_error,
)
from .sidecars import SidecarOutput

__all__ = ["JsonlOutput", "Output", "OutputOptions", "SidecarOutput", "TextOutput", "deferred_interrupt", "open_outputs",
           "write_atomic"]


class Output(Protocol):
    """Where results go. `has` tells whether an image already has a result (for resuming)."""

    def has(self, item: BatchItem, prompt: str) -> bool: ...

    def write(self, item: BatchItem, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class _AppendOutput:
    """Results appended to a file (or written to a stream), each record whole or not at all.

    A file is written unbuffered, record by record: a record that cannot be written whole (a
    full disk) is cut off again, so the file keeps exactly the records before it.
    """

    path: Path | None = None  # the regular file written (a symlink named by the user resolved)
    shown: str = "<stdout>"  # the name the user gave, for messages
    device: bool = False  # `path` is a device, FIFO or socket: written as a stream
    fh: TextIO | None = None  # the stream, when there is no file
    fd: int = -1
    lock: Any = None
    lock_made: bool = False

    def _start(self, path: str | None, stream: TextIO | None, items: Iterable[BatchItem], inputs: Iterable[str]) -> bool:
        """Find the file to write and make this run its only writer; False for a stream."""
        if path is None or path == "-":
            self.fh = stream
            return False
        self.shown = path
        try:
            st: os.stat_result | None = os.stat(path)  # follows symlinks
        except FileNotFoundError:
            st = None  # new, or a symlink to a file yet to be made
        except OSError as exc:
            raise write_error(path, exc) from exc
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise CaprlError(f"{path}: is a folder; name a file for the results")
        real = os.path.realpath(path)
        shared = _standard_stream(st)
        if shared is not None:
            # /dev/stderr, /dev/fd/1, or the very file stdout goes to (`-o out.txt >> out.txt`): written through
            # that descriptor, so its offset is shared, never reopened at 0 over what it wrote, truncated or replaced.
            self.path, self.device = Path(path), True
            self.fd = os.dup(shared)
            return False
        if st is not None and not (stat.S_ISREG(st.st_mode) and _same_stat(st, real)):
            # /dev/null, a FIFO, /dev/stdout: write into it, never replace it (or through
            # /proc/self/fd/1 of a deleted file, which no name reaches).
            self.path, self.device = Path(path), True
            self._open(truncate=False)
            return False
        self.path = Path(real)
        _refuse_inputs(path, real, items, inputs)
        self._claim()
        return True

    def _claim(self) -> None:
        """Make this run the file's only writer: two runs appending to one file would each
        skip nothing and write every image twice, or write into a file the other replaced."""
        from filelock import FileLock, Timeout

        assert self.path is not None
        if not self.path.parent.is_dir():  # FileLock would create it: a typo must not make folders
            raise write_error(self.shown, FileNotFoundError(2, "no such folder"))
        lock = self.path.with_name(fit_name(f".{self.path.name}", ".lock", name_max(self.path.parent)))
        self.lock_made = not os.path.lexists(lock)
        self.lock = FileLock(lock, timeout=0)
        try:
            self.lock.acquire()
        except Timeout:
            self.lock = None
            raise CaprlError(f"{self.shown}: another caprl-local run is writing this file; wait for it to finish, "
                             "or write to another file") from None
        except OSError as exc:
            self.lock = None
            raise write_error(self.shown, exc) from exc

    def _open(self, *, truncate: bool) -> None:
        assert self.path is not None
        flags = os.O_WRONLY | getattr(os, "O_NOCTTY", 0) if self.device else \
            os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if truncate else os.O_APPEND)
        try:
            self.fd = os.open(self.path, flags, 0o666)
        except OSError as exc:
            raise write_error(self.shown, exc) from exc

    def _append(self, data: bytes) -> None:
        if self.fd < 0:
            assert self.fh is not None
            try:
                with deferred_interrupt():
                    self.fh.write(data.decode("utf-8"))
                    self.fh.flush()
            except OSError as exc:
                raise write_error("<stdout>", exc) from exc
            return
        with deferred_interrupt():
            start = -1 if self.device else os.lseek(self.fd, 0, os.SEEK_END)
            try:
                written = 0
                while written < len(data):
                    written += os.write(self.fd, data[written:])
                if not self.device:
                    os.fsync(self.fd)
            except OSError as exc:
                if start >= 0:
                    with suppress(OSError):  # best effort: take the partial record back out
                        os.ftruncate(self.fd, start)
                raise write_error(self.shown, exc) from exc

    def close(self, *, refused: bool = False) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            with suppress(OSError):  # every record was fsynced already; nothing is left to lose
                os.close(fd)
        if self.lock is not None:
            lock, self.lock = self.lock, None
            lock.release()
            if refused and self.lock_made:  # a refused file keeps nothing of ours beside it
                with suppress(OSError):
                    os.unlink(lock.lock_file)


class JsonlOutput(_AppendOutput):
    """One JSON object per image, appended and flushed as each image finishes.

    Opening an existing file reads what it holds: images with a caption for the same prompt
    count as done. Lines of our failed images are dropped (they will be tried again), as is our
    record cut short by a crash, so that every image ends with one line; ``overwrite`` drops the
    records of `items` (all of ours when not given). Any other line (text, other JSON) means
    the file holds data that is not ours: it is refused, left exactly as it was, even with
    ``overwrite`` (which means caption again, not destroy a file we did not write).
    """

    def __init__(self, path: str | None, *, overwrite: bool = False, stream: TextIO | None = None,
                 items: Iterable[BatchItem] | None = None, inputs: Iterable[str] = ()) -> None:
        self.done: set[tuple[str, str]] = set()
        self.overwrite = overwrite
        items = None if items is None else list(items)
        if not self._start(path, stream, items or (), inputs):
            return
        try:
            self._resume(None if items is None else {i.key for i in items})
            self._open(truncate=False)
        except BaseException as exc:
            self.close(refused=isinstance(exc, CaprlError))
            raise

    def _resume(self, redo: set[str] | None) -> None:
        assert self.path is not None
        lines = read_lines(self.path, self.shown)
        kinds = [_classify(line) for line in lines]
        ours = any(kind in ("caption", "failed") for kind, _ in kinds)
        kept: list[bytes] = []
        for number, (line, (kind, record)) in enumerate(zip(lines, kinds, strict=True), 1):
            if kind == "broken" and number == len(lines) and not line.endswith(b"\n") and line.startswith(b'{"') \
                    and (ours or b'"path": "' in line):
                continue  # our record, cut short by a crash
            if kind in ("broken", "foreign"):
                raise CaprlError(f"{self.shown}: line {number} is not a caprl-local result, so this file holds other "
                                 "data; write the results to another file (this one is left as it is)")
            if kind == "caption":
                key = os.path.abspath(record["path"])
                if self.overwrite and (redo is None or key in redo):
                    continue
                self.done.add((key, str(record.get("prompt", ""))))
            if kind in ("caption", "blank"):
                kept.append(line if line.endswith(b"\n") else line + b"\n")
        if kept != lines:
            write_atomic(self.path, b"".join(kept), shown=self.shown)  # our failed and cut lines out, the rest kept

    def has(self, item: BatchItem, prompt: str) -> bool:
        return not self.overwrite and (item.key, prompt) in self.done

    def write(self, item: BatchItem, record: dict[str, Any]) -> None:
        self._append(json_line(record))


def _classify(line: bytes) -> tuple[str, Any]:
    """("caption" | "failed" | "blank" | "broken" | "foreign", the record) for one line of a JSONL output."""
    text = line.decode("utf-8", "surrogateescape")  # another tool's bytes never stop the run
    if not text.strip():
        return "blank", None
    try:
        record = json.loads(text)
    except (ValueError, RecursionError):
        return "broken", None
    if isinstance(record, dict) and isinstance(record.get("path"), str):
        if isinstance(record.get("caption"), str):
            return "caption", record
        if isinstance(record.get("error"), str) and isinstance(record.get("error_kind"), str):
            return "failed", record
    return "foreign", record


class TextOutput(_AppendOutput):
    """Captions as plain text, each under a ``==> path <==`` header, on a stream or in a file.

    An existing file is appended to, and the images under its headers count as done. A name
    that would not read back from a header (a line break in it, a byte that is not UTF-8, a
    leading quote) is written as a JSON string. A run of one image writes its caption alone,
    as a shell redirect of it would (a file is replaced).
    """

    _HEADER = re.compile(r"^==> (.*) <==$", re.M)

    def __init__(self, path: str | None, *, overwrite: bool = False, stream: TextIO | None = None,
                 headers: bool = True, items: Iterable[BatchItem] = (), inputs: Iterable[str] = ()) -> None:
        self.done: set[str] = set()
        self.headers = headers
        self.newline = b""  # put before the first record: the file's last line has no end
        if not self._start(path, stream, items, inputs):
            return
        try:
            overwrite = overwrite or not headers  # without headers nothing in the file tells what is done
            if not overwrite and self.path is not None:
                data = read_bytes(self.path, self.shown)
                self.done = {os.path.abspath(_unquote(p))
                             for p in self._HEADER.findall(data.decode("utf-8", "surrogateescape"))}
                self.newline = b"\n" if data and not data.endswith(b"\n") else b""
            self._open(truncate=overwrite)
        except BaseException as exc:
            self.close(refused=isinstance(exc, CaprlError))
            raise

    def has(self, item: BatchItem, prompt: str) -> bool:
        return item.key in self.done

    def write(self, item: BatchItem, record: dict[str, Any]) -> None:
        if "caption" in record:
            caption = as_text(record["caption"])
            text = f"==> {_quote(item.path)} <==\n{caption}\n\n" if self.headers else caption + "\n"
            self._append(self.newline + text.encode("utf-8"))
            self.newline = b""


def _quote(name: str) -> str:
    """A name for a header: as it is, or as a JSON string when it would not read back."""
    if NOT_TEXT.search(name) or name.startswith('"'):
        return NOT_TEXT.sub(u_escape, json.dumps(name, ensure_ascii=False))
    return name


def _unquote(header: str) -> str:
    if header.startswith('"'):
        with suppress(ValueError):
            name = json.loads(header)
            if isinstance(name, str):
                return name
    return header


def _standard_stream(st: os.stat_result | None) -> int | None:
    """1 or 2 when `st` is the file this process's stdout or stderr writes to, else None."""
    for fd in (1, 2):
        try:
            if st is not None and os.path.samestat(st, os.fstat(fd)):
                return fd
        except OSError:
            continue  # closed
    return None


def _same_stat(st: os.stat_result, other: str) -> bool:
    try:
        return os.path.samestat(st, os.stat(other))
    except OSError:
        return False


def same_file(path: str, other: str) -> bool:
    """Whether two names reach one file: through symlinks and hardlinks, or, for a file yet to be
    made, by the path they resolve to."""
    try:
        return os.path.samefile(path, other)
    except OSError:
        return os.path.realpath(other) == os.path.realpath(path)


def _refuse_inputs(given: str, real: str, items: Iterable[BatchItem], inputs: Iterable[str]) -> None:
    """Results are never written into what the run reads: a list file, or an image."""
    items = list(items)
    for listed in {*inputs, *(i.source for i in items if i.source)}:
        if same_file(real, listed):
            raise CaprlError(f"{given}: is the list of images being captioned; write the results to another file "
                             "(each result keeps the list's fields)")
    names = {os.path.basename(given), os.path.basename(real)}
    for item in items:
        if os.path.basename(item.path) in names and same_file(real, item.path):
            raise CaprlError(f"{given}: is an image being captioned; write the results to another file")


@dataclass(frozen=True)
class OutputOptions:
    """Where a batch's results go."""

    format: Literal["text", "jsonl"] = "text"
    path: str | None = None  # a file instead of the stream ("-": the stream)
    sidecar: bool = False  # photo.txt beside photo.jpg
    sidecar_ext: str = ".txt"
    overwrite: bool = False  # caption images that already have a result again
    inputs: tuple[str, ...] = ()  # files the run reads (list files), which results never go into


def open_outputs(options: OutputOptions, *, stream: TextIO, items: Iterable[BatchItem] = ()) -> list[Output]:
    """The outputs for a run: sidecars, and JSONL or text to the file or the stream (text to the
    stream only when nothing else receives the captions)."""
    outputs: list[Output] = []
    items = list(items)
    path = None if options.path == "-" else options.path
    try:
        if options.sidecar:
            sidecars = SidecarOutput(options.sidecar_ext, overwrite=options.overwrite, items=items)
            outputs.append(sidecars)
            if path and os.path.abspath(path) in {os.path.abspath(sidecars.path_for(i)) for i in items}:
                raise CaprlError(f"{path}: is also the sidecar of an image; write the results to another file")
        if options.format == "jsonl":
            outputs.append(JsonlOutput(path, overwrite=options.overwrite, stream=stream, items=items or None,
                                       inputs=options.inputs))
        elif path or not options.sidecar:
            outputs.append(TextOutput(path, overwrite=options.overwrite, stream=stream, headers=len(items) != 1,
                                      items=items, inputs=options.inputs))
    except BaseException:
        for output in outputs:
            output.close()
        raise
    return outputs
