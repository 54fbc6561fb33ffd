"""The first-load check (engine/probe.py): an isolated child, verdicts only for aborts, a store that follows the cache."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
from helpers import HANG_S
from PIL import Image

from caprl_local import Captioner, EngineError, ModelFileError
from caprl_local.engine import probe
from caprl_local.options import EngineOptions

OPTIONS = EngineOptions(threads=1)
NO_CORE = "import resource; resource.setrlimit(resource.RLIMIT_CORE, (0, 0))\n"  # a crash we cause leaves no core file

# Modules the child (or Python starting up) would import, planted where a captioned folder could hold them.
PLANTED = ["json", "subprocess", "signal", "ctypes", "numpy", "typing", "enum", "tempfile", "sitecustomize",
           "usercustomize", "llama_cpp", "gguf", "filelock"]
PLANTED_PACKAGES = ["PIL", "caprl_local"]


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache of this test's own, so that the check runs."""
    home = tmp_path / "cache"
    monkeypatch.setenv("CAPRL_LOCAL_HOME", str(home))
    return home


@pytest.fixture()
def children(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The command lines of the checks run in this test, in order."""
    calls: list[list[str]] = []
    real = probe._run_child

    def spy(command: list[str]) -> probe.ChildResult:
        calls.append(command)
        return real(command)

    monkeypatch.setattr(probe, "_run_child", spy)
    return calls


def _plant(folder: Path, marker: Path) -> None:
    """Modules that record their import in `marker` and then fail, so that an import from `folder` shows."""
    code = f"open({str(marker)!r}, 'a').write(__name__ + '\\n')\nraise ImportError('planted ' + __name__)\n"
    folder.mkdir(parents=True, exist_ok=True)
    for name in PLANTED:
        (folder / f"{name}.py").write_text(code)
    for name in PLANTED_PACKAGES:
        (folder / name).mkdir(exist_ok=True)
        (folder / name / "__init__.py").write_text(code)
    (folder / "evil.pth").write_text(f"import os; open({str(marker)!r}, 'a').write('pth\\n')\n")


def _verdicts(home: Path) -> dict[str, str]:
    return json.loads((home / "loaded-pairs.json").read_text())


def _verdict(home: Path, model: Path) -> list[str]:
    store = home / "loaded-pairs.json"
    if not store.exists():
        return []
    return [v for k, v in _verdicts(home).items() if str(Path(model).resolve()) in k]


# --- isolation from the working folder -------------------------------------------------------


@pytest.mark.parametrize("injection", ["cwd", "PYTHONPATH", "PYTHONSTARTUP", "PYTHONUSERBASE", "PYTHONHOME"])
def test_the_child_runs_isolated(tiny_model: tuple[Path, Path], tmp_path: Path, fresh_cache: Path,
                                 monkeypatch: pytest.MonkeyPatch, children: list[list[str]], injection: str) -> None:
    """Neither the working folder, nor PYTHON* variables, nor the user's site-packages put anything into the child."""
    planted, marker = tmp_path / "photos", tmp_path / "imported"
    _plant(planted, marker)
    monkeypatch.chdir(planted)
    if injection == "PYTHONPATH":
        monkeypatch.setenv("PYTHONPATH", str(planted))
    elif injection == "PYTHONSTARTUP":
        (planted / "startup.py").write_text(f"open({str(marker)!r}, 'a').write('startup\\n')\n")
        monkeypatch.setenv("PYTHONSTARTUP", str(planted / "startup.py"))
        monkeypatch.setenv("PYTHONINSPECT", "1")
    elif injection == "PYTHONUSERBASE":
        version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
        _plant(tmp_path / "userbase" / "lib" / version / "site-packages", marker)
        monkeypatch.setenv("PYTHONUSERBASE", str(tmp_path / "userbase"))
    elif injection == "PYTHONHOME":  # were it read, the child would find no standard library at all
        monkeypatch.setenv("PYTHONHOME", str(planted))
    model, mmproj = tiny_model
    probe.check_first_load(model, mmproj, OPTIONS)
    assert not marker.exists(), marker.read_text()
    assert _verdict(fresh_cache, model) == ["ok"]  # the child loaded the pair and captioned
    assert len(children) == 1 and children[0][:3] == [sys.executable, "-I", "-c"]


def test_the_child_starts_in_an_empty_folder_of_its_own(tiny_model: tuple[Path, Path], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    seen = tmp_path / "seen.json"
    _with_prefix(monkeypatch, "import json, os, sys\n"
                 f"json.dump([os.getcwd(), os.listdir(), sys.path], open({str(seen)!r}, 'w'))\n")
    planted = tmp_path / "photos"
    _plant(planted, tmp_path / "imported")
    monkeypatch.chdir(planted)
    probe.check_first_load(*tiny_model, OPTIONS)
    cwd, listing, path = json.loads(seen.read_text())
    assert Path(cwd) != planted and listing == [] and not Path(cwd).exists()  # and removed afterwards
    assert str(planted) not in path and "" not in path and cwd not in path


def test_a_planted_module_does_not_run_in_a_script_s_check(tiny_model: tuple[Path, Path], images: Path, tmp_path: Path,
                                                          fresh_cache: Path) -> None:
    """A program using the library, run from a folder of images that also holds json.py and friends."""
    planted, marker = tmp_path / "photos", tmp_path / "imported"
    _plant(planted, marker)
    shutil.copy(images / "photo.jpg", planted / "photo.jpg")
    script = tmp_path / "program" / "caption_them.py"
    script.parent.mkdir()
    script.write_text(
        "import sys\nfrom caprl_local import Captioner\n"
        "with Captioner(sys.argv[1], sys.argv[2], threads=1) as cap:\n"
        "    print(bool(cap.caption('photo.jpg', max_tokens=4).text))\n"
    )
    model, mmproj = tiny_model
    done = subprocess.run([sys.executable, str(script), str(model), str(mmproj)], cwd=planted, capture_output=True,
                          text=True, timeout=HANG_S, env={**os.environ, "CAPRL_LOCAL_HOME": str(fresh_cache)})
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr
    assert not marker.exists(), marker.read_text()
    assert _verdict(fresh_cache, model) == ["ok"]


def test_a_planted_module_does_not_run_in_the_cli_s_check(tiny_model: tuple[Path, Path], images: Path, tmp_path: Path,
                                                         fresh_cache: Path) -> None:
    planted, marker = tmp_path / "photos", tmp_path / "imported"
    _plant(planted, marker)
    shutil.copy(images / "photo.jpg", planted / "photo.jpg")
    # The command as installed (`python -m` would itself import from the working folder, as Python does).
    command = Path(sys.executable).with_name("caprl-local")
    cli = [str(command)] if command.exists() else [sys.executable, "-I", "-m", "caprl_local"]
    model, mmproj = tiny_model
    done = subprocess.run([*cli, "caption", "photo.jpg", "--model", str(model), "--mmproj", str(mmproj), "--threads", "1",
                           "--max-tokens", "4"], cwd=planted, capture_output=True, text=True, timeout=HANG_S,
                          env={**os.environ, "CAPRL_LOCAL_HOME": str(fresh_cache)}, stdin=subprocess.DEVNULL)
    assert done.returncode == 0 and done.stdout.strip(), done.stderr
    assert not marker.exists(), marker.read_text()
    assert _verdict(fresh_cache, model) == ["ok"]


def test_the_child_finds_the_package_where_the_parent_did(tiny_model: tuple[Path, Path], tmp_path: Path,
                                                          fresh_cache: Path) -> None:
    """A copy of the package reached only through sys.path (a source checkout): the child runs that copy too."""
    import caprl_local

    source = tmp_path / "checkout"
    shutil.copytree(Path(caprl_local.__file__).parent, source / "caprl_local",
                    ignore=shutil.ignore_patterns("__pycache__"))
    ran = tmp_path / "ran-from-the-copy"
    with open(source / "caprl_local" / "engine" / "probe_child.py", "a") as file:
        file.write(f"\nif sys.flags.isolated:  # in the child only (the parent imports it too)\n"
                   f"    open({str(ran)!r}, 'w').close()\n")
    script = tmp_path / "check.py"
    script.write_text(
        f"import sys\nsys.path.insert(0, {str(source)!r})\nimport caprl_local\n"
        f"assert caprl_local.__file__.startswith({str(source)!r}), caprl_local.__file__\n"
        "from caprl_local import Captioner\nCaptioner(sys.argv[1], sys.argv[2], threads=1).close()\n"
    )
    model, mmproj = tiny_model
    done = subprocess.run([sys.executable, str(script), str(model), str(mmproj)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=HANG_S, env={**os.environ, "CAPRL_LOCAL_HOME": str(fresh_cache)})
    assert done.returncode == 0, done.stderr
    assert ran.exists() and _verdict(fresh_cache, model) == ["ok"]


def test_relative_paths_reach_the_child(tiny_model: tuple[Path, Path], fresh_cache: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The child starts in a folder of its own: the paths it gets do not depend on the working folder."""
    model, mmproj = tiny_model
    monkeypatch.chdir(model.parent)
    probe.check_first_load(Path(model.name), Path(mmproj.name), OPTIONS)
    assert _verdict(fresh_cache, model) == ["ok"]


# --- which endings are verdicts ---------------------------------------------------------------


def _with_prefix(monkeypatch: pytest.MonkeyPatch, code: str) -> None:
    """The child runs `code` before anything else."""
    monkeypatch.setattr(probe, "_BOOTSTRAP", code + probe._BOOTSTRAP)


def _kill_when_started(pid_file: Path, signum: int) -> threading.Thread:
    def kill() -> None:
        deadline = time.monotonic() + HANG_S
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(int(pid_file.read_text()), signum)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_child_killed_from_outside_is_no_verdict(tiny_model: tuple[Path, Path], tmp_path: Path, fresh_cache: Path,
                                                   monkeypatch: pytest.MonkeyPatch, children: list[list[str]],
                                                   signum: int) -> None:
    pid_file, original = tmp_path / "child.pid", probe._BOOTSTRAP
    _with_prefix(monkeypatch, NO_CORE + f"import os, time\nopen({str(pid_file) + '.tmp'!r}, 'w').write(str(os.getpid()))\n"
                 f"os.replace({str(pid_file) + '.tmp'!r}, {str(pid_file)!r})\ntime.sleep({HANG_S})\n")
    killer = _kill_when_started(pid_file, signum)
    model, mmproj = tiny_model
    with pytest.raises(EngineError) as info:
        probe.check_first_load(model, mmproj, OPTIONS)
    killer.join()
    message = str(info.value)
    assert not isinstance(info.value, ModelFileError) and "\n" not in message
    assert f"projector {mmproj}" in message and signal.Signals(signum).name in message
    if signum == signal.SIGKILL:
        assert "memory" in message and "isolate=False" in message
    else:
        assert "from outside" in message and "again" in message
    assert _verdict(fresh_cache, model) == []  # nothing recorded
    monkeypatch.setattr(probe, "_BOOTSTRAP", original)
    probe.check_first_load(model, mmproj, OPTIONS)  # the next load checks again, and passes
    assert len(children) == 2 and _verdict(fresh_cache, model) == ["ok"]


def test_a_killed_check_fails_the_load_and_the_next_load_works(tiny_model: tuple[Path, Path], fresh_cache: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               children: list[list[str]]) -> None:
    original = probe._BOOTSTRAP
    _with_prefix(monkeypatch, "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")  # as the OOM killer does
    with pytest.raises(EngineError, match=r"was killed \(SIGKILL, most likely for lack of memory\)"):
        Captioner(*tiny_model, threads=1)
    monkeypatch.setattr(probe, "_BOOTSTRAP", original)
    with Captioner(*tiny_model, threads=1) as cap:
        assert cap.caption(Image.new("RGB", (32, 32), (10, 200, 30)), max_tokens=2).generated_tokens > 0
    assert len(children) == 2 and _verdict(fresh_cache, tiny_model[0]) == ["ok"]


def test_a_child_killed_as_the_out_of_memory_killer_does(tiny_model: tuple[Path, Path], fresh_cache: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever process is started: a SIGKILL is never taken for the files' fault."""
    real = subprocess.run
    suicide = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]
    monkeypatch.setattr(subprocess, "run", lambda command, **kw: real(suicide, **kw))
    with pytest.raises(EngineError, match="SIGKILL") as info:
        probe.check_first_load(*tiny_model, OPTIONS)
    assert not isinstance(info.value, ModelFileError) and _verdict(fresh_cache, tiny_model[0]) == []


@pytest.mark.parametrize("name", ["SIGABRT", "SIGSEGV", "SIGBUS", "SIGILL", "SIGFPE"])
def test_an_abort_or_a_crash_is_a_verdict(tiny_model: tuple[Path, Path], fresh_cache: Path,
                                          monkeypatch: pytest.MonkeyPatch, children: list[list[str]], name: str) -> None:
    _with_prefix(monkeypatch, NO_CORE + f"import os, signal\nos.kill(os.getpid(), signal.{name})\n")
    model, mmproj = tiny_model
    with pytest.raises(ModelFileError, match="llama.cpp aborts on this pair") as info:
        probe.check_first_load(model, mmproj, OPTIONS)
    assert name in str(info.value)
    assert _verdict(fresh_cache, model) == [f"aborted: {name}"]
    with pytest.raises(ModelFileError) as again:  # remembered: no second child
        probe.check_first_load(model, mmproj, OPTIONS)
    assert str(again.value) == str(info.value) and len(children) == 1


def test_the_reason_is_one_bounded_printable_line(tiny_model: tuple[Path, Path], fresh_cache: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """llama.cpp's last lines can echo a file's metadata: escape codes, line breaks, bidi controls, any length."""
    hostile = "\\x1b]0;owned\\x07\\x1b[2J/src/ggml.c:12: GGML_ASSERT(\\u202e" + "A" * 5000 + "\\r\\nError: fake) failed\\x00"
    _with_prefix(monkeypatch, NO_CORE + f"import os, sys\nprint('{probe.OK}')\nsys.stderr.write('{hostile}' * 3)\n"
                 "sys.stderr.flush()\nos.abort()\n")
    model, mmproj = tiny_model
    with pytest.raises(ModelFileError) as info:
        probe.check_first_load(model, mmproj, OPTIONS)
    message = str(info.value)
    assert message.isprintable() and len(message) < 600 and "\\x1b" in message and "\\u202e" in message
    stored = _verdict(fresh_cache, model)[0]
    assert stored.isprintable() and len(stored) < 300


def test_a_stored_reason_is_cleaned_too(tiny_model: tuple[Path, Path], fresh_cache: Path) -> None:
    model, mmproj = tiny_model
    fresh_cache.mkdir(parents=True)
    key = probe._key(model.resolve(), mmproj.resolve(), OPTIONS)
    (fresh_cache / "loaded-pairs.json").write_text(json.dumps({key: "aborted: \x1b[31mred\nsecond line" + "x" * 3000}))
    with pytest.raises(ModelFileError) as info:
        probe.check_first_load(model, mmproj, OPTIONS)
    assert str(info.value).isprintable() and len(str(info.value)) < 600


def test_the_child_s_output_is_bounded() -> None:
    """A child writing without end costs the parent TAIL_BYTES per stream, not what it wrote."""
    code = ("import sys\nblock = b'x' * 65536\n"
            "for _ in range(512): sys.stderr.buffer.write(block); sys.stdout.buffer.write(block)\n"
            "sys.stderr.buffer.write(b'THE END'); print('done')\n")
    tracemalloc.start()
    try:
        done = probe._run_child([sys.executable, "-c", code])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert done.returncode == 0 and not done.timed_out
    assert len(done.stderr) <= probe.TAIL_BYTES and done.stderr.endswith("THE END")
    assert len(done.stdout) <= probe.TAIL_BYTES and done.stdout.endswith("done\n")
    assert peak < 16 * probe.TAIL_BYTES  # 64 MiB went through


def test_a_child_that_could_not_run_is_no_verdict(tiny_model: tuple[Path, Path], fresh_cache: Path,
                                                  monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    _with_prefix(monkeypatch, "raise SystemExit('no such thing\\x1b[2J')\n")
    model, mmproj = tiny_model
    with caplog.at_level(logging.WARNING, logger="caprl_local"):
        probe.check_first_load(model, mmproj, OPTIONS)  # loads unchecked
    assert "loading it directly" in caplog.text and "\x1b" not in caplog.text
    assert _verdict(fresh_cache, model) == []


# --- where verdicts are kept ----------------------------------------------------------------


def test_verdicts_follow_the_cache_dir(tiny_model: tuple[Path, Path], tmp_path: Path, fresh_cache: Path) -> None:
    model, mmproj = tiny_model
    elsewhere = tmp_path / "elsewhere"
    probe.check_first_load(model, mmproj, OPTIONS, cache_dir=elsewhere)
    assert _verdict(elsewhere, model) == ["ok"] and not fresh_cache.exists()
    probe.check_first_load(model, mmproj, OPTIONS)  # $CAPRL_LOCAL_HOME: a store of its own
    assert _verdict(fresh_cache, model) == ["ok"]


def test_the_cli_and_from_pretrained_keep_verdicts_in_the_cache_dir_given(tiny_model: tuple[Path, Path],
                                                                         images: Path, tmp_path: Path, fresh_cache: Path) -> None:
    from helpers import run_cli

    model, mmproj = tiny_model
    given = tmp_path / "given"
    result = run_cli("caption", str(images / "photo.jpg"), "-m", str(model), "--mmproj", str(mmproj), "-t", "1",
                     "-n", "2", "--cache-dir", str(given))
    assert result.returncode == 0, result.stderr
    assert _verdict(given, model) == ["ok"] and not fresh_cache.exists()
    other = tmp_path / "other"
    with Captioner.from_pretrained(str(model), mmproj=str(mmproj), cache_dir=other, threads=1):
        pass
    assert _verdict(other, model) == ["ok"] and not fresh_cache.exists()


def test_an_unusable_store_is_kept_in_memory(tiny_model: tuple[Path, Path], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch, children: list[list[str]],
                                             caplog: pytest.LogCaptureFixture) -> None:
    in_the_way = tmp_path / "not-a-folder"
    in_the_way.write_text("a file where the cache should be")
    monkeypatch.setenv("CAPRL_LOCAL_HOME", str(in_the_way))
    model, mmproj = tiny_model
    with caplog.at_level(logging.WARNING, logger="caprl_local"):
        for _ in range(3):
            probe.check_first_load(model, mmproj, OPTIONS)
    assert len(children) == 1  # once per process, not once per load
    warnings = [r.getMessage() for r in caplog.records if "could not record" in r.getMessage()]
    assert len(warnings) == 1 and str(in_the_way) in warnings[0]
    assert in_the_way.read_text() == "a file where the cache should be"


def test_an_unusable_store_keeps_an_abort_in_memory(tiny_model: tuple[Path, Path], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch, children: list[list[str]]) -> None:
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "loaded-pairs.json").mkdir()  # a folder where the file should be
    _with_prefix(monkeypatch, NO_CORE + "import os\nos.abort()\n")
    model, mmproj = tiny_model
    for _ in range(2):
        with pytest.raises(ModelFileError, match="aborts on this pair"):
            probe.check_first_load(model, mmproj, OPTIONS)
    assert len(children) == 1


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    store = tmp_path / "cache" / "loaded-pairs.json"
    code = ("import sys\nfrom pathlib import Path\nfrom caprl_local.engine import probe\n"
            "for i in range(25): probe._record(Path(sys.argv[1]), f'{sys.argv[2]}-{i}', 'ok')\n")
    writers = [subprocess.Popen([sys.executable, "-c", code, str(store), f"w{n}"]) for n in range(6)]
    assert [w.wait(timeout=HANG_S) for w in writers] == [0] * 6
    verdicts = json.loads(store.read_text())
    assert set(verdicts) == {f"w{n}-{i}" for n in range(6) for i in range(25)}
    assert not [p for p in store.parent.iterdir() if p.name.endswith(".tmp")]


def test_threads_recording_at_once_lose_nothing(tmp_path: Path) -> None:
    store = tmp_path / "loaded-pairs.json"
    threads = [threading.Thread(target=lambda n=n: [probe._record(store, f"t{n}-{i}", "ok") for i in range(15)])
               for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(HANG_S)
    assert set(json.loads(store.read_text())) == {f"t{n}-{i}" for n in range(6) for i in range(15)}


def test_threads_loading_one_pair_share_one_check(tiny_model: tuple[Path, Path], fresh_cache: Path,
                                                  children: list[list[str]]) -> None:
    errors: list[BaseException] = []

    def load() -> None:
        try:
            probe.check_first_load(*tiny_model, OPTIONS)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(HANG_S)
    assert errors == [] and len(children) == 1 and _verdict(fresh_cache, tiny_model[0]) == ["ok"]


@pytest.mark.parametrize("content", [
    b"{" + b'"k": "ok", ' * 120_000 + b'"last": "ok"}',  # over a megabyte
    b"[" * 200_000,  # nesting deeper than the parser's recursion
    b'["ok"]', b"\xff\xfe not json", b"",
    json.dumps({"a": 5, "b": "aborted", "c": ["ok"], "d": "x" * 5000}).encode(),
])
def test_a_hostile_store_is_ignored_then_replaced(tmp_path: Path, content: bytes) -> None:
    store = tmp_path / "loaded-pairs.json"
    store.write_bytes(content)
    assert probe._read(store) == {}
    probe._record(store, "pair", "ok")
    assert json.loads(store.read_text()) == {"pair": "ok"}


def test_a_fifo_in_place_of_the_store_does_not_hang(tmp_path: Path) -> None:
    store = tmp_path / "loaded-pairs.json"
    os.mkfifo(store)
    assert probe._read(store) == {}
    probe._record(store, "pair", "ok")
    assert json.loads(store.read_text()) == {"pair": "ok"}


def test_the_store_keeps_the_newest_entries(tmp_path: Path) -> None:
    store = tmp_path / "loaded-pairs.json"
    store.write_text(json.dumps({f"old-{i}": "ok" for i in range(probe.MAX_ENTRIES)}))
    probe._record(store, "old-0", "ok")  # seen again: now the newest
    probe._record(store, "new", "aborted: SIGABRT")
    verdicts = json.loads(store.read_text())
    assert len(verdicts) == probe.MAX_ENTRIES and verdicts["new"] == "aborted: SIGABRT"
    assert "old-0" in verdicts and "old-1" not in verdicts and list(verdicts)[-1] == "new"


def test_clean() -> None:
    assert probe.clean("a\tb\nc\x1b[0m\u202ed\x00") == "a\\tb\\nc\\x1b[0m\\u202ed\\x00"
    assert probe.clean("é ✓ 文字") == "é ✓ 文字"
    assert len(probe.clean("\n" * 1000)) <= probe.REASON_CHARS + 3
    assert probe.reason("", signal.SIGABRT) == "SIGABRT"
    assert probe.reason("load\n/home/build/vendor/llama.cpp/ggml/src/ggml.c:42: GGML_ASSERT(x) failed\nbye\n", 6) == \
        "ggml.c:42: GGML_ASSERT(x) failed"
