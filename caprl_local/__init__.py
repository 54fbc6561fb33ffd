"""caprl-local: run the CapRL captioning models (images and videos) locally through llama.cpp."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import (
    Cancelled,
    CaprlError,
    DownloadError,
    EngineError,
    HubUnreachableError,
    ImageError,
    ModelFileError,
    OfflineError,
    PromptTooLongError,
    UnknownModelError,
)

if TYPE_CHECKING:
    from .chat import ChatImage, ChatMessage, ChatVideo, assistant, system, user
    from .clips import Video
    from .engine import Captioner, CaptionHandle
    from .hub import DownloadProgress, ModelFiles, download_model, list_models
    from .registry import ModelSpec
    from .results import Activity, Caption, CaptionFailure, Timings, VideoStats

# The engine loads llama.cpp's shared libraries; import it on first use only, so that
# `import caprl_local.errors` (and the CLI's --help) stay instant.
_LAZY = {
    "Captioner": "engine", "CaptionHandle": "engine", "Caption": "results", "CaptionFailure": "results", "Timings": "results",
    "Activity": "results", "VideoStats": "results", "Video": "clips", "ChatVideo": "chat",
    "ChatMessage": "chat", "ChatImage": "chat", "system": "chat", "user": "chat", "assistant": "chat",
    "ModelFiles": "hub", "DownloadProgress": "hub", "download_model": "hub", "list_models": "hub",
    "ModelSpec": "registry",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'caprl_local' has no attribute {name!r}")


__all__ = [
    "Activity",
    "Caption",
    "CaptionFailure",
    "CaptionHandle",
    "Captioner",
    "ChatImage",
    "ChatMessage",
    "ChatVideo",
    "Video",
    "VideoStats",
    "assistant",
    "system",
    "user",
    "Timings",
    "ModelSpec",
    "ModelFiles",
    "DownloadProgress",
    "download_model",
    "list_models",
    "Cancelled",
    "CaprlError",
    "DownloadError",
    "EngineError",
    "HubUnreachableError",
    "ImageError",
    "ModelFileError",
    "OfflineError",
    "PromptTooLongError",
    "UnknownModelError",
    "__version__",
]
