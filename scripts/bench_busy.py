#!/usr/bin/env python3
"""Threads on a busy machine: one batch, timed with each --threads setting, while 0..N other
processes keep cores busy (each a Python loop burning one core).

llama.cpp's threads meet at a barrier after every operation and spin while they wait, so one
thread that has to share its core with another program stalls the rest. This measures how the
default (physical cores less the busy ones, measured when the model loads) compares with fixed
counts. Each time is a whole run: start, load, caption, exit.

    python scripts/bench_busy.py --model M.gguf --mmproj P.gguf --images DIR --out docs/bench-busy.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import time
from pathlib import Path


def burn() -> None:
    while True:
        pass


def timed(args: argparse.Namespace, threads: str) -> float:
    cmd = [sys.executable, "-m", "caprl_local", "caption", str(args.images), "--model", str(args.model),
           "--mmproj", str(args.mmproj), "--max-tokens", str(args.max_tokens), "--quiet",
           "--max-image-tokens", str(args.max_image_tokens)]
    if threads != "default":
        cmd += ["--threads", threads]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--mmproj", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True, help="a folder of images (one batch)")
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--max-image-tokens", type=int, default=1024)
    parser.add_argument("--busy", default="0,1,2", help="how many cores other programs keep busy, per row")
    parser.add_argument("--threads", default="default,1,2", help="--threads settings to compare")
    parser.add_argument("--settle", type=float, default=20.0,
                        help="seconds between starting the busy processes and timing (65 where the default "
                             "threads come from the 1-minute load average: macOS)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    timed(args, "1")  # warm-up: the first load's check in a child process, the page cache
    rows = []
    for busy in map(int, args.busy.split(",")):
        burners = [multiprocessing.Process(target=burn, daemon=True) for _ in range(busy)]
        for b in burners:
            b.start()
        try:
            time.sleep(args.settle)  # idle too: the previous row's processes are gone
            row = {"busy_cores": busy, "load_avg": round(os.getloadavg()[0], 2),
                   "seconds": {t: round(timed(args, t), 2) for t in args.threads.split(",")}}
        finally:
            for b in burners:
                b.terminate()
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "images": len(list(args.images.iterdir())),
              "max_tokens": args.max_tokens, "max_image_tokens": args.max_image_tokens, "model": args.model.name,
              "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
