"""The families the engine knows, by text architecture: a new family is its module and a line here."""

from __future__ import annotations

from . import internvl, qwen2vl, qwen3vl
from .base import Family

#: Text model architecture (general.architecture) -> its family.
FAMILIES: dict[str, Family] = {f.architecture: f for f in (qwen2vl.FAMILY, qwen3vl.FAMILY, internvl.FAMILY)}
SUPPORTED_ARCHITECTURES = frozenset(FAMILIES)
#: Each known projector type, as messages name it.
PROJECTOR_NAMES = {"qwen2vl_merger": "Qwen2-VL", "qwen2.5vl_merger": "Qwen2.5-VL", "qwen3vl_merger": "Qwen3-VL",
                   "internvl": "InternVL"}
