"""Sampling inside llama.cpp's decode, on the device that computed the logits (its experimental
backend sampling, ``-bs`` in llama.cpp's tools).

A caption's sampler chain (penalties, then greedy; or penalties, top-p, temperature, dist) is attached
to its sequence; each decode then leaves the chosen token instead of 151,936 logits to copy back. The
caption's first token is still sampled on the host (its prompt was evaluated before the chain could know
the prompt's tokens); the chain starts from the same window. Greedy captions are the host's; seeded
draws are llama.cpp's device sampler's own. Off unless asked for (``device_sampling``): whether it pays
depends on the device and the number in flight, so it is measured before it is turned on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import llama_cpp
import numpy as np

from ..options import GenerationOptions
from .sampling import REPEAT_LAST_N, TokenSampler, sample_rows

log = logging.getLogger("caprl_local")


@dataclass(eq=False)
class DeviceSampler:
    """A caption's llama.cpp chain, attached to its sequence in a context."""

    chain: Any
    seq: int


def chain_for(options: GenerationOptions, window: tuple[int, ...], n_vocab: int) -> Any:
    """llama.cpp's chain for `options`, its repeat penalty already fed `window`."""
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    if options.repeat_penalty != 1.0:
        penalties = llama_cpp.llama_sampler_init_penalties(n_vocab, REPEAT_LAST_N, options.repeat_penalty, 0.0, 0.0)
        for token in window:
            llama_cpp.llama_sampler_accept(penalties, token)
        llama_cpp.llama_sampler_chain_add(chain, penalties)
    if options.temperature <= 0:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
    else:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_p(options.top_p, 1))
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(options.temperature))
        seed = llama_cpp.LLAMA_DEFAULT_SEED if options.seed is None else options.seed & 0xFFFFFFFF
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(seed))
    return chain


def attach(ctx: Any, seq: int, host: TokenSampler, n_vocab: int) -> DeviceSampler | None:
    """Move a caption's sampling to the device from the next decode on; None where llama.cpp cannot
    (the caption then goes on sampling on the host)."""
    chain = chain_for(host.options, host.window, n_vocab)
    if not llama_cpp.llama_set_sampler(ctx, seq, chain):
        llama_cpp.llama_set_sampler(ctx, seq, None)
        llama_cpp.llama_sampler_free(chain)
        log.debug("llama.cpp cannot sample sequence %d on the device; it samples on the host", seq)
        return None
    return DeviceSampler(chain, seq)


def sample(ctx: Any, sampler: DeviceSampler, row: int) -> int:
    """The token the device chose for batch row `row` (llama.cpp takes it into the chain's window)."""
    return int(llama_cpp.llama_sampler_sample(sampler.chain, ctx, row))


def detach(ctx: Any, sampler: DeviceSampler) -> None:
    """Take the chain off its sequence and free it."""
    if ctx:
        llama_cpp.llama_set_sampler(ctx, sampler.seq, None)
    llama_cpp.llama_sampler_free(sampler.chain)


def sample_step(ctx: Any, samplers: Sequence[TokenSampler | DeviceSampler],
                logits: Callable[[int], np.ndarray]) -> list[int]:
    """The next token of each caption of a step: the device's where it chose, the host's pass over the
    others' rows (`logits(row)`: a row's logits; -1, the last, after a prompt)."""
    rows = [-1] if len(samplers) == 1 else list(range(len(samplers)))
    tokens = [sample(ctx, s, row) if isinstance(s, DeviceSampler) else -1 for s, row in zip(samplers, rows, strict=True)]
    host = [i for i, s in enumerate(samplers) if isinstance(s, TokenSampler)]
    if host:
        picked = sample_rows(np.stack([logits(rows[i]) for i in host]), [samplers[i] for i in host])  # type: ignore[misc]
        for i, token in zip(host, picked, strict=True):
            tokens[i] = token
    return tokens
