"""The shapes make_tiny_model.py writes: each family's tiny test models and the published models' real dimensions."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    """Model family and the dimensions of the text model and the vision tower."""

    family: str = "qwen2vl"  # qwen2vl (CapRL-3B), qwen3vl (CapRL 2.0) or internvl (CapRL-InternVL3.5: a qwen3 text model)
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 128
    rope_sections: tuple[int, int, int, int] = (2, 3, 3, 0)  # sums to head_dim / 2
    head_dim: int | None = None  # Qwen3 states it (attention.key_length); else n_embd // n_head
    v_embd: int = 32
    v_layer: int = 4
    v_head: int = 2
    v_ff: int = 48  # must differ from v_embd: llama.cpp guesses swapped FFNs otherwise
    v_wa_pattern: int = 2  # Qwen2.5-VL: full attention every 2nd block (every 8th in the real model)
    v_deepstack: tuple[int, ...] = ()  # Qwen3-VL: vision blocks whose features also feed the text model
    v_image_size: int = 560  # Qwen3-VL: side of its learned position grid, in pixels
    n_merges: int = 160
    n_vocab: int | None = None  # pad the vocabulary to this size (the real one: 151,936)
    stem: str = ""  # the files' stem and general.name/basename/size_label ("": the family's first model's)

    @property
    def model_stem(self) -> str:
        """The model's file stem, e.g. CapRL-Qwen3VL-4B: its name, basename and size label too."""
        return self.stem or {"qwen3vl": "CapRL-Qwen3VL-2B", "internvl": "CapRL-InternVL3.5-8B"}.get(self.family, "CapRL-3B")


SHAPES = {
    "tiny": Shape(),
    # The tiny layers with Qwen's real 151,936-token vocabulary: a decode step costs next to nothing, so
    # what a benchmark sees is the work around it (reading the logits, sampling, streaming the text).
    "tiny-vocab": Shape(n_vocab=151936),
    # Qwen2.5-VL-3B: config.json of Qwen/Qwen2.5-VL-3B-Instruct (and so of CapRL-3B).
    "caprl-3b": Shape(
        n_embd=2048, n_layer=36, n_head=16, n_head_kv=2, n_ff=11008, rope_sections=(16, 24, 24, 0),
        v_embd=1280, v_layer=32, v_head=16, v_ff=3420, v_wa_pattern=8, n_vocab=151936,
    ),
    "tiny-internvl": Shape(family="internvl", head_dim=16, v_ff=40),
    # InternVL3.5-8B: Qwen3-8B's config.json and InternViT-300M's (and so CapRL-InternVL3.5-8B's).
    "caprl-internvl3.5-8b": Shape(
        family="internvl", n_embd=4096, n_layer=36, n_head=32, n_head_kv=8, n_ff=12288, head_dim=128,
        v_embd=1024, v_layer=24, v_head=16, v_ff=4096, n_vocab=151936,
    ),
    "tiny-qwen3vl": Shape(
        family="qwen3vl", n_layer=4, rope_sections=(3, 3, 2, 0), head_dim=16, v_deepstack=(0, 1, 2), v_image_size=64,
    ),
    # Qwen3-VL-2B: config.json of Qwen/Qwen3-VL-2B-Instruct (and so of CapRL-Qwen3VL-2B).
    "caprl-qwen3vl-2b": Shape(
        family="qwen3vl", n_embd=2048, n_layer=28, n_head=16, n_head_kv=8, n_ff=6144, head_dim=128,
        rope_sections=(24, 20, 20, 0), v_embd=1024, v_layer=24, v_head=16, v_ff=4096, v_deepstack=(5, 11, 17),
        v_image_size=768, n_vocab=151936,
    ),
    # Qwen3-VL-4B: config.json of Qwen/Qwen3-VL-4B-Instruct (and so of CapRL-Qwen3VL-4B and CapRL-Video-4B). The vision
    # tower is the 2B's; its mergers write 2560-wide features (out_hidden_size), the text model's width.
    "caprl-qwen3vl-4b": Shape(
        family="qwen3vl", n_embd=2560, n_layer=36, n_head=32, n_head_kv=8, n_ff=9728, head_dim=128,
        rope_sections=(24, 20, 20, 0), v_embd=1024, v_layer=24, v_head=16, v_ff=4096, v_deepstack=(5, 11, 17),
        v_image_size=768, n_vocab=151936, stem="CapRL-Qwen3VL-4B",
    ),
}

# Sizes of published files that a full-sized pair must match: mradermacher/CapRL-3B-GGUF, and
# Qwen3-VL-2B's projector as the Hub's Qwen3-VL-2B GGUFs publish it (822 MB in f16).
PUBLISHED_BYTES = {
    "caprl-3b": {"Q4_K_M": 1_930_000_000, "mmproj-f16": 1_340_000_000},
    "caprl-qwen3vl-2b": {"mmproj-f16": 822_000_000},
}
