#!/usr/bin/env python3
"""The decode loop's own cost: captions in flight on a model whose decode is nearly free.

The `tiny-vocab` pair (make_tiny_model.py: tiny layers, the real 151,936-token vocabulary) makes a
decode step cost almost nothing, so what a step costs beyond `llama_decode` (reading the logits,
the repeat penalty, sampling, streaming the text) is what this measures. For 1, 4 and 16 captions in
flight, CAPTIONS x TOKENS forced tokens (end of turn ignored), one thread, CapRL-3B's default sampling
(greedy, repeat penalty 1.05 over the last 256 tokens):

- caprl-local in process: generation tokens/s, and the time per token per caption spent in a step
  outside `llama_decode` (the step's wall time less its `llama_decode` calls);
- `llama-server -np N` with the same sampling (`--temp 0 --repeat-penalty 1.05 --repeat-last-n 256`),
  the same files and thread, the same requests at once through /v1/chat/completions: generation
  tokens/s from its own timings (skipped with a message when no llama-server is found:
  --llama-server, build/llama.cpp/build/bin, the PATH).
- with --device-sampling (for a GPU build), each again with llama.cpp's backend sampling: caprl-local's
  --device-sampling and llama-server's -bs.

Generation tokens/s is every caption's generated tokens over the span from the first caption's
first token to the last caption's end.

    python scripts/bench_sampling.py                      # writes docs/bench-sampling-cpu/
    python scripts/bench_sampling.py --flight 1 4 --tokens 64 --out /tmp/b   # smoke run
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from bench_serve import free_port, wait_ready  # noqa: E402 - a sibling script

N_CTX = 1024  # per caption: the prompt and TOKENS new ones


def test_image(size: int = 112) -> Image.Image:
    """A fixed image: a few tokens for the tiny projector, the same for every run."""
    import numpy as np

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def run_ours(model: Path, mmproj: Path, flight: int, tokens: int, *, sampling: str,
             device_sampling: bool = False) -> dict[str, Any]:
    from caprl_local import Captioner
    from caprl_local.engine import scheduler as sched_mod
    from caprl_local.engine import session as session_mod

    totals = {"decode_s": 0.0, "step_s": 0.0, "steps": 0}
    decode, step = session_mod.Session.decode, sched_mod.Scheduler._step

    def timed_decode(self: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return decode(self, *args, **kwargs)
        finally:
            totals["decode_s"] += time.perf_counter() - t0

    def timed_step(self: Any) -> None:
        t0 = time.perf_counter()
        step(self)
        totals["step_s"] += time.perf_counter() - t0
        totals["steps"] += 1

    session_mod.Session.decode = timed_decode  # type: ignore[method-assign]
    sched_mod.Scheduler._step = timed_step  # type: ignore[method-assign]
    try:
        with Captioner(model, mmproj, threads=1, parallel=flight, n_ctx=N_CTX, isolate=False,
                       device_sampling=device_sampling, gpu_layers=-1 if device_sampling else "auto") as cap:
            image = test_image()
            cap.caption(image, max_tokens=4)  # warm-up
            for key in totals:
                totals[key] = 0.0 if key != "steps" else 0
            options = dict(max_tokens=tokens, ignore_eos=True, **_sampling(sampling))
            t0 = time.perf_counter()
            handles = [cap.submit(image, **options) for _ in range(flight)]  # type: ignore[arg-type]
            results = [(h.result(), time.perf_counter()) for h in handles]
    finally:
        session_mod.Session.decode = decode  # type: ignore[method-assign]
        sched_mod.Scheduler._step = step  # type: ignore[method-assign]
    generated = sum(c.generated_tokens for c, _ in results)
    # Each caption's generation span ends when its result is out; the run's span starts at the first one's start.
    ends = [t - t0 for _, t in results]
    starts = [end - c.timings.generation_s for (c, _), end in zip(results, ends, strict=True)]
    span = max(ends) - min(starts)
    outside = totals["step_s"] - totals["decode_s"]
    return {
        "tokens": generated, "tokens_per_s": generated / span, "decode_s": totals["decode_s"],
        "step_s": totals["step_s"], "steps": totals["steps"],
        "outside_ms_per_token": 1e3 * outside / generated,
        "decode_ms_per_step": 1e3 * totals["decode_s"] / max(1, totals["steps"]),
    }


def _sampling(name: str) -> dict[str, Any]:
    if name == "greedy":
        return {"temperature": 0.0, "repeat_penalty": 1.05}
    if name == "greedy-nopenalty":
        return {"temperature": 0.0, "repeat_penalty": 1.0}
    return {"temperature": 0.7, "top_p": 0.9, "seed": 1, "repeat_penalty": 1.05}


def run_theirs(server: Path, model: Path, mmproj: Path, flight: int, tokens: int, *,
               backend_sampling: bool = False, gpu: bool = False) -> dict[str, Any]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [str(server), "-m", str(model), "--mmproj", str(mmproj), "--port", str(port), "--host", "127.0.0.1",
           "-np", str(flight), "-c", str(N_CTX * flight), "-t", "1", "-tb", "1",
           "--temp", "0", "--repeat-penalty", "1.05", "--repeat-last-n", "256", "--log-disable", "--no-warmup",
           *(["-bs"] if backend_sampling else []), *(["-ngl", "99"] if gpu else [])]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(base, proc)
        buf = io.BytesIO()
        test_image().save(buf, "PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        body = {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": "Please describe this image in detail"}]}],
            "temperature": 0, "repeat_penalty": 1.05, "repeat_last_n": 256, "ignore_eos": True}

        def ask(n: int) -> tuple[dict[str, Any], float]:
            req = urllib.request.Request(base + "/v1/chat/completions", json.dumps({**body, "max_tokens": n}).encode(),
                                         {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=3600) as r:
                return json.load(r), time.perf_counter()

        ask(4)  # warm-up
        t0 = time.perf_counter()
        with ThreadPoolExecutor(flight) as pool:
            answers = list(pool.map(ask, [tokens] * flight))
    finally:
        proc.terminate()
        proc.wait(30)
    generated = sum(a["timings"]["predicted_n"] for a, _ in answers)
    ends = [t - t0 for _, t in answers]
    starts = [end - a["timings"]["predicted_ms"] / 1e3 for (a, _), end in zip(answers, ends, strict=True)]
    return {"tokens": generated, "tokens_per_s": generated / (max(ends) - min(starts))}


def find_server(given: Path | None) -> Path | None:
    if given:
        return given
    built = HERE.parent / "build/llama.cpp/build/bin/llama-server"
    found = shutil.which("llama-server")
    return built if built.exists() else Path(found) if found else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="text GGUF (default: a tiny-vocab pair written to a temp dir)")
    parser.add_argument("--mmproj", type=Path)
    parser.add_argument("--flight", type=int, nargs="+", default=[1, 4, 16], help="captions in flight")
    parser.add_argument("--tokens", type=int, default=256, help="forced tokens per caption")
    parser.add_argument("--sampling", choices=["greedy", "greedy-nopenalty", "seeded"], nargs="+", default=["greedy"])
    parser.add_argument("--device-sampling", action="store_true",
                        help="also run caprl-local with llama.cpp's backend sampling (--device-sampling), and "
                             "llama-server with -bs; every layer offloaded (for a GPU build)")
    parser.add_argument("--llama-server", type=Path)
    parser.add_argument("--no-server", action="store_true", help="skip llama-server")
    parser.add_argument("--out", type=Path, default=HERE.parent / "docs/bench-sampling-cpu")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        model, mmproj = args.model, args.mmproj
        if model is None:
            from make_tiny_model import write_tiny_pair

            model, mmproj = write_tiny_pair(Path(tmp), shape="tiny-vocab")
        server = None if args.no_server else find_server(args.llama_server)
        if server is None and not args.no_server:
            print("no llama-server found (scripts/build_mtmd_cli.sh builds one): its rows are skipped", file=sys.stderr)
        rows: list[dict[str, Any]] = []
        for sampling in args.sampling:
            for flight in args.flight:
                row: dict[str, Any] = {"sampling": sampling, "flight": flight,
                                       "ours": run_ours(model, mmproj, flight, args.tokens, sampling=sampling)}
                if server is not None and sampling == "greedy":
                    row["llama_server"] = run_theirs(server, model, mmproj, flight, args.tokens, gpu=args.device_sampling)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
                if args.device_sampling:
                    rows.append({"sampling": f"{sampling} (device)", "flight": flight,
                                 "ours": run_ours(model, mmproj, flight, args.tokens, sampling=sampling,
                                                  device_sampling=True)})
                    if server is not None and sampling == "greedy":  # llama-server's own backend sampling: -bs
                        rows[-1]["llama_server"] = run_theirs(server, model, mmproj, flight, args.tokens,
                                                              backend_sampling=True, gpu=True)
                    print(json.dumps(rows[-1]), file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.platform(), "cpus": os.cpu_count(), "tokens": args.tokens, "threads": 1}
    (args.out / "bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = ["| sampling | in flight | caprl-local tokens/s | outside llama_decode, ms/token/caption | "
             "llama_decode, ms/step | llama-server tokens/s | ratio |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        ours, theirs = row["ours"], row.get("llama_server")
        ratio = f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x" if theirs else "-"
        lines.append(f"| {row['sampling']} | {row['flight']} | {ours['tokens_per_s']:.0f} | "
                     f"{ours['outside_ms_per_token']:.3f} | {ours['decode_ms_per_step']:.2f} | "
                     f"{theirs['tokens_per_s']:.0f} | {ratio} |" if theirs else
                     f"| {row['sampling']} | {row['flight']} | {ours['tokens_per_s']:.0f} | "
                     f"{ours['outside_ms_per_token']:.3f} | {ours['decode_ms_per_step']:.2f} | - | - |")
    (args.out / "bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
