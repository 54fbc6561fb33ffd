"""The checks that a text model and a vision projector fit together, read from their GGUF headers (see the package)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..budgets import ImageBudget, TiledBudget
from ..errors import ModelFileError
from ..ggufmeta import GGUFInfo, read_gguf
from ..options import EngineOptions
from .base import Family
from .known import FAMILIES, PROJECTOR_NAMES, SUPPORTED_ARCHITECTURES


@dataclass(frozen=True)
class ModelPair:
    """A text model and its vision projector, checked to fit together, and their family."""

    model: GGUFInfo
    mmproj: GGUFInfo
    family: Family

    def budget(self, options: EngineOptions) -> ImageBudget | TiledBudget:
        """How images are sized for this pair within the image-token cap."""
        return self.family.budget(self.mmproj.metadata, options)


def check_model_files(model_path: str | os.PathLike[str], mmproj_path: str | os.PathLike[str]) -> ModelPair:
    """Check that the pair is a supported text model and its matching vision projector."""
    model = read_gguf(model_path, role="model")
    mmproj = read_gguf(mmproj_path, role="projector")
    if model.is_projector:
        raise ModelFileError(
            f"model {model.path}: is a vision projector (mmproj), not a text model; "
            "give it as the projector (mmproj) and the text model's .gguf as the model"
        )
    if not mmproj.is_projector:
        raise ModelFileError(
            f"projector {mmproj.path}: is a text model ({mmproj.architecture or 'unknown'}), "
            "not a vision projector; give the *mmproj*.gguf file as the projector"
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
    family = FAMILIES[arch]
    if proj_type not in family.projectors:
        kind = f"a {PROJECTOR_NAMES[proj_type]} projector" if proj_type in PROJECTOR_NAMES else \
            f"a projector of type {proj_type or 'unknown'!r}"
        raise ModelFileError(
            f"projector {mmproj.path}: is {kind}, but {model.path.name} is a {family.name} text model; "
            "use the mmproj published with this model"
        )
    for key, most in ((f"{arch}.block_count", _MAX_LAYERS), (f"{arch}.embedding_length", _MAX_WIDTH)):
        _bounded(model, "model", key, most)
    _check_key_types(mmproj)
    _check_vision_tensors(mmproj, family)
    # llama.cpp feeds the text model embeddings of n_embd x (1 + deepstack layers); the projector
    # yields its merger's width x (1 + its deepstack mergers): both must agree.
    n_deepstack = _count(model.metadata.get(f"{arch}.n_deepstack_layers", 0))
    if n_deepstack >= _count(model.metadata.get(f"{arch}.block_count")):  # llama.cpp would abort
        raise ModelFileError(f"model {model.path}: invalid deepstack layer count {n_deepstack}; download it again")
    text_width = _count(model.metadata.get(f"{arch}.embedding_length")) * (1 + n_deepstack)
    bias_dims = mmproj.tensors[family.output_bias][1]
    if len(bias_dims) != 1 or not 0 < bias_dims[0] <= _MAX_WIDTH:
        raise ModelFileError(f"projector {mmproj.path}: tensor {family.output_bias} has shape {list(bias_dims)}, "
                             "not a vector; download the published mmproj")
    merger = bias_dims[0]
    deepstack = [dims for name, (_t, dims) in mmproj.tensors.items()
                 if name.startswith("v.deepstack.") and name.endswith(".fc2.weight")]
    proj_width = merger * (1 + len(deepstack))
    if text_width != proj_width or any(dims[1] != merger for dims in deepstack):
        raise ModelFileError(
            f"projector {mmproj.path}: produces {proj_width}-wide embeddings but {model.path.name} expects "
            f"{text_width}; use the mmproj published with this model"
        )
    return ModelPair(model, mmproj, family)


def kv_bytes_per_token(model: GGUFInfo) -> int:
    """Bytes of KV cache one token of context takes: K and V in f16, every layer."""
    meta, arch = model.metadata, model.architecture
    head_dim = _count(meta.get(f"{arch}.attention.key_length")) or \
        _count(meta.get(f"{arch}.embedding_length")) // max(1, _count(meta.get(f"{arch}.attention.head_count")))
    return 2 * 2 * _count(meta.get(f"{arch}.block_count")) * _count(meta.get(f"{arch}.attention.head_count_kv")) * head_dim


# Bounds on header numbers, checked before any is used: a damaged file must not make the checks
# themselves build huge lists. llama.cpp allows at most 512 layers (LLAMA_MAX_LAYERS).
_MAX_LAYERS = 512
_MAX_WIDTH = 1 << 16


def _bounded(info: GGUFInfo, role: str, key: str, most: int) -> int:
    value = info.metadata.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= most:
        raise ModelFileError(f"{role} {info.path}: {key} is {value!r}, not a number from 1 to {most}; "
                             "the file is damaged or from an incompatible converter")
    return value


def _count(value: Any) -> int:
    """A header count as a number: 0 for anything that is not a whole number."""
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


# llama.cpp's projector loader reads each scalar clip.* key with a typed getter (u32 for sizes and
# counts, f32 for epsilons, bool for has_*/use_* flags) that aborts the process (GGML_ASSERT in
# gguf.cpp) on any other type: a u32 stored as i32 or u64, as another converter could write.
_TYPE_NAMES = {0: "u8", 1: "i8", 2: "u16", 3: "i16", 4: "u32", 5: "i32", 6: "f32", 7: "bool", 10: "u64",
               11: "i64", 12: "f64"}


def _expected_type(key: str) -> int:
    if key.endswith("epsilon"):
        return 6
    return 7 if key.startswith(("clip.has_", "clip.use_")) else 4


def _check_key_types(mmproj: GGUFInfo) -> None:
    for key, vtype in mmproj.types.items():
        if key.startswith("clip.") and vtype in _TYPE_NAMES and vtype != _expected_type(key):
            raise ModelFileError(
                f"projector {mmproj.path}: key {key} is stored as {_TYPE_NAMES[vtype]}, but llama.cpp reads it as "
                f"{_TYPE_NAMES[_expected_type(key)]}; the file is from an incompatible converter: download the published mmproj"
            )


def _check_vision_tensors(mmproj: GGUFInfo, family: Family) -> None:
    sizes = {key: _bounded(mmproj, "projector", f"clip.vision.{key}", most) for key, most in (
        ("block_count", _MAX_LAYERS), ("patch_size", 1024), ("embedding_length", _MAX_WIDTH),
        ("attention.head_count", 1024))}
    if sizes["embedding_length"] % sizes["attention.head_count"]:
        raise ModelFileError(f"projector {mmproj.path}: invalid vision encoder sizes {sizes}; download the published mmproj")
    wanted = list(family.tensors) + [
        f"v.blk.{i}.{t}" for i in range(sizes["block_count"]) for t in family.block_tensors
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
