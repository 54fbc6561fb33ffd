#!/usr/bin/env python3
"""Write a random-weight CapRL pair (text GGUF + mmproj GGUF), tiny or full-sized.

The files carry exactly the metadata keys, tokenizer, chat template, tensor names
and projector type of the published GGUFs, with seeded random weights: CapRL-3B
(Qwen2.5-VL: mradermacher's files), with a `qwen3vl` shape CapRL 2.0 (Qwen3-VL:
internlm's files, deepstack projector included), with an `internvl` shape
CapRL-InternVL3.5-8B (InternViT + Qwen3, as llama.cpp's converter writes InternVL3.5). `--shape tiny` / `tiny-qwen3vl`
(~400 KB) let llama.cpp load them, encode real images and generate real tokens in
milliseconds, for tests. `--shape caprl-3b` / `caprl-qwen3vl-2b` / `caprl-qwen3vl-4b` have
the real models' dimensions and vocabulary and, with `--quant Q4_K_M` (llama.cpp's own
quantizer), cost what the real files cost to run: for benchmarks. Their sizes are
checked against the published ones, where a size is published (PUBLISHED_BYTES).

    python scripts/make_tiny_model.py OUT_DIR [--shape tiny-qwen3vl] [--seed N] [--projection-dim N]
    python scripts/make_tiny_model.py OUT_DIR --shape caprl-3b --quant Q4_K_M [--mmproj-type f16|Q8_0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import gguf
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_shapes import PUBLISHED_BYTES, SHAPES, Shape  # noqa: E402 - a sibling script, as below
from tiny_tokenizer import (  # noqa: E402 - a sibling script, importable once its folder is on the path
    CHAT_TEMPLATE,
    CORPUS,
    QWEN3_EXTRA_TOKENS,
    QWEN3VL_CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    train_bpe,
)

_FTYPES = {"Q4_K_M": 15, "Q4_K_S": 14, "Q5_K_M": 17, "Q6_K": 18, "Q8_0": 7, "IQ4_XS": 30, "Q2_K": 10, "Q3_K_M": 12}


def write_text_model(path: Path, shape: Shape, rng: np.random.Generator, *, drop: frozenset[str] = frozenset(),
                     chat_template: str | None = None) -> None:
    from tiny_internvl import INTERNVL_CHAT_TEMPLATE, INTERNVL_EXTRA_TOKENS

    internvl = shape.family == "internvl"
    qwen3 = shape.family == "qwen3vl" or internvl  # Qwen3 text models: q/k norms, no q/k/v biases
    specials = SPECIAL_TOKENS + (QWEN3_EXTRA_TOKENS if qwen3 else []) + (INTERNVL_EXTRA_TOKENS if internvl else [])
    tokens, merges = train_bpe(CORPUS, shape.n_merges)
    if shape.n_vocab:  # the real layout: 151,643 regular tokens, the specials, then [PAD] up to n_vocab
        tokens += [f"<filler{i}>" for i in range(151643 - len(tokens))]
    n_normal = len(tokens)
    tokens += specials
    types = [gguf.TokenType.NORMAL] * n_normal + [
        gguf.TokenType.CONTROL if t.startswith("<|") else gguf.TokenType.USER_DEFINED for t in specials
    ]
    if shape.n_vocab:
        pads = shape.n_vocab - len(tokens)
        tokens += [f"[PAD{len(tokens) + i}]" for i in range(pads)]
        types += [gguf.TokenType.UNUSED] * pads
    special = {t: n_normal + i for i, t in enumerate(specials)}
    head_dim = shape.head_dim or shape.n_embd // shape.n_head

    w = _Writer(str(path), "qwen3" if internvl else shape.family, drop=drop)
    w.add_type(gguf.GGUFType.MODEL)
    basename, _, size = shape.model_stem.rpartition("-")
    w.add_name(shape.model_stem.replace("-", " "))
    w.add_basename(basename)
    w.add_size_label(size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_context_length(40960 if internvl else 262144 if qwen3 else 128000)
    w.add_embedding_length(shape.n_embd)
    w.add_block_count(shape.n_layer)
    w.add_feed_forward_length(shape.n_ff)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head_kv)
    w.add_rope_freq_base(5000000.0 if qwen3 and not internvl else 1000000.0)
    w.add_layer_norm_rms_eps(1e-6)
    if qwen3:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if not internvl:  # Qwen-VL's multimodal rope; InternVL's text model is a plain Qwen3
        w.add_rope_dimension_sections(list(shape.rope_sections))
    if qwen3 and not internvl:  # the projector's deepstack features are added to the outputs of the first layers
        w.add_num_deepstack_layers(len(shape.v_deepstack))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(special["<|im_end|>"])
    w.add_pad_token_id(special["<|endoftext|>"])
    w.add_bos_token_id(special["<|endoftext|>"])
    w.add_add_bos_token(False)
    w.add_chat_template(chat_template or (INTERNVL_CHAT_TEMPLATE if internvl else QWEN3VL_CHAT_TEMPLATE if qwen3
                                          else CHAT_TEMPLATE))

    def weight(*dims: int) -> np.ndarray:  # numpy shape is (out, in): ggml's ne reversed
        return _random(rng, dims)

    def norm(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    def bias(n: int) -> np.ndarray:
        return (rng.standard_normal(n) * 0.1).astype(np.float32)

    q, kv = shape.n_head * head_dim, shape.n_head_kv * head_dim
    # Tied embeddings, as in Qwen2.5-VL-3B and Qwen3-VL-2B/4B: no output.weight. Rows of byte tokens outside
    # printable ASCII and of special tokens are shrunk so that their logits stay small: the
    # random model then writes readable text rather than invalid UTF-8 or an instant
    # end-of-turn (either would make every caption look alike).
    embd = weight(len(tokens), shape.n_embd)
    unprintable = [b for b in range(256) if not (0x20 <= b <= 0x7E or b == 0x0A)]
    embd[unprintable + list(special.values())] *= 0.05
    w.add_tensor("token_embd.weight", embd)
    for i in range(shape.n_layer):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", norm(shape.n_embd))
        for name, rows in (("attn_q", q), ("attn_k", kv), ("attn_v", kv)):
            w.add_tensor(p + name + ".weight", weight(rows, shape.n_embd))
            if not qwen3:  # Qwen3 has no q/k/v biases
                w.add_tensor(p + name + ".bias", bias(rows))
        if qwen3:  # ... but RMS norms on each head's queries and keys
            w.add_tensor(p + "attn_q_norm.weight", norm(head_dim))
            w.add_tensor(p + "attn_k_norm.weight", norm(head_dim))
        w.add_tensor(p + "attn_output.weight", weight(shape.n_embd, q))
        w.add_tensor(p + "ffn_norm.weight", norm(shape.n_embd))
        w.add_tensor(p + "ffn_gate.weight", weight(shape.n_ff, shape.n_embd))
        w.add_tensor(p + "ffn_up.weight", weight(shape.n_ff, shape.n_embd))
        w.add_tensor(p + "ffn_down.weight", weight(shape.n_embd, shape.n_ff))
    w.add_tensor("output_norm.weight", norm(shape.n_embd))
    _finish(w)


def write_mmproj(
    path: Path, shape: Shape, rng: np.random.Generator, *, projection_dim: int, drop: frozenset[str] = frozenset()
) -> None:
    if shape.family == "qwen3vl":
        from tiny_qwen3vl import write_qwen3vl_mmproj

        return write_qwen3vl_mmproj(path, shape, rng, projection_dim=projection_dim, drop=drop,
                                    writer=_mmproj_writer, tensors=_Tensors, finish=_finish)
    if shape.family == "internvl":
        from tiny_internvl import write_internvl_mmproj

        return write_internvl_mmproj(path, shape, rng, projection_dim=projection_dim, drop=drop,
                                     writer=_mmproj_writer, tensors=_Tensors, finish=_finish)
    patch = 14
    w = _mmproj_writer(path, shape, drop=drop, name="CapRL 3B", projector=gguf.VisionProjectorType.QWEN25VL,
                       patch=patch, image_size=560, projection_dim=projection_dim)
    w.add_vision_use_silu(True)
    w.add_vision_image_mean([0.48145466, 0.4578275, 0.40821073])
    w.add_vision_image_std([0.26862954, 0.26130258, 0.27577711])
    w.add_vision_n_wa_pattern(shape.v_wa_pattern)

    t = _Tensors(w, rng)
    d, ff, merged = shape.v_embd, shape.v_ff, shape.v_embd * 4
    # Qwen2.5-VL's Conv3D patch embedding, split into its two temporal halves.
    w.add_tensor("v.patch_embd.weight", t.weight(d, 3, patch, patch))
    w.add_tensor("v.patch_embd.weight.1", t.weight(d, 3, patch, patch))
    for i in range(shape.v_layer):
        p = f"v.blk.{i}."
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            t.linear(p + name, d, d)
        t.norm(p + "ln1", d, bias=False)  # RMSNorms
        t.norm(p + "ln2", d, bias=False)
        t.linear(p + "ffn_gate", ff, d)
        t.linear(p + "ffn_up", ff, d)
        t.linear(p + "ffn_down", d, ff)
    t.norm("v.post_ln", d, bias=False)
    t.linear("mm.0", merged, merged)
    t.linear("mm.2", projection_dim, merged)
    _finish(w)


def _mmproj_writer(path: Path, shape: Shape, *, drop: frozenset[str], name: str, projector: str, patch: int,
                   image_size: int, projection_dim: int) -> _Writer:
    """A projector file with the vision-tower keys every Qwen-VL mmproj carries."""
    w = _Writer(str(path), "clip", drop=drop)
    w.add_type(gguf.GGUFType.MMPROJ)
    w.add_name(name)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_clip_has_vision_encoder(True)
    w.add_clip_projector_type(projector)
    w.add_vision_projection_dim(projection_dim)
    w.add_vision_image_size(image_size)
    w.add_vision_patch_size(patch)
    w.add_vision_embedding_length(shape.v_embd)
    w.add_vision_feed_forward_length(shape.v_ff)
    w.add_vision_block_count(shape.v_layer)
    w.add_vision_head_count(shape.v_head)
    w.add_vision_attention_layernorm_eps(1e-6)
    return w


class _Tensors:
    """Adds a projector's tensors to a writer, drawing their values from rng."""

    def __init__(self, w: _Writer, rng: np.random.Generator) -> None:
        self.w, self.rng = w, rng

    def weight(self, *dims: int) -> np.ndarray:
        return _random(self.rng, dims)

    def vec(self, n: int, *, ones: bool = False) -> np.ndarray:
        return _vec(self.rng, n, ones=ones)

    def linear(self, name: str, n_out: int, n_in: int) -> None:
        """name.weight (n_out x n_in) and name.bias."""
        self.w.add_tensor(f"{name}.weight", self.weight(n_out, n_in))
        self.w.add_tensor(f"{name}.bias", self.vec(n_out))

    def norm(self, name: str, n: int, *, bias: bool = True) -> None:
        """name.weight (ones) and, for a LayerNorm, name.bias."""
        self.w.add_tensor(f"{name}.weight", self.vec(n, ones=True))
        if bias:
            self.w.add_tensor(f"{name}.bias", self.vec(n))


def _vec(rng: np.random.Generator, n: int, *, ones: bool = False) -> np.ndarray:
    """A norm weight (ones) or a bias (small random values), in f32 as the converter writes them."""
    return np.ones(n, np.float32) if ones else (rng.standard_normal(n) * 0.1).astype(np.float32)


_POOL_SIZE = 1 << 24


def _random(rng: np.random.Generator, dims: tuple[int, ...]) -> np.ndarray:
    """Normal(0, 0.1) weights in f16. Big tensors repeat one random pool from a random
    offset: their values do not matter for speed, and drawing billions would take minutes."""
    n = int(np.prod(dims))
    if n <= _POOL_SIZE:
        return (rng.standard_normal(dims) * 0.1).astype(np.float16)
    pool = getattr(_random, "pool", None)
    if pool is None:
        pool = _random.pool = (rng.standard_normal(_POOL_SIZE) * 0.1).astype(np.float16)  # type: ignore[attr-defined]
    start = int(rng.integers(0, _POOL_SIZE))
    return np.resize(np.roll(pool, -start), n).reshape(dims)


class _Writer(gguf.GGUFWriter):
    """A GGUFWriter that can leave tensors out, to make broken files for error tests."""

    def __init__(self, path: str, arch: str, *, drop: frozenset[str]) -> None:
        super().__init__(path, arch)
        self.drop = drop

    def add_tensor(self, name: str, tensor: np.ndarray, **kwargs) -> None:  # type: ignore[override]
        if name not in self.drop:
            super().add_tensor(name, tensor, **kwargs)


def _finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_tiny_pair(
    out_dir: Path | str,
    *,
    seed: int = 0,
    projection_dim: int | None = None,
    stem: str | None = None,
    drop: frozenset[str] = frozenset(),
    shape: str = "tiny",
    quant: str | None = None,
    mmproj_type: str = "f16",
    chat_template: str | None = None,
) -> tuple[Path, Path]:
    """Write `<stem>.<quant or f16>.gguf` and `<stem>.mmproj-<type>.gguf` into out_dir; return their paths."""
    dims = SHAPES[shape]
    stem = stem or dims.model_stem
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    model, mmproj = out / f"{stem}.{quant or 'f16'}.gguf", out / f"{stem}.mmproj-{mmproj_type}.gguf"
    f16 = out / f"{stem}.f16.gguf"
    if not (quant and model.exists()):
        write_text_model(f16, dims, rng, drop=drop, chat_template=chat_template)
    if quant and not model.exists():
        _quantize(f16, model, quant)
        f16.unlink()
    write_mmproj(mmproj, dims, rng, projection_dim=projection_dim or dims.n_embd, drop=drop)
    if mmproj_type != "f16":
        _quantize_mmproj(mmproj, mmproj_type)
    return model, mmproj


def _quantize(src: Path, dst: Path, quant: str) -> None:
    """Quantize a text GGUF with llama.cpp's own quantizer (as the published quants were made)."""
    import os

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = _FTYPES[quant]
    params.nthread = os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) != 0:
        raise SystemExit(f"quantizing {src} to {quant} failed")


def _quantize_mmproj(path: Path, qtype: str) -> None:
    """Rewrite a projector with its 2-D weights in Q8_0, as llama.cpp's converter does."""
    reader = gguf.GGUFReader(path)
    tmp = path.with_suffix(".tmp")
    w = gguf.GGUFWriter(str(tmp), "clip")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.file_type"):
            continue
        w.add_key_value(field.name, field.contents(), field.types[0], sub_type=field.types[-1] if len(field.types) > 1 else None)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    for t in reader.tensors:
        data = np.asarray(t.data)
        if t.name.startswith(("v.blk.", "v.deepstack.", "mm.")) and t.name.endswith(".weight") and data.ndim == 2 \
                and data.shape[1] % 32 == 0:  # Q8_0 blocks hold 32 values of a row
            w.add_tensor(t.name, gguf.quants.quantize(data.astype(np.float32), gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(t.name, data)
    _finish(w)
    tmp.replace(path)


def check_published_sizes(shape: str, model: Path, mmproj: Path, quant: str | None, mmproj_type: str) -> list[str]:
    """Compare a full-sized pair with the published files' sizes; return the mismatches."""
    problems = []
    for key, path in ((quant, model), (f"mmproj-{mmproj_type}", mmproj)):
        expected = PUBLISHED_BYTES.get(shape, {}).get(key or "")
        if expected and abs(path.stat().st_size / expected - 1) > 0.04:
            problems.append(f"{path.name}: {path.stat().st_size:,} bytes, published {expected:,}")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--projection-dim", type=int, help="write a mismatched projector (for error tests)")
    parser.add_argument("--stem", help="file name stem (default: the shape's model, e.g. CapRL-3B, CapRL-Qwen3VL-4B)")
    parser.add_argument("--drop-tensor", action="append", default=[], help="leave a tensor out (for error tests)")
    parser.add_argument("--shape", choices=list(SHAPES), default="tiny")
    parser.add_argument("--quant", choices=list(_FTYPES), help="quantize the text model (default: f16)")
    parser.add_argument("--mmproj-type", choices=["f16", "Q8_0"], default="f16")
    args = parser.parse_args()
    pair = write_tiny_pair(
        args.out_dir, seed=args.seed, projection_dim=args.projection_dim, stem=args.stem,
        drop=frozenset(args.drop_tensor), shape=args.shape, quant=args.quant, mmproj_type=args.mmproj_type,
    )
    for path in pair:
        print(f"{path}  {path.stat().st_size:,} bytes")
    if args.shape in PUBLISHED_BYTES:
        problems = check_published_sizes(args.shape, *pair, args.quant, args.mmproj_type)
        if problems:
            raise SystemExit("sizes differ from the published files: " + "; ".join(problems))
        print("sizes match the published files (within 4%)")


if __name__ == "__main__":
    main()
