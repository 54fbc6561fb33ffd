"""Qwen3-VL (CapRL 2.0): fused qkv, learned position embeddings (f32, as llama.cpp asserts), deepstack mergers."""

from __future__ import annotations

from ..videoprompt import QWEN3_VL
from .base import BLOCK, MERGER, PATCH, Family

FAMILY = Family(
    "Qwen3-VL", "qwen3vl", frozenset({"qwen3vl_merger"}),
    (*PATCH, "v.patch_embd.bias", "v.position_embd.weight", *MERGER),
    ("attn_qkv.weight", "attn_qkv.bias", *BLOCK), f32_tensors=("v.position_embd.weight",),
    video=QWEN3_VL,  # "<t seconds>" before each pair of frames, as Qwen3-VL's own processor writes a video
)
