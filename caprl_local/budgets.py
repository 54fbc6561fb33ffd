"""How an image is sized for a projector within the image-token cap, the way llama.cpp's preprocessors would.

Each budget's ``prepare`` loads an image (through :mod:`caprl_local.images`) and resizes it to
the exact size llama.cpp would pick, so that the work can run ahead in another thread and
llama.cpp has nothing left to resize. Which budget a model gets is its family's choice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .images import BACKGROUND, ImageInput, load_image


def fit_to_budget(size: tuple[int, int], *, align: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The size llama.cpp's Qwen-VL preprocessor gives an image ("smart resize"): sides in
    multiples of `align`, area within [min_pixels, max_pixels], aspect ratio kept."""
    w, h = size
    w_bar, h_bar = max(align, round(w / align) * align), max(align, round(h / align) * align)
    if w_bar * h_bar > max_pixels:
        beta = (w * h / max_pixels) ** 0.5
        w_bar = max(align, int(w / beta / align) * align)
        h_bar = max(align, int(h / beta / align) * align)
    elif w_bar * h_bar < min_pixels:
        beta = (min_pixels / (w * h)) ** 0.5
        w_bar = -(-w * beta // align) * align
        h_bar = -(-h * beta // align) * align
    return int(w_bar), int(h_bar)


@dataclass(frozen=True)
class ImageBudget:
    """How llama.cpp's Qwen-VL preprocessor sizes an image for a projector and a token cap:
    sides in multiples of `align` pixels (patch x merge), area between the token limits.

    :meth:`prepare` does that work here instead, where it can run ahead in another thread,
    leaving llama.cpp nothing to resize.
    """

    align: int
    min_pixels: int
    max_pixels: int
    max_aspect: float  # a strip more than one token high per this many tokens wide gets padded

    #: llama.cpp's own limits on image tokens for Qwen-VL projectors.
    LLAMA_MAX_TOKENS = 4096
    LLAMA_MIN_TOKENS = 8

    @classmethod
    def for_tokens(cls, *, align: int, min_tokens: int | None, max_tokens: int | None) -> ImageBudget:
        most = max_tokens or cls.LLAMA_MAX_TOKENS
        least = min(min_tokens or cls.LLAMA_MIN_TOKENS, most)
        return cls(align, least * align**2, most * align**2, 0.95 * most)

    def prepare(self, image: ImageInput) -> Image.Image:
        """Load an image and fit it to the budget the way llama.cpp would: pad strips too thin
        for the cap (llama.cpp never shrinks a side below one token), then downscale to the
        exact size llama.cpp's preprocessor picks."""
        rgb = pad_to_aspect(load_image(image, draft_pixels=self.max_pixels), self.max_aspect)
        size = fit_to_budget(rgb.size, align=self.align, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        if size[0] * size[1] < rgb.width * rgb.height:
            rgb = rgb.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
        return rgb


@dataclass(frozen=True)
class TiledBudget:
    """How llama.cpp's InternVL preprocessor spends tokens: the image cut into a grid of `tile`-pixel
    tiles plus an overview, `per_tile` tokens each. :meth:`prepare` picks the grid InternVL would
    (the closest aspect ratio) among those the token cap allows, and resizes the image to it
    exactly, so that llama.cpp's tiling lands on that grid: a 12-megapixel photo or a 6000x40
    strip costs no more than the cap."""

    tile: int
    per_tile: int
    max_tiles: int

    @classmethod
    def for_tokens(cls, *, tile: int, per_tile: int, max_tokens: int | None, most_tiles: int = 12) -> TiledBudget:
        cap = max_tokens or per_tile * (most_tiles + 1)
        return cls(tile, per_tile, max(1, min(most_tiles, cap // per_tile - 1)))  # one tile's worth for the overview

    def grid(self, width: int, height: int) -> tuple[int, int]:
        """Tiles across and down: InternVL's choice (closest aspect ratio; on a tie, the larger grid if
        the image has the pixels for it)."""
        ratio, area = width / height, width * height
        grids = sorted(((i, j) for i in range(1, self.max_tiles + 1) for j in range(1, self.max_tiles // i + 1)),
                       key=lambda g: (g[0] * g[1], g))
        best, best_diff = (1, 1), float("inf")
        for i, j in grids:
            diff = abs(ratio - i / j)
            if diff < best_diff or (diff == best_diff and area > 0.5 * self.tile**2 * i * j):
                best, best_diff = (i, j), diff
        return best

    def prepare(self, image: ImageInput) -> Image.Image:
        rgb = load_image(image, draft_pixels=self.max_tiles * self.tile**2)
        across, down = self.grid(*rgb.size)
        size = (across * self.tile, down * self.tile)
        return rgb if rgb.size == size else rgb.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def pad_to_aspect(img: Image.Image, max_ratio: float) -> Image.Image:
    """Pad the short side with white so that the long side is at most max_ratio times it.

    llama.cpp never shrinks an image side below one token, so a strip thinner than the
    token budget allows would get more image tokens than asked for; padding keeps the cap.
    """
    w, h = img.size
    if max(w, h) <= max_ratio * min(w, h):
        return img
    side = int(np.ceil(max(w, h) / max_ratio))
    size = (w, side) if w >= h else (side, h)
    canvas = Image.new("RGB", size, BACKGROUND)
    canvas.paste(img, ((size[0] - w) // 2, (size[1] - h) // 2))
    return canvas
