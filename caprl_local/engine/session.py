"""One loaded model pair and every llama.cpp handle it owns.

A Session holds the text model, one context with a sequence per caption in flight (one shared
KV pool), the vision projector's mtmd context and a token batch. It evaluates a prompt into a
sequence, decodes a step, samples and frees; it knows nothing of requests or threads (the
scheduler is its only user once loaded, and frees it when its loop stops: nothing may free the
handles while a decode may be running in them).
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import mtmd_cpp as mtmd
from PIL import Image

from ..chat import ChatMessage, caption_conversation, render_chat
from ..errors import Cancelled, EngineError, ModelFileError, PromptTooLongError
from ..families import kv_bytes_per_token
from ..ggufmeta import GGUFInfo
from ..options import EngineOptions, GenerationOptions
from ..prompts import CHATML, CONTENT, Turn, chatml
from . import backend
from .backend import LLAMA_LOG

log = logging.getLogger("caprl_local")

_N_BATCH = 2048  # logical batch, as llama-mtmd-cli uses
_N_UBATCH = 512
_REPEAT_LAST_N = 256  # the repeat penalty's window: the prompt's last text tokens, then the caption's
_NO_CALLBACK = mtmd.mtmd_helper_post_decode_callback()  # a NULL function pointer


@dataclass(frozen=True)
class Prompted:
    """A prompt evaluated into a sequence."""

    n_past: int  # tokens in the sequence
    image_tokens: int
    prompt_tokens: int
    encode_s: float  # of which the vision encoder
    text_tokens: tuple[int, ...] = ()  # the prompt's text tokens in order, images left out (for the repeat penalty)


class Session:
    """The llama.cpp handles of one model pair; see the module docstring."""

    def __init__(self, model_path: Path, mmproj_path: Path, model_info: GGUFInfo, options: EngineOptions) -> None:
        self.model_path, self.mmproj_path = model_path, mmproj_path
        self._model: Any = None
        self._ctx: Any = None
        self._mctx: Any = None
        self._batch: Any = None
        self._close_lock = threading.Lock()
        t0 = time.perf_counter()
        backend.init_backend(verbose=options.verbose)
        try:
            self._load(model_info, options)
        except BaseException:
            self.close()
            raise
        self.load_seconds = time.perf_counter() - t0
        log.info("loaded %s + %s in %.2fs (gpu_layers=%d, threads=%d, %d x %d tokens, weights %s)",
                 model_path.name, mmproj_path.name, self.load_seconds, self.n_gpu_layers, self.threads,
                 self.slots, self.n_ctx, self.weight_layout)

    def _load(self, model_info: GGUFInfo, opts: EngineOptions) -> None:
        self.n_gpu_layers = n_gpu = backend.resolve_gpu_layers(opts.gpu_layers)
        self.threads = opts.threads or backend.default_threads()
        self.on_gpu = n_gpu != 0 and backend.gpu_offload()
        if n_gpu != 0 and not self.on_gpu:
            log.warning("gpu_layers=%s has no effect: this llama.cpp build has no GPU offload, so the model "
                        "runs on the CPU", opts.gpu_layers)
        layout = backend.weight_layout(model_info, repack=opts.repack, wide=opts.parallel != 1, n_gpu=n_gpu)
        self.weight_layout = layout.description
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu
        mparams.use_extra_bufts = layout.extra_buffers
        if layout.overrides is not None:
            mparams.tensor_buft_overrides = ctypes.cast(layout.overrides, ctypes.c_void_p)
        self._model = llama_cpp.llama_model_load_from_file(os.fsencode(self.model_path), mparams)
        if not self._model:
            raise EngineError(f"model {self.model_path}: llama.cpp could not load it: {LLAMA_LOG.first_error()}")

        # Sized after the weights are in place: on a GPU, the memory left is what counts.
        per_caption = opts.n_ctx * kv_bytes_per_token(model_info)
        self.slots = opts.parallel if opts.parallel != "auto" else \
            backend.auto_parallel(on_gpu=self.on_gpu, threads=self.threads, bytes_per_caption=per_caption)
        self._make_context(opts)

        mp = mtmd.mtmd_context_params_default()
        mp.use_gpu = self.on_gpu
        mp.n_threads = self.threads
        mp.print_timings = False
        mp.warmup = opts.warmup
        mp.flash_attn_type = backend.FLASH_ATTN[opts.flash_attn]
        mp.image_min_tokens = opts.image_min_tokens or -1
        mp.image_max_tokens = opts.image_max_tokens or -1
        self._mctx = mtmd.mtmd_init_from_file(os.fsencode(self.mmproj_path), self._model, mp)
        if not self._mctx:
            raise EngineError(f"projector {self.mmproj_path}: llama.cpp could not load it: {LLAMA_LOG.first_error()}")
        if not mtmd.mtmd_support_vision(self._mctx):
            raise ModelFileError(f"projector {self.mmproj_path}: has no vision encoder; use the model's image mmproj")

        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self._piece_buf = ctypes.create_string_buffer(256)
        self.chat_format = self._chat_format()

    def _make_context(self, opts: EngineOptions) -> None:
        """A context with room for `slots` captions of n_ctx tokens each."""
        n_seq = self.slots
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = opts.n_ctx * n_seq
        cparams.n_seq_max = n_seq
        # One KV pool for all captions in flight, as llama-server's parallel slots use. With a
        # stream per sequence, llama.cpp computes a step in one pass only for runs of
        # consecutive sequence ids, so refilled slots (3, 2, 1, 0) would cost a pass each.
        cparams.kv_unified = n_seq > 1
        cparams.n_batch = self._n_batch = min(_N_BATCH, opts.n_ctx)
        cparams.n_ubatch = min(_N_UBATCH, opts.n_ctx)
        cparams.n_threads = cparams.n_threads_batch = self.threads
        cparams.flash_attn_type = backend.FLASH_ATTN[opts.flash_attn]
        self._ctx = llama_cpp.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            raise EngineError(
                f"model {self.model_path}: could not create a llama.cpp context of {n_seq} x {opts.n_ctx} tokens "
                f"(out of memory? lower parallel or n_ctx): {LLAMA_LOG.first_error()}"
            )
        self._batch = llama_cpp.llama_batch_init(n_seq, 0, 1)
        self.n_ctx = llama_cpp.llama_n_ctx(self._ctx) // n_seq

    def _chat_format(self) -> str:
        """One user turn and the assistant's opening in the model's own chat format: its GGUF's
        chat template as llama.cpp renders it (no system turn), with CONTENT for the prompt. A
        template llama.cpp does not know leaves every conversation to ChatML."""
        self._template: bytes | None = llama_cpp.llama_model_chat_template(self._model, None) or None
        if self._template:
            rendered = _apply_template(self._template, [("user", CONTENT)])
            if rendered is not None and rendered.count(CONTENT) == 1:
                return rendered
            log.warning("%s: llama.cpp does not know this model's chat template; using ChatML", self.model_path.name)
            self._template = None
        return CHATML

    def _render(self, turns: list[Turn]) -> str | None:
        return chatml(turns) if self._template is None else _apply_template(self._template, turns)

    # -- one sequence ---------------------------------------------------------------------

    def prompt(self, seq: int, rgb: Image.Image, text: str, name: str,
               cancelled: Callable[[], bool] = lambda: False) -> Prompted:
        """Evaluate a caption's prompt, one user turn of the image and `text`, into sequence `seq`."""
        return self.prompt_chat(seq, caption_conversation(rgb, text), name, cancelled)

    def prompt_chat(self, seq: int, messages: tuple[ChatMessage, ...], name: str,
                    cancelled: Callable[[], bool] = lambda: False) -> Prompted:
        """Evaluate a conversation (its images prepared) and the assistant's opening into sequence
        `seq` (which must be empty).

        Raises Cancelled between the prompt's pieces (text, image encoding, image tokens) once
        `cancelled()` is true, so that a cancel or close need not wait for a large image.
        """
        self._check_open(name)
        chunks = self._tokenize(messages, name)
        try:
            return self._eval_chunks(chunks, name, seq, cancelled)
        finally:
            mtmd.mtmd_input_chunks_free(chunks)

    def chunk_tokens(self, messages: tuple[ChatMessage, ...]) -> list[list[int] | int]:
        """What prompt_chat would evaluate, chunk by chunk: a text chunk's token ids, an image's token
        count (for checks of the prompt's layout)."""
        chunks = self._tokenize(messages, "the conversation")
        try:
            layout: list[list[int] | int] = []
            for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    layout.append(_text_ids(chunk))
                else:
                    layout.append(mtmd.mtmd_input_chunk_get_n_tokens(chunk))
            return layout
        finally:
            mtmd.mtmd_input_chunks_free(chunks)

    def _tokenize(self, messages: tuple[ChatMessage, ...], name: str) -> Any:
        """The conversation in the chat template, as mtmd chunks: the template's text with its control
        tokens, each message's text as plain text (typed control tokens and media markers stay text),
        each image where it stands (mtmd adds the projector's image delimiters)."""
        pieces = render_chat(messages, self._render)
        if pieces is None:
            raise EngineError(f"{name}: this model's chat template cannot render the conversation "
                              f"({', '.join(m.role for m in messages)}); send it as user turns only")
        parts = (ctypes.POINTER(mtmd.mtmd_input_part) * len(pieces))()
        alive: list[Any] = []  # what the parts point to, until mtmd has read it
        bitmaps: list[Any] = []
        try:
            for i, piece in enumerate(pieces):
                part = mtmd.mtmd_input_part()
                if piece.image is not None:
                    part.bitmap = self._bitmap(piece.image, name)
                    bitmaps.append(part.bitmap)
                else:
                    data = piece.text.encode(errors="replace")  # a lone surrogate from JSON is not UTF-8
                    text = mtmd.mtmd_input_text(data, len(data), True, piece.kind == "template")
                    part.text = ctypes.pointer(text)
                    alive += [data, text]
                alive.append(part)
                parts[i] = ctypes.pointer(part)
            chunks = mtmd.mtmd_input_chunks_init()
            ret = mtmd.mtmd_tokenize_from_parts(self._mctx, chunks, parts, len(pieces), True)
        finally:
            for bitmap in bitmaps:
                mtmd.mtmd_bitmap_free(bitmap)
        if ret != 0:
            mtmd.mtmd_input_chunks_free(chunks)
            raise EngineError(f"{name}: could not prepare the prompt for the model: {LLAMA_LOG.first_error()}")
        return chunks

    def _bitmap(self, rgb: Image.Image, name: str) -> Any:
        data = rgb.tobytes()
        bitmap = mtmd.mtmd_bitmap_init(rgb.width, rgb.height, (ctypes.c_uint8 * len(data)).from_buffer_copy(data))
        if not bitmap:
            raise EngineError(f"{name}: llama.cpp could not take the image: {LLAMA_LOG.first_error()}")
        return bitmap

    def _eval_chunks(self, chunks: Any, name: str, seq: int, cancelled: Callable[[], bool]) -> Prompted:
        n_chunks = mtmd.mtmd_input_chunks_size(chunks)
        total = mtmd.mtmd_helper_get_n_tokens(chunks)
        if total + 1 > self.n_ctx:  # and one more for the answer's first token
            raise PromptTooLongError(
                f"{name}: the prompt needs {total} tokens but the context holds {self.n_ctx}; "
                "shorten the conversation, lower the image-token cap or raise the context size",
                needed=total, context=self.n_ctx)
        n_past, image_tokens, encode_s = 0, 0, 0.0
        text_tokens: list[int] = []
        new_past = llama_cpp.llama_pos(0)
        for i in range(n_chunks):
            if cancelled():
                raise Cancelled.of(name)
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            new_past.value = n_past
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                image_tokens += mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                t0 = time.perf_counter()
                if mtmd.mtmd_encode_chunk(self._mctx, chunk) != 0:
                    raise EngineError(f"{name}: the vision encoder failed: {LLAMA_LOG.first_error()}")
                encode_s += time.perf_counter() - t0
                if cancelled():  # the encoder and the image's tokens are the two slow parts
                    raise Cancelled.of(name)
                embd = mtmd.mtmd_get_output_embd(self._mctx)
                ret = mtmd.mtmd_helper_decode_image_chunk(self._mctx, self._ctx, chunk, embd, n_past, seq,
                                                          self._n_batch, ctypes.byref(new_past), _NO_CALLBACK, None)
            else:
                text_tokens += _text_ids(chunk)
                ret = mtmd.mtmd_helper_eval_chunk_single(self._mctx, self._ctx, chunk, n_past, seq, self._n_batch,
                                                         i == n_chunks - 1, ctypes.byref(new_past))
            if ret != 0:
                raise EngineError(f"{name}: llama.cpp failed to evaluate the prompt: {LLAMA_LOG.first_error()}")
            n_past = new_past.value
        return Prompted(n_past, image_tokens, total, encode_s, tuple(text_tokens))

    def forget(self, seq: int) -> None:
        """Drop a sequence's tokens from the KV cache, so that another caption can use it."""
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self._ctx), seq, -1, -1)

    # -- sampling and decoding ------------------------------------------------------------

    def sampler(self, opts: GenerationOptions, prompt: Sequence[int] = ()) -> Any:
        """A sampler chain for one caption, its repeat penalty already fed the `prompt`'s text tokens (as
        llama-server, vLLM and Transformers count the prompt as repeats too); free it with free_sampler."""
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())

        def add(sampler: Any) -> None:
            llama_cpp.llama_sampler_chain_add(chain, sampler)

        if opts.repeat_penalty != 1.0:
            penalties = llama_cpp.llama_sampler_init_penalties(self.n_vocab, _REPEAT_LAST_N, opts.repeat_penalty, 0.0, 0.0)
            # llama-server accepts every text token of the prompt in order before it samples; the window
            # keeps only the last _REPEAT_LAST_N, so those alone leave it in the same state.
            for token in prompt[-_REPEAT_LAST_N:]:
                llama_cpp.llama_sampler_accept(penalties, token)
            add(penalties)
        if opts.temperature <= 0:
            add(llama_cpp.llama_sampler_init_greedy())
        else:
            add(llama_cpp.llama_sampler_init_top_p(opts.top_p, 1))
            add(llama_cpp.llama_sampler_init_temp(opts.temperature))
            seed = llama_cpp.LLAMA_DEFAULT_SEED if opts.seed is None else opts.seed & 0xFFFFFFFF
            add(llama_cpp.llama_sampler_init_dist(seed))
        return chain

    @staticmethod
    def free_sampler(sampler: Any) -> None:
        llama_cpp.llama_sampler_free(sampler)

    def sample(self, sampler: Any, index: int) -> int:
        """Sample from the logits of batch row `index` (-1: the last row evaluated)."""
        return int(llama_cpp.llama_sampler_sample(sampler, self._ctx, index))

    def logits(self, index: int) -> np.ndarray:
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._ctx, index), (self.n_vocab,)).copy()

    def decode(self, tokens: list[tuple[int, int, int]]) -> None:
        """One decode step: each (token, position, sequence) in a row of its own, all with logits."""
        batch = self._batch
        if batch is None:
            self._check_open(f"{len(tokens)} caption(s)")
        for i, (token, pos, seq) in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, 1
        batch.n_tokens = len(tokens)
        if llama_cpp.llama_decode(self._ctx, batch) != 0:
            raise EngineError(f"llama.cpp failed while generating {len(tokens)} caption(s): {LLAMA_LOG.first_error()}")

    def is_end(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def token_bytes(self, token: int) -> bytes:
        buf = self._piece_buf
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        if n < 0:  # a piece longer than the buffer: -n is the size it needs
            buf = self._piece_buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        return buf.raw[: max(n, 0)]

    # -- lifetime -------------------------------------------------------------------------

    def _check_open(self, name: str) -> None:
        if self._ctx is None:  # a last guard: the scheduler never gets here once it has freed the session
            raise EngineError(f"{name}: the model {self.model_path.name} is closed; create a new Captioner")

    def close(self) -> None:
        """Free every handle, once; a second caller waits for the first to finish. The caller
        makes sure nothing decodes meanwhile (the scheduler frees it as its loop stops)."""
        with self._close_lock:
            batch, mctx, ctx, model = self._batch, self._mctx, self._ctx, self._model
            self._batch = self._mctx = self._ctx = self._model = None
            if batch is not None:
                llama_cpp.llama_batch_free(batch)
            if mctx:
                mtmd.mtmd_free(mctx)
            if ctx:
                llama_cpp.llama_free(ctx)
            if model:
                llama_cpp.llama_model_free(model)


def _text_ids(chunk: Any) -> list[int]:
    """A text chunk's token ids."""
    n = ctypes.c_size_t(0)
    ids = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
    return [ids[j] for j in range(n.value)]


def _apply_template(template: bytes, turns: list[Turn]) -> str | None:
    """Turns and the assistant's opening in a chat template, as llama.cpp renders it (its built-in
    templates, recognised from the GGUF's); None for a template it does not know."""
    encoded = [(role.encode(), content.encode()) for role, content in turns]  # alive while llama.cpp reads them
    messages = (llama_cpp.llama_chat_message * len(turns))(*(llama_cpp.llama_chat_message(r, c) for r, c in encoded))
    size = 1024 + 2 * sum(len(r) + len(c) for r, c in encoded)
    for _ in range(2):  # a second time with the size llama.cpp asked for
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_chat_apply_template(template, messages, len(turns), True, buf, size)
        if n < 0:
            return None
        if n <= size:
            return buf.raw[:n].decode(errors="replace")
        size = n
    return None
