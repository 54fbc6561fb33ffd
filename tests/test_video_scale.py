"""Videos through a fleet of endpoints and through Ray: a clip goes to a server as a video part of its own bytes
(with the sampling asked under vLLM's names), llama-server is never sent one, a clip over the cap is refused
from its size, hostile answers to a video are handled as an image's; Ray captions a mix of an image and a
video on the tiny Qwen3-VL pair with the video's numbers, as a local run does."""

from __future__ import annotations

import base64
import json
import os
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from helpers import load_script
from PIL import Image
from test_fleet import QUICK, Action, completion

from caprl_local import Caption, CaptionFailure, Video
from caprl_local.endpoints import Endpoint, EndpointCaptioner
from caprl_local.prompts import DEFAULT_PROMPT, PRESETS, VIDEO_PROMPT

pytest.importorskip("av", reason="videos need PyAV (the video extra)")

from caprl_local.video import probe_video  # noqa: E402 - after the skip: PyAV's module

clips = load_script("make_test_videos")
#: What a stand-in saw of one request: (its media part's type, the data URL's media type, the bytes, the text).
Seen = tuple[str, str, bytes, str]


class VideoStub:
    """An OpenAI-compatible stand-in on 127.0.0.1 that takes image and video parts alike: GET lists one model
    (owned by `owned_by`, which names the server's kind); each POST gets ``answer(stub, seen, n)``."""

    def __init__(self, name: str, owned_by: str, answer: Callable[[VideoStub, Seen, int], Action] | None = None) -> None:
        self.name, self.owned_by = name, owned_by
        self.answer = answer or (lambda stub, seen, n: completion(f"{stub.name} saw {seen[0]}"))
        self.seen: list[Seen] = []
        self.bodies: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                self._send((200, {}, json.dumps({"object": "list", "data": [
                    {"id": f"{stub.name}-model", "object": "model", "owned_by": stub.owned_by}]}).encode()))

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                content = body["messages"][0]["content"]
                part = next(p for p in content if p["type"] in ("image_url", "video_url"))
                scheme, data = part[part["type"]]["url"].split(",", 1)
                text = "".join(p["text"] for p in content if p["type"] == "text")
                seen = (part["type"], scheme.removeprefix("data:").removesuffix(";base64"), base64.b64decode(data), text)
                with stub.lock:
                    stub.seen.append(seen)
                    stub.bodies.append(body)
                    n = len(stub.seen)
                self._send(stub.answer(stub, seen, n))

            def _send(self, action: Action) -> None:
                assert not isinstance(action, str)
                status, headers, data = action
                self.send_response(status)
                for key, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads, self.server.block_on_close = True, False
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/v1"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def stub(stubs: list[Any], name: str, owned_by: str, answer: Callable[[VideoStub, Seen, int], Action] | None = None
         ) -> VideoStub:
    stubs.append(VideoStub(name, owned_by, answer))
    return stubs[-1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clips")
    for make in (clips.mp4, clips.webm, clips.mov, clips.mkv, clips.avi, clips.garbage):
        make(out)
    Image.new("RGB", (80, 60), (20, 120, 200)).save(out / "photo.png")
    return out


def by_index(results: list[Caption | CaptionFailure]) -> list[Caption | CaptionFailure]:
    return sorted(results, key=lambda r: r.index or 0)


def test_a_video_goes_as_a_video_part_of_its_own_bytes(stubs: list[Any], folder: Path) -> None:
    vllm = stub(stubs, "vllm", "vllm")
    inputs = [folder / "photo.png", folder / "clip.mp4", folder / "clip.webm", folder / "clip.mkv", folder / "clip.avi",
              Video((folder / "clip.mov").read_bytes(), name="the mov")]
    with EndpointCaptioner([Endpoint(vllm.url, concurrency=2)], video_fps=1.5, video_max_frames=16) as cap:
        results = by_index(list(cap.caption_many(inputs)))
    assert all(isinstance(r, Caption) for r in results), results
    assert [r.image for r in results] == [*map(str, inputs[:5]), "the mov"]
    assert all(r.video is None for r in results if isinstance(r, Caption))  # vLLM does not say what it sampled
    seen = sorted(vllm.seen, key=lambda s: s[2])
    media = {kind: (mtype, data, text) for kind, mtype, data, text in seen if kind == "image_url"}
    assert media["image_url"][0] == "image/png" and media["image_url"][2] == DEFAULT_PROMPT
    videos = {data: (mtype, text) for kind, mtype, data, text in seen if kind == "video_url"}
    expected = {"clip.mp4": "video/mp4", "clip.webm": "video/webm", "clip.mkv": "video/x-matroska",
                "clip.avi": "video/x-msvideo", "clip.mov": "video/quicktime"}
    assert {data: mtype for data, (mtype, _) in videos.items()} == {
        (folder / name).read_bytes(): mtype for name, mtype in expected.items()}  # each clip's bytes, as they are
    assert all(text == VIDEO_PROMPT for _, text in videos.values())  # CapRL-Video's prompt, as the engine's
    for data in videos:
        assert probe_video(data).duration_s > 0  # decodable
    for body in vllm.bodies:  # vLLM's names for the sampling asked, on the videos only
        if body["messages"][0]["content"][0]["type"] == "video_url":
            assert body["media_io_kwargs"] == {"video": {"fps": 1.5, "num_frames": 16}}
            assert body["mm_processor_kwargs"] == {"fps": 1.5}
        else:
            assert "media_io_kwargs" not in body and "mm_processor_kwargs" not in body


def test_a_given_prompt_or_preset_is_the_videos_too_and_caprl_local_serve_gets_no_vllm_names(
        stubs: list[Any], folder: Path) -> None:
    serve = stub(stubs, "serve", "caprl-local")
    with EndpointCaptioner([Endpoint(serve.url)]) as cap:
        assert all(isinstance(r, Caption) for r in cap.caption_many([folder / "clip.mp4"], preset="video-dense"))
        assert all(isinstance(r, Caption) for r in cap.caption_many([folder / "clip.webm"], prompt="Say what moves."))
    assert [text for *_, text in serve.seen] == [PRESETS["video-dense"], "Say what moves."]
    assert all("media_io_kwargs" not in body and "mm_processor_kwargs" not in body for body in serve.bodies)


def test_llama_server_is_never_sent_a_video_and_refuses_it_in_one_line(stubs: list[Any], folder: Path) -> None:
    llama = stub(stubs, "llama", "llamacpp")
    with EndpointCaptioner([Endpoint(llama.url)], policy=QUICK) as cap:
        image, video = by_index(list(cap.caption_many([folder / "photo.png", folder / "clip.mp4"])))
    assert isinstance(image, Caption)
    assert isinstance(video, CaptionFailure) and video.kind == "CaprlError" and video.source == llama.url
    assert "\n" not in video.error and str(folder / "clip.mp4") in video.error and "llama-server" in video.error
    assert "caprl-local serve or vLLM" in video.error
    assert [kind for kind, *_ in llama.seen] == ["image_url"]  # the clip never left
    # In a fleet with a server that takes videos, the video goes there, and the images anywhere.
    vllm = stub(stubs, "vllm", "vllm")
    names = [folder / "clip.mp4", folder / "clip.webm", folder / "photo.png", folder / "photo.png"]
    with EndpointCaptioner([Endpoint(llama.url, concurrency=1), Endpoint(vllm.url, concurrency=1)], policy=QUICK) as cap:
        results = by_index(list(cap.caption_many(names)))
    assert all(isinstance(r, Caption) for r in results), results
    assert [r.source for r in results[:2]] == [vllm.url, vllm.url]
    assert [kind for kind, *_ in llama.seen].count("video_url") == 0


def test_a_video_waits_for_a_server_that_takes_it_only_as_long_as_an_outage(stubs: list[Any], folder: Path) -> None:
    """With llama-server up and the vLLM of the fleet down, the images are captioned and the video waits: the run
    stops after the outage bound (the video not captioned, for a rerun), never waiting for ever."""
    from test_fleet import free_port

    from caprl_local import EngineError

    llama = stub(stubs, "llama", "llamacpp")
    down = f"http://127.0.0.1:{free_port()}/v1"
    done: list[Caption | CaptionFailure] = []
    with EndpointCaptioner([Endpoint(llama.url), Endpoint(down, model="m", concurrency=1)], policy=QUICK,
                           outage_s=1) as cap:
        with pytest.raises(EngineError, match="no endpoint that takes the videos left has answered for 1 s") as raised:
            done.extend(cap.caption_many([folder / "photo.png", folder / "clip.mp4"]))
    assert "\n" not in str(raised.value) and "1 images were not captioned" in str(raised.value)
    assert [type(r) for r in done] == [Caption] and [kind for kind, *_ in llama.seen] == ["image_url"]


def test_a_clip_over_the_cap_is_refused_before_it_is_read(stubs: list[Any], folder: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    vllm = stub(stubs, "vllm", "vllm")
    big = tmp_path / "big.mp4"
    with open(big, "wb") as fh:  # sparse: 4 GB claimed, nothing written but its first bytes
        fh.write((folder / "clip.mp4").read_bytes())
        fh.truncate(4 << 30)
    fifo = tmp_path / "pipe.webm"
    os.mkfifo(fifo)  # nothing will ever write to it: opened as a file, it would wait for ever
    opened: list[str] = []
    real_open = os.open

    def watched(path: Any, *args: Any, **kwargs: Any) -> int:
        opened.append(os.fspath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", watched)
    cap_bytes = (folder / "clip.mov").stat().st_size
    assert (folder / "clip.mkv").stat().st_size > cap_bytes
    inputs = [big, Video((folder / "clip.mkv").read_bytes()), fifo, folder / "garbage.mp4", folder / "nowhere.mkv",
              folder / "clip.mov"]
    with EndpointCaptioner([Endpoint(vllm.url)]) as cap:
        over, *_ = list(cap.caption_many([big]))
    with EndpointCaptioner([Endpoint(vllm.url)], video_max_bytes=cap_bytes) as cap:
        results = by_index(list(cap.caption_many(inputs)))
    assert isinstance(over, CaptionFailure) and over.kind == "ImageError"
    assert f"{4 << 30:,} bytes of video is over the {64 << 20:,}" in over.error
    *failures, last = results
    assert all(isinstance(r, CaptionFailure) and r.kind == "ImageError" and "\n" not in r.error for r in failures)
    words = ["is over the", "<video: ", "not a regular file", "not a video file", "no such file"]
    assert [w in f.error for w, f in zip(words, failures, strict=True)] == [True] * 5, [f.error for f in failures]
    assert isinstance(last, Caption)  # the mov fits
    assert [kind for kind, *_ in vllm.seen] == ["video_url"]  # only the mov was sent
    assert str(big) not in opened and str(fifo) not in opened  # refused from their size and kind, never opened


def test_hostile_answers_to_a_video_are_an_endpoints_faults(stubs: list[Any], folder: Path) -> None:
    garbage = stub(stubs, "garbage", "vllm", lambda s, seen, n: (200, {}, b"<html>not json</html>"))
    broken = stub(stubs, "broken", "vllm", lambda s, seen, n: (500, {}, b'{"error": {"message": "decoder crashed"}}'))
    good = stub(stubs, "good", "caprl-local")
    with EndpointCaptioner([Endpoint(garbage.url, concurrency=1), Endpoint(broken.url, concurrency=1)],
                           policy=QUICK, attempts=2) as cap:
        (poisoned,) = list(cap.caption_many([folder / "clip.mp4"]))
    assert isinstance(poisoned, CaptionFailure) and poisoned.kind == "EngineError" and "\n" not in poisoned.error
    assert "failed on 2 endpoints" in poisoned.error and "HTML" in poisoned.error and "decoder crashed" in poisoned.error
    with EndpointCaptioner([Endpoint(garbage.url, concurrency=1), Endpoint(good.url, concurrency=1)], policy=QUICK,
                           attempts=3) as cap:
        results = list(cap.caption_many([folder / "clip.mp4", folder / "clip.webm"]))
    assert all(isinstance(r, Caption) and r.source == good.url for r in results), results


def test_ray_captions_an_image_and_a_video_with_the_videos_numbers(folder: Path,
                                                                   tmp_path_factory: pytest.TempPathFactory) -> None:
    ray = pytest.importorskip("ray")
    from caprl_local import Captioner
    from caprl_local.ray import RayCaptioner, init_local

    model, mmproj = load_script("make_tiny_model").write_tiny_pair(tmp_path_factory.mktemp("qwen3vl"),
                                                                   shape="tiny-qwen3vl")
    inputs = [str(folder / "photo.png"), str(folder / "clip.mp4")]
    with Captioner(model, mmproj, threads=1, parallel=1) as cap:
        local = list(cap.caption_many(inputs, max_tokens=6))
    if ray.is_initialized():
        ray.shutdown()
    init_local(num_cpus=1)
    try:
        with RayCaptioner(str(model), mmproj=str(mmproj), threads=1, parallel=1, batch_size=2) as remote:
            results = by_index(list(remote.caption_many(inputs, max_tokens=6)))
    finally:
        ray.shutdown()
    assert all(isinstance(r, Caption) for r in local + results), results
    image, video = results
    assert image.video is None and video.video is not None and video.video.frames > 0
    assert [(r.text, r.video, r.image_tokens, r.prompt_tokens) for r in results] == [
        (r.text, r.video, r.image_tokens, r.prompt_tokens) for r in local]
