"""The InternVL parts of the tiny model writer: CapRL-InternVL3.5-8B's vision tower and projector
as llama.cpp's converter writes InternVL3.5 (conversion/internvl.py): InternViT with a class
token, learned position embeddings, split q/k/v with biases, LayerNorms and layer scales, GELU
MLPs, then pixel shuffle (scale factor 2) and a LayerNorm + two-layer GELU MLP projector
(mm.model.mlp.0/1/3) into the Qwen3 text model. Images are cut into 448-pixel tiles plus an
overview, 256 tokens each. Used by make_tiny_model.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np

#: InternVL's own special tokens, which its tokenizer adds to Qwen3's (mtmd wraps an image in <img></img>).
INTERNVL_EXTRA_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]

#: InternVL3.5's chat template (Qwen3's ChatML; an image in a user turn is written as <image>).
INTERNVL_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}"
    "{%- for content in message['content'] %}{%- if content['type'] == 'image' %}{{- '<image>\\n' }}"
    "{%- elif content['type'] == 'text' %}{{- content['text'] }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

IMAGE_SIZE, PATCH = 448, 14


def write_internvl_mmproj(path: Path, shape: Any, rng: np.random.Generator, *, projection_dim: int,
                          drop: frozenset[str], writer: Any, tensors: Any, finish: Any) -> None:
    """The projector file; `writer`, `tensors` and `finish` are make_tiny_model's helpers."""
    w = writer(path, shape, drop=drop, name="CapRL InternVL3.5 8B", projector=gguf.VisionProjectorType.INTERNVL,
               patch=PATCH, image_size=IMAGE_SIZE, projection_dim=projection_dim)
    w.add_vision_use_gelu(True)
    w.add_vision_image_mean([0.485, 0.456, 0.406])
    w.add_vision_image_std([0.229, 0.224, 0.225])
    w.add_vision_projector_scale_factor(2)
    w.add_vision_preproc_min_tiles(1)
    w.add_vision_preproc_max_tiles(12)

    t = tensors(w, rng)
    d, ff, shuffled = shape.v_embd, shape.v_ff, shape.v_embd * 4
    w.add_tensor("v.patch_embd.weight", t.weight(d, 3, PATCH, PATCH))
    w.add_tensor("v.patch_embd.bias", t.vec(d))
    w.add_tensor("v.class_embd", t.weight(1, d).reshape(d).astype(np.float32))
    w.add_tensor("v.position_embd.weight", t.weight((IMAGE_SIZE // PATCH) ** 2 + 1, d).astype(np.float32))
    for i in range(shape.v_layer):
        p = f"v.blk.{i}."
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            t.linear(p + name, d, d)
        t.norm(p + "ln1", d)
        t.norm(p + "ln2", d)
        t.linear(p + "ffn_up", ff, d)
        t.linear(p + "ffn_down", d, ff)
        w.add_tensor(p + "ls1.weight", t.vec(d, ones=True))  # layer scales (InternViT's ls1/ls2)
        w.add_tensor(p + "ls2.weight", t.vec(d, ones=True))
    t.norm("mm.model.mlp.0", shuffled)
    t.linear("mm.model.mlp.1", projection_dim, shuffled)
    t.linear("mm.model.mlp.3", projection_dim, projection_dim)
    finish(w)
