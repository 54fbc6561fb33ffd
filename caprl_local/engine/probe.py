"""Defence in depth: the first load of a model pair happens in a child process.

llama.cpp answers some damaged or foreign files with an assertion that aborts the whole process
(a metadata key of an unexpected type, sizes its graphs do not expect), beyond what reading the
headers first can foresee. So the first time a pair is loaded on this machine, a child process
loads it and captions a small image; if llama.cpp kills the child, the parent raises a one-line
ModelFileError instead of dying with it. The verdict is kept in the cache, keyed by the files'
identity (path, size, modification time) and the llama.cpp version, so later loads cost nothing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import llama_cpp

from ..errors import CaprlError, ModelFileError
from ..hub import cache_root
from ..options import EngineOptions
from .backend import default_threads

log = logging.getLogger("caprl_local")

_OK = "caprl-local probe: loaded"
_FAILED = "caprl-local probe: error: "
_VERDICTS = "loaded-pairs.json"
TIMEOUT_S = 900  # a slow disk and a large model on a CPU take minutes; a hang takes forever


def check_first_load(model: Path, mmproj: Path, options: EngineOptions) -> None:
    """Load the pair in a child process unless this machine has loaded it before; raise
    ModelFileError if llama.cpp aborts or hangs there. Other failures are left to the real load,
    which reports them with their own types."""
    key = _key(model, mmproj, options)
    store = cache_root() / _VERDICTS
    verdicts = _read(store)
    verdict = verdicts.get(key)
    if verdict == "ok":
        return
    if isinstance(verdict, str) and verdict.startswith("aborted"):
        raise _aborted(model, mmproj, verdict.partition(": ")[2])
    child = {
        "model": str(model), "mmproj": str(mmproj),
        # The same device and weight layout as the real load; a small context and image (256 tokens: one
        # InternVL tile, the least any family can take), to be quick.
        "options": {"gpu_layers": options.gpu_layers, "threads": min(options.threads or default_threads(), 4), "n_ctx": 512,
                    "parallel": 1 if options.parallel == 1 else 2, "repack": options.repack,
                    "flash_attn": options.flash_attn, "image_max_tokens": 256, "isolate": False},
    }
    log.info("checking %s + %s in a child process (first load on this machine)", model.name, mmproj.name)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "caprl_local.engine.probe", json.dumps(child)], capture_output=True, text=True,
            timeout=TIMEOUT_S, env={**os.environ, "GGML_NO_BACKTRACE": "1"}, stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise ModelFileError(f"model {model} / projector {mmproj}: llama.cpp did not finish loading this pair in "
                             f"{TIMEOUT_S} s; the files are damaged or from an incompatible converter") from exc
    except OSError as exc:  # no way to start a child (a frozen app): load in this process, unchecked
        log.warning("could not check %s in a child process (%s); loading it directly", model.name, exc)
        return
    if done.returncode == 0 and _OK in done.stdout:
        verdicts[key] = "ok"
        _write(store, verdicts)
    elif done.returncode < 0:  # killed by a signal: llama.cpp aborted (or crashed) on these files
        why = _reason(done.stderr, -done.returncode)
        verdicts[key] = f"aborted: {why}"
        _write(store, verdicts)
        raise _aborted(model, mmproj, why)
    elif _FAILED not in done.stderr:  # not our child's own report: the probe itself could not run
        log.warning("could not check %s in a child process (exit %s: %s); loading it directly", model.name,
                    done.returncode, (done.stderr.strip().splitlines() or ["no output"])[-1])


def _aborted(model: Path, mmproj: Path, why: str) -> ModelFileError:
    return ModelFileError(f"model {model} / projector {mmproj}: llama.cpp aborts on this pair ({why}); the files are "
                          "damaged or from an incompatible converter: download the published ones again")


def _reason(stderr: str, signum: int) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    asserts = [line for line in lines if "GGML_ASSERT" in line or "error" in line.lower()]
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    picked = asserts or lines
    return re.sub(r"^\S*/", "", picked[-1])[-200:] if picked else name  # without the build's source path


def _key(model: Path, mmproj: Path, options: EngineOptions) -> str:
    def identity(path: Path) -> str:
        st = path.stat()
        return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"

    device = "cpu" if options.gpu_layers == 0 else f"gpu{options.gpu_layers}"
    return f"llama-cpp-python {llama_cpp.__version__} {device} | {identity(model)} | {identity(mmproj)}"


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(path: Path, verdicts: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:  # a cache: failing to keep it costs one more check next time, nothing else
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(verdicts, indent=1), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        log.info("could not record %s (%s)", path, exc)
        tmp.unlink(missing_ok=True)


def _child(spec: str) -> int:
    """In the child: load the pair as the parent will, and caption a small image."""
    from PIL import Image

    from .captioner import Captioner

    request = json.loads(spec)
    try:
        with Captioner(request["model"], request["mmproj"], **request["options"]) as cap:
            cap.caption(Image.new("RGB", (56, 56), (90, 140, 200)), max_tokens=2)
    except CaprlError as exc:  # an error the real load will report itself
        print(f"{_FAILED}{exc}", file=sys.stderr)
        return 3
    print(_OK)
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1]))
