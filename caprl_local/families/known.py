"""The families the engine knows, by text architecture: a new family is its module and a line here."""

from __future__ import annotations

from ..errors import CaprlError
from ..videoprompt import VideoForm
from . import internvl, qwen2vl, qwen3vl
from .base import Family

#: Text model architecture (general.architecture) -> its family.
FAMILIES: dict[str, Family] = {f.architecture: f for f in (qwen2vl.FAMILY, qwen3vl.FAMILY, internvl.FAMILY)}
SUPPORTED_ARCHITECTURES = frozenset(FAMILIES)
#: Each known projector type, as messages name it.
PROJECTOR_NAMES = {"qwen2vl_merger": "Qwen2-VL", "qwen2.5vl_merger": "Qwen2.5-VL", "qwen3vl_merger": "Qwen3-VL",
                   "internvl": "InternVL"}


def video_form(architecture: str, model: str) -> VideoForm:
    """The form a model's family reads a video in; CaprlError, naming `model`, for one that takes no video."""
    family = FAMILIES.get(architecture)
    if family is None or family.video is None:
        raise CaprlError(f"{model}: this model family cannot take video; use a Qwen-VL or InternVL model")
    return family.video
