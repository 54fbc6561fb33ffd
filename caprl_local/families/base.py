"""What every model family tells the engine: its projectors, the tensors llama.cpp needs, its image budget."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..budgets import ImageBudget, TiledBudget
from ..options import EngineOptions
from ..videoprompt import VideoForm

#: Tensors the Qwen-VL projectors share: the patch embedding (two frames) and the merger's MLP.
PATCH = ("v.patch_embd.weight", "v.patch_embd.weight.1")
MERGER = ("mm.0.weight", "mm.0.bias", "mm.2.weight", "mm.2.bias")
#: What every vision block has, whatever its attention's layout.
BLOCK = ("attn_out.weight", "ln1.weight", "ln2.weight", "ffn_up.weight", "ffn_down.weight")


@dataclass(frozen=True)
class Family:
    """One family of vision-language GGUFs: a text architecture and the projectors that pair with it.

    ``video`` is the form a family reads a video's frames in, or None for a family that takes no video.
    The default image budget is Qwen-VL's (sides in multiples of patch x merge pixels, area within the
    token cap); a family that sizes images otherwise overrides :meth:`budget`.
    """

    name: str
    architecture: str  # the text model's general.architecture
    projectors: frozenset[str]  # clip.projector_type values of its vision projectors
    # Projector tensors llama.cpp's vision graph uses without checking that they exist (a
    # file lacking one would crash the process instead of failing to load): overall, per block.
    tensors: tuple[str, ...]
    block_tensors: tuple[str, ...]
    f32_tensors: tuple[str, ...] = ()  # ... and those it asserts are f32
    output_bias: str = "mm.2.bias"  # the projector's last bias: its width is what the text model receives
    video: VideoForm | None = None  # how it reads a video's frames (caprl_local.videoprompt); None: it reads none

    def budget(self, projector: Mapping[str, Any], options: EngineOptions) -> ImageBudget | TiledBudget:
        """How images are sized for this projector (its GGUF metadata) within the image-token cap."""
        align = int(projector["clip.vision.patch_size"]) * int(projector.get("clip.vision.spatial_merge_size", 2))
        return ImageBudget.for_tokens(align=align, min_tokens=options.image_min_tokens,
                                      max_tokens=options.image_max_tokens)
