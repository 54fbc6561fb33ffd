"""Sidecars: ``photo.txt`` beside ``photo.jpg`` (``clip.txt`` beside ``clip.mp4``), and each folder's index of the
prompts they were written for.

A dataset folder may come from anywhere: a sidecar that is a symlink, FIFO or device is
replaced, never written through or read; names that would be too long are cut to fit; a cut
line in the index joins no later line and leaves the sidecar it named to be written again.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import CaprlError
from .inputkinds import media_of
from .inputs import BatchItem
from .safefiles import (
    append_line,
    as_text,
    deferred_interrupt,
    fit_name,
    is_file,
    json_line,
    name_max,
    read_regular,
    this_file_only,
    write_atomic,
)

log = logging.getLogger("caprl_local")


class SidecarOutput:
    """``photo.txt`` beside ``photo.jpg``, written to a temporary name and renamed.

    A video's sidecar is named as an image's. Inputs that would share a sidecar (``photo.jpg`` and ``photo.png``,
    or ``clip.jpg`` and ``clip.mp4``, in one run) each get
    one named after the whole file name instead (``photo.jpg.txt``, ``photo.png.txt``), so
    that no caption overwrites another; a name longer than the folder allows is cut short
    with a hash of the whole (a warning says so). Each folder's ``INDEX`` remembers the prompt
    of every sidecar written there: one written for another prompt is not done (another prompt
    is other work) and is replaced; one the index does not know (written by hand, or by another
    tool) counts as done, unless a cut line of the index names it. A sidecar that is a symlink
    is replaced by a file, never written through (a downloaded dataset may plant one).
    """

    INDEX = ".caprl-local-sidecars.jsonl"

    def __init__(self, ext: str = ".txt", *, overwrite: bool = False, items: Iterable[BatchItem] = ()) -> None:
        self.ext = ext if ext.startswith(".") else "." + ext
        if self.ext == "." or "/" in self.ext or os.sep in self.ext or "\0" in self.ext:
            raise CaprlError(f"{ext!r}: not a file name extension for sidecars; give one such as .txt")
        self.overwrite = overwrite
        self.paths: dict[str, Path] = {}  # item key -> its sidecar
        self.prompts: dict[Path, tuple[dict[str, str | None], list[str]]] = {}  # folder -> (index, cut names)
        self.wanted: dict[Path, set[str]] = {}  # folder -> the sidecars this run asks about (its index keeps those)
        self.partial: set[Path] = set()  # folders whose index was read for `wanted` only
        self.warned: set[Path] = set()
        items = list(items)
        natural = {item.key: self._sidecar(item, shared=False) for item in items}
        by_sidecar: dict[str, list[BatchItem]] = {}
        for item in items:
            by_sidecar.setdefault(os.path.abspath(natural[item.key][0]), []).append(item)
        for sharing in by_sidecar.values():
            if len(sharing) == 1:
                self._settle(sharing[0].key, *natural[sharing[0].key])
                continue
            for i in sharing:
                self._settle(i.key, *self._sidecar(i, shared=True))
            log.warning("%s would all be captioned into %s; writing %s instead",
                        ", ".join(Path(i.path).name for i in sharing), natural[sharing[0].key][1],
                        ", ".join(self.paths[i.key].name for i in sharing))
        for path in self.paths.values():
            self.wanted.setdefault(path.parent, set()).add(path.name)
        keys = {item.key for item in items}
        for item in items:
            if os.path.abspath(self.paths[item.key]) in keys:  # --sidecar-ext .jpg beside a .png
                what = "a video" if media_of(self.paths[item.key]) == "video" else "an image"
                raise CaprlError(f"{self.paths[item.key]}: its caption would be written over {what} being captioned; "
                                 "choose another sidecar extension")

    def _sidecar(self, item: BatchItem, *, shared: bool) -> tuple[Path, str]:
        """(the sidecar, the name it would have, were there no limit on names)."""
        image = Path(item.path)
        try:
            name = image.name + self.ext if shared else image.with_suffix(self.ext).name
        except ValueError:  # a name pathlib takes no suffix for
            name = image.name + self.ext
        return image.with_name(fit_name(name[:-len(self.ext)], self.ext, name_max(image.parent))), name

    def _settle(self, key: str, path: Path, wanted: str) -> None:
        if path.name != wanted:
            log.warning("%s: a sidecar named %s would be longer than the file system allows; writing %s instead",
                        Path(key).name, wanted, path.name)
        self.paths[key] = path

    def path_for(self, item: BatchItem) -> Path:
        if item.key not in self.paths:
            self._settle(item.key, *self._sidecar(item, shared=False))
        return self.paths[item.key]

    def has(self, item: BatchItem, prompt: str) -> bool:
        path = self.path_for(item)
        if self.overwrite or not is_file(path):  # a link to a file counts: someone put it there
            return False
        index, cut = self._index(path.parent, path.name)
        if path.name not in index:
            return not any(path.name.startswith(name) for name in cut)  # unknown: written by hand
        written = index[path.name]
        if written == prompt:
            return True
        if written is not None and path.parent not in self.warned:
            self.warned.add(path.parent)
            log.warning("%s: sidecars written for another prompt are captioned again and replaced", path.parent)
        return False

    def write(self, item: BatchItem, record: dict[str, Any]) -> None:
        if "caption" not in record:
            return
        path = self.path_for(item)
        prompt = str(record.get("prompt", ""))
        with deferred_interrupt():  # Ctrl-C never parts a sidecar from its index line
            try:
                write_atomic(path, (as_text(record["caption"]) + "\n").encode("utf-8"))
            except CaprlError as exc:
                if not this_file_only(exc):
                    raise
                log.warning("%s: cannot write this sidecar (%s); its caption is left out", path,
                            getattr(exc.__cause__, "strerror", exc))
                return
            index = path.parent / self.INDEX
            try:  # appended after the sidecar: a crash between the two leaves a sidecar counted as done
                append_line(index, json_line({"sidecar": path.name, "prompt": prompt}))
            except CaprlError as exc:
                if not this_file_only(exc):
                    raise
                log.warning("%s: cannot write the index of sidecars (%s); its sidecars count as written by hand",
                            index, getattr(exc.__cause__, "strerror", exc))
        self._index(path.parent, path.name)[0][path.name] = prompt

    def _index(self, folder: Path, name: str) -> tuple[dict[str, str | None], list[str]]:
        """(sidecar name -> its prompt, None when unknown; names, or their beginnings, on cut lines).

        Read a line at a time, keeping the sidecars this run asks about only (a folder of a
        million images has an index of a million lines); a name outside them reads it all."""
        cached = self.prompts.get(folder)
        names = self.wanted.get(folder)
        if cached is not None and (folder not in self.partial or (names is not None and name in names)):
            return cached
        only = names if cached is None and names is not None and name in names else None
        known: dict[str, str | None] = {}
        cut: list[str] = []
        prompts: dict[str, str] = {}  # one string for each prompt, however many sidecars
        for line in read_regular(folder / self.INDEX):
            text = line.decode("utf-8", "surrogateescape")
            for entry in _index_entries(text):
                if isinstance(entry, dict):
                    if only is None or entry["sidecar"] in only:
                        prompt = str(entry.get("prompt", ""))
                        known[entry["sidecar"]] = prompts.setdefault(prompt, prompt)  # the last one written wins
                elif entry[1]:
                    if only is None or entry[0] in only:
                        known[entry[0]] = None  # a whole name on a cut line: its prompt is lost
                elif entry[0]:
                    cut.append(entry[0])
        if only is None:
            self.partial.discard(folder)
        else:
            self.partial.add(folder)
        self.prompts[folder] = known, cut
        return known, cut

    def close(self) -> None:
        pass  # each sidecar is closed as it is written


_ENTRY_START = '{"sidecar": "'
_ENTRY = re.compile(r'\{"sidecar": "((?:[^"\\]|\\.)*)(")?')


def _index_entries(text: str) -> Iterator[dict[str, Any] | tuple[str, bool]]:
    """The index entries on a line: whole ones as dicts, and for a line cut (or run into the next
    by an old crash) the sidecar name it began, with whether the name is whole."""
    entry = _json(text)
    if isinstance(entry, dict) and isinstance(entry.get("sidecar"), str):
        yield entry
        return
    starts = [m.start() for m in re.finditer(re.escape(_ENTRY_START), text)]
    for start, end in itertools.pairwise([*starts, len(text)]):  # each apart: a cut one never runs into the next
        piece = text[start:end]
        entry = _json(piece)
        if isinstance(entry, dict) and isinstance(entry.get("sidecar"), str):
            yield entry
            continue
        match = _ENTRY.match(piece)
        if match is None:
            continue
        name = match.group(1)
        for cut in range(len(name), max(len(name) - 6, -1), -1):  # cut inside an escape: drop its start
            begun = _json(f'"{name[:cut]}"')
            if isinstance(begun, str):
                yield begun, bool(match.group(2))
                break


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None
