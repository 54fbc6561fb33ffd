#!/usr/bin/env python3
"""kill -9 at random moments: a batch killed N times, then run to the end, must hold exactly one
result per image, in the JSONL output and in sidecars, with no temporary files left.

    python scripts/kill_batch.py --model M.gguf --mmproj P.gguf --images 40 --kills 8 --seed 1
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--mmproj", type=Path, required=True)
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--kills", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    sys.path.insert(0, str(HERE))
    from make_test_images import write_all

    with tempfile.TemporaryDirectory() as tmp:
        source = write_all(Path(tmp) / "src")
        folder = Path(tmp) / "photos"
        folder.mkdir()
        good = ["photo.jpg", "alpha.png", "cmyk.jpg", "palette.png", "rotated.jpg"]
        for i in range(args.images):
            shutil.copy(source / good[i % len(good)], folder / f"img{i:03d}{Path(good[i % len(good)]).suffix}")
        out = Path(tmp) / "captions.jsonl"
        cmd = [sys.executable, "-m", "caprl_local", "caption", str(folder), "--model", str(args.model),
               "--mmproj", str(args.mmproj), "--threads", "1", "--max-tokens", str(args.max_tokens), "--no-loop-guard",
               "--format", "jsonl", "-o", str(out), "--sidecar", "--quiet"]
        lines_after_kill = []
        for _ in range(args.kills):
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(rng.uniform(0.3, 3.0))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            lines_after_kill.append(len(out.read_text().splitlines()) if out.exists() else 0)
        final = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        records = [json.loads(line) for line in out.read_text().splitlines()]
        paths = Counter(r["path"] for r in records)
        sidecars = sorted(p.name for p in folder.glob("*.txt"))
        report = {
            "images": args.images, "kills": args.kills, "lines_after_each_kill": lines_after_kill,
            "final_exit": final.returncode, "records": len(records), "unique_images": len(paths),
            "duplicated": sum(1 for n in paths.values() if n > 1), "captions": sum("caption" in r for r in records),
            "sidecars": len(sidecars), "temporary_files_left": len(list(folder.glob(".*.tmp"))),
            "tracebacks": final.stderr.count("Traceback"),
        }
        print(json.dumps(report))


if __name__ == "__main__":
    main()
