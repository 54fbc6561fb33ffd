#!/usr/bin/env python3
"""Mutation fuzzing of model files: every damaged GGUF must end in a caption or a one-line error.

Each mutant is the tiny format-true pair (scripts/make_tiny_model.py) with one file changed in
one way a damaged download or a foreign converter could: a metadata value set to an extreme
(0, -1, the type's largest, NaN), a key's type swapped (u32 stored as i32, u64, f32...), a
tensor's dimension or type changed, random bytes flipped in the header, the file cut short.
A worker process loads each mutant with caprl-local and captions an image; the parent watches
it: a worker killed by a signal is a crash, one silent for too long is a hang. Mutant i is the
same for the same seed, so a failure can be replayed.

    python scripts/fuzz_models.py --count 3000 [--seed 0] [--shape tiny|tiny-qwen3vl] [--out docs/fuzz.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import gguf
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

# GGUF value types by their struct format, for swapping one for another.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_EXTREMES = {"B": [0, 255], "b": [0, -1, 127, -128], "H": [0, 65535], "h": [0, -1, 32767], "I": [0, 1, 3, 2**31 - 1, 2**32 - 1],
             "i": [0, -1, 2**31 - 1, -(2**31)], "f": [0.0, -1.0, float("nan"), float("inf"), 1e30], "?": [0, 1],
             "Q": [0, 2**63 - 1, 2**64 - 1], "q": [0, -1, 2**63 - 1], "d": [0.0, float("nan"), -1.0]}


def _offset(part: np.ndarray, base: np.ndarray) -> int:
    return int(part.ctypes.data - base.ctypes.data)


def mutate(data: bytes, path: Path, rng: random.Random) -> tuple[bytes, str]:
    """One mutation of a GGUF file's bytes; returns (new bytes, what was done)."""
    reader = gguf.GGUFReader(str(path))
    base, out = reader.data, bytearray(data)
    op = rng.choice(["value", "value", "type", "dims", "tensor_type", "flip", "truncate"])
    if op in ("value", "type"):
        fields = [f for f in reader.fields.values()  # key length, key, type, value: a scalar key-value pair
                  if len(f.parts) == 4 and len(f.types) == 1 and int(f.types[0]) in _SCALARS]
        field = rng.choice(fields)
        fmt = _SCALARS[int(field.types[0])]
        type_at, value_at = _offset(field.parts[2], base), _offset(field.parts[3], base)
        if op == "value":
            value = rng.choice(_EXTREMES[fmt])
            out[value_at:value_at + struct.calcsize(fmt)] = struct.pack("<" + fmt, value)
            return bytes(out), f"{field.name} = {value!r}"
        new_type = rng.choice([t for t in _SCALARS if t != int(field.types[0])])
        out[type_at:type_at + 4] = struct.pack("<I", new_type)
        return bytes(out), f"{field.name} stored as type {new_type}"
    if op in ("dims", "tensor_type") and reader.tensors:
        tensor = rng.choice(reader.tensors)
        parts = tensor.field.parts  # name length, name, n_dims, dims, type, offset
        if op == "dims":
            at = _offset(parts[3], base) + 8 * rng.randrange(len(parts[3]))
            value = rng.choice([0, 1, 3, 2**31, int(parts[3].max()) * 2])
            out[at:at + 8] = struct.pack("<Q", value)
            return bytes(out), f"{tensor.name} dimension = {value}"
        at = _offset(parts[4], base)
        value = rng.choice([0, 1, 8, 12, 30, 39, 99])
        out[at:at + 4] = struct.pack("<I", value)
        return bytes(out), f"{tensor.name} type = {value}"
    if op == "flip":
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(8, reader.data_offset)
            out[at] ^= 1 << rng.randrange(8)
        return bytes(out), "header bits flipped"
    keep = rng.randrange(1, len(data))
    return bytes(out[:keep]), f"cut at {keep} of {len(data)} bytes"


def mutant(pair: tuple[Path, Path], seed: int, index: int, folder: Path) -> tuple[Path, Path, str]:
    """Mutant `index` of the pair: one of its two files changed, written into `folder`."""
    rng = random.Random(f"{seed}:{index}")
    which = rng.randrange(2)
    src = pair[which]
    data, what = mutate(src.read_bytes(), src, rng)
    dst = folder / f"m{index}-{src.name}"
    dst.write_bytes(data)
    files = (dst, pair[1]) if which == 0 else (pair[0], dst)
    return files[0], files[1], f"{'model' if which == 0 else 'projector'}: {what}"


def worker(pair: tuple[Path, Path], seed: int, start: int, count: int, folder: Path) -> None:
    """In the worker process: caption an image with each mutant, one JSON line per outcome."""
    from PIL import Image

    from caprl_local import CaprlError, Captioner

    image = Image.new("RGB", (64, 48), (200, 120, 40))
    for index in range(start, count):
        model, mmproj, what = mutant(pair, seed, index, folder)
        print(json.dumps({"index": index, "what": what, "outcome": "started"}), flush=True)
        try:
            with Captioner(model, mmproj, threads=1, parallel=1) as cap:
                cap.caption(image, max_tokens=2)
            outcome, message = "caption", ""
        except CaprlError as exc:
            outcome, message = "error", str(exc)
        except Exception as exc:  # noqa: BLE001 - a bug to report, not a reason to stop fuzzing
            outcome, message = "unexpected", f"{type(exc).__name__}: {exc}"
        (model if model.parent == folder else mmproj).unlink()
        print(json.dumps({"index": index, "what": what, "outcome": outcome, "message": message}), flush=True)


def fuzz(pair: tuple[Path, Path], *, seed: int = 0, count: int = 300, timeout: float = 120.0) -> list[dict]:
    """Run `count` mutants through worker processes; returns one record per mutant, with the
    outcome caption, error (one line), unexpected (a Python exception), crash or hang. A worker
    that dies is replaced, going on after the mutant that killed it."""
    records: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="caprl-fuzz-") as tmp:
        start = 0
        while start < count:
            cmd = [sys.executable, __file__, "--worker", str(pair[0]), str(pair[1]), str(seed), str(start), str(count), tmp]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                    env={**os.environ, "GGML_NO_BACKTRACE": "1"})
            assert proc.stdout is not None
            current, buffer, hung = None, b"", False
            last = time.monotonic()
            while True:
                ready, _, _ = select.select([proc.stdout], [], [], 0.2)
                chunk = os.read(proc.stdout.fileno(), 1 << 16) if ready else b""
                if chunk:
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        record = json.loads(line)
                        current = record if record["outcome"] == "started" else None
                        if current is None:
                            records.append(record)
                    last = time.monotonic()
                elif ready or proc.poll() is not None:  # end of output: the worker is gone
                    break
                elif time.monotonic() - last > timeout:
                    hung = True
                    proc.kill()
                    break
            proc.wait()
            proc.stdout.close()
            done = records[-1]["index"] + 1 if records else 0
            if current is not None:  # it never finished this mutant
                records.append({**current, "outcome": "hang" if hung else "crash", "message": f"exit {proc.returncode}"})
                done = current["index"] + 1
            if done <= start:  # no progress: the worker cannot start at all
                raise RuntimeError(f"the fuzz worker exits at once (exit {proc.returncode}); run it by hand: {cmd}")
            start = done
    return records


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        model, mmproj, seed, start, count, folder = sys.argv[2:8]
        worker((Path(model), Path(mmproj)), int(seed), int(start), int(count), Path(folder))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shape", default="tiny", choices=["tiny", "tiny-qwen3vl"])
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a mutant may take")
    parser.add_argument("--out", type=Path, help="write every record as JSON here")
    args = parser.parse_args()
    from make_tiny_model import write_tiny_pair

    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("CAPRL_LOCAL_HOME", str(Path(tmp) / "cache"))  # first-load verdicts, fresh
        pair = write_tiny_pair(Path(tmp), shape=args.shape)
        t0 = time.monotonic()
        records = fuzz(pair, seed=args.seed, count=args.count, timeout=args.timeout)
        seconds = time.monotonic() - t0
    counts = Counter(r["outcome"] for r in records)
    print(json.dumps({"mutants": len(records), "seconds": round(seconds, 1), **counts}, indent=2))
    for r in records:
        if r["outcome"] not in ("caption", "error") or "\n" in r.get("message", ""):
            print(json.dumps(r))
    if args.out:  # the summary: outcomes by kind of mutation, and every record that is not a caption or an error
        kinds = Counter(f"{r['what'].split(': ')[0]} {_kind(r['what'])}: {_outcome(r)}" for r in records)
        problems = [r for r in records if r["outcome"] not in ("caption", "error")]
        args.out.write_text(json.dumps({"seed": args.seed, "shape": args.shape, "mutants": len(records),
                                        "seconds": round(seconds, 1), "outcomes": counts,
                                        "by_mutation": dict(sorted(kinds.items())), "problems": problems}, indent=1))


def _outcome(record: dict) -> str:
    """What stopped a mutant: caprl-local's own header checks, llama.cpp refusing it, or llama.cpp
    aborting on it in the first-load child (a crash caught), or nothing (a caption)."""
    message = record.get("message", "")
    if record["outcome"] != "error":
        return record["outcome"]
    if "llama.cpp aborts on this pair" in message:
        return "error (llama.cpp aborted in the first-load check)"
    if "llama.cpp" in message:
        return "error (llama.cpp refused it)"
    return "error (header checks)"


def _kind(what: str) -> str:
    """The kind of mutation from its description."""
    detail = what.split(": ", 1)[1]
    for marker, kind in ((" stored as type ", "key type swapped"), (" dimension = ", "tensor dimension"),
                         (" type = ", "tensor type"), ("bits flipped", "header bits flipped"), ("cut at", "cut short")):
        if marker in detail:
            return kind
    return "metadata value"


if __name__ == "__main__":
    main()
