"""The one-pass sampler of every caption in flight (caprl_local/engine/sampling.py).

It must pick what llama.cpp's sampler chain picks from the same logits: greedy under the repeat penalty
exactly; seeded top-p/temperature draws exactly as a plain reference of the chain's arithmetic does
(written out here, with its own Mersenne Twister), and as llama.cpp's own chain does on rows that are not
flat (on a flat row a float32 exp's last bit may move a draw across a neighbour, numpy's exp and the C
library's differing there). A seeded caption's draws never depend on what else is in the step, and the
engine's greedy captions are those of a loop that samples each caption with llama.cpp's chain.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import pytest

from caprl_local import Caption, Captioner
from caprl_local.engine.device_sampling import DeviceSampler, chain_for
from caprl_local.engine.sampling import REPEAT_LAST_N, TokenSampler, sample_rows
from caprl_local.options import GenerationOptions

V = 4096  # a vocabulary wide enough for top-p's first look to miss on flat rows, small enough for loops
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


def llama_chain(opts: GenerationOptions, prompt: Sequence[int], n_vocab: int = V) -> Any:
    """llama.cpp's own chain for these options (penalties, then greedy; or penalties, top-p, temperature, dist),
    as the engine built it for every caption before, and builds it now for device sampling."""
    return chain_for(opts, tuple(prompt), n_vocab)


def chain_pick(chain: Any, row: np.ndarray) -> int:
    """What llama.cpp's chain selects from `row` (then takes the token into its state, as sampling does)."""
    data = (llama_cpp.llama_token_data * row.size)()
    view = np.frombuffer(data, dtype=_TOKEN_DATA)
    view["id"], view["logit"], view["p"] = np.arange(row.size), row, 0.0
    candidates = llama_cpp.llama_token_data_array(data, row.size, -1, False)
    llama_cpp.llama_sampler_apply(chain, ctypes.byref(candidates))
    token = int(data[candidates.selected].id)
    llama_cpp.llama_sampler_accept(chain, token)
    return token


class MersenneTwister:
    """std::mt19937, written out from its definition (init_genrand and the tempering)."""

    def __init__(self, seed: int) -> None:
        self.mt = [seed & 0xFFFFFFFF]
        for i in range(1, 624):
            self.mt.append((1812433253 * (self.mt[-1] ^ (self.mt[-1] >> 30)) + i) & 0xFFFFFFFF)
        self.index = 624

    def next(self) -> int:
        if self.index >= 624:
            for i in range(624):
                y = (self.mt[i] & 0x80000000) | (self.mt[(i + 1) % 624] & 0x7FFFFFFF)
                self.mt[i] = self.mt[(i + 397) % 624] ^ (y >> 1) ^ (0x9908B0DF if y & 1 else 0)
            self.index = 0
        y = self.mt[self.index]
        self.index += 1
        y ^= y >> 11
        y ^= (y << 7) & 0x9D2C5680
        y ^= (y << 15) & 0xEFC60000
        return y ^ (y >> 18)

    def canonical(self) -> float:
        low, high = self.next(), self.next()
        return (low + high * 2.0**32) / 2.0**64


class Reference:
    """llama.cpp's chain, step by step in plain loops: penalties, top-p, temperature, dist."""

    def __init__(self, opts: GenerationOptions, prompt: Sequence[int]) -> None:
        self.opts, self.window = opts, list(prompt)[-REPEAT_LAST_N:]
        self.rng = MersenneTwister((opts.seed or 0) & 0xFFFFFFFF)

    def pick(self, row: np.ndarray) -> int:
        f32 = np.float32
        logits = [f32(x) for x in row]
        penalty = f32(self.opts.repeat_penalty)
        if penalty != 1:
            for token in set(self.window):
                logits[token] = logits[token] * penalty if logits[token] <= 0 else logits[token] / penalty
        if self.opts.temperature <= 0:
            token = max(range(len(logits)), key=lambda i: (logits[i], -i))
        else:
            cands = list(range(len(logits)))
            if self.opts.top_p < 1:
                top = max(logits)
                e = np.exp(np.asarray([logits[i] - top for i in cands], dtype=np.float32))  # the same exp
                total = f32(0)
                for x in e:
                    total = f32(total + x)
                cands.sort(key=lambda i: (-logits[i], i))
                running, kept = f32(0), len(cands)
                for n, i in enumerate(cands):
                    running = f32(running + e[i] / total)
                    if running >= f32(self.opts.top_p):
                        kept = n + 1
                        break
                cands = cands[:kept]
            scaled = [f32(logits[i] / f32(self.opts.temperature)) for i in cands]
            rnd = self.rng.canonical()
            top = max(scaled)
            e = np.exp(np.asarray([s - top for s in scaled], dtype=np.float32))
            target, running, chosen = float(sum(float(x) for x in e)) * rnd, 0.0, len(cands) - 1
            for n, x in enumerate(e):
                running += float(x)
                if running >= target:
                    chosen = n
                    break
            token = cands[chosen]
        self.window = (self.window + [token])[-REPEAT_LAST_N:]
        return token


def rows(rng: np.random.Generator, n: int, scale: float) -> np.ndarray:
    """`n` rows of logits at `scale` (small: flat), with the early tokens lifted so that repeats matter."""
    out = (rng.normal(size=(n, V)) * scale).astype(np.float32)
    out[:, :64] += np.float32(2 * scale)
    return out


CASES = [
    GenerationOptions(temperature=0.0, repeat_penalty=1.05),
    GenerationOptions(temperature=0.0, repeat_penalty=1.3),
    GenerationOptions(temperature=0.0, repeat_penalty=1.0),
    GenerationOptions(temperature=0.0, repeat_penalty=0.8),
    GenerationOptions(temperature=0.7, top_p=0.9, seed=1, repeat_penalty=1.05),
    GenerationOptions(temperature=1.0, top_p=0.5, seed=2, repeat_penalty=1.3),
    GenerationOptions(temperature=1.3, top_p=1.0, seed=3, repeat_penalty=1.0),
    GenerationOptions(temperature=0.2, top_p=0.95, seed=2**32 - 2, repeat_penalty=1.05),
]


@pytest.mark.parametrize("opts", CASES, ids=lambda o: f"t{o.temperature}-p{o.top_p}-r{o.repeat_penalty}")
@pytest.mark.parametrize("scale", [0.05, 1.0, 6.0], ids=["flat", "spread", "peaked"])
def test_picks_what_the_plain_reference_picks(opts: GenerationOptions, scale: float) -> None:
    rng = np.random.default_rng(int(scale * 100) + (opts.seed or 0))
    prompt = rng.integers(0, 64, 300).tolist()
    ours, ref = TokenSampler(opts, prompt), Reference(opts, prompt)
    for row in rows(rng, 12, scale):
        assert sample_rows(row.copy()[None, :], [ours]) == [ref.pick(row)]


@pytest.mark.parametrize("opts", CASES, ids=lambda o: f"t{o.temperature}-p{o.top_p}-r{o.repeat_penalty}")
def test_picks_what_llama_cpp_picks(opts: GenerationOptions) -> None:
    """Greedy rows of every spread, and draws from rows that are not flat, are llama.cpp's chain's tokens."""
    rng = np.random.default_rng(7)
    prompt = rng.integers(0, 64, 300).tolist()
    scales = [0.05, 1.0, 6.0] if opts.temperature <= 0 else [1.0, 6.0]
    for scale in scales:
        ours, chain = TokenSampler(opts, prompt), llama_chain(opts, prompt)
        try:
            for row in rows(rng, 40, scale):
                assert sample_rows(row.copy()[None, :], [ours]) == [chain_pick(chain, row.copy())]
        finally:
            llama_cpp.llama_sampler_free(chain)


def test_a_seeded_caption_draws_the_same_whatever_else_is_in_the_step() -> None:
    rng = np.random.default_rng(3)
    seeded = GenerationOptions(temperature=0.8, top_p=0.9, seed=42)
    steps = rows(rng, 30, 1.0)
    alone = TokenSampler(seeded)
    expected = [sample_rows(row.copy()[None, :], [alone])[0] for row in steps]
    others = [TokenSampler(GenerationOptions(temperature=0.8, top_p=0.9, seed=s)) for s in (1, 2)]
    together = [TokenSampler(GenerationOptions()), TokenSampler(seeded), *others]
    got = []
    for row in steps:
        batch = np.stack([rows(rng, 1, 1.0)[0], row, *rows(rng, 2, 1.0)])
        got.append(sample_rows(batch, together)[1])
    assert got == expected


def test_a_step_penalises_each_row_by_its_own_window() -> None:
    """Rows of one step with different windows and penalties: each as if sampled alone."""
    rng = np.random.default_rng(5)
    opts = [GenerationOptions(repeat_penalty=p) for p in (1.05, 1.0, 1.5, 1.05)]
    prompts = [rng.integers(0, 64, n).tolist() for n in (10, 300, 64, 0)]
    batch = [TokenSampler(o, p) for o, p in zip(opts, prompts, strict=True)]
    single = [TokenSampler(o, p) for o, p in zip(opts, prompts, strict=True)]
    for step in rows(rng, 20, 1.0).reshape(5, 4, V):
        expected = [sample_rows(row.copy()[None, :], [s])[0] for row, s in zip(step, single, strict=True)]
        assert sample_rows(step.copy(), batch) == expected


def test_a_nan_row_picks_a_token_instead_of_failing() -> None:
    row = np.full((1, V), np.nan, dtype=np.float32)
    for opts in (GenerationOptions(), GenerationOptions(temperature=0.7, seed=1),
                 GenerationOptions(temperature=0.7, top_p=1.0, seed=1)):
        (token,) = sample_rows(row.copy(), [TokenSampler(opts)])
        assert 0 <= token < V


# -- the engine: its greedy captions are those of llama.cpp's chain, caption by caption ---------------------


def captions_with_llama_chains(captioner: Captioner, images: list[Path], **options: Any) -> list[str]:
    """Captions from a loop that samples each caption with its own llama.cpp chain, one row at a time."""
    session = captioner._live().session
    make, sample = session.sampler, session.sample
    chains: dict[int, Any] = {}

    def sampler(opts: GenerationOptions, prompt: Sequence[int] = ()) -> TokenSampler:
        made = make(opts, prompt)
        chains[id(made)] = llama_chain(opts, list(prompt)[-REPEAT_LAST_N:], session.n_vocab)
        return made

    def sample_each(samplers: Sequence[TokenSampler]) -> list[int]:
        rows = [-1] if len(samplers) == 1 else list(range(len(samplers)))
        return [int(llama_cpp.llama_sampler_sample(chains[id(s)], session._ctx, i)) for s, i in zip(samplers, rows, strict=True)]

    session.sampler, session.sample = sampler, sample_each  # type: ignore[method-assign]
    try:
        return [c.text for c in captioner.caption_many(images, **options)]  # type: ignore[union-attr]
    finally:
        session.sampler, session.sample = make, sample  # type: ignore[method-assign]
        for chain in chains.values():
            llama_cpp.llama_sampler_free(chain)


@pytest.mark.parametrize("parallel", [1, 4])
def test_greedy_captions_are_llama_cpp_chain_captions(tiny_model: tuple[Path, Path], images: Path,
                                                      parallel: int) -> None:
    files = [images / name for name in ("photo.jpg", "pixel.png", "palette.png", "alpha.png")]
    with Captioner(*tiny_model, threads=1, parallel=parallel, isolate=False) as cap:
        for penalty in (1.05, 1.3, 1.0):
            options = {"max_tokens": 48, "repeat_penalty": penalty, "loop_guard": False}
            ours = [c.text for c in cap.caption_many(files, **options)]  # type: ignore[union-attr, arg-type]
            assert ours == captions_with_llama_chains(cap, files, **options), penalty
            assert all(ours)


@pytest.mark.parametrize("parallel", [1, 3])
def test_device_sampling_keeps_greedy_captions(tiny_model: tuple[Path, Path], images: Path, parallel: int) -> None:
    """llama.cpp's backend sampling (here on the CPU backend, which it supports too) leaves greedy captions
    as the host's pass makes them, and seeded ones still complete."""
    files = [images / name for name in ("photo.jpg", "pixel.png", "palette.png", "alpha.png")]
    options: dict[str, Any] = {"max_tokens": 32, "loop_guard": False}
    with Captioner(*tiny_model, threads=1, parallel=parallel, isolate=False) as cap:
        host = [c.text for c in cap.caption_many(files, **options)]  # type: ignore[union-attr]
    with Captioner(*tiny_model, threads=1, parallel=parallel, isolate=False, device_sampling=True) as cap:
        session, attached = cap._live().session, []
        on_device = session.on_device

        def watched(seq: int, sampler: TokenSampler) -> Any:
            attached.append(on_device(seq, sampler))
            return attached[-1]

        session.on_device = watched  # type: ignore[method-assign]
        assert [c.text for c in cap.caption_many(files, **options)] == host  # type: ignore[union-attr]
        assert len(attached) == len(files) and all(isinstance(s, DeviceSampler) for s in attached)
        seeded = list(cap.caption_many(files, temperature=0.8, seed=3, max_tokens=16))
        assert all(isinstance(c, Caption) and c.text for c in seeded)
