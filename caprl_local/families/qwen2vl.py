"""Qwen2-VL and Qwen2.5-VL (CapRL-3B): separate q/k/v projections with biases, the Qwen-VL image budget."""

from __future__ import annotations

from ..videoprompt import LLAMA_CPP
from .base import BLOCK, MERGER, PATCH, Family

FAMILY = Family(
    "Qwen2-VL / Qwen2.5-VL", "qwen2vl", frozenset({"qwen2vl_merger", "qwen2.5vl_merger"}), PATCH + MERGER,
    tuple(f"{n}.{k}" for n in ("attn_q", "attn_k", "attn_v") for k in ("weight", "bias")) + BLOCK,
    # Qwen2.5-VL keeps a video's time in its M-RoPE positions, which llama.cpp does not give frames: its video
    # helper's timestamp text is then the only time the model sees (and the captions equal llama-mtmd-cli's).
    video=LLAMA_CPP,
)
