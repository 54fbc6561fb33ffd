"""Caption many images and videos: plan what is left to do, caption it, write each result as it comes.

Knows nothing of llama.cpp, the Hub or the terminal: :func:`plan_batch` opens the outputs and
finds the items that still need a caption (resume by key); :func:`run_batch` drives any
:class:`~caprl_local.captioning.Captioning` over the plan and writes each result at once to the
outputs, so an interrupted run loses only the inputs in progress and the same command, run
again, finishes the rest. A video may have a prompt of its own (CapRL-Video's, where none was
chosen): its records, and its resuming, follow that prompt. What a person sees of it is the sink's
business (the CLI's console).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, TextIO

from typing_extensions import Self

from .captioning import Captioning
from .errors import Cancelled, CaprlError
from .inputs import BatchItem
from .options import GenerationOptions, Parallel
from .outputs import Output, OutputOptions, open_outputs
from .results import Caption, CaptionFailure, VideoStats

__all__ = ["BatchPlan", "BatchSink", "BatchSummary", "OutputOptions", "caption_batch", "caption_field_taken", "plan_batch",
           "result_record", "run_batch", "video_fields"]


@dataclass
class BatchSummary:
    """How a batch went (filled in as it runs)."""

    done: int = 0  # captions made, of images and videos
    failed: int = 0
    repeating: int = 0  # captions the loop guard ended
    seconds: float = 0.0
    interrupted: bool = False
    videos: int = 0  # of `done`, the videos
    frames: int = 0  # the frames those videos gave the model, in all

    @property
    def images(self) -> int:
        """Of `done`, the images."""
        return self.done - self.videos

    @property
    def images_per_minute(self) -> float:
        """Captions (of images and videos alike) per minute."""
        return 60.0 * self.done / self.seconds if self.seconds > 0 else 0.0


class BatchSink(Protocol):
    """Follows a run as it goes (the CLI's progress display is one)."""

    def done(self, finished: int) -> None:
        """`finished` inputs of this run are done, in whatever order they finished."""

    def result(self, item: BatchItem, record: dict[str, Any], summary: BatchSummary) -> None:
        """A result, as written to the outputs (in input order)."""


@dataclass
class BatchPlan:
    """What a run does: its items, the outputs open for them, and the items still to caption.

    ``video_prompt``: the prompt of the videos, where it is not the images' (None: the same).
    A context manager: the outputs close at its end."""

    items: list[BatchItem]
    outputs: list[Output]
    generation: GenerationOptions  # its prompt resolved: results are kept, and resumed, by it
    model: str | None = None  # what the records name as their model and quant
    quant: str | None = None
    todo: list[BatchItem] = field(default_factory=list)
    caption_field: str = "caption"  # the record's field for the caption (the list's own fields are kept)
    video_prompt: str | None = None

    @property
    def prompt(self) -> str:
        """The images' prompt."""
        assert self.generation.prompt is not None  # plan_batch checks it
        return self.generation.prompt

    def prompt_for(self, item: BatchItem) -> str:
        """The prompt an item is captioned, kept and resumed with."""
        return self.video_prompt if self.video_prompt is not None and item.media == "video" else self.prompt

    @property
    def run_generation(self) -> GenerationOptions:
        """The options the items still to caption go with, in one call of caption_many: the videos' prompt,
        where it is not the images', as the options' video_prompt."""
        if self.video_prompt is None or self.video_prompt == self.prompt:
            return self.generation
        return dataclasses.replace(self.generation, video_prompt=self.video_prompt)

    @property
    def skipped(self) -> int:
        """Items every output has a result for already."""
        return len(self.items) - len(self.todo)

    def width(self, parallel: Parallel) -> Parallel:
        """Captions in flight for this plan: as asked, never more than there are images to caption."""
        return 1 if len(self.todo) == 1 else parallel if parallel == "auto" else min(parallel, len(self.todo))

    @property
    def videos(self) -> int:
        """Of the items, the videos."""
        return sum(item.media == "video" for item in self.items)

    def close(self) -> None:
        for output in self.outputs:
            output.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def plan_batch(items: list[BatchItem], *, outputs: OutputOptions, stream: TextIO, generation: GenerationOptions,
               model: str | None = None, quant: str | None = None, video_prompt: str | None = None) -> BatchPlan:
    """Open the outputs for `items` and find what is still to caption: an item is done when every output
    has its result for its prompt (``outputs.overwrite`` captions everything again). ``stream`` receives
    the results meant for stdout. JSONL records keep each item's fields: one that has the caption's
    field already is refused (see :func:`caption_field_taken`). ``video_prompt``: the videos' prompt, where
    it is not generation's (the command line gives CapRL-Video's when no prompt or preset was chosen)."""
    if generation.prompt is None or generation.preset is not None:
        raise CaprlError("a batch needs its prompt resolved (the results are kept by it); give generation.prompt")
    if video_prompt is not None and not video_prompt.strip():
        raise CaprlError("the video prompt is empty; give some text, or None for the images' prompt")
    taken = caption_field_taken(items, outputs)
    if taken is not None:
        raise CaprlError(f"{taken.source or taken.path}: its records have a \"{outputs.caption_field}\" field already, "
                         "which the new caption would replace; give the caption another field (caption_field)")
    opened = open_outputs(outputs, stream=stream, items=items)
    plan = BatchPlan(items, opened, generation, model=model, quant=quant, caption_field=outputs.caption_field,
                     video_prompt=video_prompt)
    plan.todo = [i for i in items if not (opened and all(o.has(i, plan.prompt_for(i)) for o in opened))]
    return plan


def caption_field_taken(items: list[BatchItem], outputs: OutputOptions) -> BatchItem | None:
    """The first item whose own fields (a JSONL list's) hold the caption's field, when JSONL is written:
    its record would lose the field to the new caption. Text and sidecars write the caption alone."""
    if outputs.format != "jsonl":
        return None
    name = outputs.caption_field
    return next((item for item in items if name in item.extra), None)


def result_record(item: BatchItem, result: Caption | CaptionFailure, plan: BatchPlan) -> dict[str, Any]:
    """The JSON object written for one input: its input fields, then the caption (in the plan's
    caption_field) or the error. A video's says so ("media") and, captioned, what of it the model saw
    (see :func:`video_fields`); an image's is as it always was."""
    record: dict[str, Any] = {**item.extra, "path": item.path}
    prompt = plan.prompt_for(item)
    video = item.media == "video" or (isinstance(result, Caption) and result.video is not None)
    if isinstance(result, Caption):
        record[plan.caption_field] = result.text
        record.update(
            model=result.model or plan.model, quant=plan.quant, prompt=prompt,
            image_tokens=result.image_tokens, prompt_tokens=result.prompt_tokens,
            generated_tokens=result.generated_tokens, finish_reason=result.finish_reason,
        )
        if video:
            record.update(video_fields(result.video))
        record["timings"] = {k: round(v, 4) for k, v in asdict(result.timings).items()}
    else:
        record.pop(plan.caption_field, None)  # a failure has no caption (text and sidecar outputs look for one)
        record.update(error=result.error, error_kind=result.kind, model=plan.model, quant=plan.quant, prompt=prompt)
        if video:
            record["media"] = "video"
    if result.source is not None:  # made on a server: which one (a local run's records stay as they were)
        record["endpoint"] = result.source
    return record


def video_fields(stats: VideoStats | None) -> dict[str, Any]:
    """What a video's record says of it, for a dataset builder: the clip's length, the frames the model saw
    (how many, at what rate and size) and the image tokens they cost (within image_tokens); ``truncated``
    only where the clip gave less than planned (it ended early, or part of it would not decode)."""
    fields: dict[str, Any] = {"media": "video"}
    if stats is None:  # made where the numbers are not told (a server)
        return fields
    fields.update(duration_s=round(stats.duration_s, 3), frames=stats.frames, fps=stats.fps, frame_width=stats.width,
                  frame_height=stats.height, video_tokens=stats.tokens)
    if stats.truncated:
        fields["truncated"] = True
    return fields


def run_batch(captioner: Captioning, plan: BatchPlan, *, sink: BatchSink | None = None) -> BatchSummary:
    """Caption the plan's items still to do, writing each result to every output as it comes.

    Returns the summary; Ctrl-C (or the captioner's cancel) ends the run early with ``interrupted``
    set, everything finished so far already written.
    """
    summary = BatchSummary()
    started = time.perf_counter()
    progress = None if sink is None else lambda done, total: sink.done(done)
    results = captioner.caption_many([item.path for item in plan.todo], generation=plan.run_generation,
                                     progress=progress) if plan.todo else iter(())
    try:
        for result in results:
            assert result.index is not None  # every Captioning names the input each result is for
            item = plan.todo[result.index]
            record = result_record(item, result, plan)
            for output in plan.outputs:
                output.write(item, record)
            if isinstance(result, CaptionFailure):
                summary.failed += 1
            else:
                summary.done += 1
                summary.repeating += result.finish_reason == "repetition"
                if result.video is not None:
                    summary.videos += 1
                    summary.frames += result.video.frames
            summary.seconds = time.perf_counter() - started
            if sink is not None:
                sink.result(item, record, summary)
    except (KeyboardInterrupt, Cancelled):
        summary.interrupted = True
    summary.seconds = time.perf_counter() - started
    return summary


def caption_batch(captioner: Captioning, items: list[BatchItem], *, outputs: OutputOptions, stream: TextIO,
                  generation: GenerationOptions, model: str | None = None, quant: str | None = None,
                  sink: BatchSink | None = None, video_prompt: str | None = None) -> BatchSummary | None:
    """Plan and run in one call; None when every item had its result already."""
    with plan_batch(items, outputs=outputs, stream=stream, generation=generation, model=model, quant=quant,
                    video_prompt=video_prompt) as plan:
        return run_batch(captioner, plan, sink=sink) if plan.todo else None
