"""Mutation fuzzing: no damaged model file ends in anything but a caption or a one-line error.

A few hundred mutants per run here (scripts/fuzz_models.py runs thousands): extreme metadata
values, swapped key types, changed tensor shapes and types, flipped header bits, cut files.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from helpers import HANG_S, load_script

fuzz_models = load_script("fuzz_models")


@pytest.mark.parametrize(("shape", "count"), [("tiny", 200), ("tiny-qwen3vl", 100)])
def test_damaged_model_files_never_crash_or_hang(tmp_path: Path, shape: str, count: int) -> None:
    pair = load_script("make_tiny_model").write_tiny_pair(tmp_path, shape=shape)
    records = fuzz_models.fuzz(pair, seed=11, count=count, timeout=HANG_S)
    outcomes = Counter(r["outcome"] for r in records)
    assert len(records) == count
    assert set(outcomes) <= {"caption", "error"}, [r for r in records if r["outcome"] not in ("caption", "error")]
    assert outcomes["error"] > count // 2 and outcomes["caption"] > 0  # the mutations bite, and some are harmless
    for r in records:
        if r["outcome"] == "error":
            message = r["message"]
            assert "\n" not in message and len(message) < 600, r
            assert "tmp" in message or "caprl-fuzz" in message, r  # names the file
