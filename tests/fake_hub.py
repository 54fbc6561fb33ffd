"""A local HTTP server that speaks the parts of the Hugging Face Hub protocol huggingface_hub uses.

- ``GET /api/models/{owner}/{repo}/tree/{revision}``: the file listing, with sizes and LFS sha256;
- ``HEAD|GET /{owner}/{repo}/resolve/{revision}/{filename}``: the file, with the headers
  huggingface_hub reads (X-Repo-Commit, X-Linked-Etag, X-Linked-Size) and HTTP Range for resumes.

Faults for tests: cut a file's transfer after N bytes, stall after the headers, serve corrupted
bytes, answer a listing with something else (an HTML page, a malformed listing), or go away.
Hostile modes: raw listing entries (any name, any size), a ``Link: rel="next"`` to any URL, a
listing redirected elsewhere, a gated repo (403), a file longer than its listing says.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class FakeHub:
    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)
    cut_after: dict[str, int] = field(default_factory=dict)  # filename -> bytes sent before hanging up
    cut_times: dict[str, int] = field(default_factory=dict)  # filename -> how many more transfers to cut
    corrupt: set[str] = field(default_factory=set)  # filenames served with one flipped byte
    tokens: dict[str, str] = field(default_factory=dict)  # private repo -> the token it requires
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, path, Range)
    stall: set[str] = field(default_factory=set)  # filenames whose GET sends the headers, then nothing
    listing_body: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # repo -> (content type, raw body)
    release: threading.Event = field(default_factory=threading.Event)  # ends every stall
    listing_entries: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # repo -> raw entries added
    link_next: dict[str, str] = field(default_factory=dict)  # repo -> next-page URL ("{n}": the page count)
    next_pages: int = 1 << 30  # how many listing answers carry that link
    listing_redirect: dict[str, str] = field(default_factory=dict)  # repo -> where its listing redirects (302)
    forbidden: set[str] = field(default_factory=set)  # gated repos: 403 to everyone
    extra_bytes: dict[str, int] = field(default_factory=dict)  # filename -> bytes sent beyond its real size
    authorization: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Authorization header)

    def add(self, repo: str, filename: str, data: bytes | Path) -> None:
        self.repos.setdefault(repo, {})[filename] = data.read_bytes() if isinstance(data, Path) else data

    def start(self) -> str:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        return self.url

    def stop(self) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()

    def downloads(self, filename: str) -> list[str | None]:
        """The Range header of every GET of a file (None for a full download)."""
        return [rng for method, path, rng in self.requests if method == "GET" and path.endswith("/" + filename)]


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def _serve(self, *, body: bool) -> None:
        path = unquote(urlparse(self.path).path)
        self.hub.requests.append((self.command, path, self.headers.get("Range")))
        self.hub.authorization.append((path, self.headers.get("Authorization")))
        if any(path.startswith((f"/{repo}/", f"/api/models/{repo}/")) for repo in self.hub.forbidden):
            return self._json(403, {"error": "Access to this repo is restricted"}, body, {"X-Error-Code": "GatedRepo"})
        for repo, token in self.hub.tokens.items():
            mine = path.startswith((f"/{repo}/", f"/api/models/{repo}/"))
            if mine and self.headers.get("Authorization") != f"Bearer {token}":
                return self._json(401, {"error": "Invalid credentials"}, True, {"X-Error-Code": "RepoNotFound"})
        tree = re.match(r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?$", path)
        if tree:
            return self._tree(tree.group(1), body)
        resolve = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if resolve:
            return self._file(resolve.group(1), resolve.group(3), body)
        self._json(404, {"error": "Not found"}, body, {"X-Error-Code": "RepoNotFound"})

    def _tree(self, repo: str, body: bool) -> None:
        if repo in self.hub.listing_redirect:
            self.send_response(302)
            self.send_header("Location", self.hub.listing_redirect[repo])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if repo in self.hub.listing_body:  # what a captive portal or a broken proxy sends instead
            kind, raw = self.hub.listing_body[repo]
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            if body:
                self.wfile.write(raw)
            return
        files = self.hub.repos.get(repo)
        if files is None and repo not in self.hub.listing_entries:
            return self._json(404, {"error": "Repository not found"}, body, {"X-Error-Code": "RepoNotFound"})
        files = files or {}
        listing = [
            {
                "type": "file",
                "oid": hashlib.sha1(data).hexdigest(),
                "size": len(data),
                "path": name,
                "lfs": {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134},
            }
            for name, data in sorted(files.items())
        ] + self.hub.listing_entries.get(repo, [])
        headers: dict[str, str] = {}
        pages = sum(1 for _, p, _ in self.hub.requests if p.startswith(f"/api/models/{repo}/"))
        if repo in self.hub.link_next and pages <= self.hub.next_pages:
            headers["Link"] = f'<{self.hub.link_next[repo].replace("{n}", str(pages))}>; rel="next"'
        self._json(200, listing, body, headers)

    def _file(self, repo: str, filename: str, body: bool) -> None:
        data = self.hub.repos.get(repo, {}).get(filename)
        if data is None:
            return self._json(404, {"error": "Entry not found"}, body, {"X-Error-Code": "EntryNotFound"})
        sha = hashlib.sha256(data).hexdigest()
        if filename in self.hub.corrupt:
            data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
        data += bytes(self.hub.extra_bytes.get(filename, 0))
        start = 0
        rng = re.match(r"bytes=(\d+)-", self.headers.get("Range") or "")
        status = 200
        if rng and body:
            start, status = int(rng.group(1)), 206
        payload = data[start:]
        self.send_response(status)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("X-Linked-Etag", f'"{sha}"')
        self.send_header("X-Linked-Size", str(len(data)))
        self.send_header("ETag", f'"{sha}"')
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(payload)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if not body:
            return
        if filename in self.hub.stall:
            self.wfile.flush()
            self.hub.release.wait(30)  # headers sent, then silence
            self.close_connection = True
            return
        cut = self.hub.cut_after.get(filename)
        if cut is not None and self.hub.cut_times.get(filename, 0) > 0:
            self.hub.cut_times[filename] -= 1
            self.wfile.write(payload[: max(cut - start, 0)])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)  # hang up mid-transfer
            return
        self.wfile.write(payload)

    def _json(self, status: int, obj: object, body: bool, headers: dict[str, str] | None = None) -> None:
        raw = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if body:
            self.wfile.write(raw)


def serving(repo: str, files: dict[str, bytes], monkeypatch: Any, cache: Path) -> FakeHub:
    """A started FakeHub holding one repo's files, with HF_ENDPOINT and the cache pointed at it
    (the caller stops it)."""
    server = FakeHub()
    for name, data in files.items():
        server.add(repo, name, data)
    monkeypatch.setenv("HF_ENDPOINT", server.start())
    monkeypatch.setenv("CAPRL_LOCAL_HOME", str(cache))
    return server


def pull_then_caption_offline(hub: FakeHub, name: str, repo: str, image: Path) -> list[str]:
    """`caprl-local pull NAME`, then a caption with the Hub gone: the GGUF files pulled into the cache."""
    import os

    from helpers import run_cli

    pulled = run_cli("pull", name)
    assert pulled.returncode == 0, pulled.stderr
    folder = Path(os.environ["CAPRL_LOCAL_HOME"]) / "models" / repo
    hub.stop()  # from here on, offline
    captioned = run_cli("caption", str(image), "--model", name, "--offline", "--max-tokens", "6", "--threads", "1")
    assert captioned.returncode == 0 and captioned.stdout.strip(), captioned.stderr
    return sorted(p.name for p in folder.glob("*.gguf"))
