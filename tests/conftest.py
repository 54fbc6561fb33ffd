"""Shared fixtures: tiny format-true models and real image files, built by scripts/ into tmp dirs."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import load_script


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(text model, mmproj) of a tiny random-weight CapRL-3B."""
    return load_script("make_tiny_model").write_tiny_pair(tmp_path_factory.mktemp("model"), seed=0)


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of real image files, good and broken (see scripts/make_test_images.py)."""
    return load_script("make_test_images").write_all(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="session")
def captioner(tiny_model: tuple[Path, Path]):
    from caprl_local import Captioner

    with Captioner(*tiny_model, threads=2) as cap:
        yield cap
