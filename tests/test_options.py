"""Options are defined once: checked the same way everywhere, and the CLI offers every caption option."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest

from caprl_local import CaprlError, Captioner
from caprl_local.cli import caption
from caprl_local.options import EngineOptions, GenerationOptions, make

#: Caption options the CLI leaves out on purpose: ignore_eos only serves benchmarks.
NOT_ON_THE_COMMAND_LINE = {"ignore_eos"}
#: Engine options the CLI does not offer yet (they keep their defaults there).
ENGINE_ONLY = {"n_ctx", "flash_attn", "image_min_tokens", "repack", "warmup", "isolate"}


def test_the_caption_command_offers_every_caption_option() -> None:
    cli_names = {p.name for p in caption.params}
    generation = {f.name for f in dataclasses.fields(GenerationOptions)} - NOT_ON_THE_COMMAND_LINE
    engine = {f.name for f in dataclasses.fields(EngineOptions)} - ENGINE_ONLY
    assert generation <= cli_names, generation - cli_names
    assert engine <= cli_names, engine - cli_names
    for param in caption.params:  # the CLI shows the library's defaults, not copies of them
        for cls in (GenerationOptions, EngineOptions):
            field = next((f for f in dataclasses.fields(cls) if f.name == param.name), None)
            if field is not None and isinstance(param.default, (int, float, str)):
                assert param.default == field.default, param.name


@pytest.mark.parametrize(("cls", "options", "words"), [
    (GenerationOptions, {"max_tokens": 0}, "max_tokens"),
    (GenerationOptions, {"max_tokens": True}, "max_tokens"),
    (GenerationOptions, {"temperature": -1.0}, "temperature"),
    (GenerationOptions, {"top_p": 0.0}, "top_p"),
    (GenerationOptions, {"repeat_penalty": float("nan")}, "repeat_penalty"),
    (GenerationOptions, {"prompt": "x", "preset": "short"}, "either a prompt or a preset"),
    (GenerationOptions, {"seed": "7"}, "seed"),
    (GenerationOptions, {"max_tokenz": 5}, "unknown option 'max_tokenz'"),
    (EngineOptions, {"threads": 0}, "threads"),
    (EngineOptions, {"n_ctx": 100}, "n_ctx"),
    (EngineOptions, {"gpu_layers": -2}, "gpu_layers"),
    (EngineOptions, {"image_max_tokens": 2.5}, "image_max_tokens"),
    (EngineOptions, {"parallel": "lots"}, "parallel"),
])
def test_bad_options_are_one_line_errors(cls: type, options: dict, words: str) -> None:
    with pytest.raises(CaprlError, match=words):
        make(cls, options)


def test_captioner_checks_options_before_loading(tiny_model: tuple[Path, Path], captioner: Captioner,
                                                 images: Path) -> None:
    with pytest.raises(CaprlError, match="unknown option 'gpu'"):
        Captioner(*tiny_model, gpu=1)
    with pytest.raises(CaprlError, match="unknown option 'parallel'"):  # sized by the Captioner, not per call
        list(captioner.caption_many([images / "photo.jpg"], parallel=2))
    with pytest.raises(CaprlError, match="max_tokens"):
        captioner.submit(images / "photo.jpg", max_tokens=0)


def test_default_threads_leave_out_a_core_another_program_keeps_busy() -> None:
    """llama.cpp's threads spin at barriers: one sharing its core with another program stalls
    them all, so the default counts a busy core out (on this machine and any busier one)."""
    import multiprocessing

    from caprl_local.engine import backend

    cpus = backend._usable_cpus()
    cores = backend._physical_cores(cpus)
    burner = multiprocessing.Process(target=_burn, daemon=True)
    burner.start()
    try:
        time.sleep(0.3)
        assert backend.default_threads() <= max(1, min(cores, len(cpus) - 1))
    finally:
        burner.terminate()
        burner.join()


def _burn() -> None:
    while True:
        pass
