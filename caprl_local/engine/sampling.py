"""Every caption in flight sampled in one pass over the step's logits.

llama.cpp's sampler chain runs once per caption per step: it copies the 151,936 logits into a
candidate array, looks each one up in the repeat penalty's table and scans them again to pick one,
all on one core, one caption after another. Here a step's rows are read in place as one array: the
repeat penalty touches only the tokens in each caption's window (a few hundred values per row, one
gather and one scatter for all rows), and greedy rows are one argmax together.

The arithmetic is llama.cpp's, in the same order and precision, so a caption is the one its sampler
chain (penalties, then greedy; or penalties, top-p, temperature, dist) would pick from the same logits:
the penalty in float32 (``<= 0`` multiplied, else divided), greedy the first maximum, top-p over
float32 softmax probabilities summed in descending order, the draw a ``std::mt19937`` seeded as
llama.cpp seeds it, turned into a double as libstdc++'s ``generate_canonical`` does. Each caption owns
its random stream, so what else is in flight never changes its draws.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Sequence

import numpy as np

from ..options import GenerationOptions

REPEAT_LAST_N = 256  # the repeat penalty's window: the prompt's last text tokens, then the caption's
_RANDOM_SEED = 0xFFFFFFFF  # llama.cpp's LLAMA_DEFAULT_SEED: a seed drawn from the system
# Top-p looks first among the tokens within this factor of the most likely one (logit within ~9.2 of
# it), which hold the cut in all but flat rows; the rest are sorted only when they do not.
_NEAR = np.float32(1e-4)


class TokenSampler:
    """One caption's sampling state: its options, the repeat penalty's window, its random stream."""

    def __init__(self, options: GenerationOptions, prompt: Sequence[int] = ()) -> None:
        self.options = options
        self.penalty = np.float32(options.repeat_penalty)
        self.greedy = options.temperature <= 0
        self.temperature = np.float32(options.temperature)
        self.top_p = np.float32(options.top_p)
        self._window: deque[int] = deque(maxlen=REPEAT_LAST_N)
        self._counts: dict[int, int] = {}
        self._keys: np.ndarray | None = None  # the window's distinct tokens, as an index array
        self._rng = None if self.greedy else _mt19937(options.seed)
        # llama-server, vLLM and Transformers count the prompt's text as repeats too; only the window's
        # last REPEAT_LAST_N matter, and those alone leave it as all of them would.
        for token in prompt[-REPEAT_LAST_N:]:
            self.accept(token)

    @property
    def penalised(self) -> bool:
        return bool(self.penalty != 1.0) and bool(self._counts)

    @property
    def window(self) -> tuple[int, ...]:
        """The tokens the repeat penalty looks at, oldest first."""
        return tuple(self._window)

    def accept(self, token: int) -> None:
        """Take a token into the repeat penalty's window (the caption's, or the prompt's)."""
        if self.penalty == 1.0:
            return
        if len(self._window) == REPEAT_LAST_N:
            old = self._window[0]
            left = self._counts[old] - 1
            if left:
                self._counts[old] = left
            else:
                del self._counts[old]
        self._window.append(token)
        self._counts[token] = self._counts.get(token, 0) + 1
        self._keys = None

    def keys(self) -> np.ndarray:
        """The distinct tokens the repeat penalty applies to."""
        if self._keys is None:
            self._keys = np.fromiter(self._counts, dtype=np.intp, count=len(self._counts))
        return self._keys

    def draw(self, row: np.ndarray) -> int:
        """Top-p, temperature and a draw from one (penalised) row of logits, as llama.cpp's chain does."""
        assert self._rng is not None
        rnd = _canonical(self._rng)  # drawn even for one candidate, as llama.cpp keeps its stream aligned
        if not np.isfinite(row.max()):  # a broken model's NaN or all -inf row: no distribution to draw from
            return int(row.argmax())
        if self.top_p >= 1.0:  # no top-p: the draw runs over every token, in token order
            logits = row / self.temperature
            return _pick(np.exp(logits - logits.max()), rnd)
        kept = _top_p(row, self.top_p)  # the kept logits, most likely first
        logits = kept / self.temperature
        chosen = _pick(np.exp(logits - logits[0]), rnd) if kept.size > 1 else 0
        # The token is the one holding that value; among equal values, by place in the vocabulary.
        value = kept[chosen]
        ties = np.flatnonzero(row == value)
        if ties.size > 1:
            return int(ties[min(chosen - int(np.searchsorted(-kept, -value, side="left")), ties.size - 1)])
        return int(ties[0]) if ties.size else int(row.argmax())


def sample_rows(logits: np.ndarray, samplers: Sequence[TokenSampler]) -> list[int]:
    """The next token of each caption from its row of `logits` (rows x vocabulary, float32, changed in
    place by the repeat penalty), and each taken into its sampler's window."""
    penalised = [i for i, s in enumerate(samplers) if s.penalised]
    if penalised:
        keys = [samplers[i].keys() for i in penalised]
        rows = np.repeat(np.asarray(penalised, dtype=np.intp), [k.size for k in keys])
        cols = np.concatenate(keys)
        factor = np.repeat(np.asarray([samplers[i].penalty for i in penalised], dtype=np.float32),
                           [k.size for k in keys])
        values = logits[rows, cols]
        logits[rows, cols] = np.where(values <= 0, values * factor, values / factor)
    if all(s.greedy for s in samplers):
        tokens = logits[:len(samplers)].argmax(axis=1).tolist()
    else:
        tokens = [int(logits[i].argmax()) if s.greedy else s.draw(logits[i]) for i, s in enumerate(samplers)]
    for sampler, token in zip(samplers, tokens, strict=True):
        sampler.accept(token)
    return tokens


def _top_p(row: np.ndarray, p: np.float32) -> np.ndarray:
    """The logits top-p keeps, in descending order: the fewest whose float32 probabilities, summed in
    that order, reach `p` (at least one). Values only: the sums (and the draw after) depend on nothing
    else, and sorting values is several times faster than sorting tokens."""
    e = np.exp(row - row.max())
    total = np.cumsum(e)[-1]  # llama.cpp's softmax sums in float32, in token order
    for near in (_NEAR, None):
        values = -np.sort(-(row[e >= near] if near is not None else row))
        running = np.cumsum(np.exp(values - values[0]) / total)  # float32, as llama.cpp's cum_sum
        reached = np.flatnonzero(running >= p)
        if reached.size:
            return values[:reached[0] + 1]
    return values  # the sum never reached p (rounding): every token, as llama.cpp keeps them all


def _pick(e: np.ndarray, rnd: float) -> int:
    """llama.cpp's draw: the first candidate whose running sum (in double) reaches `rnd` of the total."""
    running = np.cumsum(e, dtype=np.float64)
    return min(int(np.searchsorted(running, running[-1] * rnd, side="left")), e.size - 1)


def _mt19937(seed: int | None) -> np.random.MT19937:
    """A random stream that is ``std::mt19937(seed)`` (numpy's legacy seeding is its init_genrand)."""
    value = _RANDOM_SEED if seed is None else seed & 0xFFFFFFFF
    if value == _RANDOM_SEED:  # llama.cpp draws a seed from the system for this one
        value = int.from_bytes(os.urandom(4), "little")
    state = np.random.RandomState(value).get_state(legacy=False)
    generator = np.random.MT19937()
    generator.state = {"bit_generator": "MT19937", "state": state["state"]}
    return generator


_TWO32 = float(2**32)


def _canonical(rng: np.random.MT19937) -> float:
    """``std::uniform_real_distribution<double>(0, 1)`` on a ``std::mt19937``, as libstdc++ computes it
    (``generate_canonical``: two 32-bit draws, low word first)."""
    low, high = (float(x) for x in rng.random_raw(2))
    value = (low + high * _TWO32) / (_TWO32 * _TWO32)
    return value if value < 1.0 else float(np.nextafter(1.0, 0.0))
