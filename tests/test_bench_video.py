"""scripts/bench_video.py keeps working: smoke runs on the tiny Qwen3-VL pair (timings are not checked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import HANG_S, ROOT, load_script

pytest.importorskip("av", reason="the benchmark writes its clip with PyAV")
MTMD_CLI = ROOT / "build/llama.cpp/build/bin/llama-mtmd-cli"


def bench(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    model, mmproj = load_script("make_tiny_model").write_tiny_pair(tmp_path / "model", shape="tiny-qwen3vl")
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_video.py"), "--model", str(model), "--mmproj", str(mmproj),
           "--seconds", "2", "--size", "320x180", "-n", "4", "--threads", "1", "--pair-tokens", "64", "-c", "4096",
           "--out", str(tmp_path / "bench"), *extra]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_S, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def test_bench_video_smoke_run(tmp_path: Path) -> None:
    """caprl-local alone, twice: one table, the fastest try in it and both tries listed."""
    for _ in range(2):
        bench(tmp_path, "--tools", "caprl-local")
    report = json.loads((tmp_path / "bench" / "bench.json").read_text())
    (run,) = report["runs"]
    row = run["caprl-local"]
    # 2 s at 2 frames a second: 4 frames, 2 pairs of 320x192 (10x6 tokens of 32 pixels) within 64 tokens each
    assert (row["frames"], row["images"], row["media_tokens"], row["new_tokens"]) == (4, 2, 120, 4)
    assert row["frame_size"] == "320x192" and row["peak_rss_mib"] > 0 and row["wall_s"] > 0
    assert run["video_tokens"] == 128 and len(run["tried"]["caprl-local"]) == 2
    assert report["clip"]["frames"] == 60 and "llama-mtmd-cli" not in run
    assert "| caprl-local | 4 | 2 | 120 |" in (tmp_path / "bench" / "bench.md").read_text()


@pytest.mark.skipif(not MTMD_CLI.is_file(), reason=f"no llama-mtmd-cli at {MTMD_CLI} (scripts/build_mtmd_cli.sh)")
def test_bench_video_against_llama_mtmd_cli(tmp_path: Path) -> None:
    bench(tmp_path)
    run = json.loads((tmp_path / "bench" / "bench.json").read_text())["runs"][0]
    theirs = run["llama-mtmd-cli"]
    # its helper's layout: the first frame alone (a timestamp follows it), then a pair, then the last frame
    assert (theirs["frames"], theirs["images"], theirs["media_tokens"], theirs["new_tokens"]) == (4, 3, 180, 4)
    assert theirs["peak_rss_mib"] > 0 and "| **ours / theirs** |" in (tmp_path / "bench" / "bench.md").read_text()
