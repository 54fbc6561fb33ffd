"""Helpers shared by the tests (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

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
