"""Where a batch's results go: JSONL, plain text and sidecar files, each record whole or not at all.

Images and videos alike: a video's record has a few fields more (see batch.video_fields), its sidecar
is named as an image's (clip.txt beside clip.mp4). An existing output tells which inputs are done (for
resuming); one run at a time writes a file; files we write appear atomically or are appended to
record by record. A line we did not write is never removed: a JSONL file holding one is refused.
``-o`` follows a symlink to the file it names; a device, FIFO or socket is written as a stream (no resume, no lock, no rename).
Any file name, UTF-8 or not, is written so that it reads back the same, and files stay UTF-8.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TextIO

from .appending import AppendOutput, same_file
from .errors import CaprlError
from .inputs import BatchItem, loads_line
from .safefiles import (
    NOT_TEXT,
    as_text,
    deferred_interrupt,
    iter_lines,
    json_line,
    u_escape,
    write_atomic,
    write_error,
)
from .sidecars import SidecarOutput

__all__ = ["JsonlOutput", "Output", "OutputOptions", "SidecarOutput", "TextOutput", "deferred_interrupt", "open_outputs",
           "same_file", "write_atomic"]


class Output(Protocol):
    """Where results go. `has` tells whether an image already has a result (for resuming)."""

    def has(self, item: BatchItem, prompt: str) -> bool: ...

    def write(self, item: BatchItem, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


#: A line of an output over this is no record of ours (a list's line is at most 1 MB, a caption far
#: less): the file is refused, and the line is never held whole.
MAX_RECORD_BYTES = 64 << 20


class JsonlOutput(AppendOutput):
    """One JSON object per image, appended and flushed as each image finishes.

    Opening an existing file reads it a line at a time and keeps only an index of keys: for each
    image (of `items`, when given: only those are looked up) and prompt, whether its last record is
    a caption. So a failed image captioned again later gets a new record appended after its error,
    and the last record for an image and prompt is the one that counts (a reader keeping only the
    lines with a caption sees each image once); the file is never rewritten for it. Our record cut
    short by a crash (the last line, with no end) is cut off again. ``overwrite`` drops the records
    of `items` (all of ours when not given), rewriting the file a line at a time. Any other line
    (text, other JSON) means the file holds data that is not ours: it is refused, left exactly as it
    was, even with ``overwrite`` (which means caption again, not destroy a file we did not write).
    """

    def __init__(self, path: str | None, *, overwrite: bool = False, stream: TextIO | None = None,
                 items: Iterable[BatchItem] | None = None, inputs: Iterable[str] = (), caption_field: str = "caption") -> None:
        self.done: set[tuple[str, str]] = set()  # (key, prompt) whose last record is a caption
        self.overwrite = overwrite
        self.caption_field = caption_field  # a record with a string there is a caption
        self.newline = b""  # put before the first record: the file's last line has no end
        items = None if items is None else list(items)
        self.wanted = None if items is None else {i.key for i in items}
        if not self._start(path, stream, items or (), inputs):
            return
        try:
            self._resume()
            self._open(truncate=False)
        except BaseException as exc:
            self.close(refused=isinstance(exc, CaprlError))
            raise

    def _resume(self) -> None:
        assert self.path is not None
        prompts: dict[str, str]
        wanted, prompts = self.wanted, {}  # one string for each prompt, however many records
        ours = dropped = False
        offset, cut, last = 0, -1, b""
        for number, line in enumerate(iter_lines(self.path, self.shown, MAX_RECORD_BYTES), 1):
            start, offset = offset, offset + len(line)
            if len(line) > MAX_RECORD_BYTES and not line.endswith(b"\n"):
                raise self._not_ours(number)
            kind, record = _classify(line, self.caption_field)
            if kind == "broken" and not line.endswith(b"\n") and line.startswith(b'{"') \
                    and (ours or b'"path": "' in line):
                cut = start  # our record, cut short by a crash (a line with no end is the last)
                continue
            if kind in ("broken", "foreign"):
                raise self._not_ours(number)
            last = line
            if kind == "blank":
                continue
            ours = True
            key = os.path.abspath(record["path"])
            if wanted is not None and key not in wanted:
                continue
            if self.overwrite:
                dropped = True
                continue
            prompt = str(record.get("prompt", ""))
            prompt = prompts.setdefault(prompt, prompt)
            if kind == "caption":
                self.done.add((key, prompt))
            elif kind == "failed":  # the last record for the image and prompt counts
                self.done.discard((key, prompt))
        if dropped:
            write_atomic(self.path, self._kept(), shown=self.shown)  # the records of `items` out, the rest kept
        elif cut >= 0:
            try:
                os.truncate(self.path, cut)
            except OSError as exc:
                raise write_error(self.shown, exc) from exc
        self.newline = b"\n" if not dropped and cut < 0 and last and not last.endswith(b"\n") else b""

    def _kept(self) -> Iterator[bytes]:
        """The lines ``overwrite`` keeps (all but ours for `items` and a record cut short), each ended."""
        assert self.path is not None
        for line in iter_lines(self.path, self.shown, MAX_RECORD_BYTES):
            kind, record = _classify(line, self.caption_field)
            if kind == "broken" or (kind in ("caption", "failed")
                                    and (self.wanted is None or os.path.abspath(record["path"]) in self.wanted)):
                continue
            yield line if line.endswith(b"\n") else line + b"\n"

    def _not_ours(self, number: int) -> CaprlError:
        return CaprlError(f"{self.shown}: line {number} is not a caprl-local result, so this file holds other "
                          "data; write the results to another file (this one is left as it is)")

    def has(self, item: BatchItem, prompt: str) -> bool:
        return not self.overwrite and (item.key, prompt) in self.done

    def write(self, item: BatchItem, record: dict[str, Any]) -> None:
        self._append(self.newline + json_line(record))
        self.newline = b""


def _classify(line: bytes, caption_field: str = "caption") -> tuple[str, Any]:
    """("caption" | "failed" | "other" | "blank" | "broken" | "foreign", the record) for one line of a JSONL
    output; "other": a caption of ours in another field than this run's (so not done for this run)."""
    text = line.decode("utf-8", "surrogateescape")  # another tool's bytes never stop the run
    if not text.strip():
        return "blank", None
    try:
        record = loads_line(text.strip(" \t\n\r"))  # the blanks JSON allows around a value
    except (ValueError, RecursionError):
        return "broken", None
    if isinstance(record, dict) and isinstance(record.get("path"), str):
        if isinstance(record.get(caption_field), str):
            return "caption", record
        if isinstance(record.get("error"), str) and isinstance(record.get("error_kind"), str):
            return "failed", record
        if isinstance(record.get("prompt"), str) and "finish_reason" in record and "generated_tokens" in record:
            return "other", record
    return "foreign", record


class TextOutput(AppendOutput):
    """Captions as plain text, each under a ``==> path <==`` header, on a stream or in a file.

    An existing file is appended to, and the images under its headers count as done. A name
    that would not read back from a header (a line break in it, a byte that is not UTF-8, a
    leading quote) is written as a JSON string. A run of one image writes its caption alone,
    as a shell redirect of it would (a file is replaced).
    """

    _HEADER = re.compile(r"==> (.*) <==")

    def __init__(self, path: str | None, *, overwrite: bool = False, stream: TextIO | None = None,
                 headers: bool = True, items: Iterable[BatchItem] = (), inputs: Iterable[str] = (),
                 caption_field: str = "caption") -> None:
        self.done: set[str] = set()
        self.headers = headers
        self.caption_field = caption_field
        self.newline = b""  # put before the first record: the file's last line has no end
        items = list(items)
        if not self._start(path, stream, items, inputs):
            return
        try:
            overwrite = overwrite or not headers  # without headers nothing in the file tells what is done
            if not overwrite and self.path is not None:
                self._resume({i.key for i in items} if items else None)
            self._open(truncate=overwrite)
        except BaseException as exc:
            self.close(refused=isinstance(exc, CaprlError))
            raise

    def _resume(self, wanted: set[str] | None) -> None:
        """The images under the file's headers (of `wanted` only, when given), read a line at a time."""
        assert self.path is not None
        begins, last = True, b""  # the piece read begins a line (one over the limit comes in pieces)
        for piece in iter_lines(self.path, self.shown, MAX_RECORD_BYTES):
            if begins and piece.startswith(b"==> "):
                match = self._HEADER.fullmatch(piece.removesuffix(b"\n").decode("utf-8", "surrogateescape"))
                if match:
                    key = os.path.abspath(_unquote(match.group(1)))
                    if wanted is None or key in wanted:
                        self.done.add(key)
            begins, last = piece.endswith(b"\n"), piece
        self.newline = b"\n" if last and not last.endswith(b"\n") else b""

    def has(self, item: BatchItem, prompt: str) -> bool:
        return item.key in self.done

    def write(self, item: BatchItem, record: dict[str, Any]) -> None:
        if self.caption_field in record:
            caption = as_text(record[self.caption_field])
            text = f"==> {_quote(item.path)} <==\n{caption}\n\n" if self.headers else caption + "\n"
            self._append(self.newline + text.encode("utf-8"))
            self.newline = b""


def _quote(name: str) -> str:
    """A name for a header: as it is, or as a JSON string when it would not read back."""
    if NOT_TEXT.search(name) or name.startswith('"'):
        return NOT_TEXT.sub(u_escape, json.dumps(name, ensure_ascii=False))
    return name


def _unquote(header: str) -> str:
    if header.startswith('"'):
        with suppress(ValueError):
            name = json.loads(header)
            if isinstance(name, str):
                return name
    return header


@dataclass(frozen=True)
class OutputOptions:
    """Where a batch's results go."""

    format: Literal["text", "jsonl"] = "text"
    path: str | None = None  # a file instead of the stream ("-": the stream)
    sidecar: bool = False  # photo.txt beside photo.jpg, clip.txt beside clip.mp4
    sidecar_ext: str = ".txt"
    overwrite: bool = False  # caption images and videos that already have a result again
    inputs: tuple[str, ...] = ()  # files the run reads (list files), which results never go into
    caption_field: str = "caption"  # the JSONL records' field for the caption

    def __post_init__(self) -> None:
        if not isinstance(self.caption_field, str) or not self.caption_field or self.caption_field in RESULT_FIELDS:
            raise CaprlError(f"caption_field {self.caption_field!r}: name a field for the caption other than "
                             f"{', '.join(sorted(RESULT_FIELDS))}")


#: The fields a record of ours has besides the caption's and the input's own: never the caption's. (A video's
#: has those of batch.video_fields too.)
RESULT_FIELDS = frozenset({"path", "model", "quant", "prompt", "image_tokens", "prompt_tokens", "generated_tokens",
                           "finish_reason", "timings", "error", "error_kind", "endpoint", "media", "duration_s", "frames",
                           "fps", "frame_width", "frame_height", "video_tokens", "truncated"})


class _SidecarCaption:
    """Sidecars as they read a record ("caption", "prompt"), when the caption is in another field."""

    def __init__(self, sidecars: SidecarOutput, caption_field: str) -> None:
        self.sidecars, self.caption_field = sidecars, caption_field

    def has(self, item: BatchItem, prompt: str) -> bool:
        return self.sidecars.has(item, prompt)

    def write(self, item: BatchItem, record: dict[str, Any]) -> None:
        shown = {"prompt": record.get("prompt", "")}
        if self.caption_field in record:  # never an input's own "caption" field
            shown["caption"] = record[self.caption_field]
        self.sidecars.write(item, shown)

    def close(self) -> None:
        self.sidecars.close()


def open_outputs(options: OutputOptions, *, stream: TextIO, items: Iterable[BatchItem] = ()) -> list[Output]:
    """The outputs for a run: sidecars, and JSONL or text to the file or the stream (text to the
    stream only when nothing else receives the captions)."""
    outputs: list[Output] = []
    items = list(items)
    path = None if options.path == "-" else options.path
    try:
        if options.sidecar:
            sidecars = SidecarOutput(options.sidecar_ext, overwrite=options.overwrite, items=items)
            outputs.append(sidecars if options.caption_field == "caption" else _SidecarCaption(sidecars, options.caption_field))
            if path and os.path.abspath(path) in {os.path.abspath(sidecars.path_for(i)) for i in items}:
                raise CaprlError(f"{path}: is also the sidecar of an image or video being captioned; write the results "
                                 "to another file")
        if options.format == "jsonl":
            outputs.append(JsonlOutput(path, overwrite=options.overwrite, stream=stream, items=items or None,
                                       inputs=options.inputs, caption_field=options.caption_field))
        elif path or not options.sidecar:
            outputs.append(TextOutput(path, overwrite=options.overwrite, stream=stream, headers=len(items) != 1,
                                      items=items, inputs=options.inputs, caption_field=options.caption_field))
    except BaseException:
        for output in outputs:
            output.close()
        raise
    return outputs
