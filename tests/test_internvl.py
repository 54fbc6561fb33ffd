"""CapRL-InternVL3.5-8B: a tiny format-true InternVL pair (InternViT + Qwen3) through the real
llama.cpp, the CLI and a local Hub stand-in with a community repo's file names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fake_hub import FakeHub, pull_then_caption_offline, serving
from helpers import load_script, run_cli
from PIL import Image

from caprl_local import CaprlError, Captioner, ModelFileError
from caprl_local.hub import cache_root
from caprl_local.prompts import CHATML

tiny = load_script("make_tiny_model")
REPO = "Jobaar/CapRL-InternVL3.5-8B-GGUF"


@pytest.fixture(scope="module")
def internvl(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return tiny.write_tiny_pair(tmp_path_factory.mktemp("internvl"), shape="tiny-internvl")


@pytest.fixture(scope="module")
def cap(internvl: tuple[Path, Path]):
    with Captioner(*internvl, threads=1) as captioner:
        yield captioner


def test_captions_real_images(cap: Captioner, internvl: tuple[Path, Path], images: Path) -> None:
    assert cap.architecture == "qwen3" and cap.chat_format == CHATML  # InternVL3.5's own template
    verdicts = json.loads((cache_root() / "loaded-pairs.json").read_text())  # the first-load check passed, once
    assert [v for k, v in verdicts.items() if str(internvl[0].resolve()) in k] == ["ok"]
    texts = {cap.caption(images / name, max_tokens=12).text for name in ("photo.jpg", "rotated.jpg", "alpha.png")}
    assert all(texts) and len(texts) > 1  # the image reaches the text model


def test_the_token_cap_bounds_the_tiles(internvl: tuple[Path, Path], images: Path) -> None:
    """256 tokens a 448-pixel tile, plus an overview: the cap picks the grid, whatever the image."""
    photo = Image.fromarray((np.random.default_rng(0).random((3000, 4000, 3)) * 255).astype(np.uint8))  # 12 MP
    strip = Image.fromarray((np.random.default_rng(1).random((40, 6000, 3)) * 255).astype(np.uint8))
    for limit in (256, 1024, 2048):
        with Captioner(*internvl, threads=1, image_max_tokens=limit) as capped:
            spent = [capped.caption(image, max_tokens=1).image_tokens for image in (photo, strip, images / "rotated.jpg")]
        assert all(256 <= tokens <= limit for tokens in spent), (limit, spent)
    assert spent[1] == 2048  # the strip: 7 tiles in a row and the overview
    with pytest.raises(CaprlError, match="256 tokens on each image tile"):
        Captioner(*internvl, threads=1, image_max_tokens=100)


def test_the_cli_captions_with_it(internvl: tuple[Path, Path], images: Path) -> None:
    result = run_cli("caption", str(images / "photo.jpg"), "-m", str(internvl[0]), "-t", "1", "-n", "8")
    assert result.returncode == 0 and result.stdout.strip(), result.stderr


def test_a_qwen_projector_with_internvl_and_the_reverse_are_refused(internvl: tuple[Path, Path],
                                                                   tiny_model: tuple[Path, Path]) -> None:
    with pytest.raises(ModelFileError, match="is a Qwen2.5-VL projector, but .* is a InternVL text model"):
        Captioner(internvl[0], tiny_model[1], threads=1)
    with pytest.raises(ModelFileError, match="is a InternVL projector, but .* is a Qwen2-VL / Qwen2.5-VL text model"):
        Captioner(tiny_model[0], internvl[1], threads=1)


@pytest.fixture()
def hub(internvl: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """The community repo, with file names as a converter's user might write them."""
    model, mmproj = internvl
    server = serving(REPO, {"CapRL-InternVL3.5-8B-Q4_K_M.gguf": model.read_bytes(),
                            "CapRL-InternVL3.5-8B-q8_0.gguf": model.read_bytes() + b"\0" * 64,
                            "mmproj-CapRL-InternVL3.5-8B-f16.gguf": mmproj.read_bytes(),
                            "README.md": b"# CapRL-InternVL3.5-8B GGUF\n"}, monkeypatch, tmp_path / "cache")
    yield server
    server.stop()


def test_the_registry_entry_pulls_from_the_community_repo(hub: FakeHub, images: Path) -> None:
    listed = run_cli("models")
    assert "caprl-internvl3.5-8b" in listed.stdout and "community" in listed.stdout
    assert pull_then_caption_offline(hub, "caprl-internvl3.5-8b", REPO, images / "photo.jpg") == [
        "CapRL-InternVL3.5-8B-Q4_K_M.gguf", "mmproj-CapRL-InternVL3.5-8B-f16.gguf"]
