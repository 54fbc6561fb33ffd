#!/usr/bin/env python3
"""What going through Ray costs: one batch captioned by a local run and by `--ray` on this machine.

Both are whole `caprl-local caption` runs (start, load, caption, exit) over the same folder of
distinct photo-like images, timed from start to exit; the local run uses THREADS threads, the
Ray run ACTORS actors of THREADS/ACTORS threads each (one loaded model per actor).

    python scripts/bench_ray.py --model M.gguf --mmproj P.gguf --images 8 --threads 2 --actors 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def run(args: argparse.Namespace, folder: Path, out: Path, extra: list[str]) -> dict[str, float]:
    cmd = [sys.executable, "-m", "caprl_local", "caption", str(folder), "-m", str(args.model), "--mmproj",
           str(args.mmproj), "-n", str(args.new_tokens), "--max-image-tokens", str(args.cap), "--format", "jsonl",
           "-o", str(out), "--quiet", *extra]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    tokens = sum(json.loads(line).get("generated_tokens", 0) for line in out.read_text().splitlines())
    return {"wall_s": round(wall, 2), "images_per_min": round(60 * args.images / wall, 2), "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--mmproj", type=Path, required=True)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--cap", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args()
    from make_test_images import scene

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        for i in range(args.images):
            Image.fromarray(scene(448, 448, seed=i)).save(folder / f"{i:03d}.jpg", quality=90)
        rows = {
            "local": run(args, folder, Path(tmp) / "local.jsonl", ["--threads", str(args.threads)]),
            "ray": run(args, folder, Path(tmp) / "ray.jsonl",
                       ["--ray", "--ray-actors", str(args.actors), "--ray-cpus-per-actor",
                        str(args.threads // args.actors)]),
        }
    report = {"model": args.model.name, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "images": args.images, "threads": args.threads, "actors": args.actors, "cap": args.cap,
              "new_tokens": args.new_tokens, "rows": rows}
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
