"""The benchmark plots come out of committed bench.json files as valid, reproducible SVG."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from helpers import ROOT, load_script

pytest.importorskip("matplotlib")  # an optional extra: pip install -e '.[bench]'

# One file with per-image runs of both tools (stages), one with captions in flight (throughput).
FILES = [ROOT / "docs" / "bench-caprl-3b-cpu-scheduler" / "bench.json",
         ROOT / "docs" / "bench-caprl-3b-cpu-concurrent" / "bench.json"]


def test_plots_are_valid_svg_and_identical_when_rerun(tmp_path: Path) -> None:
    write_plots = load_script("bench_plots").write_plots
    first = write_plots(FILES, tmp_path / "a")
    assert [p.name for p in first] == ["throughput.svg", "stages.svg"]
    for path in first:
        assert ET.parse(path).getroot().tag == "{http://www.w3.org/2000/svg}svg"
    again = write_plots(FILES, tmp_path / "b")
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in first]


def test_each_plot_needs_its_rows(tmp_path: Path) -> None:
    write_plots = load_script("bench_plots").write_plots
    assert [p.name for p in write_plots(FILES[:1], tmp_path / "runs")] == ["stages.svg"]
    # caprl-local alone: nothing to compare its stages with, and no captions in flight
    report = json.loads(FILES[1].read_text())
    del report["throughput"]
    (tmp_path / "alone.json").write_text(json.dumps(report))
    assert write_plots([tmp_path / "alone.json"], tmp_path / "none") == []
    assert not list((tmp_path / "none").iterdir())
