"""Defence in depth: the first load of a model pair happens in a child process.

llama.cpp answers some damaged or foreign files with an assertion that aborts the whole process
(a metadata key of an unexpected type, sizes its graphs do not expect), beyond what reading the
headers first can foresee. So the first time a pair is loaded on this machine, a child process
loads it and captions a small image; if llama.cpp aborts the child, the parent raises a one-line
ModelFileError instead of dying with it. The verdict is kept in the cache, keyed by the files'
identity (path, size, modification time) and the llama.cpp version, so later loads cost nothing.

Only an abort or a crash (SIGABRT, SIGSEGV, SIGBUS, SIGILL, SIGFPE) is a verdict about the files. A child
killed from outside (the out-of-memory killer's SIGKILL, SIGTERM, SIGINT, SIGHUP) says nothing about them:
that load fails with an EngineError and the next one checks again. The child runs isolated (``python -I``,
from an empty folder): nothing in the working folder, the user's site-packages or PYTHON* variables runs in it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp

from ..errors import CaprlError, EngineError, ModelFileError
from ..hub import cache_root
from ..options import EngineOptions
from ..printable import printable
from ..safefiles import write_atomic
from .backend import default_threads
from .probe_child import EXIT_FAILED, FAILED, OK

log = logging.getLogger("caprl_local")

_VERDICTS = "loaded-pairs.json"
TIMEOUT_S = 900  # a slow disk and a large model on a CPU take minutes; a hang takes forever
LOCK_S = 60  # another process recording its verdict holds the lock for milliseconds
TAIL_BYTES = 64 * 1024  # of the child's stdout and stderr kept: its last lines say why it died
MAX_STORE_BYTES = 1 << 20  # a verdict file larger than this is not ours: ignored, then replaced
MAX_ENTRIES = 2000  # pairs remembered; the oldest are forgotten first (they cost one more check)
REASON_CHARS = 200

#: Signals that are llama.cpp's own verdict on the files: an assertion (abort) or a crash.
VERDICT_SIGNALS = frozenset(getattr(signal, name) for name in ("SIGABRT", "SIGSEGV", "SIGBUS", "SIGILL", "SIGFPE")
                            if hasattr(signal, name))

# Run with `python -I -c`: no working folder, user site-packages or PYTHON* variables on the path. Where the parent
# found caprl_local is added (after the standard library) only when this interpreter would find no copy or another
# one: a source checkout on PYTHONPATH, a user install.
_BOOTSTRAP = """\
import os, sys
from importlib.util import find_spec
root = sys.argv[1]
found = find_spec("caprl_local")
where = os.path.dirname(os.path.dirname(found.origin)) if found and found.origin else None
if where is None or os.path.realpath(where) != os.path.realpath(root):
    at = next((i for i, p in enumerate(sys.path) if p.endswith(("site-packages", "dist-packages"))), len(sys.path))
    sys.path.insert(at, root)
from caprl_local.engine.probe_child import main
sys.exit(main(sys.argv[2]))
"""

_lock = threading.Lock()
_pair_locks: dict[str, threading.Lock] = {}  # one check of a pair at a time in this process
_memory: dict[tuple[str, str], str] = {}  # (store, key) -> verdict, for stores that cannot be written
_warned: set[str] = set()  # stores already reported as unwritable


def check_first_load(model: Path, mmproj: Path, options: EngineOptions, *,
                     cache_dir: str | os.PathLike[str] | None = None) -> None:
    """Load the pair in a child process unless this machine has loaded it before; raise
    ModelFileError if llama.cpp aborts or hangs there, EngineError if the child is killed from
    outside. Other failures are left to the real load, which reports them with their own types.

    Verdicts are kept in `cache_dir` (else the cache root: $CAPRL_LOCAL_HOME or the platform's).
    """
    model, mmproj = Path(os.path.abspath(model)), Path(os.path.abspath(mmproj))  # the child starts elsewhere
    try:
        key = _key(model, mmproj, options)
    except OSError:  # gone or unreadable since it was checked: the real load says so
        return
    store = cache_root(cache_dir) / _VERDICTS
    with _pair_lock(key):  # a second thread loading the same pair waits for this verdict
        verdict = _lookup(store, key)
        if verdict == "ok":
            return
        if verdict is not None:
            raise _aborted(model, mmproj, clean(verdict.partition(": ")[2]))
        _check(model, mmproj, options, store, key)


def _check(model: Path, mmproj: Path, options: EngineOptions, store: Path, key: str) -> None:
    child = {
        "model": str(model), "mmproj": str(mmproj),
        # The same device and weight layout as the real load; a small context and image (256 tokens: one
        # InternVL tile, the least any family can take), to be quick.
        "options": {"gpu_layers": options.gpu_layers, "threads": min(options.threads or default_threads(), 4), "n_ctx": 512,
                    "parallel": 1 if options.parallel == 1 else 2, "repack": options.repack,
                    "flash_attn": options.flash_attn, "image_max_tokens": 256, "isolate": False},
    }
    if getattr(sys, "frozen", False) or not sys.executable:  # no Python to start: load in this process, unchecked
        log.warning("could not check %s in a child process (no Python interpreter to run); loading it directly", model.name)
        return
    log.info("checking %s + %s in a child process (first load on this machine)", model.name, mmproj.name)
    try:
        done = _run_child(_command(json.dumps(child)))
    except OSError as exc:  # no way to start a child: load in this process, unchecked
        log.warning("could not check %s in a child process (%s); loading it directly", model.name, exc)
        return
    if done.timed_out:
        raise ModelFileError(f"model {model} / projector {mmproj}: llama.cpp did not finish loading this pair in "
                             f"{TIMEOUT_S} s; the files are damaged or from an incompatible converter")
    code = done.returncode
    if code == 0 and OK in done.stdout.splitlines():
        _record(store, key, "ok")
    elif code < 0 and -code in VERDICT_SIGNALS:  # llama.cpp aborted (or crashed) on these files
        why = reason(done.stderr, -code)
        _record(store, key, f"aborted: {why}")
        raise _aborted(model, mmproj, why)
    elif code < 0:  # killed from outside: nothing is known about the files, and nothing is recorded
        raise _killed(model, mmproj, -code)
    elif not (code == EXIT_FAILED and FAILED in done.stderr):  # not the child's own report: the check could not run
        log.warning("could not check %s in a child process (exit %s: %s); loading it directly", model.name, code,
                    clean((done.stderr.strip().splitlines() or ["no output"])[-1]))


def _command(spec: str) -> list[str]:
    """The child's command line: an isolated interpreter running probe_child with `spec`."""
    import caprl_local

    root = os.path.dirname(os.path.dirname(os.path.abspath(caprl_local.__file__)))
    return [sys.executable, "-I", "-c", _BOOTSTRAP, root, spec]


# --- the child process ---------------------------------------------------------------------


@dataclass(frozen=True)
class ChildResult:
    returncode: int
    stdout: str  # the last TAIL_BYTES of each, decoded
    stderr: str
    timed_out: bool


class _Tail(threading.Thread):
    """A pipe for one of the child's streams, read to its end, keeping only its last TAIL_BYTES: a child
    writing gigabytes costs no memory (and, unlike a temporary file, no disk)."""

    def __init__(self) -> None:
        super().__init__(daemon=True, name="caprl-local-check-output")
        self.data = bytearray()
        self.read_fd, self.write_fd = os.pipe()

    def __enter__(self) -> _Tail:
        try:
            self.start()
        except BaseException:
            os.close(self.read_fd)
            os.close(self.write_fd)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.write_fd)  # the child has ended: its copy was the only other writer
        self.join(timeout=30)  # a grandchild holding the pipe open is not waited for

    def run(self) -> None:
        try:
            while chunk := os.read(self.read_fd, 65536):
                self.data += chunk
                if len(self.data) > 2 * TAIL_BYTES:
                    del self.data[:-TAIL_BYTES]
        except OSError:
            pass
        finally:
            os.close(self.read_fd)

    def text(self) -> str:
        return bytes(self.data[-TAIL_BYTES:]).decode("utf-8", errors="replace")


def _run_child(command: list[str]) -> ChildResult:
    """Run the child from an empty private folder, its output bounded; it is killed if it outlives
    TIMEOUT_S or if this process is interrupted while waiting (subprocess.run does both)."""
    with contextlib.ExitStack() as stack:
        try:  # an empty folder of its own: nothing the child looks up relative to it can be planted
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="caprl-local-check-", ignore_cleanup_errors=True))
        except OSError:  # no temporary folder: the package's own one, as trusted as the code
            folder = os.path.dirname(os.path.abspath(__file__))
        out, err = stack.enter_context(_Tail()), stack.enter_context(_Tail())
        try:
            code = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=out.write_fd, stderr=err.write_fd, cwd=folder,
                                  env={**os.environ, "GGML_NO_BACKTRACE": "1"}, timeout=TIMEOUT_S, check=False).returncode
            timed_out = False
        except subprocess.TimeoutExpired:
            code, timed_out = 0, True  # killed by subprocess.run: the time it took is the verdict
    return ChildResult(code, out.text(), err.text(), timed_out)


# --- messages -------------------------------------------------------------------------------


def _aborted(model: Path, mmproj: Path, why: str) -> ModelFileError:
    return ModelFileError(f"model {model} / projector {mmproj}: llama.cpp aborts on this pair ({why}); the files are "
                          "damaged or from an incompatible converter: download the published ones again")


def _killed(model: Path, mmproj: Path, signum: int) -> EngineError:
    name = _signal_name(signum)
    if signum == getattr(signal, "SIGKILL", None):
        return EngineError(f"model {model} / projector {mmproj}: the first-load check in a child process was killed "
                           f"({name}, most likely for lack of memory); free some memory or lower parallel or n_ctx, "
                           "or load with isolate=False to skip the check")
    return EngineError(f"model {model} / projector {mmproj}: the first-load check in a child process was stopped by "
                       f"{name} from outside; load the pair again (it is checked again)")


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def clean(text: str, limit: int = REASON_CHARS) -> str:
    """`text` as one printable line of at most about `limit` characters (a child's output can echo
    GGUF metadata: anyone's text)."""
    line = printable(text, limit=None)
    return line if len(line) <= limit else line[:limit] + "..."


def reason(stderr: str, signum: int) -> str:
    """Why the child died, in one bounded line: llama.cpp's assertion or error line, else its last line, else the signal."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    asserts = [line for line in lines if "GGML_ASSERT" in line] or [line for line in lines if "error" in line.lower()]
    picked = asserts or lines
    if not picked:
        return _signal_name(signum)
    first, _, rest = picked[-1].partition(" ")
    return clean(f"{first.rpartition('/')[2]} {rest}".strip())  # without the build's source path


def _key(model: Path, mmproj: Path, options: EngineOptions) -> str:
    def identity(path: Path) -> str:
        st = path.stat()
        return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"

    device = "cpu" if options.gpu_layers == 0 else f"gpu{options.gpu_layers}"
    return f"llama-cpp-python {llama_cpp.__version__} {device} | {identity(model)} | {identity(mmproj)}"


# --- the verdicts ---------------------------------------------------------------------------


def _pair_lock(key: str) -> threading.Lock:
    with _lock:
        return _pair_locks.setdefault(key, threading.Lock())


def _lookup(store: Path, key: str) -> str | None:
    verdict = _read(store).get(key)
    if verdict is None:
        with _lock:
            verdict = _memory.get((str(store), key))
    return verdict


def _record(store: Path, key: str, verdict: str) -> None:
    """Add one verdict to the store, merged with what other processes recorded meanwhile; if the store
    cannot be written, keep it for the life of this process."""
    from filelock import FileLock, Timeout

    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        lock_path = store.with_name(f".{store.name}.lock")
        os.close(os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644))  # unwritable: fail now, not after LOCK_S
        with FileLock(lock_path, timeout=LOCK_S):
            verdicts = _read(store)
            verdicts.pop(key, None)  # to the end: the newest is forgotten last
            verdicts[key] = verdict
            for old in list(verdicts)[:max(0, len(verdicts) - MAX_ENTRIES)]:
                del verdicts[old]
            write_atomic(store, json.dumps(verdicts, indent=1))
    except (OSError, CaprlError, Timeout) as exc:  # Timeout: another process holds the lock; a cache, not worth waiting on
        reason = exc.__cause__ if isinstance(exc, CaprlError) and exc.__cause__ else exc  # the OS's own words
        with _lock:
            _memory[(str(store), key)] = verdict
            first = str(store.parent) not in _warned
            _warned.add(str(store.parent))
        if first:
            log.warning("could not record first-load checks in %s (%s); this process remembers them, "
                        "and each new one checks its pairs again", store.parent, clean(str(reason)))


def _read(path: Path) -> dict[str, str]:
    """The verdicts in `path`: only well-formed entries, and nothing from a file too large to be ours
    (or not a regular file: a FIFO there must not hang the load)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError:
        return {}
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_STORE_BYTES:
            log.info("ignoring %s: not a file of at most %d bytes", path, MAX_STORE_BYTES)
            return {}
        with os.fdopen(os.dup(fd), "rb") as file:
            raw = file.read(MAX_STORE_BYTES + 1)
        data: Any = json.loads(raw) if len(raw) <= MAX_STORE_BYTES else None
    except (OSError, ValueError, RecursionError):
        return {}
    finally:
        os.close(fd)
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in list(data.items())[-MAX_ENTRIES:]
            if isinstance(k, str) and isinstance(v, str) and len(k) <= 8192 and len(v) <= 4096
            and (v == "ok" or v.startswith("aborted: "))}
