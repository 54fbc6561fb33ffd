"""A rendered conversation as llama.cpp's mtmd chunks: its text, its images and its videos' frames.

A video goes in as llama.cpp's own video helper gives it (mtmd-helper.cpp): each frame a bitmap, the
frames of one group marked mergeable, so that mtmd_tokenize folds the pair into one image chunk on the
Qwen-VL projectors, which merge two frames in time; the text of the video's form stands between them.

A long prompt is tokenized and evaluated in passes (see :func:`passes`), so that a long video is never
in memory as bitmaps and preprocessed pixels all at once. That gives the same tokens at the same
positions as one pass: mtmd merges only neighbouring bitmaps, and a pass ends only after a whole group;
each text piece is tokenized on its own in any case; and an image's positions (M-RoPE's too) start at
the sequence's position when it is decoded (only HunyuanVL numbers images per call; no family here is
it). Only the first pass may add the BOS token.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

from llama_cpp import mtmd_cpp as mtmd
from PIL import Image

from ..chat import Piece
from ..errors import EngineError
from .backend import LLAMA_LOG

#: The frames a pass of a prompt holds at most (its bitmaps, then its chunks' float pixels, are alive
#: together only while it is tokenized and evaluated).
FRAMES_PER_PASS = 16


def passes(pieces: Sequence[Piece], most_frames: int | None = None) -> list[list[Piece]]:
    """The pieces in runs to tokenize and evaluate one after another: a run ends after the frame group
    that brings it to `most_frames` (FRAMES_PER_PASS) frames. One run for a prompt without video."""
    most = FRAMES_PER_PASS if most_frames is None else most_frames
    runs: list[list[Piece]] = [[]]
    frames = 0
    for piece in pieces:
        if frames >= most:
            runs.append([])
            frames = 0
        runs[-1].append(piece)
        frames += len(piece.frames)
    return runs


def tokenize(mctx: Any, pieces: Sequence[Piece], name: str, *, first: bool = True, placeholder: bool = False) -> Any:
    """The pieces as mtmd chunks (free them with mtmd_input_chunks_free): the template's and a video's
    text with their control tokens, each message's text as plain text (typed control tokens and media
    markers stay text), each image and frame group where it stands (mtmd adds the projector's image
    delimiters). `first`: the prompt's start (BOS where the model wants it). `placeholder`: images with
    no pixels, only to count the tokens."""
    n_parts = sum(len(piece.frames) or 1 for piece in pieces)  # a frame group: a part per frame
    parts = (ctypes.POINTER(mtmd.mtmd_input_part) * max(n_parts, 1))()
    alive: list[Any] = []  # what the parts point to, until mtmd has read it
    bitmaps: list[Any] = []
    try:
        i = 0
        for piece in pieces:
            images = [piece.image] if piece.image is not None else list(piece.frames)
            for rgb in images:
                part = mtmd.mtmd_input_part()
                part.bitmap = bitmap(rgb, name, mergeable=len(images) > 1, placeholder=placeholder)
                bitmaps.append(part.bitmap)
                alive.append(part)
                parts[i], i = ctypes.pointer(part), i + 1
            if not images:
                data = piece.text.encode(errors="replace")  # a lone surrogate from JSON is not UTF-8
                text = mtmd.mtmd_input_text(data, len(data), True, piece.kind != "text")
                part = mtmd.mtmd_input_part()
                part.text = ctypes.pointer(text)
                alive += [data, text, part]
                parts[i], i = ctypes.pointer(part), i + 1
        chunks = mtmd.mtmd_input_chunks_init()
        ret = mtmd.mtmd_tokenize_from_parts(mctx, chunks, parts, n_parts, first)
    finally:
        for each in bitmaps:
            mtmd.mtmd_bitmap_free(each)
    if ret != 0:
        mtmd.mtmd_input_chunks_free(chunks)
        raise EngineError(f"{name}: could not prepare the prompt for the model: {LLAMA_LOG.first_error()}")
    return chunks


def bitmap(rgb: Image.Image, name: str, *, mergeable: bool = False, placeholder: bool = False) -> Any:
    """An RGB image as an mtmd bitmap (free it with mtmd_bitmap_free); `mergeable`: a video frame that
    may fold into its neighbour; `placeholder`: its size alone, to count tokens."""
    if placeholder:
        made = mtmd.mtmd_bitmap_init(rgb.width, rgb.height, None)
    else:
        data = rgb.tobytes()
        if len(data) != rgb.width * rgb.height * 3:  # mtmd reads three bytes a pixel, whatever it is given
            raise EngineError(f"{name}: an image reached the engine in mode {rgb.mode}, not RGB; prepare it first")
        made = mtmd.mtmd_bitmap_init(rgb.width, rgb.height, (ctypes.c_uint8 * len(data)).from_buffer_copy(data))
    if not made:
        raise EngineError(f"{name}: llama.cpp could not take the image: {LLAMA_LOG.first_error()}")
    if mergeable:
        mtmd.mtmd_bitmap_set_mergeable(made, True)
    return made


def count_tokens(mctx: Any, pieces: Sequence[Piece], name: str) -> int:
    """The tokens the pieces take, without their pixels (placeholder bitmaps)."""
    chunks = tokenize(mctx, pieces, name, placeholder=True)
    try:
        return int(mtmd.mtmd_helper_get_n_tokens(chunks))
    finally:
        mtmd.mtmd_input_chunks_free(chunks)


def frames_merged(mctx: Any) -> int:
    """How many video frames this projector folds into one image (2 on Qwen-VL, else 1): whether two
    mergeable frames make as many image chunks as one (placeholders: no pixels, nothing encoded)."""
    frame = Image.new("RGB", (64, 64))
    one, two = ([Piece("frames", frames=(frame,) * n)] for n in (1, 2))
    counts = []
    for pieces in (one, two):
        chunks = tokenize(mctx, pieces, "a test frame", first=False, placeholder=True)
        try:
            counts.append(sum(mtmd.mtmd_input_chunk_get_type(mtmd.mtmd_input_chunks_get(chunks, i))
                              != mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT for i in range(mtmd.mtmd_input_chunks_size(chunks))))
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
    return 2 if counts[0] == counts[1] else 1


def check_groups(pieces: Sequence[Piece], merge: int, name: str, model: str) -> None:
    """Refuse a video laid out for a model that folds more frames into one image than this one does:
    llama.cpp would read the pair as two images, apart from their timestamps."""
    widest = max((len(piece.frames) for piece in pieces), default=0)
    if widest > merge:
        raise EngineError(f"{name}: the video was laid out with {widest} frames to an image, but {model} reads "
                          f"{merge}; lay it out in the model's own video form (caprl_local.families.video_form)")
