"""Caption many images: skip what is done, caption the rest, write each result as it comes.

Knows nothing of llama.cpp or the Hub: it drives ``Captioner.caption_many`` and writes
each result at once to the outputs, so an interrupted run loses only the images in progress
and the same command, run again, finishes the rest.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from typing import Any, TextIO

from .captioning import Captioning
from .errors import Cancelled
from .inputs import BatchItem
from .options import Parallel
from .outputs import Output, OutputOptions, open_outputs
from .results import Caption, CaptionFailure

__all__ = ["BatchSummary", "OutputOptions", "caption_batch", "run_batch", "split_done"]


@dataclass
class BatchSummary:
    """How a batch went (filled in as it runs)."""

    done: int = 0
    failed: int = 0
    repeating: int = 0  # captions the loop guard ended
    seconds: float = 0.0
    interrupted: bool = False

    @property
    def images_per_minute(self) -> float:
        return 60.0 * self.done / self.seconds if self.seconds > 0 else 0.0


def result_record(item: BatchItem, result: Caption | CaptionFailure, *, prompt: str, model: str | None,
                  quant: str | None) -> dict[str, Any]:
    """The JSON object written for one image: its input fields, then the caption or the error."""
    record: dict[str, Any] = {**item.extra, "path": item.path}
    if isinstance(result, Caption):
        record.update(
            caption=result.text, model=model, quant=quant, prompt=prompt,
            image_tokens=result.image_tokens, prompt_tokens=result.prompt_tokens,
            generated_tokens=result.generated_tokens, finish_reason=result.finish_reason,
            timings={k: round(v, 4) for k, v in asdict(result.timings).items()},
        )
    else:
        record.update(error=result.error, error_kind=result.kind, model=model, quant=quant, prompt=prompt)
    return record


def split_done(items: list[BatchItem], outputs: list[Output], prompt: str) -> tuple[list[BatchItem], int]:
    """(items still to caption, how many were skipped): an item is done when every output has it."""
    todo = [i for i in items if not (outputs and all(o.has(i, prompt) for o in outputs))]
    return todo, len(items) - len(todo)


def run_batch(
    captioner: Captioning,
    items: list[BatchItem],
    outputs: list[Output],
    *,
    prompt: str,
    model: str | None = None,
    quant: str | None = None,
    on_result: Callable[[BatchItem, dict[str, Any], BatchSummary], None] | None = None,
    on_done: Callable[[int], None] | None = None,
    **options: Any,  # caption options (GenerationKwargs less the prompt, a parameter here)
) -> BatchSummary:
    """Caption the items, writing each result to every output as it comes.

    ``on_result`` follows each result as it is written (in input order); ``on_done(n)`` as each
    image finishes, in whatever order (for progress displays). Returns the summary; Ctrl-C ends
    the run early with ``interrupted`` set, everything finished so far already written.
    """
    summary = BatchSummary()
    started = time.perf_counter()
    by_name = {item.path: item for item in items}  # results name their input; a cancel leaves gaps
    try:
        progress = None if on_done is None else lambda done, total: on_done(done)
        for result in captioner.caption_many(list(by_name), prompt=prompt, progress=progress, **options):
            item = by_name[result.image]
            record = result_record(item, result, prompt=prompt, model=model, quant=quant)
            for output in outputs:
                output.write(item, record)
            if "error" in record:
                summary.failed += 1
            else:
                summary.done += 1
                summary.repeating += record.get("finish_reason") == "repetition"
            summary.seconds = time.perf_counter() - started
            if on_result is not None:
                on_result(item, record, summary)
    except (KeyboardInterrupt, Cancelled):
        summary.interrupted = True
    summary.seconds = time.perf_counter() - started
    return summary


def caption_batch(
    items: list[BatchItem],
    *,
    load: Callable[[Parallel], AbstractContextManager[Captioning]],
    outputs: OutputOptions,
    stream: TextIO,
    prompt: str,
    parallel: Parallel = "auto",
    model: str | None = None,
    quant: str | None = None,
    on_start: Callable[[int, int], None] | None = None,
    on_result: Callable[[BatchItem, dict[str, Any], BatchSummary], None] | None = None,
    on_done: Callable[[int], None] | None = None,
    **options: Any,  # caption options (GenerationKwargs less the prompt, a parameter here)
) -> BatchSummary | None:
    """Caption the items not yet done into the outputs; None when every item was done already.

    ``load(parallel)`` gives the captioner, loaded only if there is work: as many captions in
    flight as asked for, never more than there are images. ``on_start(total, skipped)`` comes
    before the first image; ``stream`` receives the results meant for stdout.
    """
    opened: list[Output] = []
    try:
        opened = open_outputs(outputs, stream=stream, items=items)
        todo, skipped = split_done(items, opened, prompt)
        if on_start is not None:
            on_start(len(items), len(items) - len(todo))
        if not todo:
            return None
        n: Parallel = 1 if len(todo) == 1 else parallel if parallel == "auto" else min(parallel, len(todo))
        with load(n) as captioner:
            return run_batch(captioner, todo, opened, prompt=prompt, model=model, quant=quant,
                             on_result=on_result, on_done=on_done, **options)
    finally:
        for out in opened:
            out.close()

