"""The same batch on a fleet of OpenAI-compatible servers, and split by hand into shards."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from helpers import HANG_S, run_cli, send_json, start_server

from caprl_local.inputs import BatchItem, shard_of

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
    from caprl_local.endpoints import Endpoint, EndpointCaptioner

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
    assert "HTTP 400" in broken["error"] and "not a recognised image" in broken["error"]
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
