"""Several captions in flight in one llama.cpp context: no cross-talk, same captions, order kept."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import run_cli

from caprl_local import Caption, Captioner, CaptionFailure, engine
from caprl_local.images import load_ahead

NAMES = ["photo.jpg", "alpha.png", "missing.jpg", "cmyk.jpg", "truncated.jpg", "palette.png", "pixel.png",
         "panorama.png", "deep16.png", "rotated.jpg"]


def test_parallel_gives_the_sequential_captions_in_order(captioner: Captioner, images: Path) -> None:
    paths = [images / n for n in NAMES]  # 10 images, 2 broken: slots get refilled and fail alone
    sequential = list(captioner.caption_many(paths, max_tokens=40))
    seen: list[int] = []
    parallel = list(captioner.caption_many(paths, max_tokens=40, parallel=3, progress=lambda d, t: seen.append(d)))
    assert [type(r) for r in parallel] == [type(r) for r in sequential]
    assert [type(r) for r in parallel].count(CaptionFailure) == 2
    for a, b in zip(sequential, parallel):
        if isinstance(a, Caption):
            assert (b.text, b.generated_tokens, b.image_tokens) == (a.text, a.generated_tokens, a.image_tokens)
        else:
            assert b.error == a.error
    assert seen == list(range(1, 11))
    assert captioner.caption(images / "photo.jpg", max_tokens=40).text == sequential[0].text  # still fine alone


def test_no_cross_talk_between_sequences(captioner: Captioner, images: Path) -> None:
    """Each sequence's logits in a batch are far closer to its own solo run than to another's."""
    paths = [images / n for n in ("photo.jpg", "cmyk.jpg", "alpha.png", "panorama.png")]

    def logits(groups: list[list[Path]]) -> dict[tuple[str, int], np.ndarray]:
        out: dict[tuple[str, int], np.ndarray] = {}
        opts = captioner._gen_options(max_tokens=6, repeat_penalty=1.0)
        for group in groups:  # the batched path, also for a group of one
            captioner._probe = lambda i, step, l, group=group: out.__setitem__((group[i].name, step), l)
            loaded = enumerate(load_ahead(group, load=captioner._load_prepared))
            list(captioner._run_parallel(loaded, opts, len(group)))
        captioner._probe = None
        return out

    together = logits([paths])
    alone = logits([[p] for p in paths])
    for step in range(1, 5):
        for p in paths:
            own = np.abs(together[(p.name, step)] - alone[(p.name, step)]).max()
            others = min(np.abs(together[(p.name, step)] - alone[(q.name, step)]).max() for q in paths if q != p)
            spread = np.ptp(alone[(p.name, step)])
            assert own < 0.05 * spread < others, (p.name, step, own, others, spread)


def test_parallel_must_be_positive(captioner: Captioner, images: Path) -> None:
    from caprl_local import CaprlError

    with pytest.raises(CaprlError, match="parallel"):
        list(captioner.caption_many([images / "photo.jpg"], parallel=0))


def test_auto_parallel_fits_memory_and_the_device(captioner: Captioner) -> None:
    n = captioner.auto_parallel()  # a CPU build here: 4 at most up to 4 threads, 8 above
    assert 1 <= n <= (4 if captioner.threads <= 4 else 8)
    assert captioner.auto_parallel(limit=1) == 1
    assert engine._gpu_free_memory() is None  # no GPU device in a CPU build


def test_cli_parallel_matches_sequential(tiny_model: tuple[Path, Path], images: Path) -> None:
    model, mmproj = tiny_model
    args = ["caption", str(images / "photo.jpg"), str(images / "cmyk.jpg"), str(images / "alpha.png"),
            "--model", str(model), "--mmproj", str(mmproj), "--max-tokens", "20", "--format", "jsonl"]
    one = run_cli(*args, "--parallel", "1")
    auto = run_cli(*args)  # default: auto
    three = run_cli(*args, "--parallel", "3")
    assert one.returncode == auto.returncode == three.returncode == 0, three.stderr
    captions = [[line.split('"caption": ')[1].split('", "')[0] for line in r.stdout.splitlines()] for r in (one, auto, three)]
    assert captions[0] == captions[1] == captions[2]
    assert run_cli(*args, "--parallel", "zero").returncode == 2
