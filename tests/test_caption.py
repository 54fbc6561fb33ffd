"""End to end through the real llama.cpp: the tiny CapRL-3B pair captions real image files."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from helpers import load_script, same_but_near_ties
from PIL import Image

from caprl_local import CaprlError, Caption, Captioner, EngineError, ImageError

GOOD_SIZES = load_script("make_test_images").GOOD

SHORT = {"max_tokens": 24}


@pytest.mark.parametrize("name", sorted(GOOD_SIZES))
def test_every_format_captions(captioner: Captioner, images: Path, name: str) -> None:
    result = captioner.caption(images / name, **SHORT)
    assert isinstance(result, Caption)
    assert result.text
    assert result.image_tokens > 0
    assert result.prompt_tokens > result.image_tokens
    assert 0 < result.generated_tokens <= 24
    assert result.finish_reason in ("stop", "length")
    t = result.timings
    assert t.total_s >= t.image_encode_s + t.generation_s
    assert t.image_encode_s > 0 and t.generation_tokens_per_s > 0


def test_greedy_and_seeded_sampling_repeat_exactly(captioner: Captioner, images: Path) -> None:
    photo = images / "photo.jpg"
    assert captioner.caption(photo, seed=1, **SHORT).text == captioner.caption(photo, seed=1, **SHORT).text
    hot = dict(temperature=0.9, seed=7, **SHORT)
    assert captioner.caption(photo, **hot).text == captioner.caption(photo, **hot).text


def test_the_image_changes_the_caption(captioner: Captioner, images: Path) -> None:
    texts = {captioner.caption(images / name, **SHORT).text for name in ("photo.jpg", "cmyk.jpg", "panorama.png")}
    assert len(texts) == 3


def test_stream_yields_the_same_text(captioner: Captioner, images: Path) -> None:
    pieces = list(captioner.stream(images / "alpha.png", **SHORT))
    assert len(pieces) > 1
    assert "".join(pieces) == captioner.caption(images / "alpha.png", **SHORT).text


def test_in_memory_inputs_match_the_file(captioner: Captioner, images: Path) -> None:
    path = images / "photo.jpg"
    expected = captioner.caption(path, **SHORT).text
    assert captioner.caption(path.read_bytes(), **SHORT).text == expected
    with Image.open(path) as pil:
        assert captioner.caption(pil, **SHORT).text == expected
        assert captioner.caption(np.asarray(pil), **SHORT).text == expected


def test_prompt_and_presets(captioner: Captioner, images: Path) -> None:
    default = captioner.caption(images / "photo.jpg", **SHORT)
    short = captioner.caption(images / "photo.jpg", preset="short", **SHORT)
    custom = captioner.caption(images / "photo.jpg", prompt="What colour is the disc? <image>", **SHORT)
    assert len({default.prompt_tokens, short.prompt_tokens, custom.prompt_tokens}) == 3
    with pytest.raises(CaprlError, match="unknown preset"):
        captioner.caption(images / "photo.jpg", preset="nope")
    with pytest.raises(CaprlError, match="either a prompt or a preset"):
        captioner.caption(images / "photo.jpg", prompt="x", preset="short")


def test_max_image_tokens_caps_the_image(tiny_model: tuple[Path, Path], images: Path, captioner: Captioner) -> None:
    full = captioner.caption(images / "photo.jpg", max_tokens=1).image_tokens
    with Captioner(*tiny_model, image_max_tokens=64, threads=1) as small:
        capped = small.caption(images / "photo.jpg", max_tokens=1).image_tokens
        panorama = small.caption(images / "panorama.png", max_tokens=1).image_tokens
    assert capped <= 64 < full
    assert panorama <= 64


def test_max_tokens_stops_generation(captioner: Captioner, images: Path) -> None:
    result = captioner.caption(images / "photo.jpg", max_tokens=3, repeat_penalty=1.0)
    assert result.generated_tokens <= 3


def test_one_captioner_is_safe_across_threads(captioner: Captioner, images: Path) -> None:
    names = ["photo.jpg", "alpha.png", "cmyk.jpg", "palette.png"]
    expected = {n: captioner.caption(images / n, **SHORT).text for n in names}
    got: dict[str, str] = {}

    def work(n: str) -> None:
        got[n] = captioner.caption(images / n, **SHORT).text

    threads = [threading.Thread(target=work, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert same_but_near_ties(got, expected)


def test_bad_image_is_an_image_error_and_the_captioner_goes_on(captioner: Captioner, images: Path) -> None:
    with pytest.raises(ImageError, match="truncated"):
        captioner.caption(images / "truncated.jpg")
    assert captioner.caption(images / "photo.jpg", **SHORT).text


def test_closed_captioner_refuses_work(tiny_model: tuple[Path, Path], images: Path) -> None:
    cap = Captioner(*tiny_model, threads=1)
    cap.close()
    cap.close()  # twice is fine
    with pytest.raises(EngineError, match="closed"):
        cap.caption(images / "photo.jpg")


def test_repacked_weight_layouts_give_the_same_caption(tiny_model: tuple[Path, Path], images: Path,
                                                       captioner: Captioner) -> None:
    expected = captioner.caption(images / "photo.jpg", **SHORT).text
    for repack in (True, False):
        with Captioner(*tiny_model, threads=1, repack=repack) as cap:
            assert cap.caption(images / "photo.jpg", **SHORT).text == expected
