"""The same batch on a fleet of OpenAI-compatible servers, and split by hand into shards."""

from __future__ import annotations

import base64
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import HANG_S, ROOT, run_cli, send_json, start_server
from PIL import Image
from test_fleet import Stub, completion, free_port, started

from caprl_local import Captioner
from caprl_local.budgets import ImageBudget
from caprl_local.endpoints import Endpoint, EndpointCaptioner
from caprl_local.inputs import BatchItem, shard_of
from caprl_local.loopguard import LoopGuard
from caprl_local.results import Caption, CaptionFailure
from caprl_local.wire import NO_SYSTEM_TEMPLATE, REPEAT_LAST_N

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

GOOD = ["photo.jpg", "alpha.png", "cmyk.jpg", "palette.png", "rotated.jpg", "deep16.png", "pixel.png", "animated.gif"]


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_fleet_with_one_server_killed_captions_every_image_once(tiny_model: tuple[Path, Path], images: Path,
                                                                   tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(48):
        shutil.copy(images / GOOD[i % len(GOOD)], folder / f"img{i:02d}{Path(GOOD[i % len(GOOD)]).suffix}")
    shutil.copy(images / "text.jpg", folder / "broken.jpg")  # not an image: the server answers 400
    model, mmproj = tiny_model
    common = ["--format", "jsonl", "-n", "300", "--no-loop-guard", "-t", "1"]
    local = tmp_path / "local.jsonl"
    assert run_cli("caption", str(folder), "-m", str(model), "--mmproj", str(mmproj), "--parallel", "1",
                   *common, "-o", str(local)).returncode == 1  # the broken image
    # One caption at a time per server, so every caption is decoded alone, as the local run's.
    (a, url_a), (b, url_b) = start_server(tiny_model, "--parallel", "1"), start_server(tiny_model, "--parallel", "1")
    out = tmp_path / "fleet.jsonl"
    with EndpointCaptioner([Endpoint(url_b)]) as probe:  # no concurrency given: the slots the server reports
        assert probe.parallel == 1 and probe.model == "CapRL-3B.f16"
    try:
        run = subprocess.Popen([sys.executable, "-m", "caprl_local", "caption", str(folder), "--endpoint", url_a,
                                "--endpoint", url_b, "--endpoint-concurrency", "2", *common, "-o", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + HANG_S
        while time.monotonic() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 3):
            time.sleep(0.01)
        a.send_signal(signal.SIGKILL)  # one server dies mid-run: its images go to the other
        _, err = run.communicate(timeout=HANG_S)
    finally:
        for proc in (a, b):
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout=HANG_S)
    assert run.returncode == 1, err  # the broken image
    fleet = records(out)
    assert sorted(r["path"] for r in fleet) == sorted(r["path"] for r in records(local))  # each exactly once
    expected = {r["path"]: r.get("caption") for r in records(local)}
    assert {r["path"]: r.get("caption") for r in fleet} == expected  # temperature 0: the local captions
    broken = next(r for r in fleet if r["path"].endswith("broken.jpg"))
    local_broken = next(r for r in records(local) if r["path"].endswith("broken.jpg"))
    assert broken["error"] == local_broken["error"] and "not a recognised image" in broken["error"]  # read here
    assert f"Warning: {url_a} is down" in err and "Traceback" not in err  # the kill came mid-run


class _Flaky(BaseHTTPRequestHandler):
    """A server that fails the first request with 500, then answers."""

    posts = 0

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        self._send(200, {"object": "list", "data": [{"id": "flaky-model", "object": "model"}]})

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).posts += 1
        if type(self).posts == 1:
            self._send(500, {"error": {"message": "a moment of trouble"}})
        else:
            self._send(200, {"choices": [{"message": {"role": "assistant", "content": "A red square."},
                                          "finish_reason": "stop"}],
                             "usage": {"prompt_tokens": 10, "completion_tokens": 4}})

    def _send(self, status: int, body: dict[str, Any]) -> None:
        send_json(self, status, body)

    def log_message(self, *args: Any) -> None:
        pass


def test_a_server_error_is_retried(images: Path) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = run_cli("caption", str(images / "photo.jpg"), "--endpoint", f"http://127.0.0.1:{server.server_port}/v1",
                         "--format", "jsonl")
    finally:
        server.shutdown()
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["caption"] == "A red square." and record["model"] == "flaky-model" and _Flaky.posts == 2


def test_shards_partition_a_list_exactly_whatever_its_order() -> None:
    items = [BatchItem(f"images/{i:05d}.jpg") for i in range(999)]
    shards = [shard_of(items, i, 3) for i in (1, 2, 3)]
    paths = [{item.path for item in shard} for shard in shards]
    assert sum(len(p) for p in paths) == len(items) and set().union(*paths) == {i.path for i in items}
    assert all(250 < len(p) < 420 for p in paths)  # about a third each
    shuffled = random.Random(1).sample(items, len(items))
    assert [{i.path for i in shard_of(shuffled, k, 3)} for k in (1, 2, 3)] == paths


# -- what each server is sent, and what is taken from its answers (stand-ins that record and answer) --


def _sent(stub: Stub, image: Path, **options: Any) -> tuple[dict[str, Any], Caption | CaptionFailure]:
    with EndpointCaptioner([Endpoint(stub.url, concurrency=1)], image_max_tokens=64) as fleet:
        (result,) = fleet.caption_many([image], max_tokens=16, **options)
    return stub.posts[-1][0], result


@pytest.mark.parametrize("name", ["rotated.jpg", "alpha.png", "cmyk.jpg", "panorama.png", "deep16.png"])
def test_each_image_is_sent_as_the_engine_sees_it(stubs: list[Stub], images: Path, name: str) -> None:
    stub = started(stubs, "llama", owned_by="llamacpp")
    body, _ = _sent(stub, images / name)
    (image_part,) = [p for p in body["messages"][0]["content"] if p["type"] == "image_url"]
    url = image_part["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")  # its real media type (llama-server refuses data:image;base64)
    sent = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert sent.format == "PNG" and sent.mode == "RGB"
    seen = ImageBudget.for_tokens(align=28, min_tokens=None, max_tokens=64).prepare(images / name)
    assert sent.size == seen.size  # what the engine hands llama.cpp: shrunk to the grid within the cap where larger
    assert np.array_equal(np.asarray(sent), np.asarray(seen))  # and its pixels: upright, on white
    if name == "rotated.jpg":
        assert sent.height > sent.width  # EXIF orientation applied


def test_every_option_goes_under_each_servers_name(stubs: list[Stub], images: Path) -> None:
    from caprl_local.engine import sampling, scheduler

    assert REPEAT_LAST_N == sampling.REPEAT_LAST_N  # the engine's penalty window
    assert scheduler.LoopGuard is LoopGuard  # the engine guards by the very rule the fleet client runs
    llama = started(stubs, "llama", owned_by="llamacpp")
    body, _ = _sent(llama, images / "photo.jpg", stop=("END",), seed=5)
    assert body["repeat_penalty"] == body["repetition_penalty"] == 1.05 and body["repeat_last_n"] == 256
    assert body["temperature"] == 0 and body["top_k"] == 1 and body["samplers"] == ["penalties", "top_k"]
    assert body["max_tokens"] == 16 and body["stop"] == ["END"] and body["seed"] == 5 and body["stream"] is False
    assert body["logprobs"] is True and body["top_logprobs"] == 1  # its tokens, for the loop guard here
    assert [p["type"] for p in body["messages"][0]["content"]] == ["image_url", "text"]  # the image first, as here
    assert len(body["messages"]) == 1  # no system turn
    body, _ = _sent(llama, images / "photo.jpg", temperature=0.7, top_p=0.8, prompt="Before <image> after")
    assert "top_k" not in body and body["samplers"] == ["penalties", "top_p", "temperature"] and body["top_p"] == 0.8
    assert [p.get("text") for p in body["messages"][0]["content"]] == ["Before ", None, " after"]
    ours = started(stubs, "ours", owned_by="caprl-local")  # caprl-local serve guards loops itself and refuses logprobs
    body, _ = _sent(ours, images / "photo.jpg")
    assert "logprobs" not in body and "samplers" not in body and body["top_k"] == 1
    body, _ = _sent(ours, images / "photo.jpg", loop_guard=False, ignore_eos=True)
    assert body["loop_guard"] is False and body["ignore_eos"] is True


LOOPING = "A cat sits on a mat. " + "the cat " * 60


def test_a_looping_caption_is_cut_here_when_the_server_does_not_guard_it(stubs: list[Stub], images: Path) -> None:
    plain = started(stubs, "plain", lambda stub, colour, n: completion(LOOPING))
    _, result = _sent(plain, images / "photo.jpg")
    assert isinstance(result, Caption) and result.text == "A cat sits on a mat. the cat"
    assert result.finish_reason == "repetition"
    _, result = _sent(plain, images / "photo.jpg", loop_guard=False)
    assert isinstance(result, Caption) and result.text == LOOPING.strip() and result.finish_reason == "stop"
    ours = started(stubs, "ours", lambda stub, colour, n: completion(LOOPING), owned_by="caprl-local")
    _, result = _sent(ours, images / "photo.jpg")  # it ran the guard itself: its text stands
    assert isinstance(result, Caption) and result.text == LOOPING.strip()
    said = started(stubs, "said", lambda stub, colour, n: completion("A cat.", choices=[{
        "index": 0, "message": {"role": "assistant", "content": "A cat."}, "finish_reason": "stop",
        "native_finish_reason": "repetition"}]), owned_by="caprl-local")
    _, result = _sent(said, images / "photo.jpg")  # a server's own reason, beside OpenAI's
    assert isinstance(result, Caption) and result.finish_reason == "repetition"
    # a server that names its tokens: the cut lands where the engine's would, token by token
    tokens = [{"id": 7, "token": "Hello", "bytes": list(b"Hello")}] + [
        {"id": 8 + i % 2, "token": t, "bytes": list(t.encode())} for i, t in enumerate([" a", " b"] * 40)]
    named = started(stubs, "named", lambda stub, colour, n: completion(
        "Hello" + " a b" * 40, choices=[{"index": 0, "message": {"role": "assistant", "content": "Hello" + " a b" * 40},
                                         "finish_reason": "length", "logprobs": {"content": tokens}}]), owned_by="llamacpp")
    _, result = _sent(named, images / "photo.jpg")
    assert isinstance(result, Caption) and result.text == "Hello a b" and result.finish_reason == "repetition"
    assert result.generated_tokens == 65  # as many as the engine would have made before it stopped


def test_each_result_names_its_server_and_what_it_reported(stubs: list[Stub], images: Path) -> None:
    timings = {"prompt_n": 30, "prompt_ms": 120.0, "prompt_per_second": 250.0, "predicted_n": 5, "predicted_ms": 800.0,
               "predicted_per_second": 6.25}
    llama = started(stubs, "llama", lambda stub, colour, n: completion("A photo.", timings=timings), owned_by="llamacpp")
    _, result = _sent(llama, images / "photo.jpg")
    assert isinstance(result, Caption) and result.source == llama.url
    assert (result.prompt_tokens, result.generated_tokens, result.image_tokens) == (30, 5, 0)
    t = result.timings
    assert (t.prompt_eval_s, t.generation_s, t.prompt_tokens_per_s, t.generation_tokens_per_s) == (0.12, 0.8, 250.0, 6.25)
    assert t.image_load_s > 0 and t.total_s >= t.image_load_s
    other = started(stubs, "other", lambda stub, colour, n: completion("A photo.", timings="nonsense"))
    _, result = _sent(other, images / "photo.jpg")
    assert isinstance(result, Caption) and result.source == other.url and result.timings.generation_s == 0.0
    refusing = started(stubs, "refusing", lambda stub, colour, n: (400, {}, b'{"error": {"message": "bad image"}}'))
    _, failure = _sent(refusing, images / "photo.jpg")
    assert isinstance(failure, CaptionFailure) and failure.source == refusing.url and "HTTP 400: bad image" in failure.error


# -- the real servers: llama-server, and llama-server beside caprl-local serve --

LLAMA_SERVER = Path(os.environ.get("CAPRL_LLAMA_SERVER", ROOT / "build/llama.cpp/build/bin/llama-server"))
SAME = ["photo.jpg", "rotated.jpg", "alpha.png", "cmyk.jpg", "palette.png", "deep16.png"]
#: Greedy at the default repeat penalty (1.05 over 256 tokens): both count the prompt's text tokens as repeats.
EQUAL = ["-n", "120"]


@pytest.fixture(scope="module")
def llama_server(tiny_model: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """llama-server on the tiny model, started as docs/scale-out.md says (one slot, our chat template)."""
    if not os.access(LLAMA_SERVER, os.X_OK):
        pytest.skip(f"no llama-server at {LLAMA_SERVER}: build one, or name it in CAPRL_LLAMA_SERVER")
    template = tmp_path_factory.mktemp("template") / "caprl-chatml.jinja"
    template.write_text(NO_SYSTEM_TEMPLATE)
    port = free_port()
    proc = subprocess.Popen([str(LLAMA_SERVER), "-m", str(tiny_model[0]), "--mmproj", str(tiny_model[1]), "-t", "1",
                             "-np", "1", "-c", "4096", "--chat-template-file", str(template), "--host", "127.0.0.1",
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + HANG_S
    while True:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "llama-server exited"
        assert time.monotonic() < deadline, "llama-server did not start"
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as answer:
                if answer.status == 200:
                    break
        except OSError:
            time.sleep(0.1)
    yield url + "/v1"
    proc.terminate()
    proc.wait(timeout=HANG_S)


def _local(tiny_model: tuple[Path, Path], folder: Path, out: Path) -> dict[str, dict[str, Any]]:
    model, mmproj = tiny_model
    result = run_cli("caption", str(folder), "-m", str(model), "--mmproj", str(mmproj), "--parallel", "1", "-t", "1",
                     *EQUAL, "--format", "jsonl", "-o", str(out))
    assert result.returncode == 0, result.stderr
    return {r["path"]: r for r in records(out)}


def _folder(images: Path, tmp_path: Path, names: list[str]) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in names:
        shutil.copy(images / name, folder / name)
    return folder


def _same(fleet: dict[str, dict[str, Any]], local: dict[str, dict[str, Any]]) -> None:
    keys = ("caption", "finish_reason", "generated_tokens")
    assert {p: [r[k] for k in keys] for p, r in fleet.items()} == {p: [r[k] for k in keys] for p, r in local.items()}


def test_llama_server_captions_equal_a_local_run(llama_server: str, tiny_model: tuple[Path, Path], images: Path,
                                                 tmp_path: Path) -> None:
    folder = _folder(images, tmp_path, SAME)
    local = _local(tiny_model, folder, tmp_path / "local.jsonl")
    assert any(r["finish_reason"] == "repetition" for r in local.values())  # the loop guard, here and there alike
    result = run_cli("caption", str(folder), "--endpoint", llama_server, *EQUAL, "--format", "jsonl",
                     "-o", str(tmp_path / "fleet.jsonl"))
    assert result.returncode == 0, result.stderr
    _same({r["path"]: r for r in records(tmp_path / "fleet.jsonl")}, local)


def test_a_mixed_fleet_equals_a_local_run(llama_server: str, tiny_model: tuple[Path, Path], images: Path,
                                          tmp_path: Path) -> None:
    folder = _folder(images, tmp_path, SAME)
    local = _local(tiny_model, folder, tmp_path / "local.jsonl")
    ours, ours_url = start_server(tiny_model, "--parallel", "1")
    try:
        paths = sorted(str(p) for p in folder.iterdir())
        with EndpointCaptioner([Endpoint(llama_server), Endpoint(ours_url)]) as fleet:
            results = list(fleet.caption_many(paths, max_tokens=120))
    finally:
        ours.send_signal(signal.SIGINT)
        ours.wait(timeout=HANG_S)
    assert sorted(r.index for r in results if r.index is not None) == list(range(len(paths)))
    assert all(isinstance(r, Caption) for r in results)
    assert {r.source for r in results} == {llama_server, ours_url}  # both took images, and each result says which
    got = {paths[r.index]: r for r in results if isinstance(r, Caption) and r.index is not None}
    assert {p: (r.text, r.generated_tokens) for p, r in got.items()} == {
        p: (r["caption"], r["generated_tokens"]) for p, r in local.items()}
    # caprl-local serve answers a caption its loop guard ended with OpenAI's "stop"
    assert all(r.finish_reason == local[p]["finish_reason"] for p, r in got.items() if r.source == llama_server)
    assert all(r.timings.generation_s > 0 for r in got.values() if r.source == llama_server)  # its own timings



@pytest.mark.parametrize("penalty", [1.3, 2.0])
def test_llama_server_counts_the_prompt_as_repeats_as_the_engine_does(llama_server: str, tiny_model: tuple[Path, Path],
                                                                      images: Path, penalty: float) -> None:
    """A strong penalty, prompts within and beyond its 256-token window: llama-server's captions are the engine's."""
    prompts = ["Describe the building.", "Describe the legend. " + "1 " * 100, "Describe the of. " + ". " * 300]
    paths = [str(images / name) for name in ("photo.jpg", "pixel.png", "palette.png", "alpha.png")]
    with EndpointCaptioner([Endpoint(llama_server)]) as fleet, Captioner(*tiny_model, threads=1, parallel=1) as local:
        for prompt in prompts:
            served = {paths[r.index]: (r.text, r.generated_tokens) for r in fleet.caption_many(
                paths, prompt=prompt, max_tokens=80, repeat_penalty=penalty) if isinstance(r, Caption) and r.index is not None}
            here = {p: local.caption(p, prompt=prompt, max_tokens=80, repeat_penalty=penalty) for p in paths}
            assert served == {p: (r.text, r.generated_tokens) for p, r in here.items()}, prompt

def test_the_documented_template_is_the_one_tested() -> None:
    assert NO_SYSTEM_TEMPLATE in (ROOT / "docs" / "scale-out.md").read_text()
