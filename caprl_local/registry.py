"""The models caprl-local knows by name: models.toml, shipped and the user's, as typed specs.

Pure: reads TOML, touches nothing else. A user's ``models.toml`` in the platform's
config directory adds entries and overrides fields of shipped ones.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from .errors import ModelFileError, UnknownModelError
from .prompts import DEFAULT_PROMPT

DEFAULT_MODEL = "caprl-3b"


@dataclass(frozen=True)
class ModelSpec:
    """One model: where its quants and vision projector live on the Hub."""

    name: str
    repo: str  # static quants
    architecture: str  # the text model's GGUF architecture (qwen2vl, qwen3vl, ...)
    default_quant: str
    description: str = ""
    imatrix_repo: str | None = None  # imatrix ("i1") quants, if published
    mmproj_repo: str | None = None  # where the projector lives when the quant's repo has none
    default_mmproj_quant: str = "f16"
    prompt: str = DEFAULT_PROMPT


_REQUIRED = ("repo", "architecture", "default_quant")
_FIELDS = {f.name: f for f in fields(ModelSpec)}
# A Hub repo id: owner/name, each of ASCII letters, digits, . _ - (not starting or ending with . or -), no "..".
_REPO_PART = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?")


def valid_repo_id(text: str) -> bool:
    """Whether `text` is spelled as a Hub repo id (owner/name) may be: nothing a path could misread."""
    parts = text.split("/")
    return len(parts) == 2 and all(_REPO_PART.fullmatch(p) and ".." not in p for p in parts)


def user_models_path() -> Path:
    """Where a user's own models.toml lives (the platform's config directory)."""
    from platformdirs import user_config_path

    return user_config_path("caprl-local") / "models.toml"


def load_registry(*, user_file: Path | None = None) -> dict[str, ModelSpec]:
    """The shipped registry, extended and overridden by the user's models.toml if it exists."""
    shipped = resources.files("caprl_local").joinpath("models.toml").read_text(encoding="utf-8")
    tables = {name: (table, "models.toml") for name, table in _parse(shipped, "models.toml").items()}
    user = user_file if user_file is not None else user_models_path()
    if user.is_file():
        for name, table in _parse(user.read_text(encoding="utf-8"), str(user)).items():
            base = tables.get(name, ({}, ""))[0]
            tables[name] = ({**base, **table}, str(user))
    return {name: _to_spec(name, table, source) for name, (table, source) in tables.items()}


def get_model(name: str, registry: Mapping[str, ModelSpec] | None = None) -> ModelSpec:
    """The spec of a model by name; unknown names list the known ones."""
    registry = load_registry() if registry is None else registry
    try:
        return registry[name.lower()]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}; known models: {', '.join(sorted(registry))} "
            "(or give a Hub repo as owner/name, or a path to a .gguf file)"
        ) from None


def _parse(text: str, source: str) -> dict[str, dict[str, Any]]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ModelFileError(f"{source}: invalid TOML ({exc}); fix the file") from exc
    lines = text.splitlines()
    out: dict[str, dict[str, Any]] = {}
    for name, table in data.items():
        if not isinstance(table, dict):
            raise ModelFileError(f"{source}:{_line_of(lines, name)}: {name!r} must be a [table] of model fields")
        for key, value in table.items():
            where = f"{source}:{_line_of(lines, key, table=name)}"
            if key not in _FIELDS or key == "name":
                raise ModelFileError(f"{where}: unknown field {key!r} in [{name}]; known fields: {', '.join(_known())}")
            if not isinstance(value, str):
                raise ModelFileError(f"{where}: field {key!r} in [{name}] must be a string")
            if key.endswith("repo") and not valid_repo_id(value):
                raise ModelFileError(f"{where}: {key} = {value!r} in [{name}] is not a Hub repo id (owner/name, of "
                                     "letters, digits, '.', '_' and '-', without '..')")
        out[name.lower()] = dict(table)
    return out


def _to_spec(name: str, table: dict[str, Any], source: str) -> ModelSpec:
    missing = [key for key in _REQUIRED if key not in table]
    if missing:
        raise ModelFileError(f"{source}: [{name}] lacks required field(s) {', '.join(missing)}")
    return ModelSpec(name=name, **table)


def _known() -> list[str]:
    return [f for f in _FIELDS if f != "name"]


def _line_of(lines: list[str], key: str, *, table: str | None = None) -> int:
    """1-based line of `key` (inside [table] if given), for messages; 0 if not found."""
    start = 0
    if table is not None:
        header = re.compile(rf"^\s*\[\s*[\"']?{re.escape(table)}[\"']?\s*\]")
        start = next((i for i, line in enumerate(lines) if header.match(line)), 0)
        pattern = re.compile(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*=")
    else:
        pattern = re.compile(rf"^\s*\[?\s*[\"']?{re.escape(key)}[\"']?\s*[\]=]")
    return next((i + 1 for i in range(start, len(lines)) if pattern.match(lines[i])), 0)


def is_repo_id(text: str) -> bool:
    """True for 'owner/name' (and not for a path that exists on disk)."""
    return valid_repo_id(text) and not os.path.exists(text)
