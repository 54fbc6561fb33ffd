"""The repeat penalty counts the prompt's text as repeats, as llama-server, vLLM and Transformers do.

llama-server feeds its sampler every text token of the prompt, in order (an image's positions carry no
token and are left out), before the first token is sampled; the penalty then looks at the last
`repeat_last_n` tokens of prompt and caption together. These tests watch each sampling step of the engine
on the tiny model (the model's own logits, and the token taken) and check it against that rule, computed
here from the prompt's text tokens; tests/test_endpoints.py checks the engine's captions against llama-server's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from caprl_local import Captioner
from caprl_local.chat import ChatMessage, user
from caprl_local.engine.session import Session

WINDOW = 256  # the penalty's window (the fleet client sends it to llama-server as repeat_last_n)
IMAGES = ["photo.jpg", "pixel.png", "palette.png", "alpha.png"]
WORDS = ["trees", "legend", "building", "of", "mou", "blu", "street", "photo", "image"]  # words of the tiny corpus


class Watched:
    """A Captioner whose session records, for each token sampled, the model's logits and the token."""

    def __init__(self, captioner: Captioner) -> None:
        self.captioner = captioner
        self.session: Session = captioner._live().session
        self.steps: list[tuple[np.ndarray, int]] = []
        self.prompts: list[tuple[ChatMessage, ...]] = []
        sample, prompt_chat = self.session.sample, self.session.prompt_chat

        def watch_sample(samplers: Any) -> list[int]:
            (logits,) = self.session.logits_rows(len(samplers)).copy()  # the model's, before the penalty
            tokens = sample(samplers)
            self.steps.append((logits, tokens[0]))
            return tokens

        def watch_prompt(seq: int, messages: tuple[ChatMessage, ...], *args: Any, **kwargs: Any) -> Any:
            self.prompts.append(messages)
            return prompt_chat(seq, messages, *args, **kwargs)

        self.session.sample = watch_sample  # type: ignore[method-assign]
        self.session.prompt_chat = watch_prompt  # type: ignore[method-assign]

    def run(self, image: Path | None = None, *, messages: Sequence[ChatMessage] = (), **options: Any) -> Run:
        """One caption (or chat answer), with the steps it took and its prompt's text tokens."""
        self.steps, self.prompts = [], []
        if image is not None:
            result = self.captioner.caption(image, **options)
        else:
            result = self.captioner.chat(messages, **options)
        (conversation,) = self.prompts
        text = [t for chunk in self.session.chunk_tokens(conversation) if isinstance(chunk, list) for t in chunk]
        return Run(result.text, text, self.steps)


class Run:
    def __init__(self, text: str, prompt: list[int], steps: list[tuple[np.ndarray, int]]) -> None:
        self.text, self.prompt, self.steps = text, prompt, steps

    @property
    def tokens(self) -> list[int]:
        return [token for _, token in self.steps]


def penalised(logits: np.ndarray, history: Sequence[int], penalty: float) -> int:
    """The greedy token under llama.cpp's repeat penalty over `history` (a positive logit divided, others multiplied)."""
    logits = logits.astype(np.float32)
    seen = np.fromiter(set(history), dtype=np.int64)
    hit = logits[seen]
    logits[seen] = np.where(hit <= 0, hit * np.float32(penalty), hit / np.float32(penalty))
    return int(np.argmax(logits))


def follows_the_rule(run: Run, penalty: float) -> bool:
    """Every token is the greedy one with the penalty over the last WINDOW of prompt text, then caption, tokens."""
    history = list(run.prompt)
    for logits, token in run.steps:
        if token != penalised(logits, history[-WINDOW:], penalty):
            return False
        history.append(token)
    return True


@pytest.fixture(scope="module")
def watched(tiny_model: tuple[Path, Path]) -> Iterator[Watched]:
    with Captioner(*tiny_model, threads=1, parallel=1) as captioner:
        yield Watched(captioner)


def test_the_prompts_text_is_penalised_from_the_first_token(watched: Watched, images: Path) -> None:
    flips = []
    for name in IMAGES:
        for word in WORDS:
            prompt = f"Describe the {word}."
            plain = watched.run(images / name, prompt=prompt, max_tokens=1, repeat_penalty=1.0)
            strict = watched.run(images / name, prompt=prompt, max_tokens=1, repeat_penalty=1.3)
            assert plain.prompt == strict.prompt and len(strict.steps) == 1
            assert np.array_equal(plain.steps[0][0], strict.steps[0][0])  # the same model logits for both
            assert plain.tokens == [int(np.argmax(plain.steps[0][0]))]
            assert follows_the_rule(strict, 1.3), (name, prompt)
            if strict.tokens != plain.tokens:
                flips.append((name, prompt, plain.text, strict.text))
    # With only the caption's tokens counted, the first token had nothing to be penalised for.
    assert flips, "no prompt's text changed a caption's first token"
    assert any(plain != strict for _, _, plain, strict in flips)  # and a caption's text shows it


def test_the_window_is_the_last_256_text_tokens_of_prompt_and_caption(watched: Watched, images: Path) -> None:
    beyond = within = 0  # steps where the whole prompt, or only llama-server's default 64 tokens, would choose otherwise
    for name in IMAGES:
        for word in WORDS:
            for filler in ("1 " * 100, ". " * 100, "1 " * 300, ". " * 300):  # the word inside the window, or before it
                run = watched.run(images / name, prompt=f"Describe the {word}. {filler}", max_tokens=1, repeat_penalty=1.3)
                assert len(run.prompt) > 200
                assert follows_the_rule(run, 1.3), (name, word, filler)
                logits, token = run.steps[0]
                beyond += token != penalised(logits, run.prompt, 1.3)
                within += token != penalised(logits, run.prompt[-64:], 1.3)
    assert beyond, "no prompt had a token that mattered beyond the window"
    assert within, "no prompt had a token that mattered early in the window"


@pytest.mark.parametrize("penalty", [1.05, 1.3, 2.0])
def test_every_token_follows_llama_servers_rule(watched: Watched, images: Path, penalty: float) -> None:
    long = "Describe the building. " + ". " * 150  # the window slides from the prompt into the caption
    for name, prompt in [("photo.jpg", long), ("pixel.png", None), ("palette.png", "legend legend legend")]:
        options: dict[str, Any] = {} if prompt is None else {"prompt": prompt}
        run = watched.run(images / name, max_tokens=80, repeat_penalty=penalty, **options)
        assert len(run.steps) > 1 and follows_the_rule(run, penalty), (name, prompt)


def test_a_conversations_text_around_its_images_is_counted_in_order(watched: Watched, images: Path) -> None:
    messages = [user("Look at the trees and the street.", images / "photo.jpg", "Now the building, the legend.")]
    run = watched.run(messages=messages, max_tokens=40, repeat_penalty=1.3)
    layout = watched.session.chunk_tokens(watched.prompts[0])
    assert sum(isinstance(chunk, int) for chunk in layout) == 1  # an image between text, which gives no token
    assert follows_the_rule(run, 1.3)


def test_without_a_penalty_every_token_is_the_models_greedy_one(watched: Watched, images: Path) -> None:
    """repeat_penalty=1.0 leaves the penalty out: the captions are what they were, the prompt notwithstanding."""
    for name in IMAGES:
        for prompt in (None, "legend legend legend trees trees of of of"):
            options: dict[str, Any] = {} if prompt is None else {"prompt": prompt}
            run = watched.run(images / name, max_tokens=60, repeat_penalty=1.0, **options)
            assert run.tokens == [int(np.argmax(logits)) for logits, _ in run.steps], (name, prompt)

