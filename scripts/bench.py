#!/usr/bin/env python3
"""Benchmark caprl-local against llama.cpp's own llama-mtmd-cli on the same files and settings.

For each image size and image-token cap, both tools caption the image in a fresh process,
generating a fixed number of tokens (end-of-turn ignored). Reported per run: process start
to first caption token, model load (first in a process, and again), image encode, prompt
processing (tokens/s), generation (tokens/s), total wall time, peak resident memory. Then a
batch: N images in one caprl-local run against N llama-mtmd-cli runs. Also the machine's
memory bandwidth and the generation-speed ceiling it implies (weight bytes read per token).

    python scripts/bench.py --shape caprl-3b            # builds the shape-true model (once)
    python scripts/bench.py --model M.gguf --mmproj P.gguf --mtmd-cli build/.../llama-mtmd-cli
    python scripts/bench.py --shape tiny --sizes 448 --new-tokens 4   # smoke run (tests)

Writes OUT/bench.json and OUT/bench.md (default OUT: docs/bench-<shape or model>).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
PROMPT = "Please describe this image in detail"
REPACK = "auto"  # caprl-local's --repack (auto: the engine's choice)
THEIRS_REPACK = True  # whether llama-mtmd-cli may use its repacked layouts
LAYOUTS = {"auto": None, "on": True, "off": False}
SIZES = {"448": (448, 448), "896": (896, 896), "1344": (1344, 1344), "12mp": (4000, 3000)}


# --- the measured process (caprl-local side) -----------------------------------------------


def one_run(args: argparse.Namespace) -> None:
    """Inside a fresh process: load, caption each image, print one JSON line per image."""
    started = float(os.environ["BENCH_SPAWNED_AT"])
    from caprl_local import Captioner

    t0 = time.perf_counter()
    width = args.in_flight or args.callers or 1
    cap = Captioner(args.model, args.mmproj, threads=args.threads, image_max_tokens=args.cap,
                    repack=LAYOUTS[args.repack], parallel=width)
    load_s = time.perf_counter() - t0
    if args.in_flight or args.callers:  # throughput: all images, this many in flight
        steps = time_full_steps(width)
        gen = {"max_tokens": args.new_tokens, "ignore_eos": True, "repeat_penalty": 1.0}
        t0 = time.perf_counter()
        if args.callers:  # a desktop app's way: threads each calling caption(), sharing one Captioner
            results = concurrent_calls(cap, args.images, args.callers, gen)
        else:
            results = list(cap.caption_many(args.images, **gen))
        seconds = time.perf_counter() - t0
        label = f"{args.callers} threads calling caption()" if args.callers else args.in_flight
        print(json.dumps({"in_flight": label, "images": len(results), "seconds": seconds,
                          "generated": sum(r.generated_tokens for r in results), "weights": cap.weight_layout,
                          "step_s": statistics.median(steps) if steps else None}),
              flush=True)
        return
    for i, image in enumerate(args.images):
        first: list[float] = []
        caption_start = time.time()
        result = cap.caption(image, max_tokens=args.new_tokens, ignore_eos=True, repeat_penalty=1.0,
                             on_text=lambda piece, first=first: first or first.append(time.time()))
        print(json.dumps({
            "image": image, "load_s": load_s if i == 0 else 0.0,
            # process start -> the image encode begins (model loaded, image read and resized)
            "ready_s": caption_start - started + result.timings.image_load_s,
            "start_to_first_token_s": (first[0] - started) if i == 0 and first else None,
            "image_tokens": result.image_tokens, "prompt_tokens": result.prompt_tokens,
            "new_tokens": result.generated_tokens, "encode_s": result.timings.image_encode_s,
            "prompt_tok_s": result.timings.prompt_tokens_per_s, "gen_tok_s": result.timings.generation_tokens_per_s,
            "caption_s": result.timings.total_s,
        }), flush=True)
    cap.close()
    done_at = time.time()  # the end of the work a llama-mtmd-cli run also does
    t0 = time.perf_counter()
    again = Captioner(args.model, args.mmproj, threads=args.threads, image_max_tokens=args.cap,
                      repack=LAYOUTS[args.repack], parallel=width)
    reload_s = time.perf_counter() - t0
    again.close()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux reports KiB)
    print(json.dumps({"reload_s": reload_s, "peak_rss_mib": rss, "done_at": done_at, "weights": again.weight_layout}),
          flush=True)


def concurrent_calls(cap, images: list[str], callers: int, options: dict) -> list:  # type: ignore[no-untyped-def]
    """`callers` threads, each calling cap.caption() on the next image until none are left."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(callers) as pool:
        return list(pool.map(lambda image: cap.caption(image, **options), images))


def time_full_steps(width: int) -> list[float]:
    """Time every llama_decode that advances `width` captions at once (a full-width step)."""
    import llama_cpp

    decode, seconds = llama_cpp.llama_decode, []

    def timed(ctx, batch):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        ret = decode(ctx, batch)
        if batch.n_tokens == width:
            seconds.append(time.perf_counter() - t0)
        return ret

    llama_cpp.llama_decode = timed  # the engine calls it through the module
    return seconds


def ours(model: Path, mmproj: Path, images: list[Path], *, cap: int, new_tokens: int, threads: int) -> list[dict]:
    cmd = [sys.executable, __file__, "--one", "--model", str(model), "--mmproj", str(mmproj), "--cap", str(cap),
           "--new-tokens", str(new_tokens), "--threads", str(threads), "--repack", REPACK,
           *map(str, images)]
    spawned = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "BENCH_SPAWNED_AT": repr(spawned)},
                          check=False)
    if proc.returncode != 0:
        raise SystemExit(f"caprl-local run failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    tail = rows.pop()
    wall = tail.pop("done_at") - spawned  # spawn to the model freed; the extra reload is not counted
    for row in rows:
        row.update(wall_s=wall, **tail)
    return rows


# --- llama-mtmd-cli side -------------------------------------------------------------------


def theirs(cli: Path, model: Path, mmproj: Path, image: Path, *, cap: int, new_tokens: int, threads: int) -> dict:
    cmd = [str(cli), "-m", str(model), "--mmproj", str(mmproj), "--image", str(image), "-p", PROMPT,
           "-n", str(new_tokens), "--ignore-eos", "--temp", "0", "-t", str(threads), "-c", "4096",
           "--image-max-tokens", str(cap), "--chat-template", "chatml", "--perf", "-lv", "4",
           *([] if THEIRS_REPACK else ["--no-repack"])]
    spawned = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = None
    assert proc.stdout is not None
    while chunk := proc.stdout.read1(4096):  # type: ignore[attr-defined]
        if first is None and chunk.strip():
            first = time.time()
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    _, status, usage = os.wait4(proc.pid, 0)  # this process's own peak memory
    proc.returncode = rc = os.waitstatus_to_exitcode(status)
    wall = time.time() - spawned
    if rc != 0:
        raise SystemExit(f"llama-mtmd-cli failed ({rc}):\n{err[-3000:]}")

    def ms(pattern: str) -> float:
        m = re.search(pattern, err)
        return float(m.group(1)) / 1000 if m else float("nan")

    prompt = re.search(r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens", err)
    gen = re.search(r"\beval time =\s*([\d.]+) ms /\s*(\d+) runs", err)
    encode_s = ms(r"encoding done in (\d+) ms")
    # llama.cpp's "prompt eval time" runs from the first decode of the prompt, so it also spans
    # the image encode that happens between the text chunks: take that out to compare.
    prompt_s = float(prompt.group(1)) / 1000 - encode_s if prompt else float("nan")
    return {
        "image": str(image), "start_to_first_token_s": (first - spawned) if first else None, "wall_s": wall,
        "load_s": ms(r"load time =\s*([\d.]+) ms"), "encode_s": encode_s, "ready_s": _log_time(err, "encoding mtmd batch"),
        "prompt_tok_s": int(prompt.group(2)) / prompt_s if prompt else float("nan"),
        "gen_tok_s": int(gen.group(2)) / (float(gen.group(1)) / 1000) if gen and float(gen.group(1)) else float("nan"),
        "new_tokens": int(gen.group(2)) + 1 if gen else None, "peak_rss_mib": usage.ru_maxrss / 1024,
    }


def _log_time(log: str, message: str) -> float:
    """Seconds since process start at which llama.cpp logged `message` (its lines start m.ss.mmm.uuu)."""
    m = re.search(rf"^(\d+)\.(\d+)\.(\d+)\.(\d+) \w {re.escape(message)}", log, re.M)
    return int(m.group(1)) * 60 + int(m.group(2)) + int(m.group(3)) / 1e3 if m else float("nan")


def drop_page_cache() -> bool:
    """Evict files from the page cache (needs root), so the next load reads from disk."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def cold_starts(args: argparse.Namespace, image: Path) -> dict | None:
    """Process start to first token with the model files evicted from the page cache
    (a 16-token image and 1 new token, so that loading is nearly all of it)."""
    if not drop_page_cache():
        return None
    out = {"caprl_local_s": ours(args.model, args.mmproj, [image], cap=16, new_tokens=1,
                                 threads=args.threads)[0]["start_to_first_token_s"]}
    if args.mtmd_cli:
        drop_page_cache()
        out["mtmd_cli_s"] = theirs(args.mtmd_cli, args.model, args.mmproj, image, cap=16, new_tokens=1,
                                   threads=args.threads)["start_to_first_token_s"]
    return out


def throughput(args: argparse.Namespace, image: Path, tmp: Path) -> list[dict]:
    """Images per minute and aggregate generation speed with 1, 2, 4... captions in flight."""
    copies = []
    for i in range(args.batch):
        copies.append(tmp / f"through{i}.jpg")
        shutil.copy(image, copies[-1])
    cap = int(args.caps.split(",")[0])
    rows = []
    runs = [("--in-flight", n) for n in map(int, filter(None, args.parallel.split(",")))]
    runs += [("--callers", n) for n in map(int, filter(None, args.callers_list.split(",")))]
    for flag, n in runs:
        cmd = [sys.executable, __file__, "--one", flag, str(n), "--model", str(args.model), "--mmproj",
               str(args.mmproj), "--cap", str(cap), "--new-tokens", str(args.new_tokens), "--threads",
               str(args.threads), "--repack", REPACK, *map(str, copies)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "BENCH_SPAWNED_AT": "0"})
        if proc.returncode != 0:
            raise SystemExit(f"throughput run failed:\n{proc.stderr[-3000:]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row.update(images_per_min=60 * row["images"] / row["seconds"], tok_s=row["generated"] / row["seconds"])
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.mtmd_cli:
        t0 = time.time()
        for path in copies:
            theirs(args.mtmd_cli, args.model, args.mmproj, path, cap=cap, new_tokens=args.new_tokens,
                   threads=args.threads)
        seconds = time.time() - t0
        rows.append({"in_flight": "llama-mtmd-cli x N", "images": len(copies), "seconds": seconds,
                     "images_per_min": 60 * len(copies) / seconds, "tok_s": len(copies) * args.new_tokens / seconds})
    return rows


# --- the machine ---------------------------------------------------------------------------


def memory_bandwidth_gbs(threads: int, size_mb: int = 512, repeats: int = 5) -> float:
    """Read bandwidth with `threads` threads (numpy releases the GIL), best of a few runs:
    each thread takes the maximum of its slice of a byte buffer far larger than the caches
    (a SIMD reduction cheap enough to be bound by memory, unlike a float sum)."""
    from concurrent.futures import ThreadPoolExecutor

    a = np.ones(size_mb << 20, np.uint8)
    parts = np.array_split(a, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(np.max, parts))
            best = min(best, time.perf_counter() - t0)
    return a.nbytes / best / 1e9


def write_images(folder: Path, sizes: list[str]) -> dict[str, Path]:
    from make_test_images import scene

    out = {}
    for name in sizes:
        w, h = SIZES[name]
        img = Image.fromarray(scene(min(w, 1000), min(h, 750), 3))
        path = folder / f"bench-{name}.jpg"
        img.resize((w, h), Image.Resampling.BICUBIC).save(path, quality=92)
        out[name] = path
    return out


# --- report --------------------------------------------------------------------------------


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.3f}" if a and b and b == b else "n/a"


def markdown(report: dict) -> str:
    lines = [f"# Benchmark: {report['model']}", "",
             f"{report['machine']} · {report['threads']} threads · {report['new_tokens']} new tokens per caption · "
             f"best of {report.get('repeats', 1)} · "
             f"weights: caprl-local {report['weights']}, llama-mtmd-cli "
             f"{'repacked' if report['theirs_repack'] else 'plain (--no-repack)'}", "",
             f"Memory read bandwidth {report['bandwidth_gbs']:.1f} GB/s; text weights {report['weights_gb']:.2f} GB "
             f"read per token: generation ceiling {report['ceiling_tok_s']:.1f} tokens/s.", "",
             "| image | cap | image tokens | tool | start→1st token s | start→encode s | encode s | prompt tok/s | "
             "gen tok/s (of ceiling) | total s | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["runs"]:
        for tool in ("caprl-local", "llama-mtmd-cli"):
            r = row.get(tool)
            if not r:
                continue
            ceiling = f" ({r['gen_tok_s'] / report['ceiling_tok_s']:.0%})" if report["ceiling_tok_s"] else ""
            lines.append(
                f"| {row['size']} | {row['cap']} | {row.get('image_tokens', '')} | {tool} | "
                f"{(r['start_to_first_token_s'] or float('nan')):.2f} | {r.get('ready_s', float('nan')):.2f} | "
                f"{r['encode_s']:.2f} | "
                f"{r['prompt_tok_s']:.1f} | {r['gen_tok_s']:.2f}{ceiling} | {r['wall_s']:.2f} | {r['peak_rss_mib']:.0f} |")
        if row.get("llama-mtmd-cli"):
            a, b = row["caprl-local"], row["llama-mtmd-cli"]
            lines.append(f"| | | | **ours / theirs** | {ratio(a['start_to_first_token_s'], b['start_to_first_token_s'])} | "
                         f"{ratio(a.get('ready_s'), b.get('ready_s'))} | {ratio(a['encode_s'], b['encode_s'])} | "
                         f"{ratio(b['prompt_tok_s'], a['prompt_tok_s'])} | {ratio(b['gen_tok_s'], a['gen_tok_s'])} | "
                         f"{ratio(a['wall_s'], b['wall_s'])} | |")
    runs = [row["caprl-local"] for row in report["runs"]]
    if runs:
        lines += ["", f"Model load in a caprl-local process: {runs[0]['load_s']:.2f} s the first time, "
                      f"{runs[0]['reload_s']:.2f} s again (files in the page cache)."]
    if report.get("cold"):
        c = report["cold"]
        lines += ["", "Cold start (page cache dropped), process start to first token at 16 image tokens: "
                      f"caprl-local {c['caprl_local_s']:.2f} s"
                      + (f", llama-mtmd-cli {c['mtmd_cli_s']:.2f} s ({c['caprl_local_s'] / c['mtmd_cli_s']:.3f}x)."
                         if c.get("mtmd_cli_s") else ".")]
    if report.get("throughput"):
        base = report["throughput"][0]["images_per_min"]
        lines += ["", "| captions in flight | images | seconds | images/min | aggregate tokens/s | vs 1 in flight "
                      "| full-width step s |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['in_flight']} | {r['images']} | {r['seconds']:.1f} | {r['images_per_min']:.2f} | "
                  f"{r['tok_s']:.2f} | {r['images_per_min'] / base:.2f}x | "
                  f"{format(r['step_s'], '.3f') if r.get('step_s') else ''} |" for r in report["throughput"]]
    if report.get("batch"):
        b = report["batch"]
        lines += ["", f"Batch of {b['n']} images: caprl-local in one run {b['caprl_local_s']:.1f} s; "
                      + (f"{b['n']} llama-mtmd-cli runs {b['mtmd_cli_s']:.1f} s ({b['mtmd_cli_s'] / b['caprl_local_s']:.2f}x "
                         "faster with caprl-local)." if b.get("mtmd_cli_s") else "llama-mtmd-cli not measured.")]
    lines += ["", "Ratios are ours over theirs for times and theirs over ours for rates: below 1 means caprl-local is faster."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--mmproj", type=Path)
    parser.add_argument("--shape", choices=["tiny", "tiny-qwen3vl", "tiny-internvl", "caprl-3b", "caprl-qwen3vl-2b",
                                            "caprl-internvl3.5-8b"],
                        help="build and use a random-weight model")
    parser.add_argument("--quant", default="Q4_K_M")
    parser.add_argument("--mtmd-cli", type=Path, help="llama-mtmd-cli to compare with (scripts/build_mtmd_cli.sh)")
    parser.add_argument("--sizes", default="448,896,12mp", help=f"from {', '.join(SIZES)}")
    parser.add_argument("--caps", default="1024", help="image-token caps")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=0, help="images in the batch comparison (0: none)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per tool and image; the fastest is kept")
    parser.add_argument("--cold", action="store_true", help="also time cold starts (drops the page cache: root)")
    parser.add_argument("--parallel", default="", help="throughput of --batch images at these captions in flight, e.g. 1,2,4,8")
    parser.add_argument("--in-flight", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--callers", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--concurrent", dest="callers_list", default="",
                        help="also the throughput of N threads calling caption() on one Captioner, e.g. 4")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--cap", type=int, default=1024, help=argparse.SUPPRESS)
    parser.add_argument("--repack", choices=["auto", "on", "off"], default="auto",
                        help="llama.cpp's repacked weight layouts (auto: each tool's safe choice on this CPU)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    global REPACK, THEIRS_REPACK
    REPACK = args.repack
    if args.one:
        return one_run(args)
    from caprl_local.engine.backend import cpu_extra_buffer_types

    # llama-mtmd-cli can only take all of llama.cpp's extra layouts or none; with AMX among
    # them a K-quant model crashes (see caprl_local.engine.backend.weight_layout), so: none.
    THEIRS_REPACK = LAYOUTS[args.repack] if args.repack != "auto" else "AMX" not in cpu_extra_buffer_types()

    build = Path("build/models") / (args.shape or "")
    if args.shape:
        from make_tiny_model import write_tiny_pair

        quant = args.quant if not args.shape.startswith("tiny") else None
        args.model, args.mmproj = write_tiny_pair(build, shape=args.shape, quant=quant)
    if not (args.model and args.mmproj):
        parser.error("give --model and --mmproj, or --shape")
    out = args.out or Path("docs") / f"bench-{args.shape or args.model.stem}"
    out.mkdir(parents=True, exist_ok=True)
    bandwidth = memory_bandwidth_gbs(args.threads)
    weights = args.model.stat().st_size / 1e9
    report: dict = {
        "model": f"{args.model.name} + {args.mmproj.name}", "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "threads": args.threads, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "theirs_repack": THEIRS_REPACK, "weights": "",
        "bandwidth_gbs": bandwidth,
        "weights_gb": weights,
        "ceiling_tok_s": bandwidth / weights,  # every weight is read once per generated token
        "runs": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        images = write_images(Path(tmp), args.sizes.split(","))
        if args.cold:
            report["cold"] = cold_starts(args, next(iter(images.values())))
        for cap in map(int, args.caps.split(",")):
            for size, image in images.items():
                row: dict = {"size": size, "cap": cap}
                # Alternate the tools and keep each one's fastest run: on a shared machine the
                # noise is one-sided (other work only ever slows a run down).
                for _ in range(args.repeats):
                    mine = ours(args.model, args.mmproj, [image], cap=cap, new_tokens=args.new_tokens,
                                threads=args.threads)[0]
                    row["caprl-local"] = min(row.get("caprl-local", mine), mine, key=lambda r: r["wall_s"])
                    if args.mtmd_cli:
                        their = theirs(args.mtmd_cli, args.model, args.mmproj, image, cap=cap,
                                       new_tokens=args.new_tokens, threads=args.threads)
                        row["llama-mtmd-cli"] = min(row.get("llama-mtmd-cli", their), their, key=lambda r: r["wall_s"])
                row["image_tokens"] = row["caprl-local"]["image_tokens"]
                report["runs"].append(row)
                print(json.dumps(row), flush=True)
        if args.batch and (args.parallel or args.callers_list):
            report["throughput"] = throughput(args, next(iter(images.values())), Path(tmp))
        if args.batch and not (args.parallel or args.callers_list):  # the throughput table has N llama-mtmd-cli runs already
            batch = [images[s] for s in images][:1] * args.batch
            copies = []
            for i, src in enumerate(batch):
                copies.append(Path(tmp) / f"batch{i}.jpg")
                shutil.copy(src, copies[-1])
            cap = int(args.caps.split(",")[0])
            t0 = time.time()
            ours(args.model, args.mmproj, copies, cap=cap, new_tokens=args.new_tokens, threads=args.threads)
            result = {"n": args.batch, "caprl_local_s": time.time() - t0}
            if args.mtmd_cli:
                t0 = time.time()
                for image in copies:
                    theirs(args.mtmd_cli, args.model, args.mmproj, image, cap=cap, new_tokens=args.new_tokens,
                           threads=args.threads)
                result["mtmd_cli_s"] = time.time() - t0
            report["batch"] = result
    layouts = [r["caprl-local"].get("weights") for r in report["runs"]] + [r.get("weights") for r in report.get("throughput", [])]
    report["weights"] = next((w for w in layouts if w), "n/a")
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    (out / "bench.md").write_text(markdown(report))
    print(markdown(report))
    try:  # plots are optional: the figures are in bench.json whatever happens here
        from bench_plots import write_plots
    except ImportError:
        print("no plots: matplotlib is missing (pip install -e '.[bench]')")
    else:
        print("plots:", ", ".join(map(str, write_plots([out / "bench.json"], out))) or "none")


if __name__ == "__main__":
    main()
