"""The one error hierarchy of caprl-local.

Third-party exceptions (Pillow, llama.cpp, huggingface_hub, OS errors) are
translated into these once, where they happen, with ``raise ... from``.
Every message is one line that names the file and says what to do.
"""

from __future__ import annotations


class CaprlError(Exception):
    """Base class of every error caprl-local raises on purpose."""


class ImageError(CaprlError):
    """An image is missing, unreadable, corrupt or too large."""


class ModelFileError(CaprlError):
    """A model or projector file is missing, truncated, of the wrong kind or mismatched."""


class NoProjectorError(ModelFileError):
    """A model file was given without its vision projector, and no single one lies beside it."""


class UnknownModelError(CaprlError):
    """A model name or quantization is not known."""


class DownloadError(CaprlError):
    """Fetching a model file failed."""


class HubUnreachableError(DownloadError):
    """The Hub (or HF_ENDPOINT) could not be reached at all."""


class NoSpaceError(DownloadError):
    """The disk that holds the cache is (or would be) full."""


class OfflineError(CaprlError):
    """A needed file is not cached and the network may not be used.

    ``model``, ``quant`` (the quant the message names: the default one when none was asked for) and
    ``imatrix`` name what is missing, so that an application can offer to download it.
    """

    def __init__(self, message: str, *, model: str = "", quant: str | None = None, imatrix: bool = False,
                 quant_is_default: bool = False) -> None:
        super().__init__(message)
        self.model, self.quant, self.imatrix = model, quant, imatrix
        self.quant_is_default = quant_is_default  # none was asked for: a download need not name it


class EngineError(CaprlError):
    """llama.cpp failed while loading or running a model."""


class PromptTooLongError(EngineError):
    """A prompt (its text and images) needs more tokens than a caption's context holds: ``needed`` of ``context``."""

    def __init__(self, message: str, *, needed: int = 0, context: int = 0) -> None:
        super().__init__(message)
        self.needed, self.context = needed, context


class Cancelled(CaprlError):
    """Captioning was stopped by ``Captioner.cancel()`` (the CLI calls it on Ctrl-C)."""

    @classmethod
    def of(cls, name: str) -> Cancelled:
        """The caption of `name` (an input, as messages name it) was cancelled."""
        return cls(f"{name}: cancelled")
