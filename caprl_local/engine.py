"""The llama.cpp engine: load a text GGUF and its vision projector, caption images.

This is the only module that imports llama_cpp. It drives llama.cpp's
multimodal (mtmd) C API directly rather than llama-cpp-python's chat handlers,
so that the image-token budget, GPU offload and timings are ours to control.
"""

from __future__ import annotations

import codecs
import ctypes
import functools
import itertools
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import llama_cpp
import numpy as np
from llama_cpp import mtmd_cpp as mtmd
from PIL import Image

from . import __version__
from .errors import Cancelled, CaprlError, EngineError, ModelFileError
from .ggufmeta import GGUFInfo, read_gguf
from .hub import ModelFiles, ProgressCallback, download_model
from .images import ImageInput, describe, fit_to_budget, load_ahead, load_image, pad_to_aspect
from .prompts import CHATML, CONTENT, chat_prompt, resolve_prompt
from .registry import DEFAULT_MODEL
from .results import Caption, CaptionFailure, Timings

log = logging.getLogger("caprl_local")
_llama_log = logging.getLogger("caprl_local.llama")

GpuLayers = int | Literal["auto"]

#: Default cap on image tokens. llama.cpp allows Qwen2.5-VL 4096 (a 12-MP photo then needs
#: tens of GB for the vision encoder); 1024 tokens is about a megapixel, ample for captions.
DEFAULT_MAX_IMAGE_TOKENS = 1024
_LLAMA_MAX_IMAGE_TOKENS = 4096  # llama.cpp's own limits for Qwen-VL projectors
_LLAMA_MIN_IMAGE_TOKENS = 8
DEFAULT_MAX_TOKENS = 1024
DEFAULT_N_CTX = 4096
_N_BATCH = 2048  # logical batch, as llama-mtmd-cli uses
_N_UBATCH = 512
_REPEAT_LAST_N = 256

_NO_CALLBACK = mtmd.mtmd_helper_post_decode_callback()  # a NULL function pointer


@dataclass(frozen=True)
class _Family:
    """What the engine knows about one family of vision-language GGUFs."""

    name: str
    projectors: frozenset[str]  # clip.projector_type values of its vision projectors
    # Projector tensors llama.cpp's vision graph uses without checking that they exist (a
    # file lacking one would crash the process instead of failing to load): overall, per block.
    tensors: tuple[str, ...]
    block_tensors: tuple[str, ...]
    f32_tensors: tuple[str, ...] = ()  # ... and those it asserts are f32


_MERGER = ("mm.0.weight", "mm.0.bias", "mm.2.weight", "mm.2.bias")
_PATCH = ("v.patch_embd.weight", "v.patch_embd.weight.1")
_BLOCK = ("attn_out.weight", "ln1.weight", "ln2.weight", "ffn_up.weight", "ffn_down.weight")

#: Text model architecture (general.architecture) -> its family.
_FAMILIES = {
    "qwen2vl": _Family(
        "Qwen2-VL / Qwen2.5-VL", frozenset({"qwen2vl_merger", "qwen2.5vl_merger"}), _PATCH + _MERGER,
        tuple(f"{n}.{k}" for n in ("attn_q", "attn_k", "attn_v") for k in ("weight", "bias")) + _BLOCK,
    ),
    "qwen3vl": _Family(
        "Qwen3-VL", frozenset({"qwen3vl_merger"}), (*_PATCH, "v.patch_embd.bias", "v.position_embd.weight", *_MERGER),
        ("attn_qkv.weight", "attn_qkv.bias", *_BLOCK), f32_tensors=("v.position_embd.weight",),
    ),
}
SUPPORTED_ARCHITECTURES = frozenset(_FAMILIES)
_PROJECTOR_FAMILY = {"qwen2vl_merger": "Qwen2-VL", "qwen2.5vl_merger": "Qwen2.5-VL", "qwen3vl_merger": "Qwen3-VL"}


@dataclass(frozen=True)
class EngineOptions:
    """How a model is loaded; fixed for the life of a Captioner."""

    gpu_layers: GpuLayers = "auto"
    threads: int | None = None  # None: every CPU this process may use
    n_ctx: int = DEFAULT_N_CTX
    flash_attn: bool | None = None  # None: let llama.cpp decide
    image_min_tokens: int | None = None
    image_max_tokens: int | None = DEFAULT_MAX_IMAGE_TOKENS
    warmup: bool = True
    verbose: bool = False
    repack: bool | None = None  # llama.cpp's repacked weight layouts (faster with captions in flight); None: auto


@dataclass(frozen=True)
class GenerationOptions:
    """How one caption is generated."""

    prompt: str
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0  # greedy, like Qwen2.5-VL's generation config (top_k=1)
    top_p: float = 0.95
    seed: int | None = None
    repeat_penalty: float = 1.05  # Qwen2.5-VL's generation config uses 1.05
    ignore_eos: bool = False  # always generate max_tokens (for benchmarks)

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise CaprlError(f"max_tokens must be a positive number, not {self.max_tokens!r}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.repeat_penalty <= 0:
            raise CaprlError("temperature must be >= 0, top_p in (0, 1] and repeat_penalty > 0")


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

    Lines go to the ``caprl_local.llama`` logger at DEBUG, or at their own level when
    verbose is on; the last error lines are kept so failures can be explained.
    """

    def __init__(self) -> None:
        self.verbose = False
        self.errors: deque[str] = deque(maxlen=8)
        self._partial = ""
        self._level = logging.DEBUG
        self.callback = llama_cpp.llama_log_callback(self._on_log)  # kept referenced: C holds it

    def _on_log(self, level: int, text: bytes | None, _user: ctypes.c_void_p) -> None:
        if level != 5:  # 5 continues the previous line at its level
            self._level = _LEVELS.get(level, logging.DEBUG)
        self._partial += (text or b"").decode("utf-8", errors="replace")
        *lines, self._partial = self._partial.split("\n")
        for line in filter(None, (x.strip() for x in lines)):
            if self._level >= logging.ERROR:
                self.errors.append(line)
            _llama_log.log(self._level if self.verbose else logging.DEBUG, "%s", line)

    def first_error(self) -> str:
        """The first error llama.cpp logged since the errors were last cleared: the most specific one."""
        if not self.errors:
            return "no details from llama.cpp (run with verbose for its log)"
        return re.sub(r"^(\w+: )+", "", self.errors[0])


_LOG = _LlamaLog()
_backend_ready = False
_backend_lock = threading.Lock()


def _init_backend(verbose: bool) -> None:
    global _backend_ready
    _LOG.verbose = verbose
    with _backend_lock:
        if not _backend_ready:
            llama_cpp.llama_log_set(_LOG.callback, ctypes.c_void_p(0))
            mtmd.mtmd_log_set(_LOG.callback, ctypes.c_void_p(0))
            mtmd.mtmd_helper_log_set(_LOG.callback, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            _backend_ready = True


def runtime_info() -> RuntimeInfo:
    """Versions, GPU offload support and the compute devices llama.cpp sees."""
    _init_backend(verbose=False)
    lib = llama_cpp.llama_cpp._lib  # ggml's device registry is reachable through libllama
    devices: list[str] = []
    try:
        lib.ggml_backend_dev_count.restype = ctypes.c_size_t
        lib.ggml_backend_dev_get.restype = ctypes.c_void_p
        lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
        for fn in (lib.ggml_backend_dev_name, lib.ggml_backend_dev_description):
            fn.restype, fn.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
        for i in range(lib.ggml_backend_dev_count()):
            dev = lib.ggml_backend_dev_get(i)
            name = lib.ggml_backend_dev_name(dev).decode()
            desc = lib.ggml_backend_dev_description(dev).decode()
            devices.append(f"{name} ({desc})" if desc and desc != name else name)
    except AttributeError:  # a build without the device registry: leave the list empty
        pass
    return RuntimeInfo(
        caprl_local_version=__version__,
        llama_cpp_python_version=llama_cpp.__version__,
        gpu_offload=bool(llama_cpp.llama_supports_gpu_offload()),
        devices=tuple(devices),
        system_info=llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
    )


# --- model files ---------------------------------------------------------------------------


def check_model_files(model_path: str | os.PathLike[str], mmproj_path: str | os.PathLike[str]) -> tuple[GGUFInfo, GGUFInfo]:
    """Check that the pair is a supported text model and its matching vision projector."""
    model = read_gguf(model_path, role="model")
    mmproj = read_gguf(mmproj_path, role="projector")
    if model.is_projector:
        raise ModelFileError(
            f"model {model.path}: is a vision projector (mmproj), not a text model; "
            "pass it as --mmproj and the main .gguf as --model"
        )
    if not mmproj.is_projector:
        raise ModelFileError(
            f"projector {mmproj.path}: is a text model ({mmproj.architecture or 'unknown'}), "
            "not a vision projector; pass the *mmproj*.gguf file as --mmproj"
        )
    arch = model.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelFileError(
            f"model {model.path}: architecture {arch or 'unknown'!r} is not supported "
            f"(supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}); use a CapRL GGUF"
        )
    if not mmproj.metadata.get("clip.has_vision_encoder", False):
        raise ModelFileError(f"projector {mmproj.path}: has no vision encoder; use the model's image mmproj")
    proj_type = str(mmproj.metadata.get("clip.projector_type", mmproj.metadata.get("clip.vision.projector_type", "")))
    family = _FAMILIES[arch]
    if proj_type not in family.projectors:
        kind = f"a {_PROJECTOR_FAMILY[proj_type]} projector" if proj_type in _PROJECTOR_FAMILY else \
            f"a projector of type {proj_type or 'unknown'!r}"
        raise ModelFileError(
            f"projector {mmproj.path}: is {kind}, but {model.path.name} is a {family.name} text model; "
            "use the mmproj published with this model"
        )
    _check_vision_tensors(mmproj, family)
    # llama.cpp feeds the text model embeddings of n_embd x (1 + deepstack layers); the projector
    # yields its merger's width x (1 + its deepstack mergers): both must agree.
    n_deepstack = _int(model.metadata.get(f"{arch}.n_deepstack_layers", 0))
    if n_deepstack >= _int(model.metadata.get(f"{arch}.block_count")):  # llama.cpp would abort
        raise ModelFileError(f"model {model.path}: invalid deepstack layer count {n_deepstack}; download it again")
    text_width = _int(model.metadata.get(f"{arch}.embedding_length")) * (1 + n_deepstack)
    merger = mmproj.tensors["mm.2.bias"][1][0]
    deepstack = [dims for name, (_t, dims) in mmproj.tensors.items()
                 if name.startswith("v.deepstack.") and name.endswith(".fc2.weight")]
    proj_width = merger * (1 + len(deepstack))
    if text_width != proj_width or any(dims[1] != merger for dims in deepstack):
        raise ModelFileError(
            f"projector {mmproj.path}: produces {proj_width}-wide embeddings but {model.path.name} expects "
            f"{text_width}; use the mmproj published with this model"
        )
    return model, mmproj


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _check_vision_tensors(mmproj: GGUFInfo, family: _Family) -> None:
    meta = mmproj.metadata
    sizes = {key: meta.get(f"clip.vision.{key}") for key in ("block_count", "patch_size", "embedding_length")}
    heads = meta.get("clip.vision.attention.head_count")
    if not all(isinstance(v, int) and v > 0 for v in sizes.values()) or not isinstance(heads, int) or heads < 1 \
            or sizes["embedding_length"] % heads:
        raise ModelFileError(f"projector {mmproj.path}: invalid vision encoder sizes {sizes}; download the published mmproj")
    wanted = list(family.tensors) + [
        f"v.blk.{i}.{t}" for i in range(sizes["block_count"]) for t in family.block_tensors  # type: ignore[arg-type]
    ]
    # A deepstack merger is used when its fc1 exists, and then needs its fc2.
    wanted += [name.replace(".fc1.", ".fc2.") for name in mmproj.tensors if name.startswith("v.deepstack.")
               and name.endswith(".fc1.weight")]
    missing = [t for t in wanted if t not in mmproj.tensors]
    if missing:
        raise ModelFileError(
            f"projector {mmproj.path}: tensor {missing[0]} is missing ({len(missing)} in all); the file is "
            "incomplete or from an incompatible converter; download the published mmproj"
        )
    for name in family.f32_tensors:
        if mmproj.tensors[name][0] != 0:  # GGML_TYPE_F32
            raise ModelFileError(
                f"projector {mmproj.path}: tensor {name} must be f32 for llama.cpp; the file is from an "
                "incompatible converter; download the published mmproj"
            )


def _resolve_gpu_layers(gpu_layers: GpuLayers) -> int:
    if gpu_layers == "auto":
        return -1 if llama_cpp.llama_supports_gpu_offload() else 0
    if isinstance(gpu_layers, bool) or not isinstance(gpu_layers, int) or gpu_layers < -1:
        raise CaprlError(f"gpu_layers must be 'auto', -1 (all) or a number of layers, not {gpu_layers!r}")
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
        "ggml_backend_dev_memory": (None, [vp, size_p, size_p]),
    }
    try:
        for name, (restype, argtypes) in signatures.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
    except AttributeError:
        return None
    return lib


def _cpu_extra_buffer_types() -> dict[str, int]:
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


class _Override(ctypes.Structure):
    """llama_model_tensor_buft_override: weights whose names match go to this buffer type."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


# ggml types that llama.cpp's CPU_REPACK buffer re-lays out on x86 with AVX2 (Q4_0, Q4_K,
# IQ4_NL; matrices with a multiple of 8 rows: repack.cpp). A weight of any other type put
# there would have no repacking routine and crash the load, so only these are routed to it.
_REPACKABLE_TYPES = frozenset({2, 12, 20})


def _weight_layout(info: GGUFInfo, repack: bool | None, n_gpu: int) -> tuple[bool, Any, str]:
    """How llama.cpp lays out the text weights in CPU memory.

    Returns (use llama.cpp's extra CPU buffers, tensor overrides or None, description).
    Repacked layouts speed up matrix products several sequences wide (captions in flight).
    On CPUs with AMX, the AMX buffer of the llama.cpp in llama-cpp-python 0.3.36 segfaults
    on the first decode of a K-quant model (seen on Sapphire Rapids VMs), so there a
    repacked layout means the CPU_REPACK buffer alone, reached by naming the weights it can
    take; and since that one decodes a single sequence about 10% slower than the plain
    layout, the default there (repack=None) is plain.
    """
    extra = _cpu_extra_buffer_types()
    amx = "AMX" in extra
    if repack is False or (repack is None and amx) or not extra:
        return False, None, "plain (AMX avoided)" if amx and repack is None else "plain"
    if not amx:
        return True, None, "repacked"
    system = llama_cpp.llama_print_system_info().decode(errors="replace")
    names = [name for name, (ttype, dims) in info.tensors.items()
             if ttype in _REPACKABLE_TYPES and len(dims) == 2 and dims[1] % 8 == 0 and name.startswith("blk.")]
    if n_gpu != 0 or "CPU_REPACK" not in extra or "AVX2 = 1" not in system or not names:
        return False, None, "plain (AMX avoided)"
    pattern = "^(" + "|".join(re.escape(n) for n in names) + ")$"
    overrides = (_Override * 2)(_Override(pattern.encode(), extra["CPU_REPACK"]), _Override(None, None))
    return False, overrides, f"repacked: {len(names)} of {len(info.tensors)} weights in CPU_REPACK (AMX avoided)"


def _available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux), or None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _gpu_free_memory() -> int | None:
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


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS and Windows
        return max(1, os.cpu_count() or 1)


_FLASH_ATTN = {None: -1, False: 0, True: 1}  # llama.cpp's auto / disabled / enabled


def _caption(text: str, image_tokens: int, prompt_tokens: int, n_gen: int, finish: str, *, load_s: float,
             t_loaded: float, encode_s: float, t_prompt: float, t_end: float) -> Caption:
    """A Caption from the clock readings of one generation."""
    prompt_s = t_prompt - t_loaded - encode_s
    gen_s = t_end - t_prompt
    return Caption(
        text=text.strip(), image_tokens=image_tokens, prompt_tokens=prompt_tokens, generated_tokens=n_gen,
        finish_reason=finish,  # type: ignore[arg-type]
        timings=Timings(
            image_load_s=load_s, image_encode_s=encode_s, prompt_eval_s=prompt_s, generation_s=gen_s,
            total_s=t_end - t_loaded + load_s,
            prompt_tokens_per_s=prompt_tokens / prompt_s if prompt_s > 0 else 0.0,
            generation_tokens_per_s=n_gen / gen_s if gen_s > 0 else 0.0,
        ),
    )


def _failure(name: str, exc: CaprlError) -> CaptionFailure:
    return CaptionFailure(image=name, error=str(exc), kind=type(exc).__name__)


class _Slot:
    """One caption in flight in a parallel run: its sequence, sampler and text so far."""

    def __init__(self, *, seq: int, index: int, name: str, sampler: Any, n_past: int, image_tokens: int,
                 prompt_tokens: int, encode_s: float, load_s: float, t_loaded: float, t_prompt: float) -> None:
        self.seq, self.index, self.name, self.sampler, self.n_past = seq, index, name, sampler, n_past
        self.image_tokens, self.prompt_tokens, self.encode_s = image_tokens, prompt_tokens, encode_s
        self.load_s, self.t_loaded, self.t_prompt = load_s, t_loaded, t_prompt
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pieces: list[str] = []
        self.pending = 0  # the token sampled but not yet taken into the caption
        self.logit_index = -1
        self.n_gen = 0
        self.finish = "length"

    def consume(self, cap: Captioner, opts: GenerationOptions) -> bool:
        """Take the pending token into the caption; True when the caption is complete."""
        if not opts.ignore_eos and llama_cpp.llama_vocab_is_eog(cap._vocab, self.pending):
            self.finish = "stop"
            return True
        self.n_gen += 1
        self.pieces.append(self.decoder.decode(cap._token_bytes(self.pending)))
        return self.n_gen >= opts.max_tokens or self.n_past >= cap.n_ctx

    def caption(self) -> Caption:
        llama_cpp.llama_sampler_free(self.sampler)
        self.pieces.append(self.decoder.decode(b"", final=True))
        return _caption("".join(self.pieces), self.image_tokens, self.prompt_tokens, self.n_gen, self.finish,
                        load_s=self.load_s, t_loaded=self.t_loaded, encode_s=self.encode_s, t_prompt=self.t_prompt,
                        t_end=time.perf_counter())


# --- the captioner -------------------------------------------------------------------------


class Captioner:
    """A loaded CapRL model pair that captions images.

    One instance may be shared between threads: calls are serialised.

        with Captioner("CapRL-3B.Q4_K_M.gguf", "CapRL-3B.mmproj-f16.gguf") as cap:
            print(cap.caption("photo.jpg").text)
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        mmproj_path: str | os.PathLike[str],
        *,
        gpu_layers: GpuLayers = "auto",
        threads: int | None = None,
        n_ctx: int = DEFAULT_N_CTX,
        flash_attn: bool | None = None,
        image_min_tokens: int | None = None,
        image_max_tokens: int | None = DEFAULT_MAX_IMAGE_TOKENS,
        warmup: bool = True,
        verbose: bool = False,
        repack: bool | None = None,
        prompt: str | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self.default_prompt = resolve_prompt(prompt=prompt)
        self._model = self._ctx = self._mctx = None
        self._batch: llama_cpp.llama_batch | None = None
        self.options = EngineOptions(
            gpu_layers=gpu_layers, threads=threads, n_ctx=n_ctx, flash_attn=flash_attn,
            image_min_tokens=image_min_tokens, image_max_tokens=image_max_tokens, warmup=warmup, verbose=verbose,
            repack=repack,
        )
        for name in ("threads", "image_min_tokens", "image_max_tokens"):
            value = getattr(self.options, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise CaprlError(f"{name} must be a positive number, not {value!r}")
        if n_ctx < 256:
            raise CaprlError(f"n_ctx must be at least 256, not {n_ctx!r}")
        model_info, mmproj_info = check_model_files(model_path, mmproj_path)
        self.model_path, self.mmproj_path = Path(model_path), Path(mmproj_path)
        self.files = ModelFiles(self.model_path, self.mmproj_path, architecture=model_info.architecture)
        self.architecture = model_info.architecture
        meta, arch = model_info.metadata, self.architecture
        head_dim = _int(meta.get(f"{arch}.attention.key_length")) or \
            _int(meta.get(f"{arch}.embedding_length")) // max(1, _int(meta.get(f"{arch}.attention.head_count")))
        self._kv_bytes_per_token = (  # K and V in f16, every layer
            2 * 2 * _int(meta.get(f"{arch}.block_count")) * _int(meta.get(f"{arch}.attention.head_count_kv")) * head_dim)
        self._load(model_info, mmproj_info)

    def _load(self, model_info: GGUFInfo, mmproj_info: GGUFInfo) -> None:
        opts = self.options
        _init_backend(opts.verbose)
        _LOG.errors.clear()
        n_gpu = _resolve_gpu_layers(opts.gpu_layers)
        threads = opts.threads or _default_threads()
        t0 = time.perf_counter()

        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu
        mparams.use_extra_bufts, overrides, self.weight_layout = _weight_layout(model_info, opts.repack, n_gpu)
        if overrides is not None:
            mparams.tensor_buft_overrides = ctypes.cast(overrides, ctypes.c_void_p)
        self._model = llama_cpp.llama_model_load_from_file(os.fsencode(self.model_path), mparams)
        if not self._model:
            raise EngineError(f"model {self.model_path}: llama.cpp could not load it: {_LOG.first_error()}")

        self.slots = 0
        self._threads = threads
        self._make_context(1)

        mp = mtmd.mtmd_context_params_default()
        mp.use_gpu = self._on_gpu = n_gpu != 0 and bool(llama_cpp.llama_supports_gpu_offload())
        mp.n_threads = threads
        mp.print_timings = False
        mp.warmup = opts.warmup
        mp.flash_attn_type = _FLASH_ATTN[opts.flash_attn]
        mp.image_min_tokens = opts.image_min_tokens or -1
        mp.image_max_tokens = opts.image_max_tokens or -1
        self._mctx = mtmd.mtmd_init_from_file(os.fsencode(self.mmproj_path), self._model, mp)
        if not self._mctx:
            self.close()
            raise EngineError(f"projector {self.mmproj_path}: llama.cpp could not load it: {_LOG.first_error()}")
        if not mtmd.mtmd_support_vision(self._mctx):
            self.close()
            raise ModelFileError(f"projector {self.mmproj_path}: has no vision encoder; use the model's image mmproj")

        self._marker = mtmd.mtmd_default_marker().decode()
        self.chat_format = self._chat_format()
        # How llama.cpp's Qwen-VL preprocessor sizes images: sides in multiples of patch x merge
        # pixels (28), area between the token limits. A strip more than one token high per
        # `cap` tokens wide would overshoot the cap, so such strips get padded first.
        merge = int(mmproj_info.metadata.get("clip.vision.spatial_merge_size", 2))
        self._align = int(mmproj_info.metadata["clip.vision.patch_size"]) * merge
        max_tokens = opts.image_max_tokens or _LLAMA_MAX_IMAGE_TOKENS
        self._max_pixels = max_tokens * self._align**2
        self._min_pixels = min(opts.image_min_tokens or _LLAMA_MIN_IMAGE_TOKENS, max_tokens) * self._align**2
        self._max_aspect = 0.95 * max_tokens
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self._piece_buf = ctypes.create_string_buffer(256)
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self._probe: Callable[[int, int, np.ndarray], None] | None = None
        self.n_gpu_layers, self.threads = n_gpu, threads
        self.load_seconds = time.perf_counter() - t0
        log.info(
            "loaded %s + %s in %.2fs (gpu_layers=%d, threads=%d, n_ctx=%d, weights %s)",
            self.model_path.name, self.mmproj_path.name, self.load_seconds, n_gpu, threads, self.n_ctx,
            self.weight_layout,
        )

    def _make_context(self, n_seq: int) -> None:
        """(Re)create the llama.cpp context with room for n_seq captions of n_ctx tokens each."""
        opts = self.options
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = opts.n_ctx * n_seq  # split evenly: each sequence gets n_ctx
        cparams.n_seq_max = n_seq
        # One KV pool for all captions in flight, as llama-server's parallel slots use. With a
        # stream per sequence, llama.cpp computes a step in one pass only for runs of
        # consecutive sequence ids, so refilled slots (3, 2, 1, 0) cost 4 passes: 2.5x slower.
        cparams.kv_unified = n_seq > 1
        cparams.n_batch = self._n_batch = min(_N_BATCH, opts.n_ctx)
        cparams.n_ubatch = min(_N_UBATCH, opts.n_ctx)
        cparams.n_threads = cparams.n_threads_batch = self._threads
        cparams.flash_attn_type = _FLASH_ATTN[opts.flash_attn]
        self._ctx = llama_cpp.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            self.close()
            raise EngineError(
                f"model {self.model_path}: could not create a llama.cpp context of {n_seq} x {opts.n_ctx} tokens "
                f"(out of memory?): {_LOG.first_error()}"
            )
        self._batch = llama_cpp.llama_batch_init(max(n_seq, 1), 0, 1)
        self.slots = n_seq
        self.n_ctx = llama_cpp.llama_n_ctx(self._ctx) // n_seq

    @classmethod
    def from_pretrained(
        cls,
        name: str = DEFAULT_MODEL,
        *,
        mmproj: str | os.PathLike[str] | None = None,
        quant: str | None = None,
        imatrix: bool = False,
        mmproj_quant: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        offline: bool = False,
        progress: ProgressCallback | None = None,
        **options: Any,
    ) -> Captioner:
        """Load a model by registry name (``caprl-3b``), Hub repo (``owner/name``) or .gguf path,
        downloading and verifying it first if it is not cached (unless offline)."""
        files = download_model(name, mmproj=mmproj, quant=quant, imatrix=imatrix, mmproj_quant=mmproj_quant,
                               cache_dir=cache_dir, offline=offline, progress=progress)
        options.setdefault("prompt", files.prompt)
        captioner = cls(files.model, files.mmproj, **options)
        captioner.files = files
        return captioner

    # -- public API --

    def caption(
        self,
        image: ImageInput,
        *,
        prompt: str | None = None,
        preset: str | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        temperature: float = 0.0,
        top_p: float = 0.95,
        seed: int | None = None,
        repeat_penalty: float = 1.05,
        ignore_eos: bool = False,
        on_text: Callable[[str], None] | None = None,
    ) -> Caption:
        """Caption one image (a path, bytes, PIL image or numpy array).

        ``on_text``, if given, receives each piece of text as it is generated.
        ``ignore_eos`` generates exactly ``max_tokens`` (for benchmarks).
        """
        opts = self._gen_options(prompt=prompt, preset=preset, max_tokens=max_tokens, temperature=temperature,
                                 top_p=top_p, seed=seed, repeat_penalty=repeat_penalty, ignore_eos=ignore_eos)
        self._cancel.clear()
        return self._finish(self._generate(*self._load_image(image), opts), on_text)

    def stream(self, image: ImageInput, **options: Any) -> Iterator[str]:
        """Caption one image, yielding pieces of text as they are generated (options as for caption)."""
        opts = self._gen_options(**options)  # checked now, not at the first piece
        self._cancel.clear()
        return self._generate(*self._load_image(image), opts)

    def caption_many(
        self,
        images: Iterable[ImageInput],
        *,
        parallel: int = 1,
        progress: Callable[[int, int | None], None] | None = None,
        prefetch: int = 2,
        **options: Any,
    ) -> Iterator[Caption | CaptionFailure]:
        """Caption many images, yielding one result per image in input order (options as for caption).

        An image that cannot be read or captioned yields a CaptionFailure instead of raising.
        The next ``prefetch`` images are read, decoded and resized in a background thread
        while the current one is captioned. ``parallel`` > 1 keeps that many captions in
        flight in one llama.cpp context, each decode step advancing all of them (the weights
        are read once per step for all); a finished caption's slot takes the next image.
        ``progress(done, total)`` follows each result (total is None when ``images`` has no length).
        """
        opts = self._gen_options(**options)
        if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
            raise CaprlError(f"parallel must be a positive number, not {parallel!r}")
        total = len(images) if isinstance(images, Sized) else None
        self._cancel.clear()
        loaded = enumerate(load_ahead(images, load=self._load_prepared, ahead=max(prefetch, parallel)))
        results = self._run_parallel(loaded, opts, parallel) if parallel > 1 else self._run_sequential(loaded, opts)
        for done, result in enumerate(results, 1):
            if progress is not None:
                progress(done, total)
            yield result

    def _run_sequential(self, loaded: Iterator[tuple[int, tuple[Any, Any]]],
                        opts: GenerationOptions) -> Iterator[Caption | CaptionFailure]:
        for _, (source, item) in loaded:
            name = describe(source)
            try:
                if isinstance(item, BaseException):
                    raise item
                yield self._finish(self._generate(item[0], item[1], name, opts), None)
            except Cancelled:
                raise
            except CaprlError as exc:
                yield _failure(name, exc)

    def _run_parallel(self, loaded: Iterator[tuple[int, tuple[Any, Any]]], opts: GenerationOptions,
                      n: int) -> Iterator[Caption | CaptionFailure]:
        """Continuous batching: up to n sequences, one token each per decode step, in order out."""
        with self._lock:
            if not self._ctx:
                raise EngineError("this Captioner is closed; create a new one")
            if self.slots < n:
                self._make_context(n)
            memory = llama_cpp.llama_get_memory(self._ctx)
            llama_cpp.llama_memory_clear(memory, True)
            batch = self._batch
            free = list(range(n - 1, -1, -1))
            active: list[_Slot] = []
            finished: dict[int, Caption | CaptionFailure] = {}
            next_out, exhausted = 0, False
            try:
                while True:
                    while free and not exhausted:  # prefill free slots with the next images
                        nxt = next(loaded, None)
                        if nxt is None:
                            exhausted = True
                            break
                        index, (source, item) = nxt
                        name = describe(source)
                        seq = free.pop()
                        try:
                            if isinstance(item, BaseException):
                                raise item
                            active.append(self._start_slot(seq, index, name, item, opts))
                        except Cancelled:
                            raise
                        except CaprlError as exc:
                            llama_cpp.llama_memory_seq_rm(memory, seq, -1, -1)
                            free.append(seq)
                            finished[index] = _failure(name, exc)
                    while next_out in finished:
                        yield finished.pop(next_out)
                        next_out += 1
                    if not active:
                        if exhausted:
                            return
                        continue
                    if self._cancel.is_set():
                        raise Cancelled("cancelled")
                    batch.n_tokens = 0
                    for slot in list(active):
                        if slot.consume(self, opts):  # its pending token ended it
                            active.remove(slot)
                            finished[slot.index] = slot.caption()
                            llama_cpp.llama_memory_seq_rm(memory, slot.seq, -1, -1)
                            free.append(slot.seq)
                            continue
                        i = batch.n_tokens
                        batch.token[i], batch.pos[i], batch.n_seq_id[i] = slot.pending, slot.n_past, 1
                        batch.seq_id[i][0], batch.logits[i] = slot.seq, 1
                        slot.logit_index, slot.n_past = i, slot.n_past + 1
                        batch.n_tokens = i + 1
                    if batch.n_tokens:
                        if llama_cpp.llama_decode(self._ctx, batch) != 0:
                            raise EngineError(f"llama.cpp failed while generating {batch.n_tokens} captions: "
                                              f"{_LOG.first_error()}")
                        for slot in active:
                            if self._probe is not None:  # tests look at the logits of each step
                                logits = llama_cpp.llama_get_logits_ith(self._ctx, slot.logit_index)
                                self._probe(slot.index, slot.n_gen, np.ctypeslib.as_array(logits, (self._n_vocab,)).copy())
                            slot.pending = llama_cpp.llama_sampler_sample(slot.sampler, self._ctx, slot.logit_index)
            finally:
                for slot in active:
                    llama_cpp.llama_sampler_free(slot.sampler)
                llama_cpp.llama_memory_clear(memory, True)

    def auto_parallel(self, *, limit: int | None = None) -> int:
        """How many captions to keep in flight: as many as half the free memory (the GPUs' when
        layers are offloaded) holds the KV cache for, n_ctx tokens each, at most `limit`.

        The default limit is 16 on a GPU. On a CPU it is 4 up to 4 threads and 8 above: a step
        several sequences wide pays off while it stays bound by memory bandwidth, and on 2 cores
        8-wide steps are already compute-bound (11.0 tokens/s against 12.8 at 4 wide).
        """
        if limit is None:
            limit = 16 if self._on_gpu else 4 if self.threads <= 4 else 8
        per_caption = max(1, self.options.n_ctx * self._kv_bytes_per_token)
        free = (_gpu_free_memory() if self._on_gpu else None) or _available_memory()
        return max(1, min(limit, int(0.5 * free // per_caption) if free else 4))

    def _start_slot(self, seq: int, index: int, name: str, item: tuple[Image.Image, float],
                    opts: GenerationOptions) -> _Slot:
        """Evaluate one image's prompt into sequence `seq` and sample its first token."""
        t_loaded = time.perf_counter()
        _LOG.errors.clear()
        chunks = self._tokenize(item[0], opts.prompt, name)
        try:
            n_past, image_tokens, prompt_tokens, encode_s = self._eval_prompt(chunks, name, seq)
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
        sampler = self._sampler(opts)
        slot = _Slot(seq=seq, index=index, name=name, sampler=sampler, n_past=n_past, image_tokens=image_tokens,
                     prompt_tokens=prompt_tokens, encode_s=encode_s, load_s=item[1], t_loaded=t_loaded,
                     t_prompt=time.perf_counter())
        slot.pending = llama_cpp.llama_sampler_sample(sampler, self._ctx, -1)
        return slot

    def cancel(self) -> None:
        """Stop the caption in progress, or the caption_many run, at the next token.

        The interrupted call raises Cancelled. Safe to call from any thread or a signal handler.
        """
        self._cancel.set()

    def close(self) -> None:
        """Free the model, context and projector. Safe to call twice."""
        with self._lock:
            if self._batch is not None:
                llama_cpp.llama_batch_free(self._batch)
                self._batch = None
            if self._mctx:
                mtmd.mtmd_free(self._mctx)
                self._mctx = None
            if self._ctx:
                llama_cpp.llama_free(self._ctx)
                self._ctx = None
            if self._model:
                llama_cpp.llama_model_free(self._model)
                self._model = None

    def __enter__(self) -> Captioner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if getattr(self, "_lock", None) is not None:
                self.close()
        except Exception:  # noqa: BLE001 - at interpreter exit llama_cpp may already be gone
            pass

    # -- internals --

    def _gen_options(self, *, prompt: str | None = None, preset: str | None = None, **rest: Any) -> GenerationOptions:
        return GenerationOptions(prompt=resolve_prompt(prompt=prompt, preset=preset, default=self.default_prompt), **rest)

    def _sampler(self, opts: GenerationOptions) -> llama_cpp.llama_sampler_p:
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = lambda s: llama_cpp.llama_sampler_chain_add(chain, s)  # noqa: E731
        if opts.repeat_penalty != 1.0:
            n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
            add(llama_cpp.llama_sampler_init_penalties(n_vocab, _REPEAT_LAST_N, opts.repeat_penalty, 0.0, 0.0))
        if opts.temperature <= 0:
            add(llama_cpp.llama_sampler_init_greedy())
        else:
            add(llama_cpp.llama_sampler_init_top_p(opts.top_p, 1))
            add(llama_cpp.llama_sampler_init_temp(opts.temperature))
            seed = llama_cpp.LLAMA_DEFAULT_SEED if opts.seed is None else opts.seed & 0xFFFFFFFF
            add(llama_cpp.llama_sampler_init_dist(seed))
        return chain

    @staticmethod
    def _finish(gen: Generator[str, None, Caption], on_text: Callable[[str], None] | None) -> Caption:
        """Drive a generation to its end, passing pieces to on_text; return the Caption."""
        while True:
            try:
                piece = next(gen)
            except StopIteration as stop:
                return stop.value
            if on_text is not None:
                on_text(piece)

    def _load_image(self, image: ImageInput) -> tuple[Image.Image, float, str]:
        # Decoded outside the lock: other threads may generate meanwhile.
        t0 = time.perf_counter()
        rgb = self._load_prepared(image)
        return rgb, time.perf_counter() - t0, describe(image)

    def _load_prepared(self, image: ImageInput) -> Image.Image:
        """Load an image and fit it to the token budget the way llama.cpp would, but here,
        where it can run ahead in another thread: pad strips too thin for the cap, then
        downscale to the exact size llama.cpp's preprocessor picks (leaving it nothing to do)."""
        rgb = pad_to_aspect(load_image(image, draft_pixels=self._max_pixels), self._max_aspect)
        size = fit_to_budget(rgb.size, align=self._align, min_pixels=self._min_pixels, max_pixels=self._max_pixels)
        if size[0] * size[1] < rgb.width * rgb.height:
            rgb = rgb.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
        return rgb

    def _generate(self, rgb: Image.Image, load_s: float, name: str,
                  opts: GenerationOptions) -> Generator[str, None, Caption]:
        """Evaluate the prompt with the image, then sample until end-of-turn or max_tokens.

        Yields text pieces; returns the finished Caption.
        """
        t_loaded = time.perf_counter()
        with self._lock:
            if not self._ctx:
                raise EngineError("this Captioner is closed; create a new one")
            if self._cancel.is_set():
                raise Cancelled(f"{name}: cancelled")
            _LOG.errors.clear()
            chunks = self._tokenize(rgb, opts.prompt, name)
            sampler = self._sampler(opts)
            try:
                llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx), True)
                n_past, image_tokens, prompt_tokens, encode_s = self._eval_prompt(chunks, name)
                t_prompt = time.perf_counter()

                decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
                pieces: list[str] = []
                batch = self._batch
                n_gen, finish = 0, "length"
                while n_gen < opts.max_tokens and n_past < self.n_ctx:
                    if self._cancel.is_set():
                        raise Cancelled(f"{name}: cancelled")
                    token = llama_cpp.llama_sampler_sample(sampler, self._ctx, -1)
                    if not opts.ignore_eos and llama_cpp.llama_vocab_is_eog(self._vocab, token):
                        finish = "stop"
                        break
                    n_gen += 1
                    piece = decoder.decode(self._token_bytes(token))
                    if piece:
                        pieces.append(piece)
                        yield piece
                    if n_gen >= opts.max_tokens:
                        break
                    batch.n_tokens = 1
                    batch.token[0], batch.pos[0], batch.n_seq_id[0] = token, n_past, 1
                    batch.seq_id[0][0], batch.logits[0] = 0, 1
                    if llama_cpp.llama_decode(self._ctx, batch) != 0:
                        raise EngineError(f"{name}: llama.cpp failed while generating: {_LOG.first_error()}")
                    n_past += 1
                tail = decoder.decode(b"", final=True)
                if tail:
                    pieces.append(tail)
                    yield tail
            finally:
                llama_cpp.llama_sampler_free(sampler)
                mtmd.mtmd_input_chunks_free(chunks)
        return _caption("".join(pieces), image_tokens, prompt_tokens, n_gen, finish, load_s=load_s,
                        t_loaded=t_loaded, encode_s=encode_s, t_prompt=t_prompt, t_end=time.perf_counter())

    def _chat_format(self) -> str:
        """One user turn and the assistant's opening in the model's own chat format: its GGUF's
        chat template as llama.cpp renders it (no system turn), with CONTENT for the prompt."""
        template = llama_cpp.llama_model_chat_template(self._model, None)
        if template:
            turn = (llama_cpp.llama_chat_message * 1)(llama_cpp.llama_chat_message(b"user", CONTENT.encode()))
            buf = ctypes.create_string_buffer(4096)
            n = llama_cpp.llama_chat_apply_template(template, turn, 1, True, buf, len(buf))
            rendered = buf.raw[:n].decode(errors="replace") if 0 < n <= len(buf) else ""
            if rendered.count(CONTENT) == 1:
                return rendered
            log.warning("%s: llama.cpp does not know this model's chat template; using ChatML", self.model_path.name)
        return CHATML

    def _token_bytes(self, token: int) -> bytes:
        buf = self._piece_buf
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        if n < 0:  # a piece longer than the buffer: -n is the size it needs
            buf = self._piece_buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        return buf.raw[: max(n, 0)]

    def _tokenize(self, rgb, prompt: str, name: str):  # type: ignore[no-untyped-def]
        data = rgb.tobytes()
        bitmap = mtmd.mtmd_bitmap_init(rgb.width, rgb.height, (ctypes.c_uint8 * len(data)).from_buffer_copy(data))
        if not bitmap:
            raise EngineError(f"{name}: llama.cpp could not take the image: {_LOG.first_error()}")
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            text = chat_prompt(self.chat_format, prompt, media_marker=self._marker).encode()
            itext = mtmd.mtmd_input_text(text, len(text), True, True)
            bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
            ret = mtmd.mtmd_tokenize(self._mctx, chunks, ctypes.byref(itext), bitmaps, 1)
        finally:
            mtmd.mtmd_bitmap_free(bitmap)
        if ret != 0:
            mtmd.mtmd_input_chunks_free(chunks)
            why = "the prompt's image placeholders do not match" if ret == 1 else _LOG.first_error()
            raise EngineError(f"{name}: could not prepare the image for the model: {why}")
        return chunks

    def _eval_prompt(self, chunks, name: str, seq: int = 0) -> tuple[int, int, int, float]:  # type: ignore[no-untyped-def]
        """Feed every chunk to the model; returns (n_past, image tokens, prompt tokens, encode seconds)."""
        n_chunks = mtmd.mtmd_input_chunks_size(chunks)
        total = mtmd.mtmd_helper_get_n_tokens(chunks)
        if total + 1 > self.n_ctx:
            raise EngineError(
                f"{name}: the prompt needs {total} tokens but the context holds {self.n_ctx}; "
                "lower --max-image-tokens or raise the context size"
            )
        n_past, image_tokens, encode_s = 0, 0, 0.0
        new_past = llama_cpp.llama_pos(0)
        for i in range(n_chunks):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            last = i == n_chunks - 1
            new_past.value = n_past
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                image_tokens += mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                t0 = time.perf_counter()
                if mtmd.mtmd_encode_chunk(self._mctx, chunk) != 0:
                    raise EngineError(f"{name}: the vision encoder failed: {_LOG.first_error()}")
                encode_s += time.perf_counter() - t0
                embd = mtmd.mtmd_get_output_embd(self._mctx)
                ret = mtmd.mtmd_helper_decode_image_chunk(
                    self._mctx, self._ctx, chunk, embd, n_past, seq, self._n_batch, ctypes.byref(new_past), _NO_CALLBACK, None
                )
            else:
                ret = mtmd.mtmd_helper_eval_chunk_single(
                    self._mctx, self._ctx, chunk, n_past, seq, self._n_batch, last, ctypes.byref(new_past)
                )
            if ret != 0:
                raise EngineError(f"{name}: llama.cpp failed to evaluate the prompt: {_LOG.first_error()}")
            n_past = new_past.value
        return n_past, image_tokens, total, encode_s
