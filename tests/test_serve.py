"""caprl-local serve: a real server process on 127.0.0.1, called with the official openai client
and with raw HTTP for the error cases."""

from __future__ import annotations

import base64
import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from helpers import HANG_S, run_cli, start_server

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

KEY = "test-key"
GOOD = ["photo.jpg", "alpha.png", "cmyk.jpg", "palette.png", "rotated.jpg", "deep16.png", "pixel.png", "animated.gif"]


@pytest.fixture(scope="module")
def server(tiny_model: tuple[Path, Path]):
    proc, url = start_server(tiny_model, "--parallel", "4", "--queue", "4", "--api-key", KEY, "--max-body-mb", "1")
    yield url
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=HANG_S) == 0  # Ctrl-C: a clean stop
    assert proc.stderr is not None and "Traceback" not in proc.stderr.read()


@pytest.fixture(scope="module")
def client(server: str) -> Any:
    return openai.OpenAI(base_url=server, api_key=KEY, max_retries=0, timeout=HANG_S)


def data_uri(path: Path, kind: str = "image") -> str:
    return f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode()}"


def user(image: str, text: str | None = None) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": image}}]
    return [{"role": "user", "content": parts + ([{"type": "text", "text": text}] if text else [])}]


def cli_caption(tiny_model: tuple[Path, Path], image: Path, *args: str) -> str:
    model, mmproj = tiny_model
    result = run_cli("caption", str(image), "-m", str(model), "--mmproj", str(mmproj), "-t", "1", *args)
    assert result.returncode == 0, result.stderr
    return result.stdout.rstrip("\n")


def test_a_served_caption_is_the_cli_caption(client: Any, images: Path, tiny_model: tuple[Path, Path]) -> None:
    """CapRL's own client code: a data:image;base64 URI, its prompt, temperature 0."""
    answer = client.chat.completions.create(model="CapRL-3B", messages=user(data_uri(images / "photo.jpg"), "Describe it."),
                                            temperature=0, max_tokens=12)
    assert answer.choices[0].message.content == cli_caption(tiny_model, images / "photo.jpg", "-n", "12",
                                                            "-p", "Describe it.")
    assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 12
    bare = client.chat.completions.create(model="caprl", messages=user(data_uri(images / "alpha.png", "image/png")),
                                          max_tokens=10)  # no text: CapRL's own prompt
    assert bare.choices[0].message.content == cli_caption(tiny_model, images / "alpha.png", "-n", "10")


@pytest.mark.parametrize("name", ["repetition_penalty", "repeat_penalty"])
def test_a_repeat_penalty_is_honoured_under_both_names(client: Any, images: Path, tiny_model: tuple[Path, Path],
                                                      name: str) -> None:
    """vLLM's name (the CapRL card sends repetition_penalty: 1.0) and llama-server's."""
    for penalty in ("1.0", "1.3"):
        answer = client.chat.completions.create(model="caprl", messages=user(data_uri(images / "cmyk.jpg")),
                                                max_tokens=24, extra_body={name: float(penalty)})
        assert answer.choices[0].message.content == cli_caption(tiny_model, images / "cmyk.jpg", "-n", "24",
                                                                "--repeat-penalty", penalty)


def test_streaming_gives_the_same_text_and_the_usage(client: Any, images: Path) -> None:
    whole = client.chat.completions.create(model="caprl", messages=user(data_uri(images / "cmyk.jpg")), max_tokens=10)
    stream = client.chat.completions.create(model="caprl", messages=user(data_uri(images / "cmyk.jpg")), max_tokens=10,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_eight_concurrent_clients_each_get_their_caption(client: Any, images: Path) -> None:
    def ask(name: str) -> str:
        return client.chat.completions.create(model="caprl", messages=user(data_uri(images / name)),
                                              max_tokens=10).choices[0].message.content

    alone = {name: ask(name) for name in GOOD}
    with ThreadPoolExecutor(8) as pool:
        together = dict(zip(GOOD, pool.map(ask, GOOD), strict=True))
    assert together == alone


def raw(server: str, path: str, body: bytes | dict[str, Any] | None = None, *, key: str | None = KEY,
        headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any], dict[str, str]]:
    """One HTTP request: (status, JSON body, headers)."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(server.removesuffix("/v1") + path, data=data,
                                     headers={"Content-Type": "application/json", **(headers or {}),
                                              **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(request, timeout=HANG_S) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


def oversized(server: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    """A body announced at 2 MB: refused from its headers, before it is sent (a client sending it
    whole would meet a closed connection, as from any server that refuses early)."""
    host, port = server.removeprefix("http://").split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=HANG_S) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {KEY}\r\nContent-Length: {2 * 1024 * 1024}\r\n\r\n".encode())
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, json.loads(response.read()), dict(response.getheaders())


def chat_body(url: str, **extra: Any) -> dict[str, Any]:
    return {"model": "caprl", "messages": user(url), "max_tokens": 4, **extra}


def test_every_bad_request_gets_its_status_and_a_json_error(server: str, images: Path) -> None:
    good = chat_body(data_uri(images / "photo.jpg"))
    cases = [
        (raw(server, "/v1/chat/completions", good, key=None), 401, "invalid_api_key"),
        (raw(server, "/v1/chat/completions", good, key="wrong"), 401, "invalid_api_key"),
        (raw(server, "/v1/models", key=None), 401, "invalid_api_key"),
        (oversized(server), 413, "request_too_large"),
        (raw(server, "/v1/chat/completions", chat_body("http://127.0.0.1:9/cat.jpg")), 400, "remote_images_disabled"),
        (raw(server, "/v1/chat/completions", chat_body("data:image/png;base64,@@not base64@@")), 400, "invalid_image"),
        (raw(server, "/v1/chat/completions", chat_body("data:image/png;base64," + base64.b64encode(b"hello").decode())),
         400, "invalid_image"),
        (raw(server, "/v1/chat/completions", chat_body("/etc/passwd")), 400, "invalid_image_url"),
        (raw(server, "/v1/chat/completions", {"messages": [{"role": "tool", "content": "hi"}]}), 400, "invalid_role"),
        (raw(server, "/v1/chat/completions", {**good, "n": 2}), 400, "unsupported_n"),
        (raw(server, "/v1/chat/completions", {**good, "max_tokens": 0}), 400, "invalid_parameter"),
        (raw(server, "/v1/chat/completions", b"{not json"), 400, "invalid_json"),
        (raw(server, "/v1/chat/completions", {**good, "model": "gpt-4o"}), 404, "model_not_found"),
        (raw(server, "/v1/nothing-here"), 404, "not_found"),
    ]
    for (status, body, _), expected, code in cases:
        assert (status, body["error"]["code"]) == (expected, code), body
        assert body["error"]["message"] and "Traceback" not in body["error"]["message"]
        assert raw(server, "/v1/chat/completions", good)[0] == 200  # and the server goes on
    assert raw(server, "/v1/models")[1]["data"][0]["object"] == "model"
    assert raw(server, "/health", key=None)[1]["status"] == "ok"


def stream_and_hang_up(server: str, image: Path, max_tokens: int) -> None:
    """Start a streamed caption, read its first event, and drop the connection."""
    host, port = server.removeprefix("http://").split("/")[0].split(":")
    body = json.dumps(chat_body(data_uri(image), max_tokens=max_tokens, stream=True, ignore_eos=True)).encode()
    with socket.create_connection((host, int(port)), timeout=HANG_S) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        received = b""
        while b"data: " not in received:
            received += sock.recv(4096)


def test_a_client_gone_mid_stream_frees_its_slot(server: str, images: Path) -> None:
    """The dead clients' 3,000 tokens each are never generated: their slots go to the next requests."""
    before = raw(server, "/health", key=None)[1]["tokens"]
    for _ in range(4):  # as many as decode at once
        stream_and_hang_up(server, images / "photo.jpg", 3000)
    status, body, _ = raw(server, "/v1/chat/completions", chat_body(data_uri(images / "alpha.png")))
    assert status == 200 and body["usage"]["completion_tokens"] == 4
    health = raw(server, "/health", key=None)[1]
    assert health["tokens"] - before < 3000  # not even one dead client's caption was finished


def hold_a_place(server: str) -> socket.socket:
    """A request that has sent its headers and part of its body: it holds a place while it reads."""
    host, port = server.removeprefix("http://").split("/")[0].split(":")
    sock = socket.create_connection((host, int(port)), timeout=HANG_S)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {KEY}\r\nContent-Length: 1000\r\n\r\n".encode() + b'{"model": ')
    return sock


def wait_health(server: str, done: Any) -> dict[str, Any]:
    """/health polled until `done(health)` holds (no timing: the bound is only against a hang)."""
    import time

    deadline = time.monotonic() + HANG_S
    while True:
        health = raw(server, "/health", key=None)[1]
        if done(health) or time.monotonic() > deadline:
            return health
        time.sleep(0.05)


def test_a_full_queue_is_a_503_and_then_the_server_recovers(server: str, images: Path) -> None:
    """4 decoding and 4 waiting fill it (here: 8 requests still reading their bodies); the 9th gets 503 with
    the expected wait in Retry-After, and once they go the server takes requests again."""
    held = [hold_a_place(server) for _ in range(8)]
    try:
        assert wait_health(server, lambda h: h["reading"] == 8)["waiting"] == 8
        status, body, headers = raw(server, "/v1/chat/completions", chat_body(data_uri(images / "alpha.png")))
        assert status == 503 and body["error"]["code"] == "queue_full"
        assert int({k.lower(): v for k, v in headers.items()}["retry-after"]) >= 1
    finally:
        for sock in held:
            sock.close()
    assert wait_health(server, lambda h: h["reading"] == 0)["waiting"] == 0
    assert raw(server, "/v1/chat/completions", chat_body(data_uri(images / "alpha.png")))[0] == 200


def test_serve_without_its_extra_says_how_to_install_it(tiny_model: tuple[Path, Path], tmp_path: Path) -> None:
    blocker = tmp_path / "starlette"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('not installed', name='starlette')\n")
    model, mmproj = tiny_model
    result = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(tmp_path)!r}); "
                             "from caprl_local.cli import main; sys.exit(main(sys.argv[1:]))",
                             "serve", "-m", str(model), "--port", "0"], capture_output=True, text=True, timeout=HANG_S)
    assert result.returncode == 1
    assert result.stderr.strip() == ("Error: caprl-local serve needs its extra (starlette is missing): "
                                     "pip install '.[serve]' in a caprl-local checkout, or 'caprl-local[serve]' once "
                                     "caprl-local is on your package index")


def test_images_by_url_and_path_only_when_allowed_and_sigterm_stops_cleanly(
        tiny_model: tuple[Path, Path], images: Path, tmp_path: Path) -> None:
    import functools
    import http.server

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(images))
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    proc, url = start_server(tiny_model, "--allow-remote-images", "--allow-image-network", "127.0.0.0/8",
                             "--allowed-local-dir", str(images))
    try:
        remote = raw(url, "/v1/chat/completions", chat_body(f"http://127.0.0.1:{files.server_port}/photo.jpg"), key=None)
        local = raw(url, "/v1/chat/completions", chat_body(str(images / "photo.jpg")), key=None)
        inline = raw(url, "/v1/chat/completions", chat_body(data_uri(images / "photo.jpg")), key=None)
        assert remote[0] == local[0] == inline[0] == 200
        assert remote[1]["choices"][0]["message"] == local[1]["choices"][0]["message"] == inline[1]["choices"][0]["message"]
        (tmp_path / "secret.jpg").write_bytes((images / "photo.jpg").read_bytes())
        outside = raw(url, "/v1/chat/completions", chat_body(str(tmp_path / "secret.jpg")), key=None)
        assert outside[0] == 403 and outside[1]["error"]["code"] == "path_not_allowed"
        missing = raw(url, "/v1/chat/completions", chat_body(f"http://127.0.0.1:{files.server_port}/none.jpg"), key=None)
        assert missing[0] == 400 and missing[1]["error"]["code"] == "image_fetch_failed"
        client = openai.OpenAI(base_url=url, api_key="any", max_retries=0, timeout=HANG_S)
        stream = client.chat.completions.create(model="caprl", messages=user(data_uri(images / "photo.jpg")),
                                                max_tokens=3000, stream=True, extra_body={"ignore_eos": True})
        next(iter(stream))  # a caption in flight
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=HANG_S) == 0  # SIGTERM: the caption in flight is cancelled, a clean exit
        with pytest.raises(openai.APIError):  # and the client's stream ends, cut short, rather than hanging
            list(stream)
    finally:
        files.shutdown()
        if proc.poll() is None:
            proc.kill()
    assert proc.stderr is not None and "Traceback" not in proc.stderr.read()
