"""Files that appear whole or not at all, are never written through a planted link, and have
names that fit; text in them stays UTF-8 whatever file names it holds.

The low level of the batch outputs: no knowledge of records, only of bytes, names and paths.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import signal
import socket
import stat
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from .errors import CaprlError

#: Characters written as \u escapes: lone surrogates (a file name's bytes that are not UTF-8, as
#: os.fsdecode gives them; json reads "\udcff" back to exactly that), controls, line separators, and
#: the invisible ones that reorder or hide text on a terminal.
NOT_TEXT = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ud800-\udfff]")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # (not on Windows, where nobody plants a symlink in a dataset)
_SURROGATE = re.compile("[\ud800-\udfff]")
# A temporary file's name says which machine and process writes it, so that a later run on the same machine
# can tell the ones a killed writer left behind (kill -9, a power cut: it could neither rename nor remove them).
_HOST = hashlib.sha256(socket.gethostname().encode(errors="replace")).hexdigest()[:6]
_TEMPORARY = re.compile(r"\.caprl-([0-9a-f]{6})-([0-9]+)-[0-9a-f]{16}\.tmp")
_swept: set[str] = set()
_swept_lock = threading.Lock()


def u_escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def json_line(record: dict[str, Any]) -> bytes:
    """One JSON line, valid UTF-8 whatever the record holds (a JSON text has these characters only
    inside strings, where a \\u escape means the same)."""
    return (NOT_TEXT.sub(u_escape, json.dumps(record, ensure_ascii=False)) + "\n").encode("utf-8")


def as_text(text: str) -> str:
    """Text from outside (a caption) with any lone surrogate escaped, so that it encodes as UTF-8."""
    return _SURROGATE.sub(u_escape, text)


def iter_lines(path: Path, shown: str, limit: int) -> Iterator[bytes]:
    """An output's lines one at a time (nothing when it does not exist yet), each with its newline,
    split at b"\\n" only. A line that does not end in one is the last, or longer than `limit`: then
    its first ``limit + 1`` bytes come, and the rest of it as further pieces, never the whole in memory."""
    try:
        with open(path, "rb") as fh:
            while line := fh.readline(limit + 1):
                yield line
    except FileNotFoundError:
        return
    except OSError as exc:
        raise CaprlError(f"{shown}: cannot read the results in it ({exc.strerror or exc}); check the file, "
                         "or write to another one") from exc


def read_regular(path: Path, limit: int = 16 << 20) -> Iterator[bytes]:
    """The lines of a file of ours in a folder from outside (a sidecar index), one at a time and
    without their newlines, as ``split(b"\\n")`` gives them (a line over `limit` bytes cut to it);
    nothing when it is not a regular file (a planted symlink, a FIFO that would never end), or from
    where it cannot be read."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as fh:
            whole = True  # the piece read begins a line
            while True:
                piece = fh.readline(limit)
                if whole:
                    yield piece.removesuffix(b"\n")
                if not piece.endswith(b"\n"):
                    if len(piece) < limit:
                        return  # the end: a last line without a newline (b"" when the file ends with one)
                    whole = False
                else:
                    whole = True
    except OSError:
        return


def append_line(path: Path, data: bytes) -> None:
    """Append one line to a file of ours, after ending a line cut short (so it joins no other);
    anything there but a regular file (a planted symlink, a FIFO) is replaced, never written through."""
    with suppress(FileNotFoundError):
        if not stat.S_ISREG(os.lstat(path).st_mode):
            write_atomic(path, b"")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | _NOFOLLOW, 0o666)
        try:
            if os.fstat(fd).st_size and os.lseek(fd, -1, os.SEEK_END) >= 0 and os.read(fd, 1) != b"\n":
                data = b"\n" + data  # the last line was cut: end it, so that it swallows no other
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
        finally:
            os.close(fd)
    except OSError as exc:
        raise write_error(path, exc) from exc


def write_atomic(path: Path, data: str | bytes | Iterable[bytes], *, shown: str | None = None) -> None:
    """Write a file so that it appears whole or not at all: temporary name, fsync, rename.

    `data` may come in pieces (a file rewritten a line at a time, never whole in memory). The
    temporary name is short (whatever the length of `path`'s) and unique across threads and
    processes. A symlink at `path` is replaced, not followed: pass the resolved path to write its target.
    """
    if isinstance(data, str):
        data = as_text(data).encode("utf-8")
    pieces = [data] if isinstance(data, bytes) else data
    _sweep(path.parent)
    tmp = path.with_name(f".caprl-{_HOST}-{os.getpid()}-{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o666)
    except OSError as exc:
        raise write_error(shown or str(path), exc) from exc
    try:
        with deferred_interrupt():
            with os.fdopen(fd, "wb") as fh:
                with suppress(OSError):  # a file replaced keeps its mode (a user's 0600 stays private)
                    old = os.lstat(path)
                    if stat.S_ISREG(old.st_mode):
                        os.fchmod(fh.fileno(), stat.S_IMODE(old.st_mode))
                for piece in pieces:
                    fh.write(piece)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
    except OSError as exc:
        raise write_error(shown or str(path), exc) from exc
    finally:
        with suppress(OSError):  # on a read-only folder there is nothing to clean up, and no new error
            tmp.unlink(missing_ok=True)


def _sweep(folder: Path) -> None:
    """Once a process, before its first write into `folder`: remove the temporary files there that a writer
    on this machine left when it was killed, those whose process is gone. A live writer's (this machine's or
    another's sharing the folder) are never touched."""
    key = os.fspath(folder)
    with _swept_lock:
        if key in _swept or os.name != "posix":  # (Windows' os.kill would end a process, not ask after it)
            return
        _swept.add(key)
    with suppress(OSError), os.scandir(folder) as entries:
        for entry in entries:
            match = _TEMPORARY.fullmatch(entry.name)
            if match and match[1] == _HOST and not _alive(int(match[2])):
                with suppress(OSError):
                    os.unlink(entry.path)


def _alive(pid: int) -> bool:
    """Whether a process of this machine with this id runs (one we may not signal runs too)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def fit_name(name: str, suffix: str, limit: int) -> str:
    """``name + suffix``, or when that is longer than `limit` bytes, `name` cut short (at a character)
    and marked with a hash of the whole, so that different long names stay different."""
    whole = name + suffix
    if nbytes(whole) <= limit:
        return whole
    tag = "~" + hashlib.sha256(whole.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    room = limit - nbytes(tag + suffix)
    cut = name[:max(room, 0)]
    while cut and nbytes(cut) > room:
        cut = cut[:-1]
    return cut + tag + suffix


def nbytes(name: str) -> int:
    """The length of a file name in bytes, as the file system counts it."""
    try:
        return len(os.fsencode(name))
    except UnicodeError:  # a surrogate no file name holds: the file will not be found anyway
        return len(name.encode("utf-8", "surrogatepass"))


_NAME_MAXES: dict[str, int] = {}


def name_max(folder: Path) -> int:
    """The longest file name (in bytes) the folder's file system takes."""
    key = os.fspath(folder) or "."
    if key not in _NAME_MAXES:
        try:
            _NAME_MAXES[key] = os.pathconf(key, "PC_NAME_MAX")
        except (OSError, ValueError, AttributeError):  # no such folder yet, or no pathconf (Windows)
            return 255
    return _NAME_MAXES[key]


def is_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def this_file_only(exc: CaprlError) -> bool:
    """Whether a write failed for a reason of that one path (a folder in the way, a name too long),
    rather than one every later write shares (a full disk, a read-only folder)."""
    cause = exc.__cause__
    return isinstance(cause, OSError) and cause.errno in (errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP, errno.ENOTDIR)


def write_error(path: str | Path, exc: OSError) -> CaprlError:
    # Results already written stay; the run stops, since every later write would fail too.
    return CaprlError(f"{path}: cannot write results ({exc.strerror or exc}); check the folder and free space, "
                      "then run the same command again to continue")


_deferring: list[bool] = []  # the main thread is in a deferred_interrupt block


#: The signals that stop a run (Ctrl-C, a service manager's stop, a closed terminal): held back while
#: a record is written, and handled by the CLI as a request to end the batch.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold Ctrl-C, SIGTERM and SIGHUP back until the block is done, so no write is left half-made
    (blocks nest); then the signal is handled as it would have been (the CLI's handler cancels the
    batch, Python's default raises KeyboardInterrupt, a default SIGTERM ends the process)."""
    if threading.current_thread() is not threading.main_thread() or _deferring:
        yield
        return
    caught: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: caught.append(signum)) for signum in STOP_SIGNALS}
    _deferring.append(True)
    try:
        yield
    finally:
        _deferring.clear()
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        if caught:
            handler = previous[caught[0]]
            if callable(handler):
                handler(caught[0], None)
            elif handler in (signal.SIG_DFL, None):
                if caught[0] == signal.SIGINT:
                    raise KeyboardInterrupt
                os.kill(os.getpid(), caught[0])
