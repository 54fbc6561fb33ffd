#!/usr/bin/env python3
"""Plot benchmark results: read bench.json files written by scripts/bench.py, write SVG plots.

    python scripts/bench_plots.py docs/bench-caprl-3b-cpu-parallel/bench.json ... --out docs/plots

Each plot takes what it needs from whichever files carry it:

- throughput.svg: images per minute against captions in flight (files with "throughput" rows),
  one panel per machine and workload;
- stages.svg: where a caption's time goes, stage by stage, caprl-local against llama-mtmd-cli
  (every run that has both tools), one panel per file.

Files are labelled by their folder (docs/bench-caprl-3b-cpu-parallel -> caprl-3b-cpu-parallel).
The same inputs and matplotlib version give byte-identical SVGs, so regenerated plots only show
up in a diff when the numbers change. Needs matplotlib: pip install -e '.[bench]'.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
from matplotlib.axes import Axes  # noqa: E402  (after the backend is chosen)
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

# SVG element ids are random unless salted, and the date is written unless withheld: both
# would make every regeneration a diff. Text as paths renders the same without the fonts.
matplotlib.rcParams.update({"svg.hashsalt": "caprl-local-bench", "svg.fonttype": "path", "font.size": 9})
SVG_METADATA = {"Date": None}

TOOLS = ("caprl-local", "llama-mtmd-cli")
CALLERS = re.compile(r"(\d+) threads calling caption\(\)")
#: (name, colour) in the order a caption goes through them; the last is what the measured
#: total leaves over (process exit, freeing the model), so the bars add up to the total.
STAGES = (("start → encode (load)", "#4e79a7"), ("image encode", "#f28e2b"), ("prompt", "#59a14f"),
          ("generation", "#e15759"), ("exit, other", "#bab0ac"))


@dataclass(frozen=True)
class Bench:
    """One bench.json and the label its plots give it."""

    label: str
    report: dict[str, Any]


def load(paths: list[Path]) -> list[Bench]:
    """Read bench.json files; each is labelled by its folder, without the "bench-" prefix."""
    benches = []
    for path in paths:
        label = path.parent.name.removeprefix("bench-") or path.stem
        benches.append(Bench(label, json.loads(path.read_text())))
    return benches


def _seconds(value: Any) -> float:
    """A number from the JSON, 0 where a tool did not report it (None or NaN)."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else 0.0


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, format="svg", metadata=SVG_METADATA)
    return path


# --- images per minute against captions in flight --------------------------------------------


def _panel_key(report: dict[str, Any]) -> tuple[str, int, int, int]:
    """Runs are only comparable on the same machine with the same work: one panel for each."""
    rows = report["throughput"]
    return report["machine"], report["threads"], rows[0]["images"], report["new_tokens"]


def plot_throughput(benches: list[Bench], path: Path) -> Path | None:
    """Images per minute against captions in flight, one line per file; threads calling
    caption() are hollow squares, one llama-mtmd-cli run per image a dashed line."""
    panels: dict[tuple[str, int, int, int], list[Bench]] = {}
    for bench in benches:
        if bench.report.get("throughput"):
            panels.setdefault(_panel_key(bench.report), []).append(bench)
    if not panels:
        return None
    fig = Figure(figsize=(5.6 * len(panels), 4.4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, ((machine, threads, images, new_tokens), members) in zip(axes, panels.items(), strict=True):
        widths: set[int] = set()
        kinds: set[str] = set()
        for i, bench in enumerate(members):
            color = f"C{i % 10}"
            rows = bench.report["throughput"]
            flight = sorted((r["in_flight"], r["images_per_min"]) for r in rows if isinstance(r["in_flight"], int))
            callers = [(int(m.group(1)), r["images_per_min"]) for r in rows
                       if (m := CALLERS.fullmatch(str(r["in_flight"])))]
            theirs = [r["images_per_min"] for r in rows if str(r["in_flight"]).startswith("llama-mtmd-cli")]
            if flight:
                ax.plot(*zip(*flight, strict=True), "o-", color=color, label=bench.label)
            if callers:
                ax.plot(*zip(*callers, strict=True), "s", mfc="none", mew=1.5, ms=8, color=color,
                        label=None if flight else bench.label)
                kinds.add("callers")
            for y in theirs:
                ax.axhline(y, ls="--", lw=1.2, color=color)
                kinds.add("theirs")
            widths.update(x for x, _ in flight + callers)
        ax.set_xscale("log", base=2)  # widths double (1, 2, 4, 8, 16): equal steps on the axis
        ax.set_xticks(sorted(widths), [str(w) for w in sorted(widths)])
        ax.minorticks_off()
        ax.set_ylim(bottom=0, top=ax.get_ylim()[1] * 1.08)
        ax.set_xlabel("captions in flight")
        ax.set_ylabel("images / minute")
        ax.set_title(f"{machine}, {threads} threads\n{images} images, {new_tokens} new tokens each")
        ax.grid(True, alpha=0.3)
        handles, _ = ax.get_legend_handles_labels()
        if "callers" in kinds:
            handles.append(Line2D([], [], ls="none", marker="s", mfc="none", mew=1.5, ms=8, color="0.35",
                                  label="threads calling caption()"))
        if "theirs" in kinds:
            handles.append(Line2D([], [], ls="--", lw=1.2, color="0.35", label="llama-mtmd-cli, one run per image"))
        ax.legend(handles=handles, loc="upper left", fontsize=8)
    return _save(fig, path)


# --- where a caption's time goes --------------------------------------------------------------


def stage_seconds(tool: dict[str, Any], prompt_tokens: int) -> list[float]:
    """Seconds in each of STAGES for one tool's run. The JSON keeps prompt and generation as
    rates, so their seconds are tokens / rate; the last stage is what the measured total
    (wall_s) leaves over, never below 0 (one token's rounding can tip the sum past it)."""
    prompt_rate, gen_rate = _seconds(tool.get("prompt_tok_s")), _seconds(tool.get("gen_tok_s"))
    stages = [_seconds(tool.get("ready_s")), _seconds(tool.get("encode_s")),
              prompt_tokens / prompt_rate if prompt_rate else 0.0,
              _seconds(tool.get("new_tokens")) / gen_rate if gen_rate else 0.0]
    return stages + [max(0.0, _seconds(tool.get("wall_s")) - sum(stages))]


def _compared_runs(bench: Bench) -> list[dict[str, Any]]:
    return [run for run in bench.report.get("runs", []) if all(run.get(tool) for tool in TOOLS)]


def _stage_panel(ax: Axes, bench: Bench, runs: list[dict[str, Any]]) -> None:
    """Horizontal bars, read left to right like the caption's timeline: one per tool and run."""
    labels, bars = [], []
    for run in runs:
        prefix = f"image {run['size']}, {run['image_tokens']} image tokens · " if len(runs) > 1 else ""
        # Both tools get the same prompt; only caprl-local's row records its length.
        prompt_tokens = int(run["caprl-local"].get("prompt_tokens") or run["image_tokens"])
        for tool in TOOLS:
            labels.append(prefix + tool)
            bars.append((stage_seconds(run[tool], prompt_tokens), _seconds(run[tool].get("wall_s"))))
    longest = max(sum(stages) for stages, _ in bars)
    for y, (stages, total) in enumerate(bars):
        left = 0.0
        for width, (_, color) in zip(stages, STAGES, strict=True):
            ax.barh(y, width, left=left, color=color, height=0.7)
            if width > 0.04 * longest:  # label only the segments wide enough to hold one
                ax.text(left + width / 2, y, f"{width:.1f}", ha="center", va="center", fontsize=7.5, color="white")
            left += width
        ax.text(left + 0.01 * longest, y, f"{total:.1f} s", va="center", fontsize=8)
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()  # the first run, caprl-local first, on top
    ax.set_xlim(0, longest * 1.12)
    ax.set_xlabel("seconds from process start")
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    run = runs[0]
    what = (f"image {run['size']}, {run['image_tokens']} image tokens, " if len(runs) == 1 else "") + \
        f"{bench.report['new_tokens']} new tokens, {bench.report['threads']} threads"
    ax.set_title(f"{bench.label}: {what}", loc="left", fontsize=9)


def plot_stages(benches: list[Bench], path: Path) -> Path | None:
    """Stacked bars of each stage's seconds, caprl-local over llama-mtmd-cli, one panel per file
    (each with its own scale: a GPU caption takes seconds, a large image on a CPU minutes)."""
    panels = [(bench, runs) for bench in benches if (runs := _compared_runs(bench))]
    if not panels:
        return None
    heights = [0.75 + 0.42 * 2 * len(runs) for _, runs in panels]
    fig = Figure(figsize=(8.5, sum(heights) + 0.6), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False, height_ratios=heights)[:, 0]
    for ax, (bench, runs) in zip(axes, panels, strict=True):
        _stage_panel(ax, bench, runs)
    fig.legend(handles=[Patch(color=color, label=name) for name, color in STAGES], loc="outside upper center",
               ncols=len(STAGES), fontsize=8, frameon=False)
    return _save(fig, path)


# --- entry points -----------------------------------------------------------------------------


def write_plots(paths: list[Path], out: Path) -> list[Path]:
    """Write every plot the files have data for into `out`; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    benches = load(paths)
    written = [plot_throughput(benches, out / "throughput.svg"), plot_stages(benches, out / "stages.svg")]
    return [path for path in written if path]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path, metavar="bench.json", help="written by scripts/bench.py")
    parser.add_argument("--out", type=Path, help="folder for the SVGs (default: the first file's folder)")
    args = parser.parse_args()
    written = write_plots(args.files, args.out or args.files[0].parent)
    if not written:
        raise SystemExit("nothing to plot: no throughput rows, and no run with both caprl-local and llama-mtmd-cli")
    print("\n".join(map(str, written)))


if __name__ == "__main__":
    main()
