"""The benchmark script keeps working: a smoke run on the tiny model (timings are not checked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import HANG_S, ROOT


def test_bench_smoke_run(tmp_path: Path, tiny_model: tuple[Path, Path]) -> None:
    model, mmproj = tiny_model
    out = tmp_path / "bench"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--model", str(model), "--mmproj", str(mmproj),
         "--sizes", "448", "--caps", "64", "--new-tokens", "3", "--batch", "2", "--threads", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=HANG_S, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "bench.json").read_text())
    run = report["runs"][0]["caprl-local"]
    assert run["image_tokens"] <= 64 and run["new_tokens"] == 3
    assert run["start_to_first_token_s"] > 0 and run["peak_rss_mib"] > 0 and report["ceiling_tok_s"] > 0
    assert report["batch"]["n"] == 2
    assert "| 448 | 64 |" in (out / "bench.md").read_text()


def test_bench_throughput_smoke_run(tmp_path: Path, tiny_model: tuple[Path, Path]) -> None:
    model, mmproj = tiny_model
    out = tmp_path / "bench"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--model", str(model), "--mmproj", str(mmproj),
         "--sizes", "448", "--caps", "64", "--new-tokens", "32", "--batch", "2", "--threads", "1",
         "--parallel", "1,2", "--concurrent", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=HANG_S, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    one, two, threads = json.loads((out / "bench.json").read_text())["throughput"]
    assert (one["in_flight"], two["in_flight"], two["images"], two["generated"]) == (1, 2, 2, 64)
    assert threads["in_flight"] == "2 threads calling caption()" and threads["generated"] == 64
    # Decode steps 1 and 2 captions wide were timed (the second caption joins while the first has 31 tokens to go).
    assert one["step_s"] > 0 and two["step_s"] > 0
    assert "| full-width step s |" in (out / "bench.md").read_text()


def test_bench_is_reachable_from_the_cli() -> None:
    from helpers import run_cli

    result = run_cli("bench", "-h")
    assert result.returncode == 0 and "--mtmd-cli" in result.stdout


def test_sampling_bench_smoke_run(tmp_path: Path, tiny_model: tuple[Path, Path]) -> None:
    """scripts/bench_sampling.py on the tiny pair, host and device sampling, without llama-server."""
    model, mmproj = tiny_model
    out = tmp_path / "bench"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_sampling.py"), "--model", str(model), "--mmproj", str(mmproj),
         "--flight", "1", "2", "--tokens", "8", "--sampling", "greedy", "seeded", "--device-sampling", "--no-server",
         "--out", str(out)],
        capture_output=True, text=True, timeout=HANG_S, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert [(r["sampling"], r["flight"]) for r in rows] == [
        ("greedy", 1), ("greedy (device)", 1), ("greedy", 2), ("greedy (device)", 2),
        ("seeded", 1), ("seeded (device)", 1), ("seeded", 2), ("seeded (device)", 2)]
    assert all(r["ours"]["tokens"] == 8 * r["flight"] and r["ours"]["outside_ms_per_token"] > 0 for r in rows)
    assert "| greedy | 2 |" in (out / "bench.md").read_text()
