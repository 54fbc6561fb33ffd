"""An application type-checking its use of caprl-local sees the library's types (PEP 561)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import ROOT


def test_the_package_ships_its_types() -> None:
    assert (ROOT / "caprl_local" / "py.typed").is_file()
    assert '"py.typed"' in (ROOT / "pyproject.toml").read_text()  # in the wheel's package data


def test_an_applications_type_checker_sees_the_types(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    api = pytest.importorskip("mypy.api")
    app = tmp_path / "app.py"
    app.write_text(
        "from caprl_local import Captioner, CaptionFailure\n"
        "with Captioner('m.gguf', 'p.gguf') as cap:\n"
        "    n: int = cap.caption('x.jpg').text\n"
        "    for r in cap.caption_many(['a.jpg']):\n"
        "        r.text\n"
    )
    (tmp_path / "mypy.ini").write_text("[mypy]\nignore_missing_imports = True\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MYPYPATH", str(ROOT))  # as an installed package would be found
    out, err, code = api.run([str(app), "--config-file", str(tmp_path / "mypy.ini"), "--no-incremental",
                              "--cache-dir", os.devnull])
    assert code == 1, out + err
    assert 'expression has type "str", variable has type "int"' in out  # caption() is typed, through __init__
    assert 'Item "CaptionFailure" of "Caption | CaptionFailure" has no attribute "text"' in out  # caption_many() too
