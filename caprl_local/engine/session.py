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
from functools import cached_property
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import mtmd_cpp as mtmd
from PIL import Image

from ..chat import ChatMessage, Piece, caption_conversation, render_chat
from ..errors import Cancelled, EngineError, ModelFileError, PromptTooLongError
from ..families import kv_bytes_per_token
from ..ggufmeta import GGUFInfo
from ..options import EngineOptions, GenerationOptions
from ..prompts import CHATML, CONTENT, Turn, chatml
from . import backend, device_sampling, media
from .backend import LLAMA_LOG
from .device_sampling import DeviceSampler
from .sampling import TokenSampler, sample_rows

Sampler = TokenSampler | DeviceSampler

log = logging.getLogger("caprl_local")

_N_BATCH = 2048  # logical batch, as llama-mtmd-cli uses
_N_UBATCH = 512
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
        self.device_sampling = opts.device_sampling
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
        self._pieces: dict[int, bytes] = {}  # each token's text, looked up once
        self._ends: dict[int, bool] = {}
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
        # Every row of a step has one sequence and logits; tokens and positions are written as arrays.
        self._batch_token = np.ctypeslib.as_array(self._batch.token, (n_seq,))
        self._batch_pos = np.ctypeslib.as_array(self._batch.pos, (n_seq,))
        for i in range(n_seq):
            self._batch.n_seq_id[i], self._batch.logits[i] = 1, 1
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
        """Evaluate a conversation (its images prepared, its videos' frames sampled) and the assistant's
        opening into sequence `seq` (which must be empty).

        Raises Cancelled between the prompt's pieces (text, image encoding, image tokens) once
        `cancelled()` is true, so that a cancel or close need not wait for a large image. A long video
        goes in passes of a few frames (see engine.media), the whole prompt's size checked first.
        """
        self._check_open(name)
        pieces = self._laid_out(messages, name)
        # mtmd appends EOS (where a model wants one) to the pass that adds BOS: such a model gets one pass.
        runs = [pieces] if llama_cpp.llama_vocab_get_add_eos(self._vocab) else media.passes(pieces)
        if len(runs) > 1:
            self._check_room(media.count_tokens(self._mctx, pieces, name), name)
        done = Prompted(0, 0, 0, 0.0)
        for i, run in enumerate(runs):
            chunks = media.tokenize(self._mctx, run, name, first=i == 0)
            try:
                if len(runs) == 1:
                    self._check_room(mtmd.mtmd_helper_get_n_tokens(chunks), name)
                done = self._eval_chunks(chunks, name, seq, cancelled, done, last=i == len(runs) - 1)
            finally:
                mtmd.mtmd_input_chunks_free(chunks)
        return done

    def chunk_tokens(self, messages: tuple[ChatMessage, ...]) -> list[list[int] | int]:
        """What prompt_chat would evaluate, chunk by chunk (in one pass): a text chunk's token ids, an
        image's token count (for checks of the prompt's layout)."""
        chunks = media.tokenize(self._mctx, self._laid_out(messages, "the conversation"), "the conversation")
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

    def _laid_out(self, messages: tuple[ChatMessage, ...], name: str) -> list[Piece]:
        """The conversation in the chat template, in pieces (chat.render_chat), its videos' frame groups
        checked against what the projector merges."""
        pieces = render_chat(messages, self._render)
        if pieces is None:
            raise EngineError(f"{name}: this model's chat template cannot render the conversation "
                              f"({', '.join(m.role for m in messages)}); send it as user turns only")
        if any(piece.frames for piece in pieces):
            media.check_groups(pieces, self.frames_merged, name, self.model_path.name)
        return pieces

    @cached_property
    def frames_merged(self) -> int:
        """How many video frames the projector folds into one image (2 on Qwen-VL, else 1)."""
        return media.frames_merged(self._mctx)

    def _check_room(self, total: int, name: str) -> None:
        if total + 1 > self.n_ctx:  # and one more for the answer's first token
            raise PromptTooLongError(
                f"{name}: the prompt needs {total} tokens but the context holds {self.n_ctx}; "
                "shorten the conversation, lower the image-token cap or raise the context size",
                needed=total, context=self.n_ctx)

    def _eval_chunks(self, chunks: Any, name: str, seq: int, cancelled: Callable[[], bool],
                     done: Prompted, *, last: bool) -> Prompted:
        """Evaluate chunks into `seq` after what `done` put there (the prompt's earlier passes); the
        logits of the last text token when this pass is the `last`."""
        n_chunks = mtmd.mtmd_input_chunks_size(chunks)
        n_past, image_tokens, encode_s = done.n_past, done.image_tokens, done.encode_s
        text_tokens = list(done.text_tokens)
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
                                                         last and i == n_chunks - 1, ctypes.byref(new_past))
            if ret != 0:
                raise EngineError(f"{name}: llama.cpp failed to evaluate the prompt: {LLAMA_LOG.first_error()}")
            n_past = new_past.value
        total = done.prompt_tokens + mtmd.mtmd_helper_get_n_tokens(chunks)
        return Prompted(n_past, image_tokens, total, encode_s, tuple(text_tokens))

    def forget(self, seq: int) -> None:
        """Drop a sequence's tokens from the KV cache, so that another caption can use it."""
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self._ctx), seq, -1, -1)

    # -- sampling and decoding ------------------------------------------------------------

    def sampler(self, opts: GenerationOptions, prompt: Sequence[int] = ()) -> TokenSampler:
        """One caption's sampling state, its repeat penalty already fed the `prompt`'s text tokens (as
        llama-server, vLLM and Transformers count the prompt as repeats too)."""
        return TokenSampler(opts, prompt)

    def on_device(self, seq: int, sampler: TokenSampler) -> Sampler:
        """With device sampling, the caption in `seq` sampled in llama.cpp's decode from now on."""
        return (device_sampling.attach(self._ctx, seq, sampler, self.n_vocab) or sampler) if self.device_sampling \
            else sampler

    def release(self, sampler: Sampler) -> None:
        if isinstance(sampler, DeviceSampler):
            device_sampling.detach(self._ctx, sampler)

    def sample(self, samplers: Sequence[Sampler]) -> list[int]:
        """The next token of each caption from the last evaluation's rows of logits, in order: one row
        per sampler (after a prompt, its last token's)."""
        if self.device_sampling:
            return device_sampling.sample_step(self._ctx, samplers, self.logits)
        return sample_rows(self.logits_rows(len(samplers)), samplers)  # type: ignore[arg-type]

    def logits_rows(self, n: int) -> np.ndarray:
        """The last evaluation's `n` rows of logits, in place (n x vocabulary float32; valid until the
        next evaluation)."""
        first = llama_cpp.llama_get_logits_ith(self._ctx, -1 if n == 1 else 0)
        if not first:
            raise EngineError(f"llama.cpp has no logits for {n} caption(s): {LLAMA_LOG.first_error()}")
        if n > 1:  # a decode step's rows: one block when llama.cpp kept the batch's order, else gathered
            last = llama_cpp.llama_get_logits_ith(self._ctx, n - 1)
            step = self.n_vocab * ctypes.sizeof(ctypes.c_float)
            if ctypes.addressof(last.contents) - ctypes.addressof(first.contents) != (n - 1) * step:
                return np.stack([self.logits(i) for i in range(n)])
        return np.ctypeslib.as_array(first, (n, self.n_vocab))

    def logits(self, index: int) -> np.ndarray:
        """A copy of batch row `index`'s logits (-1: the last row evaluated)."""
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._ctx, index), (self.n_vocab,)).copy()

    def decode(self, tokens: Sequence[tuple[int, int, int]]) -> None:
        """One decode step: each (token, position, sequence) in a row of its own, all with logits."""
        batch = self._batch
        if batch is None:
            self._check_open(f"{len(tokens)} caption(s)")
        n = len(tokens)
        rows = np.asarray(tokens, dtype=np.int32).reshape(n, 3)
        self._batch_token[:n], self._batch_pos[:n] = rows[:, 0], rows[:, 1]
        seq_ids = batch.seq_id
        for i, seq in enumerate(rows[:, 2].tolist()):
            seq_ids[i][0] = seq
        batch.n_tokens = n
        if llama_cpp.llama_decode(self._ctx, batch) != 0:
            raise EngineError(f"llama.cpp failed while generating {n} caption(s): {LLAMA_LOG.first_error()}")

    def is_end(self, token: int) -> bool:
        end = self._ends.get(token)
        if end is None:
            end = self._ends[token] = bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))
        return end

    def token_bytes(self, token: int) -> bytes:
        """A token's text, as bytes (a piece may be part of a UTF-8 character)."""
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self._piece(token)
        return piece

    def _piece(self, token: int) -> bytes:
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
