"""One contract for what captions a batch, and caption options as typed values that reach where they are meant to."""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import threading
import typing
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from helpers import send_json

from caprl_local import cli, endpoints, hub, options, transfer
from caprl_local.captioning import Captioning
from caprl_local.endpoints import Endpoint, EndpointCaptioner
from caprl_local.engine import Captioner
from caprl_local.errors import CaprlError
from caprl_local.options import EngineKwargs, EngineOptions, GenerationKwargs, GenerationOptions, PretrainedKwargs
from caprl_local.prompts import PRESETS, resolve_prompt
from caprl_local.results import Caption


def _ray_captioner() -> type[Any]:
    pytest.importorskip("ray")
    from caprl_local.ray import RayCaptioner

    return RayCaptioner


def _shape(function: Any) -> list[tuple[str, Any, Any]]:
    """A signature as names, kinds and defaults (the annotations may differ: wider is fine)."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


def test_the_captioners_caption_many_signatures_agree_with_the_contract() -> None:
    expected = _shape(Captioning.caption_many)
    assert expected[-1][1] is inspect.Parameter.VAR_KEYWORD  # the caption options
    for cls in (Captioner, EndpointCaptioner, _ray_captioner()):
        assert _shape(cls.caption_many) == expected, cls.__name__


def test_each_captioner_is_a_captioning(tiny_model: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    model, mmproj = tiny_model
    with Captioner(model, mmproj, threads=1, parallel=1, isolate=False, warmup=False) as local:
        assert isinstance(local, Captioning)
    # given its model and width, an endpoint fleet asks its servers nothing until it captions
    with EndpointCaptioner([Endpoint("http://127.0.0.1:9/v1", model="m", concurrency=1)]) as fleet:
        assert isinstance(fleet, Captioning)
    ray_captioner = _ray_captioner()
    import caprl_local.ray

    monkeypatch.setattr(caprl_local.ray.ray, "is_initialized", lambda: True)  # no Ray instance started
    with ray_captioner(str(model), threads=1) as on_ray:
        assert isinstance(on_ray, Captioning)
    assert not isinstance(object(), Captioning)


@pytest.mark.parametrize(("typed", "values"), [(GenerationKwargs, GenerationOptions), (EngineKwargs, EngineOptions)])
def test_the_keyword_options_mirror_the_option_values(typed: Any, values: Any) -> None:
    assert typing.get_type_hints(typed) == typing.get_type_hints(values)
    assert list(typed.__annotations__) == [f.name for f in dataclasses.fields(values)]
    assert typed.__optional_keys__ == frozenset(typed.__annotations__)  # every option has its default


def test_from_pretrained_takes_the_engine_options_download_models_and_the_prompt() -> None:
    download = {k: v for k, v in typing.get_type_hints(hub.download_model).items() if k not in ("name", "return")}
    hints = typing.get_type_hints(PretrainedKwargs, localns={"ProgressCallback": transfer.ProgressCallback})
    assert hints == {**typing.get_type_hints(EngineKwargs), **download, "prompt": str | None}
    assert PretrainedKwargs.__optional_keys__ == frozenset(hints)


# -- options through the CLI to Ray --


class _Recorded(Exception):
    pass


@pytest.fixture
def own_logging() -> Iterator[None]:
    """cli.main configures the package's logger; the other tests in this process keep theirs."""
    ours, root = logging.getLogger("caprl_local"), logging.getLogger()
    ours_handlers, ours_level, ours_propagate = ours.handlers[:], ours.level, ours.propagate
    root_handlers, root_level = root.handlers[:], root.level
    yield
    ours.handlers[:], root.handlers[:] = ours_handlers, root_handlers
    ours.setLevel(ours_level)
    root.setLevel(root_level)
    ours.propagate = ours_propagate


@pytest.mark.parametrize(("flags", "expected"), [(["--gpu-layers", "0"], 0), (["--gpu-layers", "3"], 3),
                                                 (["--gpu-layers", "-1"], -1), ([], "auto")])
def test_ray_runs_get_every_engine_option_given_falsy_or_not(flags: list[str], expected: Any, images: Path,
                                                              monkeypatch: pytest.MonkeyPatch, own_logging: None) -> None:
    ray_module = pytest.importorskip("caprl_local.ray")
    seen: dict[str, Any] = {}

    def recording(model: str, **kwargs: Any) -> None:
        seen.update(kwargs, model=model)
        raise _Recorded

    monkeypatch.setattr(ray_module, "RayCaptioner", recording)
    code = cli.main(["caption", str(images / "photo.jpg"), "--threads", "1", *flags, "--ray"])
    assert code != 0 and seen, "the CLI did not reach the RayCaptioner"
    assert seen.get("gpu_layers", "auto") == expected and type(seen.get("gpu_layers", "auto")) is type(expected)
    assert seen["threads"] == 1


# -- options through the CLI to endpoints --


class _Recorder(BaseHTTPRequestHandler):
    """An OpenAI-compatible stand-in that keeps every request body and answers with one caption."""

    bodies: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802 - the http.server API
        type(self).bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self._send({"choices": [{"message": {"role": "assistant", "content": "A red square."}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 4}})

    def do_GET(self) -> None:  # noqa: N802
        self._send({"object": "list", "data": [{"id": "recorded-model", "object": "model"}]})

    def _send(self, body: dict[str, Any]) -> None:
        send_json(self, 200, body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    bodies: list[dict[str, Any]] = []
    handler = type("Recorder", (_Recorder,), {"bodies": bodies})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/v1", bodies
    finally:
        server.shutdown()
        server.server_close()


def test_the_cli_sends_each_caption_option_to_the_endpoints(recorder: tuple[str, list[dict[str, Any]]], images: Path,
                                                            tmp_path: Path, own_logging: None) -> None:
    url, bodies = recorder
    out = tmp_path / "out.jsonl"
    code = cli.main(["caption", str(images / "photo.jpg"), "--endpoint", url, "--endpoint-concurrency", "1",
                     "--prompt", "Say it.", "-n", "12", "--temperature", "0.5", "--top-p", "0.9", "--seed", "7",
                     "--repeat-penalty", "1.3", "--stop", "END", "--no-loop-guard", "--format", "jsonl", "-o", str(out)])
    assert code == 0
    assert json.loads(out.read_text())["caption"] == "A red square."
    (body,) = bodies
    assert body["messages"][0]["content"][1]["text"] == "Say it."
    assert {k: body[k] for k in ("max_tokens", "temperature", "top_p", "seed", "stop", "loop_guard")} == {
        "max_tokens": 12, "temperature": 0.5, "top_p": 0.9, "seed": 7, "stop": ["END"], "loop_guard": False}
    assert body["repeat_penalty"] == body["repetition_penalty"] == 1.3  # llama-server's name, and vLLM's and SGLang's


#: A value other than the default for every caption option.
CHANGED: dict[str, Any] = {"prompt": "Say it.", "preset": "short", "max_tokens": 7, "temperature": 0.5, "top_p": 0.5,
                           "seed": 3, "repeat_penalty": 1.3, "stop": ("END",), "loop_guard": False, "ignore_eos": True}


def _bodies(url: str, bodies: list[dict[str, Any]], image: Path, **options: Any) -> dict[str, Any]:
    with EndpointCaptioner([Endpoint(url, concurrency=1)]) as fleet:
        texts: list[tuple[str, str]] = []
        (result,) = fleet.caption_many([image], on_text=lambda name, text: texts.append((name, text)), **options)
    assert isinstance(result, Caption) and texts == [(str(image), "A red square.")]
    return bodies.pop()


def test_every_caption_option_reaches_the_endpoints(recorder: tuple[str, list[dict[str, Any]]], images: Path,
                                                    tmp_path: Path) -> None:
    assert set(CHANGED) | {"video_prompt"} == {f.name for f in dataclasses.fields(GenerationOptions)}  # a new one here too
    url, bodies = recorder
    plain = _bodies(url, bodies, images / "photo.jpg")
    for name, value in CHANGED.items():
        sent = _bodies(url, bodies, images / "photo.jpg", **{name: value})
        assert sent != plain, f"{name} was not sent"
    clip = tmp_path / "clip.mp4"  # sent as its bytes, not decoded here: an MP4's opening is all it needs
    clip.write_bytes(b"\x00\x00\x00\x18ftypisom" + bytes(64))
    with EndpointCaptioner([Endpoint(url, concurrency=1)]) as fleet:
        assert all(isinstance(r, Caption) for r in fleet.caption_many([clip], video_prompt="Tell the clip."))
    assert bodies.pop()["messages"][0]["content"][1]["text"] == "Tell the clip."
    assert _bodies(url, bodies, images / "photo.jpg", ignore_eos=True)["ignore_eos"] is True
    preset = _bodies(url, bodies, images / "photo.jpg", preset="short")
    assert preset["messages"][0]["content"][1]["text"] == resolve_prompt(preset="short") == PRESETS["short"]


def test_an_option_the_requests_cannot_carry_is_refused_by_name(recorder: tuple[str, list[dict[str, Any]]], images: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    url, bodies = recorder
    monkeypatch.setattr(endpoints, "SENT", endpoints.SENT - {"ignore_eos"})  # as if the requests had no room for it
    with EndpointCaptioner([Endpoint(url, model="m", concurrency=1)]) as fleet:
        with pytest.raises(CaprlError, match="cannot honour option 'ignore_eos'"):
            list(fleet.caption_many([images / "photo.jpg"], ignore_eos=True))
        assert len(list(fleet.caption_many([images / "photo.jpg"], ignore_eos=False))) == 1  # its default is fine
    assert len(bodies) == 1
    with pytest.raises(CaprlError, match="unknown option 'max_tokns'"):
        options.make(GenerationOptions, {"max_tokns": 5})


def test_the_docstrings_that_list_options_name_every_one() -> None:
    """An IDE shows these lists: a new option is named there too."""
    assert Captioner.__doc__ is not None and Captioner.caption.__doc__ is not None
    for field in dataclasses.fields(EngineOptions):
        assert field.name in Captioner.__doc__, field.name
    for field in dataclasses.fields(GenerationOptions):
        assert field.name in Captioner.caption.__doc__, field.name
