"""The Hub client against a hostile or broken Hub, and against a damaged cache (a local Hub only)."""

from __future__ import annotations

import errno
import hashlib
import http.client
import logging
import os
import socket
import urllib.error
from pathlib import Path

import pytest
from fake_hub import FakeHub, serving
from helpers import load_script, run_cli

from caprl_local import DownloadError, OfflineError, UnknownModelError, hubhttp
from caprl_local import cache as cache_module
from caprl_local.errors import HubUnreachableError
from caprl_local.hub import download_model, list_cached, list_repo_files, spec_for
from caprl_local.hubhttp import translate_error
from caprl_local.registry import is_repo_id

STATIC = "mradermacher/CapRL-3B-GGUF"
MODEL, MMPROJ = "CapRL-3B.Q4_K_M.gguf", "CapRL-3B.mmproj-f16.gguf"
EVIL = "evil/Trojan-GGUF"
TOKEN = "hf_secret_token"

# Listed names that must never become a path: each is refused, whatever else the listing holds.
HOSTILE_NAMES = [
    "../../mradermacher/CapRL-3B-GGUF/CapRL-3B.Q4_K_M.gguf",
    "Q4_K_M/../../../../outside.Q4_K_M.gguf",
    "/etc/outside.Q4_K_M.gguf",
    "nul\x00byte.Q4_K_M.gguf",
    "back\\..\\..\\slash.Q4_K_M.gguf",
    "line\nbreak.Q4_K_M.gguf",
    "tab\there.Q4_K_M.gguf",
    "esc\x1b[2Jape.Q4_K_M.gguf",
    "del\x7f.Q4_K_M.gguf",
    "bidi\u202egguf.Q4_K_M.gguf",
    "zero\u200bwidth.Q4_K_M.gguf",
    "sep\u2028line.Q4_K_M.gguf",
    "empty//component.Q4_K_M.gguf",
    "./dot.Q4_K_M.gguf",
    "Q4_K_M/./dot.Q4_K_M.gguf",
    "C:drive.Q4_K_M.gguf",
    "C:/drive.Q4_K_M.gguf",
    "x" * 300 + ".Q4_K_M.gguf",
    "/".join(["d"] * 20) + "/deep.Q4_K_M.gguf",
    ".hidden.Q4_K_M.gguf",
    "trailing./x.Q4_K_M.gguf",
    " lead/x.Q4_K_M.gguf",
    "CON.Q4_K_M.gguf",
]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """A tiny format-true CapRL-3B pair under mradermacher's file names."""
    model, mmproj = load_script("make_tiny_model").write_tiny_pair(tmp_path_factory.mktemp("pair"), seed=0)
    return {MODEL: model.read_bytes(), MMPROJ: mmproj.read_bytes()}


@pytest.fixture()
def hub(pair: dict[str, bytes], monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    server = serving(STATIC, pair, monkeypatch, tmp_path / "cache")
    yield server
    server.stop()


@pytest.fixture()
def other(hub: FakeHub):
    """A second local server, on another port: it must never hear from us (and never get the token)."""
    server = FakeHub()
    server.start()
    yield server
    server.stop()


def cache() -> Path:
    return Path(os.environ["CAPRL_LOCAL_HOME"])


def sha(data: bytes | Path) -> str:
    return hashlib.sha256(data.read_bytes() if isinstance(data, Path) else data).hexdigest()


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() or p.is_symlink()) if folder.exists() else []


def error_line(stderr: str) -> str:
    """The one error line (the last line; warnings may come before it), checked to be one printable line."""
    assert stderr.endswith("\n") and "Traceback" not in stderr, stderr
    line = stderr.splitlines()[-1]
    assert line.startswith("Error: ") and "unexpected" not in line, line
    assert line.isprintable(), repr(line)  # no raw control character from the Hub reaches the terminal
    return line


def listing_requests(server: FakeHub, repo: str) -> int:
    return sum(1 for _, path, _ in server.requests if path.startswith(f"/api/models/{repo}/"))


# --- 1. names from a listing never leave the cache ----------------------------------------------


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_a_hostile_name_in_a_listing_is_refused_and_nothing_is_written(hub: FakeHub, pair: dict[str, bytes],
                                                                       name: str) -> None:
    hub.add(EVIL, name, pair[MODEL])
    hub.add(EVIL, "mmproj-trojan-f16.gguf", pair[MMPROJ])
    with pytest.raises(DownloadError) as info:
        download_model(EVIL)
    message = str(info.value)
    assert not isinstance(info.value, HubUnreachableError)
    assert EVIL in message and "cannot be a path in the cache" in message
    assert message.isprintable() and len(message) < 1000, repr(message)
    assert files_under(cache()) == []  # not even the (well-named) projector
    assert [r for r in hub.requests if "/resolve/" in r[1]] == []


@pytest.mark.parametrize("name", ["../../../outside.Q4_K_M.gguf", "esc\x1b]0;pwned\x07.Q4_K_M.gguf"])
def test_pull_names_the_bad_name_escaped_in_one_line(hub: FakeHub, pair: dict[str, bytes], tmp_path: Path,
                                                     name: str) -> None:
    hub.add(EVIL, name, pair[MODEL])
    hub.add(EVIL, "mmproj-trojan-f16.gguf", pair[MMPROJ])
    result = run_cli("pull", EVIL)
    assert result.returncode == 1 and result.stdout == ""
    line = error_line(result.stderr)
    assert result.stderr.count("\n") == 1 and EVIL in line and "cannot reach" not in line
    assert name.encode("unicode_escape").decode() in line  # the name, escaped
    assert files_under(tmp_path) == []  # nothing anywhere: not in the cache, not beside it


def test_an_absolute_name_matching_a_file_on_disk_is_not_used(hub: FakeHub, pair: dict[str, bytes],
                                                               tmp_path: Path) -> None:
    bait = tmp_path / "elsewhere" / "bait.Q4_K_M.gguf"  # the right size, already on disk
    bait.parent.mkdir()
    bait.write_bytes(pair[MODEL])
    hub.add(EVIL, str(bait), pair[MODEL])
    hub.add(EVIL, "mmproj-trojan-f16.gguf", pair[MMPROJ])
    result = run_cli("pull", EVIL)
    assert result.returncode == 1 and str(bait) not in result.stdout
    assert "an absolute path" in error_line(result.stderr)
    assert files_under(cache()) == []


def test_a_listing_cannot_replace_another_models_cached_file(hub: FakeHub, pair: dict[str, bytes],
                                                              images: Path) -> None:
    assert run_cli("pull", "caprl-3b").returncode == 0
    victim = cache() / "models" / STATIC / MODEL
    before = sha(victim)
    hub.add(EVIL, f"../../{STATIC}/{MODEL}", pair[MMPROJ])  # other bytes under the victim's name
    hub.add(EVIL, "mmproj-trojan-f16.gguf", pair[MMPROJ])
    result = run_cli("pull", EVIL)
    assert result.returncode == 1 and "'..' component" in error_line(result.stderr)
    assert sha(victim) == before
    hub.stop()
    captioned = run_cli("caption", str(images / "photo.jpg"), "--model", "caprl-3b", "--offline",
                        "--max-tokens", "4", "--threads", "1")
    assert captioned.returncode == 0 and captioned.stdout.strip(), captioned.stderr
    hub.start()  # for the fixture to stop


def test_the_hubs_own_sub_folders_are_fine(hub: FakeHub, pair: dict[str, bytes]) -> None:
    repo = "someone/Folders-GGUF"
    hub.add(repo, "Q4_K_M/model-Q4_K_M.gguf", pair[MODEL])
    hub.add(repo, "mmproj/mmproj-model-f16.gguf", pair[MMPROJ])
    hub.add(repo, ".gitattributes", b"*.gguf filter=lfs\n")  # a hidden non-GGUF file: never fetched, fine
    files = download_model(repo)
    assert files.model == cache() / "models" / repo / "Q4_K_M" / "model-Q4_K_M.gguf"
    assert {c.filename for c in list_cached()} == {"Q4_K_M/model-Q4_K_M.gguf", "mmproj/mmproj-model-f16.gguf"}


@pytest.mark.parametrize("name", [*HOSTILE_NAMES, "", ".", "..", "../x", "x/.."])
def test_the_cache_path_is_checked_where_it_is_built(tmp_path: Path, name: str) -> None:
    with pytest.raises(DownloadError, match="o/r"):
        cache_module.final_path(tmp_path, "o/r", name)


def test_a_linked_folder_leading_out_of_the_cache_is_refused(hub: FakeHub, pair: dict[str, bytes],
                                                              tmp_path: Path) -> None:
    repo = "someone/Linked-GGUF"
    hub.add(repo, "Q4_K_M/model-Q4_K_M.gguf", pair[MODEL])
    hub.add(repo, "mmproj-model-f16.gguf", pair[MMPROJ])
    outside = tmp_path / "outside"
    outside.mkdir()
    entry = cache() / "models" / repo
    entry.mkdir(parents=True)
    (entry / "Q4_K_M").symlink_to(outside)
    with pytest.raises(DownloadError, match="symbolic link") as info:
        download_model(repo)
    assert str(entry / "Q4_K_M" / "model-Q4_K_M.gguf") in str(info.value)
    assert list(outside.iterdir()) == []
    with pytest.raises(DownloadError, match="symbolic link"):
        cache_module.final_path(cache(), repo, "Q4_K_M/anything.gguf")
    assert cache_module.final_path(cache(), repo, "Q8_0/x.gguf") == entry / "Q8_0" / "x.gguf"


@pytest.mark.parametrize("repo", ["../x", "o/..", "o/r..x", "./r", "o/.r", "o/r-", "ö/x", "o/r\x00", "a/b/c", "o/" + "r" * 97])
def test_a_repo_id_that_is_not_one_is_refused(hub: FakeHub, repo: str) -> None:
    with pytest.raises(DownloadError, match="not a Hub repo id"):
        list_repo_files(repo)
    if is_repo_id(repo):  # what a user may type for a model: refused before it names a folder
        with pytest.raises(UnknownModelError, match="not a Hub repo id"):
            spec_for(repo)
        with pytest.raises(UnknownModelError, match="not a Hub repo id"):
            download_model(repo)
    assert hub.requests == []


def test_a_bad_repo_id_in_the_users_models_toml(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config"
    (config / "caprl-local").mkdir(parents=True)
    (config / "caprl-local" / "models.toml").write_text(
        '[sneaky]\nrepo = "../.."\narchitecture = "qwen2vl"\ndefault_quant = "Q4_K_M"\n')
    monkeypatch.setenv("XDG_CONFIG_HOME", str(config))
    victim = cache().parent / ".victim.part"  # what `rm` would have globbed from models/../..
    victim.write_bytes(b"x")
    for args in (["pull", "sneaky"], ["rm", "sneaky"], ["rm", "../evil"]):
        result = run_cli(*args)
        assert result.returncode == 1 and "not a Hub repo id" in error_line(result.stderr), (args, result.stderr)
    assert victim.exists()
    listed = run_cli("models", "--json")  # the user's registry is refused where it is read, naming the line
    assert listed.returncode == 1 and "models.toml:2" in error_line(listed.stderr), listed.stderr


# --- 2. pagination: bounded, on the endpoint's own origin, the token nowhere else ------------------


def test_a_next_link_back_to_the_same_page_is_followed_once(hub: FakeHub) -> None:
    hub.link_next[STATIC] = f"{hub.url}/api/models/{STATIC}/tree/main?recursive=true"
    result = run_cli("pull", "caprl-3b")
    assert result.returncode == 1 and "leads back to a page" in error_line(result.stderr)
    assert listing_requests(hub, STATIC) == 1


@pytest.mark.parametrize("link", ["{url}/api/models/{repo}/tree/main?recursive=true&cursor={n}",
                                  "/api/models/{repo}/tree/main?cursor={n}"])
def test_endless_pages_stop_at_the_bound(hub: FakeHub, link: str) -> None:
    hub.link_next[STATIC] = link.format(url=hub.url, repo=STATIC, n="{n}")
    result = run_cli("pull", "caprl-3b")
    assert result.returncode == 1 and f"past {hubhttp.MAX_PAGES} pages" in error_line(result.stderr)
    assert listing_requests(hub, STATIC) == hubhttp.MAX_PAGES


def test_a_second_page_on_the_hub_is_read_with_the_token(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub.link_next[STATIC], hub.next_pages = f"{hub.url}/api/models/{STATIC}/tree/main?cursor=2", 1
    assert run_cli("pull", "caprl-3b").returncode == 0
    pages = [auth for path, auth in hub.authorization if path.startswith("/api/models/")]
    assert pages == [f"Bearer {TOKEN}"] * 2


@pytest.mark.parametrize("spelling", [
    "http://localhost:{other}", "http://127.0.0.1:{other}", "http://[::1]:{other}", "http://127.1:{other}",
    "http://localhost:{port}", "http://[::1]:{port}", "https://127.0.0.1:{port}", "http://0x7f000001:{port}",
    "http://127.0.0.1:{port}@127.0.0.1:{other}", "http://127.0.0.1:{port}\\@127.0.0.1:{other}",
    "//127.0.0.1:{other}",
])
def test_a_next_link_elsewhere_gets_no_request_and_no_token(hub: FakeHub, other: FakeHub, spelling: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    port, other_port = hub.url.rsplit(":", 1)[1], other.url.rsplit(":", 1)[1]
    hub.link_next[STATIC] = spelling.format(port=port, other=other_port) + f"/api/models/{STATIC}/tree/main?p=2"
    result = run_cli("pull", "caprl-3b")
    assert result.returncode == 1 and "was not followed" in error_line(result.stderr)
    assert other.requests == [] and listing_requests(hub, STATIC) == 1
    assert TOKEN not in result.stderr


def test_a_listing_redirected_elsewhere_goes_without_the_token(hub: FakeHub, other: FakeHub,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub.listing_redirect[STATIC] = f"{other.url}/api/models/{STATIC}/tree/main?recursive=true"
    result = run_cli("pull", "caprl-3b")
    assert result.returncode == 1 and "HTTP 404" in error_line(result.stderr)  # the other server has no such repo
    assert [auth for _, auth in other.authorization] == [None]


def test_a_listing_past_the_entry_or_byte_bound_is_refused(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    hub.listing_entries[STATIC] = [{"type": "file", "path": f"doc{i}.md", "size": 1} for i in range(50)]
    monkeypatch.setattr(hubhttp, "MAX_ENTRIES", 20)
    with pytest.raises(DownloadError, match="over 20 files"):
        list_repo_files(STATIC)
    monkeypatch.setattr(hubhttp, "MAX_ENTRIES", 100_000)
    monkeypatch.setattr(hubhttp, "MAX_PAGE_BYTES", 2000)
    with pytest.raises(DownloadError, match="a page of the Hub's listing is over 2 KB") as info:
        list_repo_files(STATIC)
    assert not isinstance(info.value, HubUnreachableError)


def test_a_huge_listing_gives_a_short_error(hub: FakeHub) -> None:
    hub.listing_entries[EVIL] = [{"type": "file", "path": f"m{i}.Q{1 + i % 8}_K.gguf", "size": i} for i in range(3000)]
    result = run_cli("pull", EVIL, "--quant", "Q5_K_M")
    line = error_line(result.stderr)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert len(line) < 1500 and "and 2,980 more" in line


def test_json_nested_past_the_parsers_depth_is_a_download_error(hub: FakeHub) -> None:
    hub.listing_body[STATIC] = ("application/json", b"[" * 200_000)
    result = run_cli("pull", "caprl-3b")
    assert result.returncode == 1 and "not the Hub's JSON" in error_line(result.stderr)


# --- 3. what is cached is checked, and a pull repairs it ------------------------------------------


def test_a_truncated_cached_file_is_named_offline_and_pull_repairs_it(hub: FakeHub, pair: dict[str, bytes],
                                                                       images: Path) -> None:
    assert run_cli("pull", "caprl-3b").returncode == 0
    model = cache() / "models" / STATIC / MODEL
    with open(model, "r+b") as fh:
        fh.truncate(len(pair[MODEL]) // 2)
    offline = run_cli("caption", str(images / "photo.jpg"), "--offline", "--max-tokens", "4")
    line = error_line(offline.stderr)
    assert offline.returncode == 1 and str(model) in line and "`caprl-local pull caprl-3b`" in line
    with pytest.raises(OfflineError, match="bytes, not the"):
        download_model("caprl-3b", offline=True)
    pulled = run_cli("pull", "caprl-3b")
    assert pulled.returncode == 0, pulled.stderr
    assert sha(model) == sha(pair[MODEL])


def test_a_cached_file_longer_than_it_was_is_repaired(hub: FakeHub, pair: dict[str, bytes]) -> None:
    download_model("caprl-3b")
    mmproj = cache() / "models" / STATIC / MMPROJ
    with open(mmproj, "ab") as fh:
        fh.write(b"\0" * 1000)
    pulled = run_cli("pull", "caprl-3b")
    assert pulled.returncode == 0, pulled.stderr
    assert sha(mmproj) == sha(pair[MMPROJ])


def test_a_damaged_file_cached_without_a_record_is_found_by_its_header(hub: FakeHub, pair: dict[str, bytes]) -> None:
    folder = cache() / "models" / STATIC  # as an older version (or a copy by hand) left it: no records
    folder.mkdir(parents=True)
    (folder / MODEL).write_bytes(pair[MODEL][: len(pair[MODEL]) * 2 // 3])
    (folder / MMPROJ).write_bytes(pair[MMPROJ])
    pulled = run_cli("pull", "caprl-3b")
    assert pulled.returncode == 0, pulled.stderr
    assert sha(folder / MODEL) == sha(pair[MODEL])
    assert [r for r in hub.requests if r[1].endswith("/" + MMPROJ)] == []  # the whole one was kept


def test_verify_repairs_same_size_corruption(hub: FakeHub, pair: dict[str, bytes],
                                             caplog: pytest.LogCaptureFixture) -> None:
    download_model("caprl-3b")
    model = cache() / "models" / STATIC / MODEL
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="caprl_local"):
        files = download_model("caprl-3b", verify=True)
    assert files.model == model and sha(model) == sha(pair[MODEL])
    assert "does not match the Hub's sha256" in caplog.text
    assert len(hub.downloads(MODEL)) == 2


def test_pull_repairs_same_size_corruption(hub: FakeHub, pair: dict[str, bytes]) -> None:
    assert run_cli("pull", "caprl-3b").returncode == 0
    model = cache() / "models" / STATIC / MODEL
    data = bytearray(model.read_bytes())
    data[len(data) // 3] ^= 0xFF
    model.write_bytes(bytes(data))
    repaired = run_cli("pull", "caprl-3b")
    assert repaired.returncode == 0, repaired.stderr
    assert "does not match the Hub's sha256" in repaired.stderr and sha(model) == sha(pair[MODEL])


def test_verify_with_the_hub_gone_keeps_whole_cached_files(hub: FakeHub, caplog: pytest.LogCaptureFixture) -> None:
    cached = download_model("caprl-3b")
    hub.stop()
    with caplog.at_level(logging.WARNING, logger="caprl_local"):
        assert download_model("caprl-3b", verify=True) == cached
    assert "could not be verified" in caplog.text
    with open(cached.model, "r+b") as fh:
        fh.truncate(1000)
    with pytest.raises(HubUnreachableError):  # damaged, and nothing to repair it from
        download_model("caprl-3b", verify=True)
    hub.start()


def test_a_server_sending_more_than_its_listing_says_is_cut_off(hub: FakeHub) -> None:
    hub.extra_bytes[MMPROJ] = 3 << 20
    with pytest.raises(DownloadError, match="sent more than the"):
        download_model("caprl-3b")
    assert files_under(cache() / "models") == []


# --- 4. odd things in the cache ---------------------------------------------------------------------


def test_a_dangling_link_in_the_cache(hub: FakeHub, images: Path, tmp_path: Path) -> None:
    download_model("caprl-3b")
    model = cache() / "models" / STATIC / MODEL
    model.unlink()
    model.symlink_to(tmp_path / "nowhere.gguf")
    listed = run_cli("models", "--offline")
    assert listed.returncode == 0 and "unexpected" not in listed.stderr, listed.stderr
    assert "dangling link" in listed.stderr
    offline = run_cli("caption", str(images / "photo.jpg"), "--offline")
    assert offline.returncode == 1 and "not in the cache" in error_line(offline.stderr)
    removed = run_cli("rm", "caprl-3b", "--quant", "Q4_K_M")
    assert removed.returncode == 0 and "Removed 1 file" in removed.stderr, removed.stderr
    assert not model.is_symlink()
    model.symlink_to(tmp_path / "nowhere.gguf")
    assert run_cli("pull", "caprl-3b").returncode == 0  # the link is replaced by the file itself
    assert model.is_file() and not model.is_symlink()


def test_a_folder_where_the_model_file_goes(hub: FakeHub, images: Path) -> None:
    folder = cache() / "models" / STATIC / MODEL
    folder.mkdir(parents=True)
    pulled = run_cli("pull", "caprl-3b")
    line = error_line(pulled.stderr)
    assert pulled.returncode == 1 and str(folder) in line and "a folder" in line and "cannot reach" not in line
    assert run_cli("models", "--offline").returncode == 0
    offline = run_cli("caption", str(images / "photo.jpg"), "--offline")
    assert offline.returncode == 1 and "not in the cache" in error_line(offline.stderr)
    assert run_cli("rm", "caprl-3b").returncode == 0 and folder.is_dir()  # not ours to delete


def test_a_loop_of_links_in_the_cache_ends(hub: FakeHub) -> None:
    download_model("caprl-3b")
    (cache() / "models" / STATIC / "loop").symlink_to(cache() / "models")
    assert {c.filename for c in list_cached()} == {MODEL, MMPROJ}
    assert run_cli("models", "--offline").returncode == 0


# --- 5. messages say what really happened ----------------------------------------------------------


@pytest.mark.parametrize(("exc", "unreachable"), [
    (urllib.error.URLError(ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")), True),
    (urllib.error.URLError(socket.gaierror(socket.EAI_NONAME, "Name or service not known")), True),
    (urllib.error.URLError(TimeoutError("timed out")), True),
    (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), True),
    (TimeoutError("The read operation timed out"), True),
    (http.client.RemoteDisconnected("Remote end closed connection without response"), True),
    (OSError(errno.ENETUNREACH, "Network is unreachable"), True),
    (PermissionError(errno.EACCES, "Permission denied", "/cache/models/o/r"), False),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/cache/.x.part", None, "/cache/x.gguf"), False),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/cache/models"), False),
    (OSError(errno.EROFS, "Read-only file system", "/cache/models"), False),
])
def test_only_network_failures_are_called_unreachable(exc: Exception, unreachable: bool) -> None:
    error = translate_error(exc, "downloading o/r/x.gguf", Path("/cache/models/o/r"))
    assert isinstance(error, HubUnreachableError) is unreachable and isinstance(error, DownloadError)
    message = str(error)
    assert ("cannot reach" in message) is unreachable and "\n" not in message
    if not unreachable:
        assert isinstance(exc, OSError) and str(exc.filename) in message and str(exc.strerror) in message


def test_a_bug_shaped_value_error_is_not_disguised() -> None:
    with pytest.raises(ValueError, match="embedded null byte"):
        translate_error(ValueError("embedded null byte"), "downloading o/r/x.gguf")


def test_a_cache_that_cannot_be_written_names_the_local_path(hub: FakeHub, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("CAPRL_LOCAL_HOME", str(blocker / "cache"))
    result = run_cli("pull", "caprl-3b")
    line = error_line(result.stderr)
    assert result.returncode == 1 and str(blocker) in line and "cannot reach" not in line


@pytest.mark.skipif(os.geteuid() == 0, reason="permissions do not stop root")
def test_a_read_only_cache_names_the_local_path(hub: FakeHub) -> None:
    cache().mkdir(parents=True)
    cache().chmod(0o500)
    try:
        result = run_cli("pull", "caprl-3b")
    finally:
        cache().chmod(0o700)
    line = error_line(result.stderr)
    assert result.returncode == 1 and str(cache()) in line and "Permission denied" in line and "cannot reach" not in line


def test_401_says_whether_a_token_was_sent(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    hub.tokens[STATIC] = "hf_the_right_one"
    without = error_line(run_cli("pull", "caprl-3b").stderr)
    assert "set HF_TOKEN" in without
    monkeypatch.setenv("HF_TOKEN", "hf_a_wrong_one")
    refused = error_line(run_cli("pull", "caprl-3b").stderr)
    assert "refused the token" in refused and "set HF_TOKEN" not in refused and "hf_a_wrong_one" not in refused


def test_403_points_at_the_gated_repos_terms(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    hub.forbidden.add(STATIC)
    without = error_line(run_cli("pull", "caprl-3b").stderr)
    assert f"accept its terms on {hub.url}/{STATIC}" in without and "set HF_TOKEN" in without
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with_token = error_line(run_cli("pull", "caprl-3b").stderr)
    assert f"{hub.url}/{STATIC}" in with_token and "the account the token belongs to" in with_token
