"""The library's messages speak of the library; the CLI adds its flags and commands."""

from __future__ import annotations

import ast
import re

from helpers import ROOT

CLI_WORDS = re.compile(r"(?<![\w-])--[a-z]|caprl-local (pull|caption|models|rm)\b")


def _raised_strings(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            for part in ast.walk(node.exc):
                if isinstance(part, ast.Constant) and isinstance(part.value, str):
                    found.append((part.lineno, part.value))
    return found


def test_library_errors_carry_no_cli_advice() -> None:
    """A desktop app shows these messages to its users, who have no command line."""
    offenders = []
    for path in sorted((ROOT / "caprl_local").rglob("*.py")):
        if path.parent.name == "cli" or path.name == "console.py":  # the CLI's own words
            continue
        for line, text in _raised_strings(ast.parse(path.read_text(encoding="utf-8"))):
            if CLI_WORDS.search(text):
                offenders.append(f"{path.relative_to(ROOT)}:{line}: {text!r}")
    assert offenders == []
