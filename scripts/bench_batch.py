#!/usr/bin/env python3
"""Measure what overlapping image decoding with generation gains in a batch.

Writes N synthetic photos (JPEG, default 4000x3000 = 12 MP, like a phone camera), then
captions them with Captioner.caption_many twice: prefetch off (each image read, decoded and
resized just before its turn) and on (the next images prepared in a background thread).

    python scripts/bench_batch.py --model M.gguf --mmproj P.gguf [--images 12] [--max-tokens 32]
    python scripts/bench_batch.py --tiny            # the tiny test model, built on the fly
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))


def write_photos(folder: Path, n: int, size: tuple[int, int]) -> list[Path]:
    from make_test_images import scene

    base = scene(size[0] // 4, size[1] // 4, 0)
    paths = []
    for i in range(n):
        rng = np.random.default_rng(i)
        img = Image.fromarray(np.roll(base, i * 37, axis=1)).resize(size, Image.Resampling.BILINEAR)
        noisy = np.asarray(img).astype(np.int16) + rng.integers(-12, 12, (size[1], size[0], 3))
        path = folder / f"photo{i:03d}.jpg"
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def run(model: Path, mmproj: Path, photos: list[Path], *, max_tokens: int, threads: int | None) -> dict[str, float]:
    from caprl_local import Captioner

    out = {}
    with Captioner(model, mmproj, threads=threads) as cap:
        cap.caption(photos[0], max_tokens=2)  # warm the caches once
        for prefetch in (0, 2):
            t0 = time.perf_counter()
            results = list(cap.caption_many(photos, prefetch=prefetch, max_tokens=max_tokens, repeat_penalty=1.0))
            seconds = time.perf_counter() - t0
            assert all(hasattr(r, "text") for r in results), results
            out[f"prefetch_{prefetch}_s"] = seconds
            out[f"prefetch_{prefetch}_images_per_min"] = 60 * len(photos) / seconds
            out[f"prefetch_{prefetch}_load_s_per_image"] = sum(r.timings.image_load_s for r in results) / len(photos)
    out["gain"] = out["prefetch_0_s"] / out["prefetch_2_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--mmproj", type=Path)
    parser.add_argument("--tiny", action="store_true", help="use the tiny random-weight test model")
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--size", default="4000x3000")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            from make_tiny_model import write_tiny_pair

            args.model, args.mmproj = write_tiny_pair(Path(tmp) / "model")
        elif not (args.model and args.mmproj):
            parser.error("give --model and --mmproj, or --tiny")
        photos = write_photos(Path(tmp), args.images, size)  # type: ignore[arg-type]
        result = run(args.model, args.mmproj, photos, max_tokens=args.max_tokens, threads=args.threads)
    print(json.dumps({"images": args.images, "size": args.size, "max_tokens": args.max_tokens, **result}, indent=2))


if __name__ == "__main__":
    main()
