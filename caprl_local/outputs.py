"""Where a batch's results go: JSONL, plain text and sidecar files, each record whole or not at all.

An existing output tells which images are done (for resuming); one run at a time writes a
file; files we write appear atomically or are appended to record by record.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, TextIO

from .errors import CaprlError
from .inputs import BatchItem

log = logging.getLogger("caprl_local")


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

    path: Path | None
    fh: TextIO | None = None  # the stream, when there is no file
    fd: int = -1
    lock: Any = None

    def _claim(self) -> None:
        """Make this run the file's only writer: two runs appending to one file would each
        skip nothing and write every image twice, or write into a file the other replaced."""
        from filelock import FileLock, Timeout

        assert self.path is not None
        if not self.path.parent.is_dir():  # FileLock would create it: a typo must not make folders
            raise _write_error(self.path, FileNotFoundError(2, "no such folder"))
        self.lock = FileLock(self.path.with_name(f".{self.path.name}.lock"), timeout=0)
        try:
            self.lock.acquire()
        except Timeout:
            raise CaprlError(f"{self.path}: another caprl-local run is writing this file; wait for it to finish, "
                             "or write to another file") from None
        except OSError as exc:
            raise _write_error(self.path, exc) from exc

    def _open(self, *, truncate: bool) -> None:
        assert self.path is not None
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if truncate else os.O_APPEND)
        try:
            self.fd = os.open(self.path, flags, 0o666)
        except OSError as exc:
            raise _write_error(self.path, exc) from exc

    def _append(self, text: str) -> None:
        if self.path is None:
            assert self.fh is not None
            try:
                with deferred_interrupt():
                    self.fh.write(text)
                    self.fh.flush()
            except OSError as exc:
                raise _write_error(Path("<stdout>"), exc) from exc
            return
        data = text.encode("utf-8")
        with deferred_interrupt():
            start = os.lseek(self.fd, 0, os.SEEK_END)
            try:
                written = 0
                while written < len(data):
                    written += os.write(self.fd, data[written:])
                os.fsync(self.fd)
            except OSError as exc:
                with suppress(OSError):  # best effort: take the partial record back out
                    os.ftruncate(self.fd, start)
                raise _write_error(self.path, exc) from exc

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            with suppress(OSError):  # every record was fsynced already; nothing is left to lose
                os.close(fd)
        if self.lock is not None:
            self.lock.release()


class JsonlOutput(_AppendOutput):
    """One JSON object per image, appended and flushed as each image finishes.

    Opening an existing file reads what it holds: images with a caption for the same prompt
    count as done; lines of failed images are dropped (they will be tried again), as is a
    line cut short by a crash, so that every image ends with exactly one line.
    """

    def __init__(self, path: str | None, *, overwrite: bool = False, stream: TextIO | None = None) -> None:
        self.path = Path(path) if path else None
        self.done: set[tuple[str, str]] = set()
        if self.path is None:
            self.fh = stream
            return
        self._claim()
        kept: list[str] = []
        if self.path.exists() and not overwrite:
            for line in _lines(self.path):
                record = _parse_line(line)
                if record is not None and "caption" in record and "path" in record:
                    self.done.add((os.path.abspath(record["path"]), record.get("prompt", "")))
                    kept.append(line)
        if overwrite or kept != _lines(self.path):
            write_atomic(self.path, "".join(kept))  # drop failed and broken lines, keep the rest
        self._open(truncate=False)

    def has(self, item: BatchItem, prompt: str) -> bool:
        return (item.key, prompt) in self.done

    def write(self, item: BatchItem, record: dict[str, Any]) -> None:
        self._append(json.dumps(record, ensure_ascii=False) + "\n")


class SidecarOutput:
    """``photo.txt`` beside ``photo.jpg``, written to a temporary name and renamed.

    Images that would share a sidecar (``photo.jpg`` and ``photo.png`` in one run) each get
    one named after the whole file name instead (``photo.jpg.txt``, ``photo.png.txt``), so
    that no caption overwrites another; a warning says so. Each folder's ``INDEX`` remembers
    the prompt of every sidecar written there: one written for another prompt is not done
    (another prompt is other work) and is replaced; one the index does not know (written by
    hand, or by another tool) counts as done.
    """

    INDEX = ".caprl-local-sidecars.jsonl"

    def __init__(self, ext: str = ".txt", *, overwrite: bool = False, items: Iterable[BatchItem] = ()) -> None:
        self.ext = ext if ext.startswith(".") else "." + ext
        self.overwrite = overwrite
        by_sidecar: dict[Path, list[BatchItem]] = {}
        for item in items:
            by_sidecar.setdefault(Path(item.key).with_suffix(self.ext), []).append(item)
        self.renamed: dict[str, Path] = {}
        self.prompts: dict[Path, dict[str, str]] = {}  # folder -> sidecar name -> its prompt
        self.warned: set[Path] = set()
        for sidecar, sharing in by_sidecar.items():
            if len(sharing) > 1:
                self.renamed.update((i.key, Path(i.path).with_name(Path(i.path).name + self.ext)) for i in sharing)
                log.warning("%s would all be captioned into %s; writing %s instead",
                            ", ".join(Path(i.path).name for i in sharing), sidecar.name,
                            ", ".join(self.renamed[i.key].name for i in sharing))

    def path_for(self, item: BatchItem) -> Path:
        return self.renamed.get(item.key) or Path(item.path).with_suffix(self.ext)

    def has(self, item: BatchItem, prompt: str) -> bool:
        path = self.path_for(item)
        if self.overwrite or not path.is_file():
            return False
        written = self._prompts(path.parent).get(path.name)
        if written is None or written == prompt:
            return True
        if path.parent not in self.warned:
            self.warned.add(path.parent)
            log.warning("%s: sidecars written for another prompt are captioned again and replaced", path.parent)
        return False

    def write(self, item: BatchItem, record: dict[str, Any]) -> None:
        if "caption" not in record:
            return
        path = self.path_for(item)
        write_atomic(path, record["caption"] + "\n")
        index = path.parent / self.INDEX
        try:  # appended after the sidecar: a crash between the two leaves a sidecar counted as done
            with deferred_interrupt(), open(index, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"sidecar": path.name, "prompt": record.get("prompt", "")},
                                    ensure_ascii=False) + "\n")
        except OSError as exc:
            raise _write_error(index, exc) from exc
        self._prompts(path.parent)[path.name] = record.get("prompt", "")

    def _prompts(self, folder: Path) -> dict[str, str]:
        if folder not in self.prompts:
            known: dict[str, str] = {}
            with suppress(OSError, UnicodeDecodeError):
                for line in _lines(folder / self.INDEX):
                    entry = _parse_line(line)
                    if entry is not None and isinstance(entry.get("sidecar"), str):
                        known[entry["sidecar"]] = str(entry.get("prompt", ""))  # the last one written wins
            self.prompts[folder] = known
        return self.prompts[folder]

    def close(self) -> None:
        pass  # each sidecar is closed as it is written


class TextOutput(_AppendOutput):
    """Captions as plain text, each under a ``==> path <==`` header, on a stream or in a file.

    An existing file is appended to, and the images under its headers count as done. A run of
    one image writes its caption alone, as a shell redirect of it would (a file is replaced).
    """

    _HEADER = re.compile(r"^==> (.*) <==$", re.M)

    def __init__(self, path: str | None, *, overwrite: bool = False, stream: TextIO | None = None,
                 headers: bool = True) -> None:
        self.path = Path(path) if path else None
        self.done: set[str] = set()
        self.headers = headers
        if self.path is None:
            self.fh = stream
            return
        self._claim()
        overwrite = overwrite or not headers  # without headers nothing in the file tells what is done
        if self.path.exists() and not overwrite:
            self.done = {os.path.abspath(p) for p in self._HEADER.findall(self.path.read_text(encoding="utf-8"))}
        self._open(truncate=overwrite)

    def has(self, item: BatchItem, prompt: str) -> bool:
        return item.key in self.done

    def write(self, item: BatchItem, record: dict[str, Any]) -> None:
        if "caption" in record:
            self._append(f"==> {item.path} <==\n{record['caption']}\n\n" if self.headers else record["caption"] + "\n")


def _parse_line(line: str) -> dict[str, Any] | None:
    if not line.endswith("\n"):
        return None  # cut short by a crash
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def _lines(path: Path) -> list[str]:
    """The file's lines, each with its newline: split at "\n" only, since a JSON line may hold
    other line breaks (U+0085 and U+2028 in a file name) that str.splitlines would cut at."""
    return re.split(r"(?<=\n)(?!$)", path.read_text(encoding="utf-8")) if path.exists() and path.stat().st_size else []


def write_atomic(path: Path, text: str) -> None:
    """Write a file so that it appears whole or not at all: temporary name, fsync, rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with deferred_interrupt(), open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise _write_error(path, exc) from exc
    finally:
        with suppress(OSError):  # on a read-only folder there is nothing to clean up, and no new error
            tmp.unlink(missing_ok=True)


def _write_error(path: Path, exc: OSError) -> CaprlError:
    # Results already written stay; the run stops, since every later write would fail too.
    return CaprlError(f"{path}: cannot write results ({exc.strerror or exc}); check the folder and free space, "
                      "then run the same command again to continue")


@contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold Ctrl-C back until the block is done, so no write is left half-made."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            raise KeyboardInterrupt


@dataclass(frozen=True)
class OutputOptions:
    """Where a batch's results go."""

    format: Literal["text", "jsonl"] = "text"
    path: str | None = None  # a file instead of the stream
    sidecar: bool = False  # photo.txt beside photo.jpg
    sidecar_ext: str = ".txt"
    overwrite: bool = False  # caption images that already have a result again


def open_outputs(options: OutputOptions, *, stream: TextIO, items: Iterable[BatchItem] = ()) -> list[Output]:
    """The outputs for a run: sidecars, and JSONL or text to the file or the stream (text to the
    stream only when nothing else receives the captions)."""
    outputs: list[Output] = []
    items = list(items)
    if options.sidecar:
        outputs.append(SidecarOutput(options.sidecar_ext, overwrite=options.overwrite, items=items))
    if options.format == "jsonl":
        outputs.append(JsonlOutput(options.path, overwrite=options.overwrite, stream=stream))
    elif options.path or not options.sidecar:
        outputs.append(TextOutput(options.path, overwrite=options.overwrite, stream=stream, headers=len(items) != 1))
    return outputs
