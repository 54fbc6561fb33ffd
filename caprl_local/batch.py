"""Caption many images: plan what is left to do, caption it, write each result as it comes.

Knows nothing of llama.cpp, the Hub or the terminal: :func:`plan_batch` opens the outputs and
finds the items that still need a caption (resume by key); :func:`run_batch` drives any
:class:`~caprl_local.captioning.Captioning` over the plan and writes each result at once to the
outputs, so an interrupted run loses only the images in progress and the same command, run
again, finishes the rest. What a person sees of it is the sink's business (the CLI's console).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, TextIO

from typing_extensions import Self

from .captioning import Captioning
from .errors import Cancelled, CaprlError
from .inputs import BatchItem
from .options import GenerationOptions, Parallel
from .outputs import Output, OutputOptions, open_outputs
from .results import Caption, CaptionFailure

__all__ = ["BatchPlan", "BatchSink", "BatchSummary", "OutputOptions", "caption_batch", "caption_field_taken", "plan_batch",
           "result_record", "run_batch"]


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


class BatchSink(Protocol):
    """Follows a run as it goes (the CLI's progress display is one)."""

    def done(self, finished: int) -> None:
        """`finished` images of this run are done, in whatever order they finished."""

    def result(self, item: BatchItem, record: dict[str, Any], summary: BatchSummary) -> None:
        """A result, as written to the outputs (in input order)."""


@dataclass
class BatchPlan:
    """What a run does: its items, the outputs open for them, and the items still to caption.

    A context manager: the outputs close at its end."""

    items: list[BatchItem]
    outputs: list[Output]
    generation: GenerationOptions  # its prompt resolved: results are kept, and resumed, by it
    model: str | None = None  # what the records name as their model and quant
    quant: str | None = None
    todo: list[BatchItem] = field(default_factory=list)
    caption_field: str = "caption"  # the record's field for the caption (the list's own fields are kept)

    @property
    def prompt(self) -> str:
        assert self.generation.prompt is not None  # plan_batch checks it
        return self.generation.prompt

    @property
    def skipped(self) -> int:
        """Items every output has a result for already."""
        return len(self.items) - len(self.todo)

    def width(self, parallel: Parallel) -> Parallel:
        """Captions in flight for this plan: as asked, never more than there are images to caption."""
        return 1 if len(self.todo) == 1 else parallel if parallel == "auto" else min(parallel, len(self.todo))

    def close(self) -> None:
        for output in self.outputs:
            output.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def plan_batch(items: list[BatchItem], *, outputs: OutputOptions, stream: TextIO, generation: GenerationOptions,
               model: str | None = None, quant: str | None = None) -> BatchPlan:
    """Open the outputs for `items` and find what is still to caption: an item is done when every output
    has its result for this prompt (``outputs.overwrite`` captions everything again). ``stream`` receives
    the results meant for stdout. JSONL records keep each item's fields: one that has the caption's
    field already is refused (see :func:`caption_field_taken`)."""
    if generation.prompt is None or generation.preset is not None:
        raise CaprlError("a batch needs its prompt resolved (the results are kept by it); give generation.prompt")
    taken = caption_field_taken(items, outputs)
    if taken is not None:
        raise CaprlError(f"{taken.source or taken.path}: its records have a \"{outputs.caption_field}\" field already, "
                         "which the new caption would replace; give the caption another field (caption_field)")
    opened = open_outputs(outputs, stream=stream, items=items)
    plan = BatchPlan(items, opened, generation, model=model, quant=quant, caption_field=outputs.caption_field)
    plan.todo = [i for i in items if not (opened and all(o.has(i, plan.prompt) for o in opened))]
    return plan


def caption_field_taken(items: list[BatchItem], outputs: OutputOptions) -> BatchItem | None:
    """The first item whose own fields (a JSONL list's) hold the caption's field, when JSONL is written:
    its record would lose the field to the new caption. Text and sidecars write the caption alone."""
    if outputs.format != "jsonl":
        return None
    name = outputs.caption_field
    return next((item for item in items if name in item.extra), None)


def result_record(item: BatchItem, result: Caption | CaptionFailure, plan: BatchPlan) -> dict[str, Any]:
    """The JSON object written for one image: its input fields, then the caption (in the plan's
    caption_field) or the error."""
    record: dict[str, Any] = {**item.extra, "path": item.path}
    if isinstance(result, Caption):
        record[plan.caption_field] = result.text
        record.update(
            model=result.model or plan.model, quant=plan.quant, prompt=plan.prompt,
            image_tokens=result.image_tokens, prompt_tokens=result.prompt_tokens,
            generated_tokens=result.generated_tokens, finish_reason=result.finish_reason,
            timings={k: round(v, 4) for k, v in asdict(result.timings).items()},
        )
    else:
        record.pop(plan.caption_field, None)  # a failure has no caption (text and sidecar outputs look for one)
        record.update(error=result.error, error_kind=result.kind, model=plan.model, quant=plan.quant, prompt=plan.prompt)
    if result.source is not None:  # made on a server: which one (a local run's records stay as they were)
        record["endpoint"] = result.source
    return record


def run_batch(captioner: Captioning, plan: BatchPlan, *, sink: BatchSink | None = None) -> BatchSummary:
    """Caption the plan's items still to do, writing each result to every output as it comes.

    Returns the summary; Ctrl-C (or the captioner's cancel) ends the run early with ``interrupted``
    set, everything finished so far already written.
    """
    summary = BatchSummary()
    started = time.perf_counter()
    todo = plan.todo
    try:
        progress = None if sink is None else lambda done, total: sink.done(done)
        for result in captioner.caption_many([item.path for item in todo], generation=plan.generation,
                                             progress=progress):
            assert result.index is not None  # every Captioning names the input each result is for
            item = todo[result.index]
            record = result_record(item, result, plan)
            for output in plan.outputs:
                output.write(item, record)
            if isinstance(result, CaptionFailure):
                summary.failed += 1
            else:
                summary.done += 1
                summary.repeating += result.finish_reason == "repetition"
            summary.seconds = time.perf_counter() - started
            if sink is not None:
                sink.result(item, record, summary)
    except (KeyboardInterrupt, Cancelled):
        summary.interrupted = True
    summary.seconds = time.perf_counter() - started
    return summary


def caption_batch(captioner: Captioning, items: list[BatchItem], *, outputs: OutputOptions, stream: TextIO,
                  generation: GenerationOptions, model: str | None = None, quant: str | None = None,
                  sink: BatchSink | None = None) -> BatchSummary | None:
    """Plan and run in one call; None when every item had its result already."""
    with plan_batch(items, outputs=outputs, stream=stream, generation=generation, model=model, quant=quant) as plan:
        return run_batch(captioner, plan, sink=sink) if plan.todo else None
