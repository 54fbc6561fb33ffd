"""The loop guard: where a caption that fell into a loop is cut back to its first round.

Pure, free of llama.cpp, and the one home of the rule. The engine guards each caption as it is generated
(engine/scheduler.py feeds a LoopGuard token by token) and ends it there; a caption made by another server
(llama-server, vLLM, SGLang) comes back whole, so the fleet client runs the same rule over it afterwards:
over its tokens when the server names them (``logprobs``), else over word-sized pieces of its text.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Hashable, Sequence

#: A caption whose last units repeat one cycle of up to LOOP_PERIOD units at least LOOP_COPIES times, over at
#: least LOOP_SPAN units, has fallen into a loop. The span keeps short legitimate repeats (a table's "| --- |"
#: row, a list of alike items) from counting.
LOOP_PERIOD, LOOP_COPIES, LOOP_SPAN = 64, 4, 64

#: Text cut into pieces about the size of tokens: a word with the space before it, a run of spaces, one
#: other character; a long word in pieces of four letters (a tokenizer splits it too).
_PIECES = re.compile(r"\s?\w{1,4}|\s+|[^\w\s]")


class LoopGuard:
    """The rule over units taken one at a time, as a caption is generated (at most LOOP_PERIOD comparisons a unit)."""

    def __init__(self) -> None:
        self.units: list[Hashable] = []
        self._runs = [0] * (LOOP_PERIOD + 1)  # runs[p]: how many latest units equal the one p before them

    def take(self, unit: Hashable) -> int | None:
        """Take the next unit; once the units have fallen into a loop, how many of them to keep (everything
        before the repeats, and one round of the cycle), else None."""
        units, runs = self.units, self._runs
        units.append(unit)
        n = len(units)
        for p in range(1, min(LOOP_PERIOD, n - 1) + 1):
            runs[p] = runs[p] + 1 if unit == units[-1 - p] else 0
            if runs[p] >= (LOOP_COPIES - 1) * p and runs[p] + p >= LOOP_SPAN:
                # The shortest cycle that spans the same tail ("of of of" is also a cycle of 6 "of"s).
                q = next(q for q in range(1, p + 1) if runs[q] + q >= runs[p] + p)
                return n - runs[q]
        return None


def loop_end(units: Sequence[Hashable]) -> tuple[int, int] | None:
    """(units to keep, units taken when the loop showed), or None when the units never fall into a loop:
    the engine's guard, unit by unit, so that the cut lands where the engine's would."""
    guard = LoopGuard()
    for n, unit in enumerate(units, 1):
        if (keep := guard.take(unit)) is not None:
            return keep, n
    return None


def cut_tokens(pieces: Sequence[bytes], ids: Sequence[Hashable]) -> tuple[str, int] | None:
    """(the caption cut back to its first round, tokens generated when the loop showed) for a caption's
    tokens (each one's bytes and identity), or None when it never loops. The text is decoded as the engine
    decodes it: token by token, an unfinished character held back."""
    end = loop_end(ids)
    if end is None:
        return None
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    return "".join(decoder.decode(piece) for piece in pieces[:end[0]]).strip(), end[1]


def cut_text(text: str) -> str | None:
    """`text` cut back to the first round of the loop it fell into, or None when it never loops."""
    pieces = _PIECES.findall(text)
    end = loop_end(pieces)
    return None if end is None else "".join(pieces[:end[0]]).strip()
