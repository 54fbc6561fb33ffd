"""Helpers shared by the tests (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

#: How long a test waits before calling something hung. Generous on purpose: a busy machine
#: slows everything down, and no test measures time.
HANG_S = 900

#: Broken inputs (from scripts/make_test_images.py, plus one that does not exist) and the
#: words their one-line error must contain.
BAD_IMAGE_ERRORS = [
    ("missing.jpg", "no such file"),
    ("empty.jpg", "empty"),
    ("truncated.jpg", "truncated"),
    ("text.jpg", "not a recognised image"),
    ("bomb.png", "too large"),
]


def load_script(name: str) -> ModuleType:
    """Import one of the project's scripts/ as a module (once)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def run_cli(*args: str, input: str | None = None, timeout: float = HANG_S,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed CLI in a subprocess, as a user would."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "caprl_local", *args],
        capture_output=True, text=True, input=input, timeout=timeout, env=env, cwd=cwd,
    )


def run_on_a_terminal(args: list[str], *, stderr_too: bool = True) -> tuple[int, str]:
    """Run the CLI with stdout (and stderr) on a pseudo-terminal 100 columns wide, as a person's
    shell does; returns the exit code and everything the terminal received."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # room for a bar
    proc = subprocess.Popen([sys.executable, "-m", "caprl_local", *args], stdout=slave,
                            stderr=slave if stderr_too else subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                            env={**os.environ, "TERM": "xterm"})
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    code = proc.wait(timeout=HANG_S)
    os.close(master)
    return code, b"".join(chunks).decode("utf-8", "replace")


def start_server(tiny_model: tuple[Path, Path], *args: str) -> tuple[subprocess.Popen[str], str]:
    """`caprl-local serve` on a free port of 127.0.0.1 with the tiny model: (process, base URL)."""
    model, mmproj = tiny_model
    proc = subprocess.Popen([sys.executable, "-m", "caprl_local", "serve", "-m", str(model), "--mmproj", str(mmproj),
                             "-t", "1", "--port", "0", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()  # printed once the server listens
    assert url.startswith("http://127.0.0.1:"), proc.stderr.read() if proc.stderr else ""
    return proc, url


def runs_collapsed(text: str) -> str:
    """`text` with every run of one character and of one word cut to one: what stays of a caption when
    a batched decode tips a near-tie in a random model's logits (docs/robustness.md, "the threads row")."""
    import re

    return re.sub(r"\b(\S+)(?: \1\b)+", r"\1", re.sub(r"(.)\1+", r"\1", text))


def same_but_near_ties(got: dict[str, str], expected: dict[str, str]) -> bool:
    """Captions decoded together equal those decoded alone, but for how long a run of one token lasts
    (and so, within a token cap, for how far past the run each gets)."""
    def alike(a: str, b: str) -> bool:
        a, b = runs_collapsed(a), runs_collapsed(b)
        return a.startswith(b) or b.startswith(a)

    return got.keys() == expected.keys() and all(alike(got[k], expected[k]) for k in got)


def send_json(handler: object, status: int, body: object) -> None:
    """Answer a BaseHTTPRequestHandler's request with `body` as JSON (the local stand-in servers)."""
    import json

    data = json.dumps(body).encode()
    handler.send_response(status)  # type: ignore[attr-defined]
    handler.send_header("Content-Type", "application/json")  # type: ignore[attr-defined]
    handler.send_header("Content-Length", str(len(data)))  # type: ignore[attr-defined]
    handler.end_headers()  # type: ignore[attr-defined]
    handler.wfile.write(data)  # type: ignore[attr-defined]


@contextmanager
def each_step(scheduler: Any, watch: Callable[[Any, int, Any], None]) -> Iterator[None]:
    """Call ``watch(request, tokens generated so far, logits)`` at each sampled token of `scheduler`'s loop."""
    sample = scheduler._sample

    def watched(slots: list[Any]) -> list[int]:
        logits = scheduler.session.logits_rows(len(slots)).copy()  # the model's, before the penalty
        for slot, row in zip(slots, logits, strict=True):
            watch(slot.request, slot.n_gen, row)
        return sample(slots)

    scheduler._sample = watched
    try:
        yield
    finally:
        scheduler._sample = sample


def descendants(root: int) -> set[int]:
    """`root` and every process below it (from /proc; Linux)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    found, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        children = [child for child, parent in parents.items() if parent == pid and child not in found]
        found.update(children)
        frontier += children
    return found
