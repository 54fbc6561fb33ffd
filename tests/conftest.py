"""Shared fixtures: tiny format-true models and real image files, built by scripts/ into tmp dirs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import load_script


@pytest.fixture(scope="session", autouse=True)
def isolated_environment(tmp_path_factory: pytest.TempPathFactory) -> None:
    """No test may reach the real Hub or touch the user's cache and config.

    HF_ENDPOINT points at a closed local port unless a test starts its own fake Hub.
    """
    home = tmp_path_factory.mktemp("home")
    os.environ.update({
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HOME": str(home / "hf"),
        "CAPRL_LOCAL_HOME": str(home / "cache"),
        "XDG_CONFIG_HOME": str(home / "config"),
        "XDG_CACHE_HOME": str(home / "xdg-cache"),
    })
    for key in ("HF_TOKEN", "HF_HUB_OFFLINE", "CAPRL_LOCAL_MODEL"):
        os.environ.pop(key, None)


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

    with Captioner(*tiny_model, threads=1) as cap:
        yield cap


@pytest.fixture
def stubs() -> Iterator[list[Any]]:
    """Local stand-in servers a test starts (anything with a stop()), stopped when it ends."""
    made: list[Any] = []
    yield made
    for stub in made:
        stub.stop()
