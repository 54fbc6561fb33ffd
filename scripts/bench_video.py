#!/usr/bin/env python3
"""Benchmark captioning a video: caprl-local against llama.cpp's own `llama-mtmd-cli --video`, same clip and settings.

Writes (PyAV) a clip with moving content, by default 10 seconds of 1280x720 at 30 fps (H.264 where this PyAV
encodes it, else MPEG-4), then captions it in a fresh process with each tool: caprl-local through its Python
API (a child process), llama-mtmd-cli through llama.cpp's video helper (ffmpeg, with PyAV standing in for a
missing ffprobe: scripts/ffprobe_shim.py). Both are greedy, on the same threads, generate the same number of
tokens (end of turn ignored), take 2 frames a second and hold each image of frames to the same token cap
(llama-mtmd-cli's --image-max-tokens; caprl-local's video_max_tokens, the cap times the frame pairs).
Reported per tool: wall seconds, frames and media tokens, prompt tokens, encode and prompt seconds, tokens/s,
peak resident memory.

    scripts/bench_video.py                                    # the caprl-qwen3vl-2b shape, Q4_K_M + mmproj Q8_0
    scripts/bench_video.py --shape caprl-qwen3vl-4b --mmproj-type f16
    scripts/bench_video.py --model M.gguf --mmproj P.gguf --pair-tokens 256
    scripts/bench_video.py --shape tiny-qwen3vl --seconds 2 --size 320x180 -n 4 --out /tmp/bench   # smoke run

Shapes are written once into build/models/SHAPE (scripts/make_tiny_model.py). Writes OUT/bench.json and
OUT/bench.md (default OUT: docs/bench-video-cpu); a run of another model joins the runs already there; a run
of the same model at the same settings is one more try: each tool's row is its fastest try, and the tries
are listed (on a shared machine another program's work slows some of them).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
PROMPT = "Please describe this video in detail."  # caprl_local.prompts.VIDEO_PROMPT, given to both tools
MTMD_CLI = ROOT / "build/llama.cpp/build/bin/llama-mtmd-cli"
SHAPES = ("tiny-qwen3vl", "caprl-qwen3vl-2b", "caprl-qwen3vl-4b")
TOOLS = ("caprl-local", "llama-mtmd-cli")
SETTINGS = ("model", "mmproj", "threads", "new_tokens", "ctx", "pair_tokens")  # runs with these equal share a table


# --- the clip ------------------------------------------------------------------------------------


def write_clip(path: Path, *, seconds: float, size: tuple[int, int], fps: int) -> dict:
    """A clip whose every frame differs: diagonal gradients that drift, a disc that crosses the frame and a
    bar that sweeps down it. Returns what it is (codec, frames, bytes)."""
    import av
    import numpy as np
    from make_test_videos import encoder

    width, height = size
    codec = encoder("libx264", "libopenh264", "mpeg4")
    count = round(seconds * fps)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=Fraction(fps, 1))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for n in range(count):
            t = n / count
            frame = np.empty((height, width, 3), np.uint8)
            frame[..., 0] = (xs / width * 255 + t * 510) % 256
            frame[..., 1] = (ys / height * 255 + t * 255) % 256
            frame[..., 2] = ((xs + ys) / (width + height) * 255 - t * 765) % 256
            cx, cy, r = width * (0.1 + 0.8 * t), height * (0.5 + 0.3 * math.sin(2 * math.pi * t)), height / 8
            frame[(xs - cx) ** 2 + (ys - cy) ** 2 < r * r] = (250, 250, 250)
            bar = int(height * t)
            frame[bar:bar + max(2, height // 30)] = (10, 10, 10)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return {"path": path.name, "codec": codec, "seconds": seconds, "width": width, "height": height, "fps": fps,
            "frames": count, "bytes": path.stat().st_size}


# --- caprl-local: a fresh process ---------------------------------------------------------------


def one_run(args: argparse.Namespace) -> None:
    """Inside the fresh process: load the pair, caption the clip, print one JSON line."""
    started = float(os.environ["BENCH_SPAWNED_AT"])
    from caprl_local import Captioner

    t0 = time.perf_counter()
    # isolate=False: the first-load check in a child process runs once per pair and machine, not per run.
    cap = Captioner(args.model, args.mmproj, threads=args.threads, n_ctx=args.ctx, parallel=1, isolate=False,
                    video_fps=args.fps, video_max_tokens=args.video_tokens)
    load_s = time.perf_counter() - t0
    first: list[float] = []

    def on_text(piece: str) -> None:
        if not first:
            first.append(time.time())

    caption_at = time.time()
    result = cap.caption(args.clip, prompt=PROMPT, max_tokens=args.new_tokens, ignore_eos=True, temperature=0,
                         repeat_penalty=1.0, on_text=on_text)
    weights = cap.weight_layout
    cap.close()
    t = result.timings
    video = result.video
    print(json.dumps({
        "load_s": load_s, "ready_s": caption_at - started + result.timings.image_load_s,
        "start_to_first_token_s": first[0] - started if first else None,
        "frames": video.frames if video else None, "frame_size": f"{video.width}x{video.height}" if video else None,
        "media_tokens": result.image_tokens, "prompt_tokens": result.prompt_tokens, "new_tokens": result.generated_tokens,
        "read_s": t.image_load_s, "encode_s": t.image_encode_s, "prompt_s": t.prompt_eval_s,
        "prompt_tok_s": t.prompt_tokens_per_s, "gen_tok_s": t.generation_tokens_per_s, "weights": weights,
        "peak_rss_mib": vm_hwm_mib(), "done_at": time.time(),
    }), flush=True)


def vm_hwm_mib() -> float:
    """This process's own peak resident memory (VmHWM: not the forking parent's, as ru_maxrss may be)."""
    found = re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(found.group(1)) / 1024 if found else float("nan")


def ours(args: argparse.Namespace, clip: Path) -> dict:
    cmd = [sys.executable, __file__, "--one", "--model", str(args.model), "--mmproj", str(args.mmproj),
           "--clip", str(clip), "--threads", str(args.threads), "-n", str(args.new_tokens), "-c", str(args.ctx),
           "--fps", str(args.fps), "--video-tokens", str(args.video_tokens)]
    spawned = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "BENCH_SPAWNED_AT": repr(spawned)},
                          check=False)
    if proc.returncode != 0:
        raise SystemExit(f"caprl-local run failed:\n{proc.stderr[-3000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["wall_s"] = row.pop("done_at") - spawned
    row["images"] = math.ceil(row["frames"] / 2) if row["frames"] else None  # Qwen3-VL's form: frames in pairs
    return row


# --- llama-mtmd-cli ------------------------------------------------------------------------------


def ffmpeg_dir(folder: Path) -> Path:
    """A folder with ffmpeg and ffprobe, as llama.cpp's video helper wants them (--video-ffmpeg-dir)."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        import imageio_ffmpeg  # ships an ffmpeg binary (pip install imageio-ffmpeg)

        ffmpeg = str(imageio_ffmpeg.get_ffmpeg_exe())
    (folder / "ffmpeg").symlink_to(ffmpeg)
    if probe := shutil.which("ffprobe"):
        (folder / "ffprobe").symlink_to(probe)
    else:  # imageio-ffmpeg ships no ffprobe: PyAV answers its one question
        shim = folder / "ffprobe"
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -I "{HERE / "ffprobe_shim.py"}" "$@"\n')
        shim.chmod(0o755)
    return folder


def theirs(args: argparse.Namespace, clip: Path, tools: Path) -> dict:
    from caprl_local.engine.backend import cpu_extra_buffer_types

    # With AMX among llama.cpp's extra layouts a K-quant model crashes llama-mtmd-cli (see bench.py): none then.
    plain = "AMX" in cpu_extra_buffer_types()
    cmd = [str(args.mtmd_cli), "-m", str(args.model), "--mmproj", str(args.mmproj), "--video", str(clip),
           "--video-ffmpeg-dir", str(tools), "--video-fps", str(args.fps), "-p", PROMPT, "-n", str(args.new_tokens),
           "--ignore-eos", "--temp", "0", "--repeat-penalty", "1.0", "-t", str(args.threads), "-c", str(args.ctx),
           "--image-max-tokens", str(args.pair_tokens), "--chat-template", "chatml", "--perf", "-lv", "5",
           *(["--no-repack"] if plain else [])]
    for _ in range(3):
        spawned = time.time()
        # Its log (hundreds of KB at -lv 5) goes to a file: a pipe read only at the end would fill and stall it.
        with tempfile.TemporaryFile() as log:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
            first = None
            assert proc.stdout is not None
            while chunk := proc.stdout.read1(4096):  # type: ignore[attr-defined]
                if first is None and chunk.strip():
                    first = time.time()
            _, status, usage = os.wait4(proc.pid, 0)  # its own peak memory
            log.seek(0)
            err = log.read().decode(errors="replace")
        proc.returncode = rc = os.waitstatus_to_exitcode(status)
        wall = time.time() - spawned
        if rc != 0:
            raise SystemExit(f"llama-mtmd-cli failed ({rc}):\n{err[-3000:]}")
        prompt = re.search(r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens", err)
        gen = re.search(r"\beval time =\s*([\d.]+) ms /\s*(\d+) runs", err)
        if prompt and gen:  # else its logger thread lost the last lines at exit: run it again
            break
    media = [int(n) for n in re.findall(r"decoding image batch \d+/\d+, n_tokens_batch = (\d+)", err)]
    encodes = [int(ms) for ms in re.findall(r"mtmd batch encoding done in (\d+) ms", err)]  # one per image
    encode_s = sum(encodes) / 1000
    # llama.cpp's "prompt eval time" runs from the first decode of the prompt, over the encodes between its chunks.
    prompt_s = float(prompt.group(1)) / 1000 - encode_s if prompt else float("nan")
    return {
        "start_to_first_token_s": first - spawned if first else None, "wall_s": wall,
        "ready_s": _log_time(err, "encoding mtmd batch"), "images": len(encodes),
        "frames": len(re.findall(r"read_next_frame: frame \d+ read OK", err)), "media_tokens": sum(media),
        "prompt_tokens": int(prompt.group(2)) if prompt else None,
        "new_tokens": int(gen.group(2)) + 1 if gen else None, "encode_s": encode_s, "prompt_s": prompt_s,
        "prompt_tok_s": int(prompt.group(2)) / prompt_s if prompt and prompt_s > 0 else float("nan"),
        "gen_tok_s": int(gen.group(2)) / (float(gen.group(1)) / 1000) if gen and float(gen.group(1)) else float("nan"),
        "weights": "plain (--no-repack)" if plain else "repacked", "peak_rss_mib": usage.ru_maxrss / 1024,
    }


def _log_time(log: str, message: str) -> float:
    """Seconds since process start at which llama.cpp logged `message` (its lines start m.ss.mmm.uuu)."""
    found = re.search(rf"^(\d+)\.(\d+)\.(\d+)\.(\d+) \w {re.escape(message)}", log, re.M)
    return int(found.group(1)) * 60 + int(found.group(2)) + int(found.group(3)) / 1e3 if found else float("nan")


def attempt(row: dict) -> list:
    return [round(row["wall_s"], 2), *row.get("load", [None, None])]


def merged(earlier: dict, now: dict) -> dict:
    """A run at the same settings as an earlier one: each tool keeps its fastest row, and every try is listed."""
    run, tried = {**earlier, **{k: v for k, v in now.items() if k not in TOOLS}}, dict(earlier.get("tried", {}))
    for tool in TOOLS:
        if tool not in now:
            continue
        old = earlier.get(tool)
        tried[tool] = tried.get(tool) or ([attempt(old)] if old else [])
        tried[tool] = [*tried[tool], attempt(now[tool])]
        run[tool] = now[tool] if old is None or now[tool]["wall_s"] < old["wall_s"] else old
    run["tried"] = tried
    return run


# --- the report ----------------------------------------------------------------------------------


def cell(value: object, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(report: dict) -> str:
    clip = report["clip"]
    lines = ["# Benchmark: captioning a video, caprl-local and llama-mtmd-cli --video", "",
             f"Clip: {clip['seconds']:g} s of {clip['width']}x{clip['height']} at {clip['fps']} fps ({clip['frames']} "
             f"frames, {clip['codec']}, {clip['bytes']:,} bytes), moving gradients and shapes. Both tools: greedy, "
             "end of turn ignored, the same prompt, 2 frames a second.", ""]
    for run in report["runs"]:
        ours_, theirs_ = run.get("caprl-local"), run.get("llama-mtmd-cli")
        if ours_ is None:
            continue
        lines += [f"## {run['model']} + {run['mmproj']}", "",
                  f"{run['machine']} · {run['threads']} threads · {run['new_tokens']} new tokens · context "
                  f"{run['ctx']} · cap {run['pair_tokens']} tokens per image of frames (caprl-local: video_max_tokens="
                  f"{run['video_tokens']}) · files {run['model_mib']:,.0f} + {run['mmproj_mib']:,.0f} MiB", "",
                  "| tool | frames | images | media tokens | prompt tokens | encode s | prompt s (tok/s) | "
                  "gen tok/s | start→encode s | start→1st token s | wall s | peak RSS MiB | load avg |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in (("caprl-local", ours_), ("llama-mtmd-cli", theirs_)):
            if r:
                lines.append(f"| {name} | {cell(r['frames'])} | {cell(r['images'])} | {r['media_tokens']} | "
                             f"{cell(r['prompt_tokens'])} | {cell(r['encode_s'])} | {cell(r['prompt_s'])} "
                             f"({cell(r['prompt_tok_s'], 1)}) | {cell(r['gen_tok_s'])} | {cell(r['ready_s'])} | "
                             f"{cell(r['start_to_first_token_s'])} | {cell(r['wall_s'])} | {cell(r['peak_rss_mib'], 0)} | "
                             f"{'–'.join(cell(x) for x in r.get('load', [None]))} |")
        if theirs_:
            ratios = [ratio(theirs_[key], ours_[key]) if key.endswith("tok_s") else ratio(ours_[key], theirs_[key])
                      for key in ("encode_s", "prompt_s", "gen_tok_s", "ready_s", "start_to_first_token_s", "wall_s",
                                  "peak_rss_mib")]
            lines.append("| **ours / theirs** | | | | | " + " | ".join(ratios) + " | |")
        tries = {tool: t for tool, t in run.get("tried", {}).items() if len(t) > 1}
        if tries:
            lines += ["", "Each tool's fastest of its runs (wall s, load average at start and end): " + "; ".join(
                f"{tool} " + ", ".join(f"{wall:.1f} s ({cell(a)}–{cell(b)})" for wall, a, b in t)
                for tool, t in tries.items()) + "."]
        lines += ["", f"caprl-local: frames of {ours_['frame_size']}, {ours_['media_tokens'] // max(1, ours_['images'])} "
                      f"tokens per pair, Qwen3-VL's timestamps; reading the clip {ours_['read_s']:.2f} s, model load "
                      f"{ours_['load_s']:.2f} s; weights {ours_['weights']}."]
        if theirs_:
            lines[-1] += (f" llama-mtmd-cli: {theirs_['media_tokens'] // max(1, theirs_['images'])} tokens per image, its "
                          f"helper's timestamps (a mark every 5 s keeps a frame from its neighbour, so {theirs_['images']} "
                          f"images), frames read while it encodes; weights {theirs_['weights']}.")
        lines.append("")
    lines += ["Ratios are ours over theirs (times, memory) and theirs over ours (generation rate): below 1 means "
              "caprl-local is faster or lighter. The machine's cores are shared with other work: the load "
              "average (1 minute, at each run's start and end) says how busy it was."]
    return "\n".join(lines) + "\n"


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.3f}" if a and b and a == a and b == b else "n/a"


# --- main ----------------------------------------------------------------------------------------


def build_pair(args: argparse.Namespace) -> tuple[Path, Path]:
    """The shape's pair in build/models/SHAPE, written there the first time."""
    from make_tiny_model import SHAPES as ALL
    from make_tiny_model import write_tiny_pair

    folder, stem = ROOT / "build/models" / args.shape, ALL[args.shape].model_stem
    quant = None if args.shape.startswith("tiny") else args.quant  # K-quants need rows wider than the tiny model's
    model, mmproj = folder / f"{stem}.{quant or 'f16'}.gguf", folder / f"{stem}.mmproj-{args.mmproj_type}.gguf"
    if model.exists() and mmproj.exists():
        return model, mmproj
    return write_tiny_pair(folder, shape=args.shape, quant=quant, mmproj_type=args.mmproj_type)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--clip", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--video-tokens", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--shape", choices=SHAPES, default="caprl-qwen3vl-2b", help="write and use a random-weight pair")
    parser.add_argument("--quant", default="Q4_K_M", help="the shape's text model quant")
    parser.add_argument("--mmproj-type", choices=["f16", "Q8_0"], default="Q8_0", help="the shape's projector")
    parser.add_argument("--model", type=Path, help="a text model GGUF instead of a shape (with --mmproj)")
    parser.add_argument("--mmproj", type=Path)
    parser.add_argument("--mtmd-cli", type=Path, default=MTMD_CLI, help="llama-mtmd-cli built with video support "
                        "(scripts/build_mtmd_cli.sh)")
    parser.add_argument("--tools", default=",".join(TOOLS), help="the tools to time, of caprl-local,llama-mtmd-cli; "
                        "one alone adds a try to its row of an earlier run at the same settings")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--size", default="1280x720", help="the clip's WIDTHxHEIGHT")
    parser.add_argument("--clip-fps", type=int, default=30)
    parser.add_argument("--fps", type=float, default=2.0, help="frames taken per second of video, by both tools")
    parser.add_argument("--pair-tokens", type=int, default=256, help="token cap per image of frames (a pair)")
    parser.add_argument("-n", "--new-tokens", type=int, default=64)
    parser.add_argument("-c", "--ctx", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=ROOT / "docs/bench-video-cpu")
    args = parser.parse_args()
    if args.one:
        return one_run(args)
    if (args.model is None) != (args.mmproj is None):
        parser.error("give --model and --mmproj together (or neither, for --shape)")
    try:
        width, height = (int(side) for side in args.size.lower().split("x"))
    except ValueError:
        parser.error(f"--size takes WIDTHxHEIGHT, e.g. 1280x720, not {args.size!r}")
    args.frames = max(2, round(args.seconds * args.fps))
    args.video_tokens = args.pair_tokens * math.ceil(args.frames / 2)
    tools = [name.strip() for name in args.tools.split(",") if name.strip()]
    if not tools or set(tools) - set(TOOLS):
        parser.error(f"--tools takes {', '.join(TOOLS)} (comma-separated), not {args.tools!r}")
    if "llama-mtmd-cli" in tools and not args.mtmd_cli.is_file():
        parser.error(f"no llama-mtmd-cli at {args.mtmd_cli}: build it with scripts/build_mtmd_cli.sh, or pass "
                     "--tools caprl-local")
    if args.model is None:
        args.model, args.mmproj = build_pair(args)
    run = {"model": args.model.name, "mmproj": args.mmproj.name, "model_mib": args.model.stat().st_size / 2**20,
           "mmproj_mib": args.mmproj.stat().st_size / 2**20, "threads": args.threads, "new_tokens": args.new_tokens,
           "ctx": args.ctx, "pair_tokens": args.pair_tokens, "video_tokens": args.video_tokens,
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}
    with tempfile.TemporaryDirectory(prefix="bench-video-") as tmp:
        folder = Path(tmp)
        clip = folder / "clip.mp4"
        clip_info = write_clip(clip, seconds=args.seconds, size=(width, height), fps=args.clip_fps)
        (folder / "ffmpeg").mkdir()
        ffmpeg = ffmpeg_dir(folder / "ffmpeg") if "llama-mtmd-cli" in tools else folder / "ffmpeg"
        for tool in tools:
            before = os.getloadavg()[0]  # the machine may be shared: how busy it was, beside each row
            row = ours(args, clip) if tool == "caprl-local" else theirs(args, clip, ffmpeg)
            row["load"] = [before, os.getloadavg()[0]]
            run[tool] = row
            print(json.dumps({tool: row}), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bench.json"
    report = json.loads(path.read_text()) if path.exists() else {"runs": []}
    if {**report.get("clip", clip_info), "bytes": 0} != {**clip_info, "bytes": 0}:
        report["runs"] = []  # another clip (its encoder's bytes may vary): the earlier runs are not comparable
    report["clip"] = clip_info
    same = [r for r in report["runs"] if all(r.get(key) == run[key] for key in SETTINGS)]
    run = merged(same[0], run) if same else {**run, "tried": {tool: [attempt(run[tool])] for tool in tools}}
    models = [r["model"] for r in report["runs"]]
    if run["model"] in models:  # in its place: the tables keep their order
        report["runs"][models.index(run["model"])] = run
    else:
        report["runs"].append(run)
    path.write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "bench.md").write_text(markdown(report))
    print(f"wrote {path} and {args.out / 'bench.md'}")


if __name__ == "__main__":
    main()
