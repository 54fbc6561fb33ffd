"""InternVL3.5 (CapRL-InternVL3.5-8B): InternViT and a Qwen3 text model, images as 448-pixel tiles.

llama.cpp asserts the class and position embeddings exist, and reads the projector's MLP unchecked.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..budgets import TiledBudget
from ..errors import CaprlError
from ..options import EngineOptions
from ..videoprompt import INTERNVL
from .base import BLOCK, Family


@dataclass(frozen=True)
class InternVL(Family):
    def budget(self, projector: Mapping[str, Any], options: EngineOptions) -> TiledBudget:
        """Tiles pixel-shuffled to 256 tokens each, plus an overview, within the cap."""
        patch = int(projector["clip.vision.patch_size"])
        tile = int(projector.get("clip.vision.image_size", 448))
        per_tile = (tile // patch // int(projector.get("clip.vision.projector.scale_factor", 2))) ** 2
        if options.image_max_tokens is not None and options.image_max_tokens < per_tile:
            raise CaprlError(f"InternVL spends {per_tile} tokens on each image tile; the image-token cap "
                             f"({options.image_max_tokens}) must be at least that")
        return TiledBudget.for_tokens(tile=tile, per_tile=per_tile, max_tokens=options.image_max_tokens,
                                      most_tiles=int(projector.get("clip.vision.preproc_max_tiles", 12)))


FAMILY = InternVL(
    "InternVL", "qwen3", frozenset({"internvl"}),
    ("v.patch_embd.weight", "v.class_embd", "v.position_embd.weight",
     *(f"mm.model.mlp.{i}.{k}" for i in (0, 1, 3) for k in ("weight", "bias"))),
    ("attn_q.weight", "attn_k.weight", "attn_v.weight", *BLOCK), output_bias="mm.model.mlp.3.bias",
    video=INTERNVL,  # "Frame{i}: " and one image a frame, as InternVL's processor writes a video
)
