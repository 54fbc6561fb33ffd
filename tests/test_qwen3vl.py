"""CapRL 2.0 (Qwen3-VL): a tiny format-true pair through the real llama.cpp, the Hub and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fake_hub import FakeHub, pull_then_caption_offline, serving
from helpers import load_script, run_cli
from PIL import Image

from caprl_local import Captioner, ModelFileError
from caprl_local.hub import download_model
from caprl_local.prompts import CHATML

tiny = load_script("make_tiny_model")
REPO = "internlm/CapRL-Qwen3VL-2B-GGUF"


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(text model, mmproj) of a tiny random-weight CapRL-Qwen3VL-2B."""
    return tiny.write_tiny_pair(tmp_path_factory.mktemp("qwen3vl"), shape="tiny-qwen3vl")


@pytest.fixture(scope="module")
def cap(qwen3: tuple[Path, Path]):
    with Captioner(*qwen3, threads=1) as captioner:
        yield captioner


@pytest.fixture(scope="module")
def square(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 320 x 320 photo: 10 x 10 tokens of 32 px for Qwen3-VL, 11 x 11 of 28 px for Qwen2.5-VL."""
    path = tmp_path_factory.mktemp("square") / "square.png"
    Image.effect_mandelbrot((320, 320), (-2, -1.5, 1, 1.5), 60).convert("RGB").save(path)
    return path


def test_captions_real_images(cap: Captioner, images: Path) -> None:
    assert cap.architecture == "qwen3vl"
    assert cap.chat_format == CHATML  # Qwen3-VL's own template, rendered by llama.cpp: no system turn
    texts = set()
    for name in ("photo.jpg", "rotated.jpg", "alpha.png", "cmyk.jpg"):
        result = cap.caption(images / name, max_tokens=12)
        assert result.text and result.image_tokens > 0 and 0 < result.generated_tokens <= 12
        texts.add(result.text)
    assert len(texts) > 1  # the image reaches the text model


def test_one_token_covers_32_by_32_pixels(cap: Captioner, qwen3: tuple[Path, Path], tiny_model: tuple[Path, Path],
                                          square: Path, images: Path) -> None:
    assert cap.caption(square, max_tokens=1).image_tokens == 10 * 10
    with Captioner(*tiny_model, threads=1) as qwen25:  # the same image costs Qwen2.5-VL 28 x 28 px tokens
        assert qwen25.caption(square, max_tokens=1).image_tokens == 11 * 11
    with Captioner(*qwen3, image_max_tokens=48, threads=1) as small:
        assert small.caption(square, max_tokens=1).image_tokens == 6 * 6  # 192 x 192 px
        assert small.caption(images / "photo.jpg", max_tokens=1).image_tokens <= 48
        assert small.caption(images / "panorama.png", max_tokens=1).image_tokens <= 48  # 6000 x 40


def test_captions_in_flight_equal_sequential_ones(qwen3: tuple[Path, Path], images: Path) -> None:
    names = [images / n for n in ("photo.jpg", "missing.jpg", "rotated.jpg", "alpha.png", "palette.png")]
    with Captioner(*qwen3, threads=1, parallel=1) as one:
        sequential = [getattr(r, "text", None) for r in one.caption_many(names, max_tokens=10)]
    with Captioner(*qwen3, threads=1, parallel=3) as three:
        parallel = [getattr(r, "text", None) for r in three.caption_many(names, max_tokens=10)]
    assert parallel == sequential and sequential[1] is None and all(sequential[i] for i in (0, 2, 3, 4))


def test_the_prompt_format_comes_from_the_models_template(tmp_path: Path, images: Path) -> None:
    gemma_like = ("{% for message in messages %}<start_of_turn>{{ message['role'] }}\n{{ message['content'] }}"
                  "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
    pair = tiny.write_tiny_pair(tmp_path, shape="tiny-qwen3vl", chat_template=gemma_like)
    with Captioner(*pair, threads=1) as other:
        assert other.chat_format == "<start_of_turn>user\n{content}<end_of_turn>\n<start_of_turn>model\n"
        assert other.caption(images / "photo.jpg", max_tokens=2).generated_tokens > 0


def _error(model: Path, mmproj: Path) -> str:
    with pytest.raises(ModelFileError) as info:
        Captioner(model, mmproj, threads=1)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_mismatched_families_are_one_line_errors(qwen3: tuple[Path, Path], tiny_model: tuple[Path, Path],
                                                 images: Path) -> None:
    message = _error(tiny_model[0], qwen3[1])
    assert f"projector {qwen3[1]}: is a Qwen3-VL projector" in message
    assert f"{tiny_model[0].name} is a Qwen2-VL / Qwen2.5-VL text model" in message
    message = _error(qwen3[0], tiny_model[1])
    assert "is a Qwen2.5-VL projector" in message and "is a Qwen3-VL text model" in message
    result = run_cli("caption", str(images / "photo.jpg"), "--model", str(qwen3[0]), "--mmproj", str(tiny_model[1]))
    assert result.returncode == 1 and result.stdout == "" and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "Qwen2.5-VL projector" in result.stderr


@pytest.mark.parametrize("drop, words", [
    ("v.deepstack.1.fc2.weight", "tensor v.deepstack.1.fc2.weight is missing"),
    ("v.position_embd.weight", "tensor v.position_embd.weight is missing"),
    ("v.blk.2.attn_qkv.bias", "tensor v.blk.2.attn_qkv.bias is missing"),
])
def test_incomplete_projectors_are_refused_before_llama_cpp(qwen3: tuple[Path, Path], tmp_path: Path,
                                                            drop: str, words: str) -> None:
    _, broken = tiny.write_tiny_pair(tmp_path, shape="tiny-qwen3vl", drop=frozenset({drop}))
    assert words in _error(qwen3[0], broken)


def test_projector_without_deepstack_does_not_fit(qwen3: tuple[Path, Path], tmp_path: Path) -> None:
    shallow = tiny.Shape(family="qwen3vl", n_layer=4, rope_sections=(3, 3, 2, 0), head_dim=16, v_image_size=64)
    path = tmp_path / "shallow.mmproj-f16.gguf"
    tiny.write_mmproj(path, shallow, tiny.np.random.default_rng(0), projection_dim=64)
    assert "produces 64-wide embeddings but" in _error(qwen3[0], path) and "expects 256" in _error(qwen3[0], path)


def test_cli_captions_a_folder_in_flight(qwen3: tuple[Path, Path], images: Path, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("photo.jpg", "rotated.jpg", "alpha.png"):
        (folder / name).write_bytes((images / name).read_bytes())
    args = ["--model", str(qwen3[0]), "--mmproj", str(qwen3[1]), "--threads", "1", "--max-tokens", "8"]
    result = run_cli("caption", str(folder), *args, "--format", "jsonl", "--parallel", "2", "--max-image-tokens", "48")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(r["path"]).name for r in records] == ["alpha.png", "photo.jpg", "rotated.jpg"]
    assert all(r["caption"] and r["image_tokens"] <= 48 for r in records)


# --- from the Hub, under internlm's file names -----------------------------------------------


@pytest.fixture()
def hub(qwen3: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """internlm's repo as published: hyphenated names, upper- and lower-case quants, a Q8_0 projector."""
    model, mmproj = qwen3
    server = serving(REPO, {"CapRL-Qwen3VL-2B-Q4_K_M.gguf": model.read_bytes(),
                            "CapRL-Qwen3VL-2B-q6_k.gguf": model.read_bytes() + b"\0" * 64,
                            "CapRL-Qwen3VL-2B-mmproj-Q8_0.gguf": mmproj.read_bytes(),
                            "README.md": b"# CapRL-Qwen3VL-2B GGUF\n"}, monkeypatch, tmp_path / "cache")
    yield server
    server.stop()


def test_pull_and_caption_from_the_internlm_repo(hub: FakeHub, images: Path) -> None:
    assert pull_then_caption_offline(hub, "caprl-qwen3vl-2b", REPO, images / "photo.jpg") == [
        "CapRL-Qwen3VL-2B-Q4_K_M.gguf", "CapRL-Qwen3VL-2B-mmproj-Q8_0.gguf"]


def test_quants_resolve_whatever_their_case(hub: FakeHub) -> None:
    files = download_model("caprl-qwen3vl-2b", quant="Q6_K")
    assert files.model.name == "CapRL-Qwen3VL-2B-q6_k.gguf" and files.mmproj.name == "CapRL-Qwen3VL-2B-mmproj-Q8_0.gguf"
    listing = json.loads(run_cli("models", "--json").stdout)
    entry = next(m for m in listing if m["name"] == "caprl-qwen3vl-2b")
    assert entry["repo"] == REPO
    quants = {q["quant"].upper(): q for q in entry["available"] if not q["projector"]}
    assert set(quants) == {"Q4_K_M", "Q6_K"} and quants["Q6_K"]["cached"] and not quants["Q4_K_M"]["cached"]
