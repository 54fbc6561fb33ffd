"""The one contract of "what captions a batch": the local Captioner, the endpoint fleet and the Ray runner.

The batch runner, the console's progress display and its Ctrl-C handling are typed to :class:`Captioning`,
so any of the three (or a new one) can stand in for another. Free of llama.cpp: the remote captioners
import this, never the engine.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol, runtime_checkable

from typing_extensions import Self, Unpack

from .options import GenerationKwargs, GenerationOptions
from .results import Activity, Caption, CaptionFailure

#: An image file, as a batch names it.
ImageFile = str | os.PathLike[str]


@runtime_checkable
class Captioning(Protocol):
    """Captions image files in bulk; a context manager that closes it."""

    @property
    def parallel(self) -> int:
        """Captions in flight at once."""
        ...

    @property
    def threads(self) -> int:
        """CPU threads it decodes with (0 where the decoding is elsewhere)."""
        ...

    @property
    def on_gpu(self) -> bool: ...

    def caption_many(
        self,
        images: Iterable[ImageFile],
        *,
        generation: GenerationOptions | None = None,
        on_text: Callable[[str, str], None] | None = None,
        progress: Callable[[int, int | None], None] | None = None,
        prefetch: int = 2,
        **options: Unpack[GenerationKwargs],
    ) -> Iterator[Caption | CaptionFailure]:
        """One result per image, with its ``index`` in `images`; an image that fails is a CaptionFailure.
        The caption options come as keywords or as one ``generation`` value.
        ``on_text(image, piece)`` receives caption text as it comes, ``progress(done, total)`` each image as it
        finishes; Cancelled after :meth:`cancel`, once every result finished before it is out."""
        ...

    def activity(self) -> Activity:
        """What it is doing now, for progress displays; cheap, from any thread."""
        ...

    def cancel(self) -> None:
        """Stop the captions in flight at the next step; safe from a signal handler."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...


class ClosingContext:
    """``with captioner:`` closes it at the end: the context manager the three captioners share."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
