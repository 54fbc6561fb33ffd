"""Videos through caprl-local serve (vLLM's video_url parts): a real server process on the tiny Qwen3-VL pair,
called with the official openai SDK and with raw HTTP; clips from scripts/make_test_videos.py, every origin a
local server on 127.0.0.1. Each hostile input gets a 4xx naming its part, and the server answers the next
request. No test measures time."""

from __future__ import annotations

import base64
import http.client
import http.server
import json
import os
import shutil
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from helpers import HANG_S, load_script, start_server

pytest.importorskip("av")
openai = pytest.importorskip("openai")
pytest.importorskip("starlette")

from caprl_local.serve.chat import VideoUrl  # noqa: E402 - after the skips: the serve extra
from caprl_local.serve.protocol import ApiError, ImagePolicy  # noqa: E402
from caprl_local.serve.videos import read_clip, video_refusal  # noqa: E402

clips = load_script("make_test_videos")
tiny = load_script("make_tiny_model")
WHERE = "messages[0].content[0]"


def data_uri(data: bytes, media: str = "video/mp4") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def video_part(url: str) -> dict[str, Any]:
    return {"type": "video_url", "video_url": {"url": url}}


def body(*parts: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"model": "caprl", "max_tokens": 6, "temperature": 0, "messages": [{"role": "user", "content": list(parts)}],
            **extra}


def post(url: str, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """POST a chat request as raw JSON on its own connection: (status, JSON body)."""
    host, port = url.removeprefix("http://").split("/")[0].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=HANG_S)
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps(payload).encode(),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


class Origin(http.server.ThreadingHTTPServer):
    """A local web server answering GET /<name> with the file of that name in `folder`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        super().__init__(("127.0.0.1", 0), _Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = self.server.folder / self.path.lstrip("/")  # type: ignore[attr-defined]
        data = path.read_bytes() if path.is_file() else b""
        self.send_response(200 if data else 404)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The clips, good and bad, in the folder the server may read (a FIFO and a link out of it too)."""
    here = tmp_path_factory.mktemp("videos")
    for make in (clips.mp4, clips.webm, clips.mkv, clips.truncated_mp4, clips.garbage, clips.huge, clips.bomb,
                 clips.endless_claim, clips.audio_only, clips.no_frames, clips.empty, clips.text):
        make(here)
    os.mkfifo(here / "endless.mp4")
    outside = tmp_path_factory.mktemp("outside")
    shutil.copy(here / "clip.mp4", outside / "clip.mp4")
    os.symlink(outside / "clip.mp4", here / "link.mp4")
    (here / "folder.mp4").mkdir()
    return here


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(text model, mmproj) of a tiny random-weight CapRL-Qwen3VL-2B."""
    return tiny.write_tiny_pair(tmp_path_factory.mktemp("qwen3vl"), shape="tiny-qwen3vl")


@pytest.fixture(scope="module")
def served(qwen3: tuple[Path, Path], folder: Path) -> Iterator[tuple[str, int]]:
    """A server on the tiny Qwen3-VL pair that reads files under `folder` and may fetch from 127.0.0.1:
    (base URL, process id)."""
    proc, url = start_server(qwen3, "--allowed-local-dir", str(folder), "--allow-remote-images",
                             "--allow-image-network", "127.0.0.1/32", "--max-body-mb", "2")
    yield url, proc.pid
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=HANG_S) == 0
    assert proc.stderr is not None
    err = proc.stderr.read()
    assert "Traceback" not in err and "unexpected" not in err, err


def caption(url: str, video: str, **extra: Any) -> tuple[str, int]:
    """(the caption, its image tokens) of one video through the openai SDK."""
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=HANG_S)
    answer = client.chat.completions.create(model="caprl", max_tokens=6, temperature=0,
                                            messages=[{"role": "user", "content": [video_part(video), *extra.get("also", [])]}])
    counts = answer.usage.model_dump() if answer.usage is not None else {}
    return str(answer.choices[0].message.content), int((counts.get("prompt_tokens_details") or {}).get("image_tokens") or 0)


def test_a_data_uri_a_file_and_a_url_video_are_captioned_alike(served: tuple[str, int], folder: Path) -> None:
    url, _ = served
    data = (folder / "clip.mp4").read_bytes()
    text, tokens = caption(url, data_uri(data))
    assert text and tokens > 0
    with Origin(folder) as origin:
        for same in (f"file://{folder}/clip.mp4", "clip.mp4", data_uri(data, "application/octet-stream"),
                     data_uri(data, "video"), origin.url("clip.mp4")):
            assert caption(url, same) == (text, tokens), same
    webm, webm_tokens = caption(url, f"file://{folder}/clip.webm")  # another container, in a file
    assert webm and webm_tokens > 0
    mkv = caption(url, data_uri((folder / "clip.mkv").read_bytes(), "video/x-matroska"))
    assert mkv[0] and mkv[1] > 0


def test_a_served_video_is_captioned_as_the_library_captions_it(served: tuple[str, int], qwen3: tuple[Path, Path],
                                                                 folder: Path) -> None:
    """The same frames, the same prompt (CapRL-Video's, for a video without text) and the same tokens."""
    from caprl_local import Captioner

    url, _ = served
    with Captioner(*qwen3, threads=1) as cap:
        local = cap.caption(folder / "clip.mp4", max_tokens=6, temperature=0)
    assert caption(url, "clip.mp4") == (local.text, local.image_tokens)


def test_a_video_with_text_and_a_streamed_one(served: tuple[str, int], folder: Path) -> None:
    url, _ = served
    video = data_uri((folder / "clip.mp4").read_bytes())
    asked, tokens = caption(url, video, also=[{"type": "text", "text": "What happens in it?"}])
    assert asked and tokens > 0
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=HANG_S)
    stream = client.chat.completions.create(model="caprl", max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": [video_part(video)]}])
    pieces, usage = [], None
    for chunk in stream:
        pieces += [choice.delta.content or "" for choice in chunk.choices]
        usage = chunk.usage or usage
    assert usage is not None and "".join(pieces) == caption(url, video)[0]
    assert (usage.model_dump().get("prompt_tokens_details") or {}).get("image_tokens") == tokens


def hostile(folder: Path) -> list[tuple[str, dict[str, Any], int, str, str]]:
    """(what, request body, status, error code, words of its message)."""
    good = data_uri((folder / "clip.mp4").read_bytes())
    text = {"type": "text", "text": "hi"}
    return [
        ("garbage bytes", body(video_part(data_uri((folder / "garbage.mp4").read_bytes()))), 400, "invalid_video",
         "not a video"),
        ("a truncated MP4", body(video_part(data_uri((folder / "cut.mp4").read_bytes()))), 400, "invalid_video", ""),
        ("half of a clip's bytes", body(video_part(data_uri((folder / "clip.mp4").read_bytes()[:300]))), 400,
         "invalid_video", ""),
        ("invalid base64", body(video_part("data:video/mp4;base64,AAAA@@@@")), 400, "invalid_video", "base64"),
        ("an empty data URI", body(video_part("data:video/mp4;base64,")), 400, "invalid_video", "not a video"),
        ("no base64", body(video_part("data:video/mp4,abc")), 400, "invalid_video_url", "base64"),
        ("a huge claimed width", body(video_part(data_uri((folder / "huge.mkv").read_bytes()))), 400, "invalid_video",
         "claims 65535x"),
        ("64-megapixel frames", body(video_part(f"file://{folder}/bomb.mkv")), 400, "invalid_video", "claims 8000x8000"),
        ("ten years claimed", body(video_part(data_uri((folder / "decade.mkv").read_bytes()))), 400, "invalid_video",
         "claims to last"),
        ("sound only", body(video_part("audio.mp4")), 400, "invalid_video", "only audio"),
        ("no frames", body(video_part("noframes.mkv")), 400, "invalid_video", ""),
        ("an empty file", body(video_part("empty.webm")), 400, "invalid_video", "not a video"),
        ("a text file", body(video_part("notes.mov")), 400, "invalid_video", "not a video"),
        ("a FIFO", body(video_part(f"file://{folder}/endless.mp4")), 400, "invalid_video_url", "FIFO"),
        ("a folder", body(video_part("folder.mp4")), 400, "invalid_video_url", "directory"),
        ("a link out of the folder", body(video_part("link.mp4")), 403, "path_not_allowed", "not under the folder"),
        ("a path outside", body(video_part("/etc/passwd")), 403, "path_not_allowed", "not under the folder"),
        ("a missing file", body(video_part("missing.mp4")), 400, "invalid_video_url", "no such file"),
        ("another host's file", body(video_part("file://elsewhere/clip.mp4")), 400, "invalid_video_url", "elsewhere"),
        ("an image's type", body(video_part(data_uri(b"\x89PNG\r\n\x1a\n" + b"\0" * 32, "image/png"))), 400,
         "invalid_video_url", "not image/png"),
        ("a text type", body(video_part(data_uri(b"hello", "text/plain"))), 400, "invalid_video_url", "not text/plain"),
        ("untyped image bytes", body(video_part(data_uri(b"\x89PNG\r\n\x1a\n" + b"\0" * 32, "application/octet-stream"))),
         400, "invalid_video", "not a video"),
        ("an ftp URL", body(video_part("ftp://127.0.0.1/clip.mp4")), 400, "invalid_video_url", "not read here"),
        ("an unreachable origin", body(video_part("http://127.0.0.1:9/clip.mp4")), 400, "video_fetch_failed",
         "cannot fetch the video"),
        ("no url", body({"type": "video_url", "video_url": {}}), 400, "invalid_video_url", "needs a url"),
        ("two videos", body(video_part(good), video_part(good)), 400, "too_many_videos", "at most 1"),
        ("a video as an image_url", body({"type": "image_url", "image_url": {"url": good}}), 400, "invalid_image_url",
         "send it as a video_url part"),
        ("an input_video part", body({"type": "input_video", "video_url": {"url": good}}), 400,
         "invalid_content", "unsupported part type 'input_video'"),
    ] + [
        (f"a video in a {role} message", {"model": "caprl", "messages": [
            {"role": role, "content": [video_part(good)]}, {"role": "user", "content": [text]}]}, 400, "invalid_content",
         f"{role} message cannot hold a video")
        for role in ("system", "assistant", "developer")
    ]


def test_hostile_videos_get_a_4xx_naming_their_part_and_the_server_goes_on(served: tuple[str, int], folder: Path) -> None:
    url, pid = served
    expected = caption(url, "clip.mp4")
    for what, payload, status, code, words in hostile(folder):
        got, answer = post(url, payload)
        error = answer.get("error") or {}
        assert (got, error.get("code")) == (status, code), (what, got, answer)
        message = error["message"]
        assert words in message and "\n" not in message and "Traceback" not in message, (what, message)
        if code not in ("too_many_videos", "invalid_image_url"):
            assert message.startswith(f"{WHERE}: "), (what, message)
    assert caption(url, "clip.mp4") == expected  # and it goes on
    held = [name for name in os.listdir(f"/proc/{pid}/fd") if _points_into(f"/proc/{pid}/fd/{name}", folder)]
    assert held == [], "a video file was left open"


def _points_into(link: str, folder: Path) -> bool:
    try:
        return os.readlink(link).startswith(str(folder))
    except OSError:  # closed since listed
        return False


def test_a_video_body_over_the_cap_is_refused_before_it_is_read(served: tuple[str, int]) -> None:
    url, _ = served
    payload = json.dumps(body(video_part(data_uri(b"\0" * (3 * 1024 * 1024))))).encode()  # over --max-body-mb 2
    host, port = url.removeprefix("http://").split("/")[0].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=HANG_S) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload[:4096])
        response = http.client.HTTPResponse(sock)
        response.begin()
        status, answer = response.status, json.loads(response.read())
    assert (status, answer["error"]["code"]) == (413, "request_too_large")
    assert caption(url, "clip.mp4")[1] > 0


# -- the reading alone (in process) ----------------------------------------------------------------


def test_the_video_byte_cap_holds_for_every_source(folder: Path) -> None:
    policy = ImagePolicy(local_dir=folder, max_video_bytes=1000)  # the clips are larger
    data = (folder / "clip.mp4").read_bytes()
    assert len(data) > 1000
    for source in (data_uri(data), "clip.mp4", f"file://{folder}/clip.webm"):
        with pytest.raises(ApiError) as info:
            read_clip(VideoUrl(source, WHERE), policy)
        assert (info.value.status, info.value.code) == (413, "video_too_large"), source
        assert info.value.message.startswith(f"{WHERE}: ") and "1,000 bytes" in info.value.message
    read_clip(VideoUrl("clip.mp4", WHERE), ImagePolicy(local_dir=folder)).close()  # under the default cap
    assert ImagePolicy().max_video_bytes == 256 * 1024 * 1024 > ImagePolicy().max_bytes


def test_a_family_without_video_is_told_so_before_anything_is_read() -> None:
    why = video_refusal(SimpleNamespace(architecture="llama"))  # type: ignore[arg-type]
    assert why is not None and "cannot take video" in why
    assert video_refusal(SimpleNamespace(architecture="qwen3vl")) is None  # type: ignore[arg-type]
