"""models.toml: the shipped registry, the user's additions and overrides, and errors naming the line."""

from __future__ import annotations

from pathlib import Path

import pytest

from caprl_local import ModelFileError, UnknownModelError
from caprl_local.registry import get_model, load_registry, user_models_path


def test_shipped_registry(tmp_path: Path) -> None:
    models = load_registry(user_file=tmp_path / "none.toml")
    spec = models["caprl-3b"]
    assert spec.repo == "mradermacher/CapRL-3B-GGUF" and spec.imatrix_repo == "mradermacher/CapRL-3B-i1-GGUF"
    assert spec.mmproj_repo == "mradermacher/CapRL-3B-GGUF" and spec.architecture == "qwen2vl"
    assert (spec.default_quant, spec.default_mmproj_quant) == ("Q4_K_M", "f16")
    assert spec.prompt == "Please describe this image in detail"
    for name, repo in (("caprl-qwen3vl-2b", "internlm/CapRL-Qwen3VL-2B-GGUF"),
                       ("caprl-qwen3vl-4b", "internlm/CapRL-Qwen3VL-4B-GGUF")):
        assert models[name].repo == repo and models[name].architecture == "qwen3vl"


def test_user_file_adds_and_overrides(tmp_path: Path) -> None:
    user = tmp_path / "models.toml"
    user.write_text(
        '[caprl-3b]\ndefault_quant = "Q8_0"\n\n'
        '[my-captioner]\nrepo = "me/My-GGUF"\narchitecture = "qwen2vl"\ndefault_quant = "Q5_K_M"\n'
    )
    models = load_registry(user_file=user)
    assert models["caprl-3b"].default_quant == "Q8_0"
    assert models["caprl-3b"].repo == "mradermacher/CapRL-3B-GGUF"  # other fields kept
    assert models["my-captioner"].repo == "me/My-GGUF" and models["my-captioner"].default_mmproj_quant == "f16"


def test_user_file_lives_in_the_platform_config_dir() -> None:
    # The test session points XDG_CONFIG_HOME at a temporary folder.
    assert user_models_path().parts[-2:] == ("caprl-local", "models.toml")
    assert "config" in str(user_models_path())


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('[x]\nrepo = "a/b"\narchitecture = "qwen2vl"\ndefault_quant = "Q4_K_M"\nquants = "Q4"\n',
         ["models.toml:5", "unknown field 'quants'"]),
        ('[x]\nrepo = "a/b"\n', ["[x] lacks required field(s) architecture, default_quant"]),
        ('[x]\nrepo = "not a repo"\narchitecture = "a"\ndefault_quant = "Q"\n', [":2", "not a Hub repo"]),
        ('[x]\nrepo = 3\n', [":2", "must be a string"]),
        ('[x\nrepo = "a/b"\n', ["invalid TOML"]),
    ],
)
def test_bad_user_files_name_the_line(tmp_path: Path, text: str, words: list[str]) -> None:
    user = tmp_path / "models.toml"
    user.write_text(text)
    with pytest.raises(ModelFileError) as info:
        load_registry(user_file=user)
    for word in words:
        assert word in str(info.value)
    assert str(user) in str(info.value)


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(UnknownModelError, match="caprl-3b"):
        get_model("caprl-9b")
    assert get_model("CapRL-3B").name == "caprl-3b"
