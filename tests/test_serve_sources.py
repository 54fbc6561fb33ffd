"""Where caprl-local serve takes its images from (caprl_local/serve/sources.py): data URIs, files under the
allowed folder, and http(s) URLs, each bounded in bytes, total time and pixels, and remote fetching
kept to the addresses it may reach. Every origin is a local server on 127.0.0.1 or [::1] started here;
the public-address path is tested on the address classifier alone."""

from __future__ import annotations

import base64
import http.server
import io
import json
import logging
import os
import platform
import shutil
import signal
import socket
import ssl
import stat
import struct
import subprocess
import threading
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest
from helpers import HANG_S, start_server
from PIL import Image

from caprl_local.errors import CaprlError
from caprl_local.images import peek_image
from caprl_local.serve.protocol import ApiError, ImagePolicy, image_bytes
from caprl_local.serve.sources import is_public, may_reach

LOOPBACK_SPELLINGS = ["127.0.0.1", "127.1", "2130706433", "0x7f000001", "0177.0.0.1", "0.0.0.0", "0", "localhost",
                      "[::ffff:127.0.0.1]", "[::ffff:7f00:1]"]


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


def refused(call: Callable[[], object]) -> ApiError:
    with pytest.raises(ApiError) as info:
        call()
    return info.value


def png(size: tuple[int, int], mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size).save(out, "PNG")
    return out.getvalue()


# --- local origins ----------------------------------------------------------------------------


class Origin(http.server.ThreadingHTTPServer):
    """A local web server answering from `routes` (path -> (status, headers, body)); it notes each request."""

    def __init__(self, host: str = "127.0.0.1", routes: dict[str, tuple[int, dict[str, str], bytes]] | None = None,
                 tls: ssl.SSLContext | None = None) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.routes, self.seen = routes or {}, []
        super().__init__((host, 0), _Handler)
        if tls is not None:
            self.socket = tls.wrap_socket(self.socket, server_side=True)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def url(self, path: str, host: str | None = None) -> str:
        scheme = "https" if isinstance(self.socket, ssl.SSLSocket) else "http"
        return f"{scheme}://{host or ('[::1]' if self.address_family == socket.AF_INET6 else '127.0.0.1')}:" \
               f"{self.server_port}{path}"


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the standard library's name
        server: Any = self.server
        server.seen.append((self.path, self.headers.get("Host")))
        status, headers, body = server.routes.get(self.path, (404, {}, b"not here"))
        self.send_response(status)
        for name, value in {"Content-Length": str(len(body)), **headers}.items():
            if value:  # "": left out (the body ends where the connection does)
                self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def origin(*args: Any, **kwargs: Any) -> Iterator[Origin]:
    server = Origin(*args, **kwargs)
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def dripping(prefix: bytes) -> Iterator[tuple[str, list[int]]]:
    """A local origin that answers `prefix` whole, then one byte every 0.2 s, for 30 minutes if let:
    (URL, [bytes it managed to send before the client hung up])."""
    listener = socket.create_server(("127.0.0.1", 0))
    sent: list[int] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            count = 0
            try:
                conn.sendall(prefix)
                for _ in range(9000):
                    conn.sendall(b"x")
                    count += 1
                    threading.Event().wait(0.2)
            except OSError:
                pass
            sent.append(count)

    worker = threading.Thread(target=serve, daemon=True)
    worker.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/slow.jpg", sent
        worker.join(HANG_S)
    finally:
        listener.close()


LOCAL = ImagePolicy(allow_remote=True, networks=("127.0.0.0/8", "::1/128"), timeout_s=HANG_S)
PUBLIC_ONLY = ImagePolicy(allow_remote=True, timeout_s=HANG_S)


# --- the address classifier -------------------------------------------------------------------


@pytest.mark.parametrize("address", [
    "127.0.0.1", "127.255.255.254", "0.0.0.0", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1",
    "224.0.0.1", "239.255.255.250", "255.255.255.255", "240.0.0.1", "192.0.2.1", "198.18.0.1", "::1", "::",
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::127.0.0.1", "::8.8.8.8", "64:ff9b::7f00:1", "64:ff9b::a00:1", "64:ff9b:1::1",
    "2002:7f00:1::1", "2002:a00:1::", "fe80::1", "fc00::1", "fd12:3456::1", "ff02::1", "ff0e::1", "fec0::1",
    "2001:db8::1", "2001:0:4136:e378:8000:63bf:3fff:fdd2"])
def test_no_spelling_of_a_non_public_address_is_public(address: str) -> None:
    assert not is_public(ip_address(address)) and not may_reach(ip_address(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8",
                                     "64:ff9b::808:808", "2002:808:808::1"])
def test_public_addresses_are_public(address: str) -> None:
    assert is_public(ip_address(address)) and may_reach(ip_address(address))


def test_the_operators_networks_widen_what_may_be_reached() -> None:
    networks = ImagePolicy(networks=("10.0.0.0/8", "127.0.0.1/32", "fd00::/8")).networks
    assert may_reach(ip_address("10.9.8.7"), networks) and may_reach(ip_address("fd00::5"), networks)
    assert may_reach(ip_address("::ffff:127.0.0.1"), networks)  # the IPv4 address, however written
    assert not may_reach(ip_address("127.0.0.2"), networks) and not may_reach(ip_address("192.168.0.1"), networks)
    with pytest.raises(CaprlError, match="CIDR"):
        ImagePolicy(networks=("10.0.0.0/33",))


def test_the_pixel_cap_follows_the_image_token_budget() -> None:
    assert ImagePolicy.pixels_for(1024) == 16_777_216 >= 16 * 1024 * 28 * 28
    assert ImagePolicy.pixels_for(64) == 16_000_000  # never under 16 megapixels
    assert ImagePolicy.pixels_for(4096) > ImagePolicy.pixels_for(2048) > ImagePolicy.pixels_for(1024)


# --- pixels -----------------------------------------------------------------------------------


def jpeg(size: tuple[int, int], **options: Any) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (90, 20, 200)).save(out, "JPEG", **options)
    return out.getvalue()


def jpeg_header(scan_components: int) -> bytes:
    """A JPEG's header only: a 3-component baseline frame whose first scan holds `scan_components`."""
    frame = bytes([8, 0x10, 0, 0x10, 0, 3, 1, 0x11, 0, 2, 0x11, 1, 3, 0x11, 1])
    scan = bytes([scan_components, *[b for c in range(1, scan_components + 1) for b in (c, 0)], 0, 63, 0])
    return (b"\xff\xd8\xff\xc0" + (len(frame) + 2).to_bytes(2, "big") + frame
            + b"\xff\xda" + (len(scan) + 2).to_bytes(2, "big") + scan + b"\0" * 16 + b"\xff\xd9")


def tiled_tiff(side: int) -> bytes:
    """A 16x16 deflated RGB TIFF in one `side` x `side` tile (which the decoder allocates whole)."""
    squeeze = zlib.compressobj(9)
    tile = b"".join(squeeze.compress(bytes(side * 3)) for _ in range(side)) + squeeze.flush()
    entries = [(256, 16), (257, 16), (258, 0), (259, 8), (262, 2), (277, 3), (284, 1), (322, side), (323, side), (324, 0),
               (325, len(tile))]
    head = 8 + 2 + 12 * len(entries) + 4  # the three BitsPerSample values follow the directory, then the tile
    out = bytearray(b"II*\0" + struct.pack("<IH", 8, len(entries)))
    for tag, value in entries:
        if tag == 258:
            out += struct.pack("<HHII", tag, 3, 3, head)
        elif tag in (322, 323, 324, 325):
            out += struct.pack("<HHII", tag, 4, 1, head + 6 if tag == 324 else value)
        else:
            out += struct.pack("<HHIHH", tag, 3, 1, value, 0)
    return bytes(out + struct.pack("<I", 0) + struct.pack("<HHH", 8, 8, 8) + tile)


def test_the_header_tells_which_jpegs_a_reduced_scale_decode_bounds() -> None:
    assert peek_image(jpeg((64, 48))) == ("JPEG", 64, 48, 0)  # 0: decoded at a reduced scale
    assert peek_image(jpeg((64, 48), progressive=True)) == ("JPEG", 64, 48, 64 * 48)  # every coefficient buffered
    assert peek_image(jpeg_header(3))[3] == 0
    assert peek_image(jpeg_header(1))[1:] == (4096, 4096, 4096 * 4096)  # one component per scan: buffered whole too
    assert peek_image(png((64, 48))) == ("PNG", 64, 48, 64 * 48)
    assert peek_image(tiled_tiff(1024)) == ("TIFF", 16, 16, 1024 * 1024)  # a tile is decoded whole


@pytest.mark.parametrize("kind", ["PNG", "GIF", "WEBP", "TIFF", "BMP", "progressive JPEG", "multi-scan JPEG", "tiled TIFF"])
def test_an_image_over_the_pixel_cap_is_refused_before_decoding(kind: str) -> None:
    policy = ImagePolicy(max_pixels=200 * 100)
    if kind == "multi-scan JPEG":
        data = jpeg_header(1)
    elif kind == "tiled TIFF":
        data = tiled_tiff(1024)
    elif kind == "progressive JPEG":
        data = jpeg((300, 200), progressive=True)
    else:
        out = io.BytesIO()
        Image.new("RGB", (300, 200)).save(out, kind)
        data = out.getvalue()
    error = refused(lambda: image_bytes(f"data:image;base64,{base64.b64encode(data).decode()}", policy))
    assert error.status == 413 and error.code == "image_too_large"
    _, width, height, pixels = peek_image(data)
    assert f"{width}x{height}" in error.message and f"{pixels:,} pixels" in error.message
    assert "limit of 20,000;" in error.message
    small = image_bytes(f"data:image;base64,{base64.b64encode(png((200, 100))).decode()}", policy)
    assert peek_image(small)[1:3] == (200, 100)  # at the cap: taken


def test_a_baseline_jpeg_of_any_size_is_taken_its_decode_being_reduced() -> None:
    data = jpeg((300, 200))
    assert image_bytes(f"data:image/jpeg;base64,{base64.b64encode(data).decode()}", ImagePolicy(max_pixels=100)) == data


@pytest.mark.parametrize("data", [b"hello", b"\x89PNG\r\n\x1a\n" + b"\0" * 30, b"GIF89a\xff\xff", b"\xff\xd8\xff"])
def test_a_broken_header_is_a_400(data: bytes) -> None:
    error = refused(lambda: image_bytes(f"data:image;base64,{base64.b64encode(data).decode()}", ImagePolicy()))
    assert (error.status, error.code) == (400, "invalid_image")


def test_a_data_uri_over_the_byte_cap_is_refused_before_decoding() -> None:
    error = refused(lambda: image_bytes("data:image/png;base64," + "A" * 4000, ImagePolicy(max_bytes=1000)))
    assert (error.status, error.code) == (413, "image_too_large")


# --- local files ------------------------------------------------------------------------------


@pytest.fixture()
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An allowed folder with 'a b.png' (64x48) in it; the working folder elsewhere, with another 'a b.png'."""
    allowed, elsewhere = tmp_path / "allowed", tmp_path / "cwd"
    allowed.mkdir()
    elsewhere.mkdir()
    (allowed / "a b.png").write_bytes(png((64, 48)))
    (elsewhere / "a b.png").write_bytes(png((8, 8)))
    monkeypatch.chdir(elsewhere)
    return allowed


@pytest.mark.parametrize("form", ["{dir}/a b.png", "file://{dir}/a%20b.png", "file://localhost{dir}/a%20b.png",
                                  "file:{dir}/a%20b.png", "FILE:///{dir}/a%20b.png#frag", "a b.png", "./a b.png",
                                  "sub/../a b.png", "inside.png"])
def test_a_file_under_the_folder_is_read_in_every_spelling(folder: Path, form: str) -> None:
    (folder / "sub").mkdir()
    (folder / "inside.png").symlink_to(folder / "a b.png")
    data = image_bytes(form.format(dir=folder), ImagePolicy(local_dir=folder))
    assert peek_image(data)[1:3] == (64, 48)  # the folder's file, never the working folder's


@pytest.mark.parametrize(("form", "status"), [
    ("file://elsewhere{dir}/a%20b.png", 400), ("file:relative.png", 400), ("a\0b.png", 400), ("file://{dir}/a%00b.png", 400),
    ("a\ud800b.png", 400), ("file://{dir}/\udcff.png", 400), ("{dir}/../cwd/a b.png", 403), ("/etc/hostname", 403),
    ("outside.png", 403), ("file:///etc/passwd", 403), ("ftp://127.0.0.1/a.png", 400), ("gopher://x/", 400)])
def test_a_bad_or_outside_path_is_refused(folder: Path, form: str, status: int) -> None:
    (folder / "outside.png").symlink_to(folder.parent / "cwd" / "a b.png")
    error = refused(lambda: image_bytes(form.format(dir=folder), ImagePolicy(local_dir=folder)))
    assert error.status == status and error.message.isprintable()


def test_a_fifo_a_device_a_socket_or_a_folder_is_refused_at_once(folder: Path) -> None:
    os.mkfifo(folder / "fifo.png")  # no writer: a blocking open would wait for ever
    (folder / "dir.png").mkdir()
    kinds = [("fifo.png", "a FIFO"), ("dir.png", "a directory"), ("sock.png", "a socket")]
    try:
        os.mknod(folder / "zero.png", 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero's: endless
        kinds.append(("zero.png", "a character device"))
    except OSError:  # not allowed to make device nodes here
        pass
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(folder / "sock.png"))
        for name, kind in kinds:
            error = refused(lambda name=name: image_bytes(name, ImagePolicy(local_dir=folder)))
            assert (error.status, error.code) == (400, "invalid_image_url") and kind in error.message


def test_a_file_over_the_byte_cap_is_refused_unread(folder: Path) -> None:
    with open(folder / "huge.png", "wb") as fh:
        fh.truncate(1_500_000_000)  # sparse: 1.5 GB that take no room
    error = refused(lambda: image_bytes("huge.png", ImagePolicy(local_dir=folder)))
    assert (error.status, error.code) == (413, "image_too_large") and "20,000,000 bytes" in error.message


def test_paths_are_refused_where_no_folder_is_allowed(folder: Path) -> None:
    error = refused(lambda: image_bytes(str(folder / "a b.png"), ImagePolicy()))
    assert (error.status, error.code) == (400, "invalid_image_url")


# --- remote images ----------------------------------------------------------------------------


def test_a_local_origin_is_fetched_only_when_the_operator_allows_its_network() -> None:
    with origin(routes={"/a.png": (200, {}, png((64, 48)))}) as server:
        assert peek_image(image_bytes(server.url("/a.png"), LOCAL))[1:3] == (64, 48)
        assert server.seen == [("/a.png", f"127.0.0.1:{server.server_port}")]
        server.seen.clear()
        for host in LOOPBACK_SPELLINGS:  # each reaches this server if the check is wrong
            url = server.url("/a.png", host)
            error = refused(lambda url=url: image_bytes(url, PUBLIC_ONLY))
            assert (error.status, error.code, error.message) == (400, "image_fetch_failed", f"cannot fetch the image at {url}")
        assert server.seen == []


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback here")
def test_the_ipv6_loopback_is_refused_unless_allowed() -> None:
    with origin("::1", routes={"/a.png": (200, {}, png((64, 48)))}) as server:
        for host in ("[::1]", "[0:0:0:0:0:0:0:1]", "[::]"):
            assert refused(lambda host=host: image_bytes(server.url("/a.png", host), PUBLIC_ONLY)).code == \
                "image_fetch_failed"
        assert server.seen == []
        assert peek_image(image_bytes(server.url("/a.png"), LOCAL))[1:3] == (64, 48)


def test_every_fetch_failure_gets_one_answer_and_the_log_the_reason(caplog: pytest.LogCaptureFixture) -> None:
    """Not found, a server error, a closed port, a refused address and every refused redirect look alike."""
    closed = socket.create_server(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    with origin(routes={}) as server:
        def moved(to: str) -> tuple[int, dict[str, str], bytes]:
            return 302, {"Location": to}, b""

        server.routes.update({
            "/ftp": moved("ftp://127.0.0.1/a.png"), "/file": moved("file:///etc/passwd"),
            "/data": moved("data:image/png;base64,AA"), "/public-only": moved(server.url("/a.png", "0.0.0.0")),
            "/loop": moved("/loop"), "/boom": (500, {}, b"")})
        strict = ImagePolicy(allow_remote=True, networks=("127.0.0.1/32",), timeout_s=HANG_S)
        cases = [(server.url("/missing"), LOCAL), (server.url("/boom"), LOCAL), (f"http://127.0.0.1:{closed_port}/a", LOCAL),
                 (server.url("/a.png"), PUBLIC_ONLY), (server.url("/ftp"), LOCAL), (server.url("/file"), LOCAL),
                 (server.url("/data"), LOCAL), (server.url("/loop"), LOCAL), ("http:///nohost.png", LOCAL),
                 ("http://user:pw@127.0.0.1/a.png", LOCAL), (server.url("/\x1b[2J\nforged"), LOCAL)]
        with caplog.at_level(logging.WARNING, logger="caprl_local"):
            for url, policy in cases:
                error = refused(lambda url=url, policy=policy: image_bytes(url, policy))
                assert (error.status, error.code) == (400, "image_fetch_failed") and error.message.isprintable()
            # a redirect to an address the first one was allowed and this one is not
            server.routes["/a.png"] = (200, {}, png((8, 8)))
            assert refused(lambda: image_bytes(server.url("/public-only"), strict)).code == "image_fetch_failed"
        assert ("/a.png", f"0.0.0.0:{server.server_port}") not in server.seen
    reasons = [r.getMessage() for r in caplog.records]
    assert len(reasons) == len(cases) + 1 and all(r.isprintable() for r in reasons)
    for words in ("HTTP 404", "HTTP 500", "cannot connect", "not a public address", "only http and https",
                  "more than 5 redirects", "user name or password"):
        assert any(words in r for r in reasons), (words, reasons)


def test_redirects_are_followed_up_to_five() -> None:
    hops = {f"/hop{i}": (301, {"Location": f"/hop{i + 1}"}, b"") for i in range(6)}
    with origin(routes={**hops, "/hop6": (200, {}, png((8, 8)))}) as server:
        assert peek_image(image_bytes(server.url("/hop1"), LOCAL))[1:3] == (8, 8)  # five redirects
        assert refused(lambda: image_bytes(server.url("/hop0"), LOCAL)).code == "image_fetch_failed"  # six


def test_a_remote_image_over_the_byte_cap_is_refused() -> None:
    big = png((8, 8)) + b"\0" * 5000
    with origin(routes={"/declared": (200, {}, big), "/undeclared": (200, {"Content-Length": ""}, big)}) as server:
        policy = ImagePolicy(allow_remote=True, networks=("127.0.0.0/8",), max_bytes=4000, timeout_s=HANG_S)
        for path in ("/declared", "/undeclared"):  # refused from its header; counted as it comes
            error = refused(lambda path=path: image_bytes(server.url(path), policy))
            assert (error.status, error.code) == (413, "image_too_large")


@pytest.mark.parametrize("prefix", [b"", b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n"])
def test_a_dripping_origin_fails_at_the_total_deadline(prefix: bytes) -> None:
    """One byte every 0.2 s (headers, or a body) would take half an hour; the deadline is one second in all."""
    policy = ImagePolicy(allow_remote=True, networks=("127.0.0.0/8",), timeout_s=1)
    with dripping(prefix) as (url, sent):
        assert refused(lambda: image_bytes(url, policy)).code == "image_fetch_failed"
    assert sent and sent[0] < 9000  # the client hung up long before the origin was done


def test_the_host_is_resolved_once_and_that_address_connected_to(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rebinding resolver answers differently the second time: there is no second time."""
    lookups: list[str] = []
    real = socket.getaddrinfo

    def resolver(host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        lookups.append(host)
        if host != "images.test" or len(lookups) > 1:
            raise socket.gaierror(socket.EAI_NONAME, "not known")
        return real("127.0.0.1", port, *args, **kwargs)

    with origin(routes={"/a.png": (200, {}, png((8, 8)))}) as server:
        monkeypatch.setattr(socket, "getaddrinfo", resolver)
        assert peek_image(image_bytes(server.url("/a.png", "images.test"), LOCAL))[1:3] == (8, 8)
    assert lookups == ["images.test"] and server.seen == [("/a.png", f"images.test:{server.server_port}")]


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost: (cert, key)."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make a certificate")
    where = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(where / "key.pem"), "-out", str(where / "cert.pem"), "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost"], check=True, capture_output=True, timeout=HANG_S)
    return where / "cert.pem", where / "key.pem"


def test_https_names_the_host_in_sni_and_checks_its_certificate(certificate: tuple[Path, Path]) -> None:
    names: list[str | None] = []
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(*certificate)
    tls.sni_callback = lambda sock, name, ctx: names.append(name)  # type: ignore[assignment,func-returns-value]
    trust = ssl.create_default_context(cafile=str(certificate[0]))
    with origin(routes={"/a.png": (200, {}, png((8, 8)))}, tls=tls) as server:
        assert peek_image(image_bytes(server.url("/a.png", "localhost"), LOCAL, tls=trust))[1:3] == (8, 8)
        assert names == ["localhost"] and server.seen == [("/a.png", f"localhost:{server.server_port}")]
        # the name the certificate is checked against is the URL's: an address it does not name fails
        assert refused(lambda: image_bytes(server.url("/a.png", "127.0.0.1"), LOCAL, tls=trust)).code == "image_fetch_failed"
        # and without trusting it, as a client of the system's certificates
        assert refused(lambda: image_bytes(server.url("/a.png", "localhost"), LOCAL)).code == "image_fetch_failed"


# --- a real server ----------------------------------------------------------------------------


openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def served(tiny_model: tuple[Path, Path], images: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, int]]:
    """A server that may fetch from [::1] only (so that every IPv4 loopback spelling must be refused)
    and read files under a folder: (base URL, folder, process id)."""
    if not has_ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    folder = tmp_path_factory.mktemp("served")
    shutil.copy(images / "photo.jpg", folder / "a photo.jpg")
    os.mkfifo(folder / "fifo.jpg")
    proc, url = start_server(tiny_model, "--allow-remote-images", "--allow-image-network", "::1/128",
                             "--allowed-local-dir", str(folder))
    yield url, folder, proc.pid
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=HANG_S) == 0
    assert proc.stderr is not None and "Traceback" not in proc.stderr.read()


def ask(server: str, image: str) -> tuple[int, dict[str, Any]]:
    """POST a caption request for `image` as raw JSON (a surrogate or a NUL survives it): (status, body)."""
    body = {"model": "caprl", "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image}}]}]}
    request = urllib.request.Request(f"{server}/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=HANG_S) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_a_served_image_comes_only_from_where_it_may(served: tuple[str, Path, int], images: Path) -> None:
    url, folder, _ = served
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=HANG_S)

    def caption(image: str) -> str:
        answer = client.chat.completions.create(model="caprl", max_tokens=6, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}}]}])
        return str(answer.choices[0].message.content)

    photo = (images / "photo.jpg").read_bytes()
    with origin("::1", routes={"/photo.jpg": (200, {}, photo)}) as v6, origin(routes={"/photo.jpg": (200, {}, photo)}) as v4:
        expected = caption(f"data:image/jpeg;base64,{base64.b64encode(photo).decode()}")
        assert caption(v6.url("/photo.jpg")) == expected
        assert caption(f"file://{folder}/a%20photo.jpg") == caption("a photo.jpg") == expected
        for host in LOOPBACK_SPELLINGS:
            with pytest.raises(openai.BadRequestError) as info:
                caption(v4.url("/photo.jpg", host))
            assert info.value.code == "image_fetch_failed"
        assert v4.seen == []
    for image, status, code in [("fifo.jpg", 400, "invalid_image_url"), ("a\0b.jpg", 400, "invalid_image_url"),
                                ("a\ud800b.jpg", 400, "invalid_image_url"), ("file://host/a.jpg", 400, "invalid_image_url"),
                                ("/etc/passwd", 403, "path_not_allowed")]:
        got = ask(url, image)
        assert (got[0], got[1]["error"]["code"]) == (status, code), (image, got)
    assert caption("a photo.jpg") == expected  # and it goes on


def test_a_huge_but_small_image_is_refused_naming_its_size_and_the_cap(served: tuple[str, Path, int]) -> None:
    url, _, _ = served
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=HANG_S)
    data = png((4100, 4100), "1")  # 16.8 megapixels in a few kilobytes
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="caprl", max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{base64.b64encode(data).decode()}"}}]}])
    assert info.value.status_code == 413 and info.value.code == "image_too_large"
    assert "4100x4100 PNG" in info.value.message and "16,810,000 pixels" in info.value.message
    assert "limit of 16,777,216" in info.value.message


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="how glibc's allocator keeps freed memory")
def test_the_memory_of_big_decodes_goes_back(served: tuple[str, Path, int]) -> None:
    """Four 16-megapixel decodes at once take a GB; once done, the server is back near its size before
    (glibc would otherwise keep some 170 MB of it for good)."""
    url, _, pid = served
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=HANG_S)

    def caption(data: bytes) -> None:
        client.chat.completions.create(model="caprl", max_tokens=1, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{base64.b64encode(data).decode()}"}}]}])

    def rss_mb() -> int:
        status = Path(f"/proc/{pid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1]) // 1024

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(caption, [png((1200, 1200))] * 4))  # the engine's buffers for a whole image budget, once
        before = rss_mb()
        list(pool.map(caption, [png((4000, 4000), "RGBA")] * 4))  # just under the 16.8-megapixel cap
    assert rss_mb() - before < 80, (before, rss_mb())
