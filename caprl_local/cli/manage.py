"""The commands around captioning: pull, models, rm, info (and bench, for a source checkout)."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict

import click

from .. import console
from ..errors import CaprlError, HubUnreachableError, OfflineError
from ..printable import human_size, printable
from ..registry import DEFAULT_MODEL
from .base import cache_dir_option, cli, model_options
from .listing import listing_json, print_models


@cli.command()
@click.argument("model", default=DEFAULT_MODEL, metavar="MODEL")
@model_options
def pull(model: str, quant: str | None, imatrix: bool, mmproj_quant: str | None, cache_dir: str | None) -> None:
    """Download MODEL (a name or owner/repo) and its vision projector, verify and cache them.

    Prints the two local paths. An interrupted pull resumes where it stopped; files already
    cached are checked against the Hub's sha256 and downloaded again if damaged.
    """
    from ..hub import download_model

    # A pull checks what is cached against the Hub's sha256 and repairs it: the network is used anyway.
    console.status(f"Asking the Hub for {model}'s files ...")  # at once: a stalled network is no silent wait
    try:
        files = download_model(model, quant=quant, imatrix=imatrix, mmproj_quant=mmproj_quant,
                               cache_dir=cache_dir, progress=console.DownloadBar(), verify=True)
    except HubUnreachableError as exc:
        # Not the general hint (--offline): a pull has no such option, and nothing whole is cached to use offline.
        raise CaprlError(f"{exc} (`caprl-local caption -m PATH.gguf`); or pull again once the Hub answers") from exc
    except OfflineError as exc:
        # Only HF_HUB_OFFLINE makes a pull offline: the general hint (`caprl-local pull ...`) would send it back here.
        raise CaprlError(f"{exc}: HF_HUB_OFFLINE is set, unset it to pull") from exc
    console.status("")
    click.echo(printable(files.model, limit=None))
    click.echo(printable(files.mmproj, limit=None))


@cli.command(name="models")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--offline", is_flag=True, help="Do not ask the Hub; show cached files only.")
@cache_dir_option
def models_cmd(as_json: bool, offline: bool, cache_dir: str | None) -> None:
    """List the known models, their published quants and what is cached."""
    from ..hub import cache_root, list_models
    from ..registry import user_models_path

    if not offline:
        console.status("Asking the Hub for the models' files ...")
    listings = list_models(cache_dir=cache_dir, offline=offline)
    console.status("")
    if as_json:
        click.echo(json.dumps([listing_json(item, default=DEFAULT_MODEL) for item in listings], indent=2))
        return
    print_models(listings, default=DEFAULT_MODEL)
    click.echo(f"\n* cached. Cache: {cache_root(cache_dir)}", err=True)
    click.echo(f"Your own models go in {user_models_path()}", err=True)


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []},
             add_help_option=False, hidden=True)  # a source checkout's tool, not a user's command
@click.pass_context
def bench(ctx: click.Context) -> None:
    """Benchmark against llama.cpp's llama-mtmd-cli (scripts/bench.py; `bench -h` for its options)."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a source checkout
    script = os.path.join(root, "scripts", "bench.py")
    if not os.path.isfile(script):
        raise CaprlError("the benchmark lives in a source checkout of caprl-local (scripts/bench.py); "
                         "run it from there")
    raise SystemExit(subprocess.call([sys.executable, script, *ctx.args]))


@cli.command(name="rm")
@click.argument("model")
@click.option("--quant", help="Remove only this quant (default: every file of the model).")
@cache_dir_option
def rm(model: str, quant: str | None, cache_dir: str | None) -> None:
    """Delete MODEL's cached files (or one quant) to free disk space."""
    from ..hub import remove_model

    removed = remove_model(model, quant=quant, cache_dir=cache_dir)
    for c in removed:
        click.echo(printable(c.path, limit=None))
    click.echo(f"Removed {len(removed)} file(s), freed {human_size(sum(c.size for c in removed))}.", err=True)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def info(as_json: bool) -> None:
    """Show versions, GPU offload support and the devices llama.cpp sees."""
    from ..engine import runtime_info

    rt = runtime_info()
    if as_json:
        click.echo(json.dumps(asdict(rt), indent=2))
        return
    rows = [
        ("caprl-local", rt.caprl_local_version),
        ("llama-cpp-python", rt.llama_cpp_python_version),
        ("GPU offload", "yes" if rt.gpu_offload else "no (this llama.cpp build runs on the CPU)"),
        ("devices", ", ".join(rt.devices) or "unknown"),
        ("system", rt.system_info),
    ]
    for key, value in rows:
        click.echo(f"{key:<17} {value}")
