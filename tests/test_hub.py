"""Models from the Hub, against a local server speaking the Hub's protocol (never the real Hub)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fake_hub import FakeHub
from helpers import HANG_S, load_script, run_cli

from caprl_local import Captioner, DownloadError, OfflineError, UnknownModelError
from caprl_local import hub as hub_module
from caprl_local.errors import HubUnreachableError, NoProjectorError
from caprl_local.hub import download_model, list_cached, list_models, parse_quant
from caprl_local.hubhttp import translate_error

STATIC, IMATRIX = "mradermacher/CapRL-3B-GGUF", "mradermacher/CapRL-3B-i1-GGUF"
BIG = "CapRL-3B.Q6_K.gguf"  # padded past the downloader's chunk size, so a cut leaves a partial file


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Tiny format-true GGUFs under mradermacher's real file names (distinct seeds, distinct hashes)."""
    tiny = load_script("make_tiny_model")
    files: dict[str, bytes] = {}
    for seed, quant in enumerate(["Q4_K_M", "Q8_0", "i1-Q4_K_M", "i1-IQ4_XS"]):
        model, mmproj = tiny.write_tiny_pair(tmp_path_factory.mktemp(f"pub{seed}"), seed=seed)
        files[f"CapRL-3B.{quant}.gguf"] = model.read_bytes()
        if seed == 0:
            files["CapRL-3B.mmproj-f16.gguf"] = mmproj.read_bytes()
        if seed == 1:
            files["CapRL-3B.mmproj-Q8_0.gguf"] = mmproj.read_bytes()
    files[BIG] = files["CapRL-3B.Q4_K_M.gguf"] + bytes(24 << 20)  # GGUF readers ignore trailing bytes
    return files


@pytest.fixture()
def hub(published: dict[str, bytes], monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    server = FakeHub()
    for name, data in published.items():
        server.add(IMATRIX if ".i1-" in name else STATIC, name, data)
    server.add(STATIC, "README.md", b"# CapRL-3B GGUF\n")
    server.add(IMATRIX, "imatrix.dat", b"\0" * 100)
    monkeypatch.setenv("HF_ENDPOINT", server.start())
    monkeypatch.setenv("CAPRL_LOCAL_HOME", str(tmp_path / "cache"))
    yield server
    server.stop()


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "caprl_local", *args], capture_output=True, text=True,
                          timeout=HANG_S, env={**os.environ, **(env or {})})


def cache() -> Path:
    return Path(os.environ["CAPRL_LOCAL_HOME"])


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_pull_then_caption(hub: FakeHub, images: Path, published: dict[str, bytes]) -> None:
    pulled = cli("pull", "caprl-3b")
    assert pulled.returncode == 0, pulled.stderr
    model, mmproj = map(Path, pulled.stdout.split())
    assert model == cache() / "models" / STATIC / "CapRL-3B.Q4_K_M.gguf"
    assert mmproj.name == "CapRL-3B.mmproj-f16.gguf"
    assert sha(model) == hashlib.sha256(published[model.name]).hexdigest()
    assert "Downloading CapRL-3B.Q4_K_M.gguf" in pulled.stderr  # one line per file when not a terminal
    captioned = cli("caption", str(images / "photo.jpg"), "--max-tokens", "8")  # default model, now cached
    assert captioned.returncode == 0, captioned.stderr
    assert captioned.stdout.strip() and captioned.stderr == ""


def test_from_pretrained_downloads_with_progress_as_data(hub: FakeHub, images: Path) -> None:
    events = []
    with Captioner.from_pretrained("caprl-3b", quant="q8_0", progress=events.append, threads=1) as cap:
        assert cap.files.quant == "Q8_0" and cap.default_prompt == "Please describe this image in detail"
        assert cap.caption(images / "photo.jpg", max_tokens=4).text
    finished = {e.filename for e in events if e.downloaded == e.total}
    assert finished == {"CapRL-3B.Q8_0.gguf", "CapRL-3B.mmproj-f16.gguf"}


def test_imatrix_quant_pairs_with_the_static_repos_projector(hub: FakeHub) -> None:
    files = download_model("caprl-3b", imatrix=True, mmproj_quant="Q8_0")
    assert files.model == cache() / "models" / IMATRIX / "CapRL-3B.i1-Q4_K_M.gguf"
    assert files.mmproj == cache() / "models" / STATIC / "CapRL-3B.mmproj-Q8_0.gguf"
    assert download_model("caprl-3b", imatrix=True, quant="IQ4_XS").model.name == "CapRL-3B.i1-IQ4_XS.gguf"


def test_unknown_quant_lists_the_available_ones(hub: FakeHub) -> None:
    with pytest.raises(UnknownModelError) as info:
        download_model("caprl-3b", quant="Q5_K_M")
    message = str(info.value)
    assert "no quant Q5_K_M" in message and "Q4_K_M (" in message and "Q8_0 (" in message and "KB" in message
    result = cli("pull", "caprl-3b", "--imatrix", "--quant", "Q2_K")
    assert result.returncode == 1 and "IQ4_XS" in result.stderr and "Traceback" not in result.stderr


def test_a_cut_connection_resumes_on_the_next_pull(hub: FakeHub, published: dict[str, bytes]) -> None:
    hub.cut_after[BIG], hub.cut_times[BIG] = 15_000_000, 100
    first = cli("pull", "caprl-3b", "--quant", "Q6_K")
    assert first.returncode == 1 and "run the same command again to resume" in first.stderr
    final = cache() / "models" / STATIC / BIG
    assert not final.exists()  # nothing partial is ever visible under its real name
    assert (final.parent / f".{BIG}.part").stat().st_size == 15_000_000
    hub.cut_times[BIG] = 0
    second = cli("pull", "caprl-3b", "--quant", "Q6_K")
    assert second.returncode == 0, second.stderr
    assert hub.downloads(BIG)[-1] == "bytes=15000000-"  # continued, not restarted
    assert sha(final) == hashlib.sha256(published[BIG]).hexdigest()
    assert not (final.parent / f".{BIG}.part").exists()


def test_corrupt_bytes_are_rejected_and_nothing_unverified_stays(hub: FakeHub) -> None:
    hub.corrupt.add("CapRL-3B.Q4_K_M.gguf")
    with pytest.raises(DownloadError, match="checksum mismatch"):
        download_model("caprl-3b")
    folder = cache() / "models" / STATIC
    assert not (folder / "CapRL-3B.Q4_K_M.gguf").exists()
    assert not list(folder.glob("*.part")) and not list(folder.glob(".*.part"))
    assert [c.filename for c in list_cached()] == ["CapRL-3B.mmproj-f16.gguf"]  # verified before it
    hub.corrupt.clear()
    assert download_model("caprl-3b").model.exists()


def test_two_concurrent_pulls_end_with_one_good_file(hub: FakeHub, published: dict[str, bytes]) -> None:
    procs = [subprocess.Popen([sys.executable, "-m", "caprl_local", "pull", "caprl-3b", "--quant", "Q6_K"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=HANG_S) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    folder = cache() / "models" / STATIC
    assert sorted(p.name for p in folder.iterdir()) == [
        BIG, "CapRL-3B.mmproj-f16.gguf"]
    assert sha(folder / BIG) == hashlib.sha256(published[BIG]).hexdigest()
    assert hub.downloads(BIG).count(None) == 1  # the second process waited, then found it in place


def test_offline_after_the_hub_is_gone(hub: FakeHub, images: Path) -> None:
    assert cli("pull", "caprl-3b").returncode == 0
    hub.stop()  # the network is down, HF_HUB_OFFLINE unset
    before = len(hub.requests)
    captioned = cli("caption", str(images / "photo.jpg"), "--max-tokens", "8")
    assert captioned.returncode == 0, captioned.stderr
    assert len(hub.requests) == before  # not one request
    listed = cli("models")
    assert listed.returncode == 0, listed.stderr
    assert "cached: CapRL-3B.Q4_K_M.gguf" in listed.stdout and "cannot reach" in listed.stdout
    assert listed.stdout.count("quants: not listed") == listed.stdout.count("  repo: ")  # every model says so
    data = json.loads(cli("models", "--json").stdout)
    entry = next(m for m in data if m["name"] == "caprl-3b")
    assert entry["available"] is None and entry["cached_bytes"] > 0 and "cannot reach" in entry["error"]
    assert all(m["error"] for m in data)
    hub.start()  # so the fixture can stop it


@pytest.mark.parametrize("how", [["--offline"], []])
def test_missing_files_offline_say_which_pull_fixes_it(hub: FakeHub, images: Path, how: list[str]) -> None:
    env = {} if how else {"HF_HUB_OFFLINE": "1"}
    result = cli("caption", str(images / "photo.jpg"), "--quant", "Q8_0", *how, env=env)
    assert result.returncode == 1
    assert "`caprl-local pull caprl-3b --quant Q8_0`" in result.stderr
    assert hub.requests == []
    with pytest.raises(OfflineError) as offline:
        download_model("caprl-3b", offline=True)
    assert "caprl-local" not in str(offline.value) and "--" not in str(offline.value)  # the CLI adds its hint
    assert (offline.value.model, offline.value.quant, offline.value.imatrix) == ("caprl-3b", "Q4_K_M", False)
    assert offline.value.quant_is_default and "Q4_K_M" in str(offline.value)  # the attribute names what the text does


def test_models_lists_quants_and_cache(hub: FakeHub) -> None:
    download_model("caprl-3b")
    data = json.loads(cli("models", "--json").stdout)
    names = [m["name"] for m in data]
    assert names[:1] == ["caprl-3b"] and {"caprl-qwen3vl-2b", "caprl-qwen3vl-4b"} <= set(names)
    entry = data[0]
    quants = {(q["quant"], q["imatrix"]): q for q in entry["available"] if not q["projector"]}
    assert quants[("Q4_K_M", False)]["cached"] and not quants[("Q8_0", False)]["cached"]
    assert ("IQ4_XS", True) in quants and entry["default_quant"] == "Q4_K_M"
    text = cli("models")
    assert text.returncode == 0 and "Q4_K_M" in text.stdout and "i1-IQ4_XS" in text.stdout


def test_rm_frees_the_space(hub: FakeHub) -> None:
    download_model("caprl-3b")
    download_model("caprl-3b", quant="Q8_0")
    one = cli("rm", "caprl-3b", "--quant", "Q8_0")
    assert one.returncode == 0 and "Removed 1 file" in one.stderr
    assert {c.filename for c in list_cached()} == {"CapRL-3B.Q4_K_M.gguf", "CapRL-3B.mmproj-f16.gguf"}
    everything = cli("rm", "caprl-3b")
    assert everything.returncode == 0 and "Removed 2 file" in everything.stderr
    folder = cache() / "models" / STATIC
    assert sum(p.stat().st_size for p in folder.iterdir()) == 0


def test_token_is_sent_for_private_repos(hub: FakeHub, published: dict[str, bytes]) -> None:
    hub.add("someone/Private-GGUF", "private-q4_k_m.gguf", published["CapRL-3B.Q4_K_M.gguf"])
    hub.add("someone/Private-GGUF", "mmproj-private-f16.gguf", published["CapRL-3B.mmproj-f16.gguf"])
    hub.tokens["someone/Private-GGUF"] = "hf_secret"
    denied = cli("pull", "someone/Private-GGUF")
    assert denied.returncode == 1 and "HF_TOKEN" in denied.stderr
    allowed = cli("pull", "someone/Private-GGUF", env={"HF_TOKEN": "hf_secret"})
    assert allowed.returncode == 0, allowed.stderr
    assert Path(allowed.stdout.split()[0]).name == "private-q4_k_m.gguf"  # another publisher's naming


def test_not_enough_disk_space_is_checked_first(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(DownloadError, match="disk space"):
        download_model("caprl-3b")
    assert [r for r in hub.requests if r[0] == "GET" and "/resolve/" in r[1]] == []


def test_full_disk_and_unreachable_hub_are_one_line_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    full = translate_error(OSError(errno.ENOSPC, "No space left on device"), "downloading x", Path("/cache"))
    assert "disk is full" in str(full) and "resume" in str(full) and not isinstance(full, HubUnreachableError)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(HubUnreachableError, match="cannot reach"):
        download_model("caprl-3b")


def count_listings(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The repos list_models asks the Hub for, in order (the real listing still runs)."""
    asked: list[str] = []
    real = hub_module.list_repo_files

    def counting(repo: str, **kwargs: str | None) -> list[hub_module.RemoteFile]:
        asked.append(repo)
        return real(repo, **kwargs)

    monkeypatch.setattr(hub_module, "list_repo_files", counting)
    return asked


def test_models_stop_asking_a_hub_that_cannot_be_reached(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # a closed port: refused at once
    asked = count_listings(monkeypatch)
    listings = list_models()
    assert len(listings) >= 3 and all(item.available is None for item in listings)
    assert asked == [listings[0].spec.repo]  # the first refusal is typed, so no other repo is tried
    assert "cannot reach http://127.0.0.1:9" in (listings[0].error or "")
    assert [item.error for item in listings[1:]] == ["the Hub could not be reached"] * (len(listings) - 1)
    with pytest.raises(HubUnreachableError):
        hub_module.list_repo_files(listings[1].spec.repo)


def test_models_keep_asking_after_a_repo_the_hub_does_not_have(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    asked = count_listings(monkeypatch)
    listings = list_models()  # only the CapRL-3B repos exist on this Hub: the others answer 404
    assert listings[0].available and listings[0].error is None
    missing = [item for item in listings if item.available is None]
    assert missing and all("HTTP 404" in (item.error or "") for item in missing)
    every_repo = {r for item in listings for r in (item.spec.repo, item.spec.imatrix_repo, item.spec.mmproj_repo) if r}
    assert set(asked) == every_repo  # a missing repo is that model's error, not a reason to stop asking


def test_local_paths_find_the_projector_beside_the_model(tiny_model: tuple[Path, Path], tmp_path: Path,
                                                         images: Path) -> None:
    model, mmproj = tiny_model
    assert download_model(str(model)).mmproj == mmproj
    lonely = tmp_path / "model.gguf"
    lonely.write_bytes(model.read_bytes())
    with pytest.raises(NoProjectorError, match="no vision projector"):
        download_model(str(lonely))
    photo = str(images / "photo.jpg")
    told = run_cli("caption", photo, "--model", str(lonely))
    assert told.returncode == 1 and told.stderr.strip().endswith("name the projector's .gguf with --mmproj")
    swapped = run_cli("caption", photo, "--model", str(mmproj))  # the projector given as the model
    assert swapped.returncode == 1 and "is a vision projector (mmproj), not a text model" in swapped.stderr
    assert "give its vision projector" not in swapped.stderr


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("CapRL-3B.Q4_K_M.gguf", ("Q4_K_M", False)),
        ("CapRL-3B.i1-IQ4_XS.gguf", ("IQ4_XS", True)),
        ("CapRL-3B.mmproj-f16.gguf", ("f16", False)),
        ("CapRL-3B.mmproj-Q8_0.gguf", ("Q8_0", False)),
        ("Qwen2-VL-2B-Instruct-Q4_K_M.gguf", ("Q4_K_M", False)),
        ("qwen2-vl-2b-instruct-q4_k_m.gguf", ("q4_k_m", False)),
        ("mmproj-model-f32.gguf", ("f32", False)),
        ("CapRL-3B.BF16.gguf", ("BF16", False)),
        ("README.md", None),
    ],
)
def test_quant_names_of_different_publishers(name: str, expected: tuple[str, bool] | None) -> None:
    assert parse_quant(name) == expected


def test_a_server_that_stalls_after_the_headers_fails_fast(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    """Headers, then silence: a short read timeout (lowered here from 30 s), two tries, a clear error,
    and no empty .part left behind to 'resume' from."""
    from caprl_local import transfer

    monkeypatch.setattr(transfer, "READ_TIMEOUT_S", 0.5)
    hub.stall.add("CapRL-3B.mmproj-f16.gguf")
    with pytest.raises(DownloadError, match=r"the server stopped sending .*run the same command again to resume"):
        download_model("caprl-3b")
    folder = cache() / "models" / STATIC
    assert not list(folder.glob(".*.part"))
    assert len(hub.downloads("CapRL-3B.mmproj-f16.gguf")) == transfer.STALLS


@pytest.mark.parametrize(("kind", "body", "words"), [
    ("text/html", b"<html><body>Welcome to the airport wifi</body></html>", "answered with text/html, not the Hub's JSON"),
    ("application/json", b'[{"type": "file", "size": 12}]', "not a file listing"),
    ("application/json", b'{"error": "something"}', "not a file listing"),
    ("application/json", b'[{"type": "file", "path": "x.gguf", "size": "12"}]', "not a file listing"),
])
def test_a_listing_that_is_not_one_is_a_download_error(hub: FakeHub, kind: str, body: bytes, words: str) -> None:
    hub.listing_body[STATIC] = (kind, body)
    with pytest.raises(DownloadError) as info:
        download_model("caprl-3b")
    assert words in str(info.value) and f"listing {STATIC}" in str(info.value)
    assert not isinstance(info.value, HubUnreachableError)
    result = cli("pull", "caprl-3b")
    assert result.returncode == 1 and "unexpected" not in result.stderr and result.stderr.count("\n") == 1


def test_models_shows_what_one_listing_has_when_the_other_fails(hub: FakeHub) -> None:
    hub.forbidden.add(IMATRIX)  # the imatrix repo refuses; the static one answers
    entry = next(m for m in json.loads(cli("models", "--json").stdout) if m["name"] == "caprl-3b")
    assert entry["available"] and all(not f["imatrix"] for f in entry["available"])  # the static quants are shown
    assert IMATRIX in entry["error"]  # and what is missing is said
    text = cli("models").stdout
    assert "quants: Q4_K_M" in text.replace("i1-", "") and "partly listed" in text


def test_a_stalled_hub_is_named_at_once_and_given_up_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Hub that takes the connection and never answers: the terminal says at once what is awaited, and the
    wait ends (within the listing timeout) in one error line."""
    import socket
    import threading

    from helpers import run_on_a_terminal

    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.extend(iter(lambda: listener.accept()[0], None)), daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{listener.getsockname()[1]}")
    monkeypatch.setenv("CAPRL_LOCAL_HOME", str(tmp_path / "cache"))
    try:
        code, seen = run_on_a_terminal(["pull", "caprl-3b"])
        assert code == 1, seen
        assert seen.index("Asking the Hub for caprl-3b's files") < seen.index("Error:")
        assert seen.count("Error:") == 1 and "--offline" not in seen
        code, seen = run_on_a_terminal(["models"])
        assert code == 0 and "Asking the Hub for the models' files" in seen, seen
    finally:
        listener.close()
        for conn in held:
            conn.close()
