"""The Qwen3-VL part of the tiny model writer (CapRL 2.0's projector). Used by make_tiny_model.py,
which passes in its writer helpers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np


def write_qwen3vl_mmproj(path: Path, shape: Any, rng: np.random.Generator, *, projection_dim: int,
                         drop: frozenset[str], writer: Any, tensors: Any, finish: Any) -> None:
    """Qwen3-VL's vision tower as llama.cpp's converter writes it (conversion/qwen3vl.py): fused
    QKV, LayerNorms with biases, GELU MLPs, learned position embeddings, and deepstack mergers
    whose outputs are concatenated to the main merger's (the text model's input is 1 + N wide)."""
    patch = 16
    w = writer(path, shape, drop=drop, name="CapRL Qwen3VL 2B", projector=gguf.VisionProjectorType.QWEN3VL,
                       patch=patch, image_size=shape.v_image_size, projection_dim=projection_dim)
    w.add_vision_use_gelu(True)
    w.add_vision_image_mean([0.5, 0.5, 0.5])
    w.add_vision_image_std([0.5, 0.5, 0.5])
    w.add_vision_spatial_merge_size(2)
    w.add_vision_is_deepstack_layers([i in shape.v_deepstack for i in range(shape.v_layer)])

    t = tensors(w, rng)
    d, ff, merged = shape.v_embd, shape.v_ff, shape.v_embd * 4
    w.add_tensor("v.patch_embd.weight", t.weight(d, 3, patch, patch))
    w.add_tensor("v.patch_embd.weight.1", t.weight(d, 3, patch, patch))
    w.add_tensor("v.patch_embd.bias", t.vec(d))
    # Position embeddings stay f32, as the converter keeps them (llama.cpp interpolates them in f32).
    w.add_tensor("v.position_embd.weight", t.weight((shape.v_image_size // patch) ** 2, d).astype(np.float32))
    for i in range(shape.v_layer):
        p = f"v.blk.{i}."
        t.norm(p + "ln1", d)
        t.linear(p + "attn_qkv", 3 * d, d)
        t.linear(p + "attn_out", d, d)
        t.norm(p + "ln2", d)
        t.linear(p + "ffn_up", ff, d)
        t.linear(p + "ffn_down", d, ff)
    for i in shape.v_deepstack:
        p = f"v.deepstack.{i}."
        t.norm(p + "norm", merged)
        t.linear(p + "fc1", merged, merged)
        t.linear(p + "fc2", projection_dim, merged)
    t.norm("v.post_ln", d)
    t.linear("mm.0", merged, merged)
    t.linear("mm.2", projection_dim, merged)
    finish(w)
