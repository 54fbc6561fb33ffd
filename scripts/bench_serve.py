#!/usr/bin/env python3
"""Serving throughput: `caprl-local serve` against llama.cpp's own `llama-server` on the same files.

Each server is started on its default settings (give `--parallel N` to fix the captions in flight
of both, `--parallel N` / `-np N` with the same context per caption), the same threads and
image-token cap; then CLIENTS concurrent clients (16 by default) send IMAGES distinct images
(base64 data URIs, greedy, a fixed caption length: end-of-turn ignored), no client retrying. The
wall time from the first request to the last answer gives images per minute; each request's
latency gives p50, p95 and the maximum; every request must complete (a 503 or an error counts
against its server). One warm-up request first. llama-server is taken from --llama-server, else
build/llama.cpp/build/bin (scripts/build_mtmd_cli.sh builds it), else the PATH; without one, its
row is skipped with a message.

    python scripts/bench_serve.py --model M.gguf --mmproj P.gguf
    python scripts/bench_serve.py --shape tiny --images 32 --new-tokens 8 --threads 1     # smoke run

Writes OUT/bench.json and OUT/bench.md (default OUT: docs/bench-serve-<shape or model>).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
N_CTX = 4096  # per caption, as caprl-local's default


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(base: str, proc: subprocess.Popen[bytes], timeout_s: float = 900) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise SystemExit("the server did not become ready")


def ours(args: argparse.Namespace, port: int) -> list[str]:
    parallel = ["--parallel", str(args.parallel)] if args.parallel else []  # else its default: auto
    return [sys.executable, "-m", "caprl_local", "serve", "-m", str(args.model), "--mmproj", str(args.mmproj),
            "--port", str(port), *parallel, "--threads", str(args.threads), "--max-image-tokens", str(args.cap)]


def theirs(args: argparse.Namespace, port: int) -> list[str]:
    parallel = ["-np", str(args.parallel), "-c", str(N_CTX * args.parallel)] if args.parallel else []
    return [str(args.llama_server), "-m", str(args.model), "--mmproj", str(args.mmproj), "--port", str(port),
            *parallel, "-t", str(args.threads), "--image-max-tokens", str(args.cap), "--log-disable"]


def find_llama_server(given: Path | None) -> Path | None:
    """--llama-server, else the one scripts/build_mtmd_cli.sh builds, else one on the PATH."""
    if given is not None:
        return given if given.is_file() else None
    built = HERE.parent / "build" / "llama.cpp" / "build" / "bin" / "llama-server"
    if built.is_file():
        return built
    found = shutil.which("llama-server")
    return Path(found) if found else None


def ask(base: str, image: str, new_tokens: int) -> dict[str, Any]:
    """One request, never retried: its latency, and its tokens or what went wrong."""
    body = {"model": "caprl", "temperature": 0, "max_tokens": new_tokens, "ignore_eos": True,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": image}},
                {"type": "text", "text": "Please describe this image in detail"}]}]}
    request = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=3600) as r:
            answer = json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return {"seconds": time.perf_counter() - t0, "completion_tokens": 0, "error": f"HTTP {exc.code}"}
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return {"seconds": time.perf_counter() - t0, "completion_tokens": 0, "error": type(exc).__name__}
    return {"seconds": time.perf_counter() - t0, "completion_tokens": answer["usage"]["completion_tokens"]}


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of `values`."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered), math.ceil(q / 100 * len(ordered))) - 1)]


def images(n: int, size: int) -> list[str]:
    """n distinct photo-like images as data URIs (smooth gradients and shapes, JPEG)."""
    from make_test_images import scene

    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(np.asarray(scene(size, size, seed=i))).save(buf, format="JPEG", quality=90)
        out.append("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode())
    return out


def measure(name: str, command: list[str], args: argparse.Namespace, port: int, sent: list[str]) -> dict[str, Any]:
    print(f"{name}: {' '.join(command)}", file=sys.stderr)
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc)
        ask(base, sent[0], args.new_tokens)  # warm-up: first-use costs stay out of the figure
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            answers = list(pool.map(lambda image: ask(base, image, args.new_tokens), sent))
        wall = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    tokens = sum(a["completion_tokens"] for a in answers)
    done = [a for a in answers if "error" not in a]
    errors: dict[str, int] = {}
    for a in answers:
        if "error" in a:
            errors[a["error"]] = errors.get(a["error"], 0) + 1
    latencies = [a["seconds"] for a in answers]
    row = {"server": name, "images": len(sent), "clients": args.clients, "wall_s": round(wall, 2),
           "completed": len(done), "errors": errors,
           "images_per_min": round(60 * len(done) / wall, 2), "completion_tokens": tokens,
           "mean_latency_s": round(sum(latencies) / len(latencies), 2),
           "p50_latency_s": round(percentile(latencies, 50), 2), "p95_latency_s": round(percentile(latencies, 95), 2),
           "max_latency_s": round(max(latencies), 2)}
    print(json.dumps(row), file=sys.stderr)
    return row


def markdown(report: dict[str, Any]) -> str:
    in_flight = f"{report['parallel']} captions in flight" if report["parallel"] else "each server's default settings"
    lines = [f"# Serving: {report['model']}", "",
             f"{report['machine']}; {report['images']} images of {report['size']}x{report['size']} from "
             f"{report['clients']} concurrent clients (no retries), {in_flight}, {report['threads']} "
             f"threads, image-token cap {report['cap']}, {report['new_tokens']} new tokens each (greedy, "
             "end-of-turn ignored).", "",
             "| server | completed | wall s | images/min | p50 s | p95 s | max s | tokens |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['server']} | {r['completed']}/{r['images']}{_errors(r)} | {r['wall_s']} | {r['images_per_min']} | "
              f"{r['p50_latency_s']} | {r['p95_latency_s']} | {r['max_latency_s']} | {r['completion_tokens']} |"
              for r in report["rows"]]
    lines += [f"\n{note}" for note in report.get("notes", [])]
    return "\n".join(lines) + "\n"


def _errors(row: dict[str, Any]) -> str:
    return f" ({', '.join(f'{n} x {what}' for what, n in row['errors'].items())})" if row["errors"] else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--mmproj", type=Path)
    parser.add_argument("--shape", choices=["tiny", "caprl-3b"], help="write a shape-true model (instead of --model)")
    parser.add_argument("--llama-server", type=Path, help="llama-server to compare with [default: the one "
                        "scripts/build_mtmd_cli.sh builds, or one on the PATH]")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--parallel", type=int, help="captions in flight for both servers [default: each one's own]")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--cap", type=int, default=256, help="image-token cap")
    parser.add_argument("--size", type=int, default=448, help="image side in pixels")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.shape:
        from make_tiny_model import write_tiny_pair

        folder = Path(tempfile.mkdtemp(prefix="bench-serve-"))
        args.model, args.mmproj = write_tiny_pair(folder, shape=args.shape, quant=None if args.shape == "tiny" else "Q4_K_M")
    if args.model is None or args.mmproj is None:
        parser.error("give --model and --mmproj, or --shape")
    sent = images(args.images, args.size)
    rows = [measure("caprl-local serve", ours(args, port := free_port()), args, port, sent)]
    notes = []
    llama_server = find_llama_server(args.llama_server)
    if llama_server is not None:
        args.llama_server = llama_server
        rows.append(measure("llama-server", theirs(args, port := free_port()), args, port, sent))
    else:
        notes.append(f"llama-server skipped: {args.llama_server or 'none'} not found (build it with "
                     "scripts/build_mtmd_cli.sh, or give --llama-server PATH)")
        print(notes[-1], file=sys.stderr)
    report = {"model": args.model.name, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "images": args.images, "size": args.size, "clients": args.clients, "parallel": args.parallel,
              "threads": args.threads, "cap": args.cap, "new_tokens": args.new_tokens, "rows": rows, "notes": notes}
    out = args.out or HERE.parent / "docs" / f"bench-serve-{args.shape or args.model.stem}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "bench.md").write_text(markdown(report))
    print(markdown(report))
    if any(r["completed"] < r["images"] for r in rows):
        raise SystemExit("not every request completed (see the table)")


if __name__ == "__main__":
    main()
