"""`caprl-local models`: each model, its published quants and what is cached, as text or JSON."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import click

from ..printable import human_size, printable

if TYPE_CHECKING:
    from ..hub import ModelListing


def print_models(listings: list[ModelListing], *, default: str) -> None:
    """`caprl-local models` as text: each model, its published quants (* cached) and cached files
    (names from the Hub and the user's registry are escaped)."""
    for item in listings:
        spec = item.spec
        mark = " (default)" if spec.name == default else ""
        _line(f"{spec.name}{mark}  [{spec.architecture}]  {spec.description}")
        _line(f"  repo: {spec.repo}" + (f"   imatrix: {spec.imatrix_repo}" if spec.imatrix_repo else ""))
        cached = {(c.repo, c.filename) for c in item.cached}
        if item.available is not None:
            quants = [f for f in item.available if not f.projector]
            shown = ", ".join(
                f"{'i1-' if f.imatrix else ''}{f.quant} {human_size(f.size)}{' *' if (f.repo, f.filename) in cached else ''}"
                for f in sorted(quants, key=lambda f: (f.imatrix, f.size))
            )
            _line(f"  quants: {shown or 'none published yet'}")
            if item.error:  # one of the model's repos did not answer: what the others list is above
                _line(f"  partly listed: {item.error}")
        elif item.error != "offline":
            _line(f"  quants: not listed ({item.error})")
        for c in item.cached:
            _line(f"  cached: {c.filename}  {human_size(c.size)}")
        if not item.cached:
            _line("  cached: nothing")


def _line(text: str) -> None:
    click.echo(printable(text, limit=None))


def listing_json(item: ModelListing, *, default: str) -> dict[str, Any]:
    """`caprl-local models --json`: one model as a JSON object."""
    cached = {(c.repo, c.filename): c for c in item.cached}
    return {
        **asdict(item.spec),
        "default": item.spec.name == default,
        "available": None if item.available is None else [
            {**asdict(f), "cached": (f.repo, f.filename) in cached} for f in item.available
        ],
        "cached": [{**asdict(c), "path": str(c.path)} for c in item.cached],
        "cached_bytes": sum(c.size for c in item.cached),
        "error": item.error,  # why "available" is null: "offline", or what the Hub answered
    }
