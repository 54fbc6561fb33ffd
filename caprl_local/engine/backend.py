"""llama.cpp as a process-wide resource: initialisation, its log, devices, memory, weight layouts.

Everything here is about the installed llama.cpp and this machine, not about one model.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp
from llama_cpp import mtmd_cpp as mtmd

from .._version import __version__
from ..ggufmeta import GGUFInfo
from ..options import GpuLayers

_llama_log = logging.getLogger("caprl_local.llama")

FLASH_ATTN = {None: -1, False: 0, True: 1}  # llama.cpp's auto / disabled / enabled


@dataclass(frozen=True)
class RuntimeInfo:
    """What the installed llama.cpp can do on this machine."""

    caprl_local_version: str
    llama_cpp_python_version: str
    gpu_offload: bool
    devices: tuple[str, ...]
    system_info: str


# --- llama.cpp's own logging -------------------------------------------------------------

# ggml_log_level: 1 debug, 2 info, 3 warn, 4 error (5 continues the previous line).
_LEVELS = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}


class _LlamaLog:
    """Routes llama.cpp's C-level log lines to Python logging and remembers recent errors.

    llama.cpp has one log callback per process, but it calls it on the thread doing the work,
    so everything kept here is per thread: two Captioners (each loading in its caller's thread
    and decoding in its own scheduler thread) never see each other's errors or verbosity.
    Lines go to the ``caprl_local.llama`` logger at DEBUG, or at their own level when verbose.
    """

    def __init__(self) -> None:
        self._local = threading.local()
        self.callback = llama_cpp.llama_log_callback(self._on_log)  # kept referenced: C holds it

    def _state(self) -> Any:
        state = self._local
        if not hasattr(state, "errors"):
            state.errors, state.partial, state.level, state.verbose = deque(maxlen=8), "", logging.DEBUG, False
        return state

    def _on_log(self, level: int, text: bytes | None, _user: ctypes.c_void_p) -> None:
        state = self._state()
        if level != 5:  # 5 continues the previous line at its level
            state.level = _LEVELS.get(level, logging.DEBUG)
        state.partial += (text or b"").decode("utf-8", errors="replace")
        *lines, state.partial = state.partial.split("\n")
        for line in filter(None, (x.strip() for x in lines)):
            if state.level >= logging.ERROR:
                state.errors.append(line)
            _llama_log.log(state.level if state.verbose else logging.DEBUG, "%s", line)

    def attach(self, *, verbose: bool) -> None:
        """Start a piece of work on this thread: set its verbosity and forget earlier errors."""
        state = self._state()
        state.verbose = verbose
        state.errors.clear()

    def clear(self) -> None:
        self._state().errors.clear()

    def first_error(self) -> str:
        """The first error llama.cpp logged on this thread since the last clear: the most specific one."""
        errors = self._state().errors
        if not errors:
            return "no details from llama.cpp (run with verbose for its log)"
        return re.sub(r"^(\w+: )+", "", errors[0])


LLAMA_LOG = _LlamaLog()
_backend_lock = threading.Lock()


@functools.cache
def _init() -> None:
    llama_cpp.llama_log_set(LLAMA_LOG.callback, ctypes.c_void_p(0))
    mtmd.mtmd_log_set(LLAMA_LOG.callback, ctypes.c_void_p(0))
    mtmd.mtmd_helper_log_set(LLAMA_LOG.callback, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()


def init_backend(*, verbose: bool) -> None:
    """Initialise llama.cpp once per process, with its log routed here; attach this thread."""
    with _backend_lock:
        _init()
    LLAMA_LOG.attach(verbose=verbose)


def runtime_info() -> RuntimeInfo:
    """Versions, GPU offload support and the compute devices llama.cpp sees."""
    init_backend(verbose=False)
    lib = _ggml()
    devices: list[str] = []
    if lib is not None:
        for i in range(lib.ggml_backend_dev_count()):
            dev = lib.ggml_backend_dev_get(i)
            name = lib.ggml_backend_dev_name(dev).decode()
            desc = lib.ggml_backend_dev_description(dev).decode()
            devices.append(f"{name} ({desc})" if desc and desc != name else name)
    return RuntimeInfo(
        caprl_local_version=__version__,
        llama_cpp_python_version=llama_cpp.__version__,
        gpu_offload=gpu_offload(),
        devices=tuple(devices),
        system_info=llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
    )


def gpu_offload() -> bool:
    """Whether this llama.cpp build can offload layers to a GPU."""
    return bool(llama_cpp.llama_supports_gpu_offload())


def resolve_gpu_layers(gpu_layers: GpuLayers) -> int:
    """llama.cpp's n_gpu_layers: auto means all (-1) when the build has GPU offload, else 0."""
    if gpu_layers == "auto":
        return -1 if gpu_offload() else 0
    return gpu_layers


@functools.cache
def _ggml() -> Any:
    """ggml's device registry, reached through libllama, with the signatures used here; None
    if this build does not export it."""
    lib = llama_cpp.llama_cpp._lib
    vp, size_p = ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)
    signatures = {
        "ggml_backend_dev_by_type": (vp, [ctypes.c_int]),
        "ggml_backend_dev_backend_reg": (vp, [vp]),
        "ggml_backend_reg_get_proc_address": (vp, [vp, ctypes.c_char_p]),
        "ggml_backend_buft_name": (ctypes.c_char_p, [vp]),
        "ggml_backend_dev_count": (ctypes.c_size_t, []),
        "ggml_backend_dev_get": (vp, [ctypes.c_size_t]),
        "ggml_backend_dev_type": (ctypes.c_int, [vp]),
        "ggml_backend_dev_name": (ctypes.c_char_p, [vp]),
        "ggml_backend_dev_description": (ctypes.c_char_p, [vp]),
        "ggml_backend_dev_memory": (None, [vp, size_p, size_p]),
    }
    try:
        for name, (restype, argtypes) in signatures.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
    except AttributeError:
        return None
    return lib


def cpu_extra_buffer_types() -> dict[str, int]:
    """llama.cpp's extra CPU weight buffer types on this machine (e.g. AMX, CPU_REPACK), by name."""
    lib = _ggml()
    if lib is None:
        return {}
    dev = lib.ggml_backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
    reg = lib.ggml_backend_dev_backend_reg(dev) if dev else None
    fn = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts") if reg else None
    if not fn:
        return {}
    bufts = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(fn)(dev)
    out: dict[str, int] = {}
    for i in itertools.count():
        if not bufts or not bufts[i]:
            return out
        out[lib.ggml_backend_buft_name(bufts[i]).decode()] = bufts[i]
    return out  # pragma: no cover - the loop returns


class _Override(ctypes.Structure):
    """llama_model_tensor_buft_override: weights whose names match go to this buffer type."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


# ggml types that llama.cpp's CPU_REPACK buffer re-lays out on x86 with AVX2 (Q4_0, Q4_K,
# IQ4_NL; matrices with a multiple of 8 rows: repack.cpp). A weight of any other type put
# there would have no repacking routine and crash the load, so only these are routed to it.
_REPACKABLE_TYPES = frozenset({2, 12, 20})


@dataclass(frozen=True)
class WeightLayout:
    """How llama.cpp lays out the text weights in CPU memory."""

    extra_buffers: bool  # llama.cpp's use_extra_bufts
    overrides: Any  # a NULL-terminated _Override array, or None
    description: str


def weight_layout(info: GGUFInfo, *, repack: bool | None, wide: bool, n_gpu: int) -> WeightLayout:
    """The weight layout for a model: repacked layouts speed up matrix products several
    sequences wide (`wide`: captions in flight); a single sequence decodes as fast or faster
    in the plain one.

    On CPUs with AMX, the AMX buffer of the llama.cpp in llama-cpp-python 0.3.36 segfaults on
    the first decode of a K-quant model, so there a repacked layout means the CPU_REPACK buffer
    alone, reached by naming the weights it can take. ``repack`` None chooses: repacked when
    `wide` or when the CPU has no AMX (llama.cpp's own default), plain otherwise.
    """
    extra = cpu_extra_buffer_types()
    amx = "AMX" in extra
    if repack is None:
        repack = wide or not amx
    if not repack or not extra:
        return WeightLayout(False, None, "plain (AMX avoided)" if amx else "plain")
    if not amx:
        return WeightLayout(True, None, "repacked")
    system = llama_cpp.llama_print_system_info().decode(errors="replace")
    names = [name for name, (ttype, dims) in info.tensors.items()
             if ttype in _REPACKABLE_TYPES and len(dims) == 2 and dims[1] % 8 == 0 and name.startswith("blk.")]
    if n_gpu != 0 or "CPU_REPACK" not in extra or "AVX2 = 1" not in system or not names:
        return WeightLayout(False, None, "plain (AMX avoided)")
    pattern = "^(" + "|".join(re.escape(n) for n in names) + ")$"
    overrides = (_Override * 2)(_Override(pattern.encode(), extra["CPU_REPACK"]), _Override(None, None))
    return WeightLayout(False, overrides,
                        f"repacked: {len(names)} of {len(info.tensors)} weights in CPU_REPACK (AMX avoided)")


# --- memory, threads and how many captions in flight ---------------------------------------


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux), or None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def gpu_free_memory() -> int | None:
    """Free bytes summed over llama.cpp's GPU devices, or None if it reports none."""
    lib = _ggml()
    if lib is None:
        return None
    free, total, found = ctypes.c_size_t(), ctypes.c_size_t(), 0
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        if lib.ggml_backend_dev_type(dev) in (1, 2):  # GGML_BACKEND_DEVICE_TYPE_GPU, _IGPU
            lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
            found += free.value
    return found or None


def default_threads() -> int:
    """One thread per physical core this process may use (llama.cpp's own default), less the
    cores other programs keep busy now.

    llama.cpp's threads meet at a barrier after every operation of a step and spin while they
    wait: one thread that has to wait for a busy core stalls all the others, so a step can take
    many times longer with one thread too many (docs/benchmarks.md, "Threads on a busy machine").
    One thread fewer costs far less than one too many.
    """
    cpus = _usable_cpus()
    return max(1, min(_physical_cores(cpus), len(cpus) - int(busy_cores(cpus) + 0.25)))  # busy from 0.75 of a core


def busy_cores(cpus: list[int], window_s: float = 0.2) -> float:
    """How many of `cpus` other programs keep busy: on Linux, measured over a short window (less
    this process's own use); elsewhere the 1-minute load average, where there is one."""
    try:
        before, own, t0 = _cpu_jiffies(cpus), time.process_time(), time.monotonic()
        time.sleep(window_s)
        after, own, elapsed = _cpu_jiffies(cpus), time.process_time() - own, time.monotonic() - t0
        busy, total = after[0] - before[0], after[1] - before[1]
        return max(0.0, len(cpus) * busy / total - own / elapsed) if total > 0 else 0.0
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows
        return 0.0


def _cpu_jiffies(cpus: list[int]) -> tuple[int, int]:
    """(busy, total) clock ticks of `cpus` since boot, from /proc/stat."""
    busy = total = 0
    wanted = {f"cpu{c}" for c in cpus}
    with open("/proc/stat", encoding="ascii") as fh:
        for line in fh:
            name, *ticks = line.split()
            if name in wanted:
                user, nice, system, idle, iowait, irq, softirq, steal = map(int, ticks[:8])
                busy += user + nice + system + irq + softirq + steal
                total += user + nice + system + idle + iowait + irq + softirq + steal
    if not total:
        raise ValueError("no CPU lines in /proc/stat")
    return busy, total


def _usable_cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows
        return list(range(os.cpu_count() or 1))


def _physical_cores(cpus: list[int]) -> int:
    """Cores among `cpus`, hyper-threads counted once (they share a core's memory bandwidth)."""
    if sys.platform == "darwin":
        for key in ("hw.perflevel0.physicalcpu", "hw.physicalcpu"):  # performance cores first, as llama.cpp
            with contextlib.suppress(OSError, ValueError, subprocess.SubprocessError):
                return max(1, int(subprocess.run(["sysctl", "-n", key], capture_output=True, text=True,
                                                 timeout=5, check=True).stdout))
    siblings = set()
    for cpu in cpus:
        try:
            siblings.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip())
        except OSError:
            return len(cpus)  # not Linux, or no topology: count every CPU
    return max(1, len(siblings))


def auto_parallel(*, on_gpu: bool, threads: int, bytes_per_caption: int, limit: int | None = None) -> int:
    """How many captions to keep in flight: as many as half the free memory (the GPUs' when
    layers are offloaded) holds the KV cache of, at most `limit`.

    The default limit is 16 on a GPU. On a CPU it is 4 up to 4 threads and 8 above: a step
    several sequences wide pays off while it stays bound by memory bandwidth, and on a few
    cores wider steps become compute-bound (measured in docs/benchmarks.md).
    """
    if limit is None:
        limit = 16 if on_gpu else 4 if threads <= 4 else 8
    free = (gpu_free_memory() if on_gpu else None) or available_memory()
    return max(1, min(limit, int(0.5 * free // max(1, bytes_per_caption)) if free else 4))

