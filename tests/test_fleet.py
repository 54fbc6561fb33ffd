"""A fleet of endpoints that misbehave: a poison image, garbage with status 200, a hang, a server down at start
and one that goes away and comes back, busy servers. Every image ends with exactly one result, and the run
with the right exit code."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from helpers import HANG_S, run_cli
from PIL import Image

from caprl_local.endpoints import Endpoint, EndpointCaptioner
from caprl_local.fleet import Policy
from caprl_local.results import Caption, CaptionFailure

POISON = (255, 0, 0)  # the colour of the image the stand-in servers fail on
QUICK = Policy(probe_min_s=0.1, probe_max_s=0.5, busy_min_s=0.05, busy_max_s=0.5)
HANG, DROP = "hang", "drop"  # what a stand-in does instead of answering: nothing, or close the connection
Action = tuple[int, dict[str, str], bytes] | str
Colour = tuple[int, int, int]


def completion(text: str, *, model: str = "stub-model", **extra: Any) -> Action:
    body = {"id": "chatcmpl-1", "object": "chat.completion", "model": model, "usage": {
        "prompt_tokens": 30, "completion_tokens": 5, "total_tokens": 35}, "choices": [
        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}], **extra}
    return 200, {"Content-Type": "application/json"}, json.dumps(body).encode()


class Stub:
    """An OpenAI-compatible stand-in on 127.0.0.1: GET lists one model; each POST gets what ``answer(stub, colour,
    n)`` says (n counts its posts from 1), where colour is the centre pixel of the image sent."""

    def __init__(self, name: str, answer: Callable[[Stub, Colour, int], Action] | None = None, *, port: int = 0,
                 owned_by: str | None = None, listing: Callable[[int], Action | None] | None = None) -> None:
        self.name, self.answer, self.port, self.owned_by = name, answer or Stub.captions, port, owned_by
        self.listing, self.gets = listing, 0  # listing(n): what the n-th GET gets instead of the model list
        self.posts: list[tuple[dict[str, Any], Colour]] = []
        self.lock, self.released = threading.Lock(), threading.Event()
        self.server: ThreadingHTTPServer | None = None

    @staticmethod
    def captions(stub: Stub, colour: Colour, n: int) -> Action:
        return completion(f"{stub.name} saw {colour}", model=f"{stub.name}-model")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> Stub:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                stub.gets += 1
                instead = stub.listing(stub.gets) if stub.listing else None
                if instead is not None:
                    return self._answer(instead)
                model = {"id": f"{stub.name}-model", "object": "model", **({"owned_by": stub.owned_by} if stub.owned_by else {})}
                self._answer((200, {}, json.dumps({"object": "list", "data": [model]}).encode()))

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                url = next(p for p in body["messages"][0]["content"] if p["type"] == "image_url")["image_url"]["url"]
                image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
                colour = image.convert("RGB").getpixel((image.width // 2, image.height // 2))
                with stub.lock:
                    stub.posts.append((body, colour))
                    n = len(stub.posts)
                self._answer(stub.answer(stub, colour, n))

            def _answer(self, action: Action) -> None:
                if action == HANG:
                    stub.released.wait(HANG_S)
                if isinstance(action, str):  # hang (once released) or drop: the connection closes unanswered
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                status, headers, data = action
                self.send_response(status)
                for key, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads, server.block_on_close = True, False
        self.server, self.port = server, server.server_port
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.released.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def colours(self) -> list[Colour]:
        with self.lock:
            return [colour for _, colour in self.posts]


def started(stubs: list[Stub], *args: Any, **kwargs: Any) -> Stub:
    stubs.append(Stub(*args, **kwargs).start())
    return stubs[-1]


def free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on (now)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def colour_images(folder: Path, count: int, *, poison: int | None = None) -> dict[str, Colour]:
    """`count` small PNGs of one colour each (the one at `poison` in POISON): {path: colour}."""
    folder.mkdir(exist_ok=True)
    made = {}
    for i in range(count):
        colour = POISON if i == poison else (10 + i * 7 % 200, 60 + i * 13 % 190, 200 - i * 5 % 150)
        path = folder / f"img{i:02d}.png"
        Image.new("RGB", (80, 60), colour).save(path)
        made[str(path)] = colour
    return made


def caption_cli(folder: Path, out: Path, *stubs_or_urls: Stub | str, extra: tuple[str, ...] = ()) -> tuple[int, str]:
    urls = [s.url if isinstance(s, Stub) else s for s in stubs_or_urls]
    result = run_cli("caption", str(folder), *[a for u in urls for a in ("--endpoint", u)], "--format", "jsonl",
                     "-o", str(out), "-n", "16", *extra)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, result.stderr


def records(path: Path) -> dict[str, dict[str, Any]]:
    lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    by_path = {r["path"]: r for r in lines}
    assert len(by_path) == len(lines), "an image has more than one record"
    return by_path


def caption_all(captioner: EndpointCaptioner, images: dict[str, Colour], **options: Any) -> dict[str, Caption | CaptionFailure]:
    names = list(images)
    results = {names[r.index]: r for r in captioner.caption_many(names, max_tokens=16, **options) if r.index is not None}
    assert sorted(results) == sorted(names)  # exactly one result each (a dict would hide a second)
    return results


def test_a_poison_image_fails_alone_after_two_endpoints(stubs: list[Stub], tmp_path: Path) -> None:
    def poisoned(stub: Stub, colour: Colour, n: int) -> Action:
        if colour == POISON:
            return 500, {}, b'{"error": {"message": "the vision encoder crashed"}}'
        return Stub.captions(stub, colour, n)

    a, b = started(stubs, "a", poisoned), started(stubs, "b", poisoned)
    images = colour_images(tmp_path / "in", 12, poison=3)
    code, err = caption_cli(tmp_path / "in", tmp_path / "out.jsonl", a, b, extra=("--endpoint-concurrency", "2"))
    assert code == 1, err  # one image failed
    got = records(tmp_path / "out.jsonl")
    assert sorted(got) == sorted(images)
    poison = got[str(tmp_path / "in" / "img03.png")]
    assert "failed on 2 endpoints" in poison["error"] and a.url in poison["error"] and b.url in poison["error"]
    assert "HTTP 500" in poison["error"] and "vision encoder crashed" in poison["error"]
    for path, colour in images.items():
        if colour != POISON:
            assert got[path]["caption"].endswith(f"saw {colour}")
            server = a if got[path]["caption"].startswith("a ") else b  # each record names who made it
            assert (got[path]["endpoint"], got[path]["model"]) == (server.url, f"{server.name}-model")
    assert a.colours().count(POISON) == b.colours().count(POISON) == 1  # tried once on each, never blindly again
    assert "is down" not in err  # both stayed in use


@pytest.mark.parametrize("garbage", [b'{"choices": [{"message": ', b"<html><body>502 Bad Gateway</body></html>",
                                     b'{"choices": []}', b"", b'{"choices": [{"finish_reason": "stop"}]}',
                                     b'{"error": {"message": "upstream failed"}}', b"[1, 2]"])
def test_garbage_with_status_200_is_the_endpoints_fault(stubs: list[Stub], garbage: bytes, tmp_path: Path) -> None:
    bad = started(stubs, "bad", lambda stub, colour, n: (200, {}, garbage))
    good = started(stubs, "good")
    images = colour_images(tmp_path / "in", 10)
    with EndpointCaptioner([Endpoint(bad.url, concurrency=2), Endpoint(good.url, concurrency=2)], policy=QUICK) as fleet:
        results = caption_all(fleet, images)
    for path, result in results.items():
        assert isinstance(result, Caption), result
        assert result.source == good.url and result.text == f"good saw {images[path]}"  # never garbage as a caption
    assert bad.posts  # it was asked, and its images went to the other endpoint


def test_a_server_that_keeps_answering_garbage_is_dropped_and_a_lone_one_is_retried(stubs: list[Stub],
                                                                                   tmp_path: Path) -> None:
    bad = started(stubs, "bad", lambda stub, colour, n: (200, {}, b"<html>oops</html>"))
    good = started(stubs, "good", lambda stub, colour, n: Stub.captions(stub, colour, n))
    colour_images(tmp_path / "in", 16)
    code, err = caption_cli(tmp_path / "in", tmp_path / "out.jsonl", bad, good, extra=("--endpoint-concurrency", "1"))
    assert code == 0, err
    assert all(r["caption"].startswith("good saw") for r in records(tmp_path / "out.jsonl").values())
    assert f"{bad.url} is down" in err and "HTML" in err
    # one endpoint that answers garbage once: asked again, and the image captioned, not failed
    flaky = started(stubs, "flaky", lambda stub, colour, n: (200, {}, b"") if n == 1 else Stub.captions(stub, colour, n))
    with EndpointCaptioner([Endpoint(flaky.url)], policy=QUICK) as fleet:
        (result,) = caption_all(fleet, colour_images(tmp_path / "one", 1)).values()
    assert isinstance(result, Caption) and result.source == flaky.url and len(flaky.posts) == 2


def test_a_hung_server_times_out_and_its_images_move_without_being_sent_twice(stubs: list[Stub], tmp_path: Path) -> None:
    hung = started(stubs, "hung", lambda stub, colour, n: HANG)
    good = started(stubs, "good")
    colour_images(tmp_path / "in", 8)
    code, err = caption_cli(tmp_path / "in", tmp_path / "out.jsonl", hung, good,
                            extra=("--endpoint-timeout", "2", "--endpoint-concurrency", "2"))
    assert code == 0, err
    assert all(r["caption"].startswith("good saw") for r in records(tmp_path / "out.jsonl").values())
    sent = hung.colours()
    assert sent and len(sent) == len(set(sent))  # each image at most once to the hung server: no blind re-send
    # a fleet of hung servers: each image fails, and says why
    other = started(stubs, "hung too", lambda stub, colour, n: HANG)
    with EndpointCaptioner([Endpoint(hung.url, concurrency=1), Endpoint(other.url, concurrency=1)], timeout_s=1,
                           policy=QUICK) as fleet:
        results = caption_all(fleet, colour_images(tmp_path / "two", 2))
    for result in results.values():
        assert isinstance(result, CaptionFailure) and "timed out after 1 s" in result.error, result
        assert "cannot reach" not in result.error


def test_a_server_down_at_start_joins_when_it_comes_up(stubs: list[Stub], tmp_path: Path) -> None:
    late = Stub("late", port=free_port())
    came = threading.Event()

    def held(stub: Stub, colour: Colour, n: int) -> Action:  # the first caption waits for the late server's first
        came.wait(HANG_S) if n == 1 else None
        return Stub.captions(stub, colour, n)

    def first(stub: Stub, colour: Colour, n: int) -> Action:
        came.set()
        return Stub.captions(stub, colour, n)

    early = started(stubs, "early", held)
    late.answer = first
    stubs.append(late)
    colour_images(tmp_path / "in", 6)
    run = _cli_in_background(tmp_path / "in", tmp_path / "out.jsonl", late.url, early.url)
    _until(lambda: bool(early.posts))
    late.start()  # on the port it was given: the run probes it again, and it joins
    code, err = run()
    assert code == 0, err
    got = records(tmp_path / "out.jsonl")
    assert len(got) == 6 and all("caption" in r for r in got.values())
    assert any(r["caption"].startswith("late saw") for r in got.values())
    assert f"{late.url} is down (cannot reach it" in err and f"{late.url} is back" in err


def test_a_dropped_server_comes_back_after_an_outage(stubs: list[Stub], tmp_path: Path) -> None:
    gate, leaving = threading.Event(), threading.Event()

    def going(stub: Stub, colour: Colour, n: int) -> Action:
        if n == 3:  # its third request is in flight as it goes away
            leaving.wait(HANG_S)
            return DROP
        return Stub.captions(stub, colour, n)

    a = started(stubs, "a", going)
    b = started(stubs, "b", lambda stub, colour, n: (gate.wait(HANG_S), Stub.captions(stub, colour, n))[1])
    images = colour_images(tmp_path / "in", 10)
    with EndpointCaptioner([Endpoint(a.url, concurrency=1), Endpoint(b.url, concurrency=1)], policy=QUICK) as fleet:
        out: list[Caption | CaptionFailure] = []
        worker = threading.Thread(target=lambda: out.extend(fleet.caption_many(list(images), max_tokens=16)))
        worker.start()
        _until(lambda: len(a.posts) == 3)
        a.stop()  # refused from now on
        leaving.set()
        _until(lambda: fleet.fleet.members[0].state == "down")
        back = started(stubs, "a again", port=a.port)
        _until(lambda: bool(back.posts))  # probed, rejoined, and given images again
        gate.set()
        worker.join(HANG_S)
    assert sorted(r.index for r in out if r.index is not None) == list(range(10))
    assert all(isinstance(r, Caption) for r in out)
    assert {r.source for r in out} == {a.url, b.url}


def test_busy_servers_are_waited_for_not_dropped(stubs: list[Stub], tmp_path: Path) -> None:
    def busy(stub: Stub, colour: Colour, n: int) -> Action:
        if n <= 3:
            return (503 if n % 2 else 429), {"Retry-After": "0"}, b'{"error": {"message": "queue full"}}'
        return Stub.captions(stub, colour, n)

    server = started(stubs, "busy", busy)
    colour_images(tmp_path / "in", 4)
    code, err = caption_cli(tmp_path / "in", tmp_path / "out.jsonl", server, extra=("--endpoint-concurrency", "1"))
    assert code == 0, err
    assert len(records(tmp_path / "out.jsonl")) == 4 and "is down" not in err
    # one that says nothing but "busy" holds the run up only so long
    always = started(stubs, "always busy", lambda stub, colour, n: (503, {"Retry-After": "0"}, b"{}"))
    code, err = caption_cli(tmp_path / "in", tmp_path / "never.jsonl", always, extra=("--endpoint-outage", "2"))
    assert code == 1 and "no endpoint has answered for 2 s" in err and "busy" in err, err
    # a Retry-After of a day is honoured only within bounds
    slow = started(stubs, "slow", lambda stub, colour, n: (503, {"Retry-After": "86400"}, b"{}") if n == 1
                   else Stub.captions(stub, colour, n))
    with EndpointCaptioner([Endpoint(slow.url)], policy=QUICK) as fleet:
        (result,) = caption_all(fleet, colour_images(tmp_path / "one", 1)).values()
    assert isinstance(result, Caption)


def test_a_server_still_loading_is_asked_again_until_ready(stubs: list[Stub], tmp_path: Path) -> None:
    loading = started(stubs, "loading", listing=lambda n: (503, {"Retry-After": "0"},
                                                           b'{"error": {"message": "Loading model"}}') if n <= 3 else None)
    with EndpointCaptioner([Endpoint(loading.url)], policy=QUICK) as fleet:  # probed as it is made: still loading
        assert fleet.fleet.members[0].state == "down" and "Loading model" in fleet.fleet.members[0].why
        results = caption_all(fleet, colour_images(tmp_path / "in", 3))
    assert all(isinstance(r, Caption) and r.source == loading.url for r in results.values())


def test_with_no_endpoint_answering_the_run_stops_and_a_rerun_finishes(stubs: list[Stub], tmp_path: Path) -> None:
    port = free_port()
    images = colour_images(tmp_path / "in", 3)
    code, err = caption_cli(tmp_path / "in", tmp_path / "out.jsonl", f"http://127.0.0.1:{port}/v1",
                            extra=("--endpoint-outage", "2"))
    assert code == 1 and "no endpoint has answered for 2 s" in err and "run the same command again" in err, err
    assert records(tmp_path / "out.jsonl") == {}  # left for the rerun, not recorded as failed
    started(stubs, "up now", port=port)
    code, err = caption_cli(tmp_path / "in", tmp_path / "out.jsonl", f"http://127.0.0.1:{port}/v1")
    assert code == 0, err
    assert sorted(records(tmp_path / "out.jsonl")) == sorted(images)


def test_a_server_that_refuses_us_is_left_out_and_a_fleet_of_them_stops_at_once(stubs: list[Stub],
                                                                               tmp_path: Path) -> None:
    def refusing(stub: Stub, colour: Colour, n: int) -> Action:
        return 401, {}, b'{"error": {"message": "invalid api key"}}'

    bad, good = started(stubs, "bad", refusing), started(stubs, "good")
    images = colour_images(tmp_path / "in", 4)
    code, err = caption_cli(tmp_path / "in", tmp_path / "out.jsonl", bad, good)
    assert code == 0 and f"{bad.url} refuses the key (HTTP 401: invalid api key)" in err, err
    assert sorted(records(tmp_path / "out.jsonl")) == sorted(images)
    code, err = caption_cli(tmp_path / "in", tmp_path / "again.jsonl", bad)
    assert code == 1 and "every endpoint refuses the requests" in err, err


def _cli_in_background(folder: Path, out: Path, *urls: str) -> Callable[[], tuple[int, str]]:
    done: list[tuple[int, str]] = []
    thread = threading.Thread(target=lambda: done.append(caption_cli(folder, out, *urls,
                                                                     extra=("--endpoint-concurrency", "1"))))
    thread.start()

    def wait() -> tuple[int, str]:
        thread.join(HANG_S)
        return done[0]

    return wait


def _until(condition: Callable[[], bool]) -> None:
    """Wait for `condition` (a busy machine may take its time; only a hang fails)."""
    deadline = time.monotonic() + HANG_S
    while not condition():
        assert time.monotonic() < deadline, "waited too long"
        time.sleep(0.02)
