"""An output file appended to record by record: the file a name reaches, its one writer, each record whole.

The common part of the JSONL and text outputs (caprl_local.outputs): ``-o`` follows a symlink to
the file it names; a device, FIFO or socket, or the file stdout or stderr goes to, is written as a
stream (no resume, no lock, no rename); results never go into what the run reads.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from contextlib import suppress
from pathlib import Path
from typing import Any, TextIO

from .errors import CaprlError
from .inputs import BatchItem
from .safefiles import deferred_interrupt, fit_name, name_max, write_error


class AppendOutput:
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
            except BrokenPipeError:
                raise  # the reader went away (`| head`): as for print(), the caller decides (the CLI stops quietly)
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
            except BrokenPipeError:
                raise  # a pipe or FIFO whose reader went away (-o /dev/stdout | head): as above
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
            raise CaprlError(f"{given}: is an image or video being captioned; write the results to another file")
