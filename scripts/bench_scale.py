#!/usr/bin/env python3
"""What planning a CapRL-2M-sized batch costs: reading a list of millions of lines and resuming from a big output.

Makes, in a temporary folder, lists of SIZES lines (JSONL with CapRL-2M-like fields, and plain
paths) and JSONL outputs of OUTPUTS records for the first images of the biggest list; then, each
in a fresh subprocess, runs the planning stage of `caprl-local caption --shard 1/1000` (the list
read into this shard's items, then `plan_batch` opening the output to find what is left), loading
no model. Each line reports the wall time of the whole subprocess, the time of each stage, and the
subprocess's peak RSS. The images need not exist: planning never opens them.

    python scripts/bench_scale.py                                  # 100k, 1M, 2M lines; 100k, 1M records
    python scripts/bench_scale.py --sizes 100k --outputs 100k --code /tmp/older-checkout
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "Please describe this image in detail"
CAPTION = ("The image shows a wide street at dusk, lined with low brick buildings whose ground floors hold small "
           "shops with lit windows. ") * 8  # about 1 KB, as CapRL's captions are

CHILD = r"""
import io, json, os, resource, sys, time
start = time.perf_counter()
code, list_file, output, index, count = sys.argv[1:6]
sys.path.insert(0, code)
from caprl_local import inputs
from caprl_local.batch import OutputOptions, plan_batch
from caprl_local.options import GenerationOptions
imported = time.perf_counter()
shard = (int(index), int(count))
if list_file == "-":
    items = []
else:
    try:
        items = inputs.collect_inputs([], list_file=list_file, shard=shard)
    except TypeError:  # a version that reads the whole list, then splits it
        items = inputs.shard_of(inputs.collect_inputs([], list_file=list_file), *shard)
listed = time.perf_counter()
before = os.stat(output).st_ino if output != "-" and os.path.exists(output) else None
plan = plan_batch(items, outputs=OutputOptions(format="jsonl", path=None if output == "-" else output),
                  stream=io.StringIO(), generation=GenerationOptions(prompt=sys.argv[6]))
planned = time.perf_counter()
rewritten = before is not None and os.stat(output).st_ino != before
plan.close()
print(json.dumps({"items": len(items), "todo": len(plan.todo), "import_s": imported - start,
                  "inputs_s": listed - imported, "plan_s": planned - listed, "rewritten": rewritten,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def count(text: str) -> int:
    """100k, 1M, 2m, 5000 -> the number."""
    text = text.strip().lower()
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1:], 1)
    return int(float(text.rstrip("km")) * scale)


def entry(i: int) -> str:
    return f"images/{i // 10_000:04d}/{i:08d}.jpg"


def make_lists(folder: Path, sizes: list[int]) -> dict[str, Path]:
    """A JSONL list and a plain list of each size (the smaller ones are prefixes of the biggest)."""
    made: dict[str, Path] = {}
    for size in sizes:
        jsonl, plain = folder / f"list-{size}.jsonl", folder / f"list-{size}.txt"
        with open(jsonl, "w") as js, open(plain, "w") as pl:
            for i in range(size):
                js.write(json.dumps({
                    "id": f"caprl2m-{i:08d}", "image": entry(i), "source": ("laion", "coyo", "datacomp")[i % 3],
                    "url": f"http://127.0.0.1:9/images/{i % 977:03d}/{i:08d}-{i * 7919 % 100_000:05d}.jpg",
                    "width": 512 + i % 1024, "height": 384 + i % 768,
                    "sha256": f"{i * 2654435761 % (1 << 64):016x}" * 4, "license": "cc-by-4.0",
                }) + "\n")
                pl.write(entry(i) + "\n")
        made[f"jsonl-{size}"], made[f"plain-{size}"] = jsonl, plain
    return made


def make_output(folder: Path, records: int) -> Path:
    """A JSONL output of `records` results for the first images of the lists (one in 1,000 a failure)."""
    out = folder / f"out-{records}.jsonl"
    with open(out, "w") as fh:
        for i in range(records):
            record: dict[str, object] = {"id": f"caprl2m-{i:08d}", "image": entry(i), "path": str(folder / entry(i))}
            if i % 1000 == 999:
                record.update(error=f"{entry(i)}: the image is truncated; re-export or re-download it",
                              error_kind="ImageError", model="CapRL-3B", quant="Q4_K_M", prompt=PROMPT)
            else:
                record.update(caption=CAPTION, model="CapRL-3B", quant="Q4_K_M", prompt=PROMPT, image_tokens=256,
                              prompt_tokens=281, generated_tokens=243, finish_reason="stop",
                              timings={"image_encode_s": 1.2345, "prompt_s": 0.4321, "generation_s": 9.8765,
                                       "total_s": 11.5431})
            fh.write(json.dumps(record) + "\n")
    return out


def measure(code: Path, list_file: str, output: str, shard: tuple[int, int]) -> dict[str, object]:
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-P", "-c", CHILD, str(code), list_file, output, *map(str, shard), PROMPT],
                          capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"the planning run failed: {done.stderr.strip().splitlines()[-1:]}")
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = wall
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100k,1m,2m", help="lines of the lists (comma-separated)")
    parser.add_argument("--outputs", default="100k,1m", help="records of the JSONL outputs to resume from")
    parser.add_argument("--shard", default="1/1000", help="the shard planned, I/N")
    parser.add_argument("--code", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="the checkout whose caprl_local is measured [default: this one]")
    parser.add_argument("--dir", type=Path, help="where to make the files [default: a temporary folder, removed]")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    sizes = sorted(count(s) for s in args.sizes.split(",") if s.strip())
    outputs = sorted(count(s) for s in args.outputs.split(",") if s.strip())
    index, _, parts = args.shard.partition("/")
    shard = (int(index), int(parts))
    folder = Path(tempfile.mkdtemp(prefix="caprl-bench-scale-", dir=args.dir))
    rows: list[dict[str, object]] = []
    try:
        t0 = time.perf_counter()
        lists = make_lists(folder, sizes)
        made = {records: make_output(folder, records) for records in outputs}
        print(f"made the files in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        runs: list[tuple[str, str, str]] = [("imports only", "-", "-")]
        for size in sizes:
            runs += [(f"plain list, {size:,} lines", str(lists[f"plain-{size}"]), "-"),
                     (f"JSONL list, {size:,} lines", str(lists[f"jsonl-{size}"]), "-")]
        for records, out in made.items():
            size = next((s for s in sizes if s >= records), sizes[-1])
            runs.append((f"JSONL list, {size:,} lines + output of {records:,} records", str(lists[f"jsonl-{size}"]),
                         str(out)))
        for name, list_file, output in runs:
            row = {"run": name, **measure(args.code, list_file, output, shard)}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"\n`--shard {args.shard}`, {platform.python_implementation()} {platform.python_version()}, "
          f"{os.cpu_count()} CPUs\n")
    print("| run | items kept | wall s | list s | plan s | peak RSS MB | output rewritten |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['items']:,} | {r['wall_s']} | {r['inputs_s']} | {r['plan_s']} | {r['peak_rss_mb']:.0f} "
              f"| {'yes' if r['rewritten'] else 'no'} |")
    if args.json:
        args.json.write_text(json.dumps({"shard": args.shard, "python": platform.python_version(), "runs": rows},
                                        indent=1) + "\n")


if __name__ == "__main__":
    main()
