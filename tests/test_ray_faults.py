"""What Ray clusters do to a run: actors that die (once, on every try of one image, while loading),
no cluster at the address, Ray's own arguments; all on a local Ray instance with the tiny model."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import HANG_S, descendants, run_cli

ray = pytest.importorskip("ray")

GOOD = ["photo.jpg", "alpha.png", "cmyk.jpg", "palette.png", "rotated.jpg", "deep16.png", "pixel.png", "animated.gif"]


def _busy_caption_actors(root: int) -> list[int]:
    """The caption actors of a run that are captioning a batch now (Ray names a worker's process
    after its actor class and the method it runs)."""
    found = []
    for pid in descendants(root):
        try:
            if b"MapBatches(_CaptionActor)).submit" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            continue
    return found


# The CLI tests come first: their Ray instances start in their own processes, before this module's.

@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds Ray's processes in Linux's /proc")
def test_an_actor_killed_mid_run_loses_no_image_and_keeps_stdout_for_results(
        tiny_model: tuple[Path, Path], images: Path, tmp_path: Path) -> None:
    model, mmproj = tiny_model
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(16):
        shutil.copy(images / GOOD[i % len(GOOD)], folder / f"img{i:02d}{Path(GOOD[i % len(GOOD)]).suffix}")
    common = ["-m", str(model), "--mmproj", str(mmproj), "-t", "1", "-n", "60", "--parallel", "1", "--format", "jsonl"]
    local = tmp_path / "local.jsonl"
    assert run_cli("caption", str(folder), *common, "-o", str(local)).returncode == 0
    expected = {r["path"]: r["caption"] for r in map(json.loads, local.read_text().splitlines())}

    out, err = tmp_path / "stdout.jsonl", tmp_path / "stderr.txt"
    with out.open("w") as stdout, err.open("w") as stderr:  # results on stdout: Ray's notices must not land there
        run = subprocess.Popen([sys.executable, "-m", "caprl_local", "caption", str(folder), *common,
                                "--ray", "--ray-actors", "2"], stdout=stdout, stderr=stderr, cwd=tmp_path)
        deadline, busy = time.monotonic() + HANG_S, []
        while time.monotonic() < deadline and run.poll() is None and not busy:
            busy = _busy_caption_actors(run.pid)
            time.sleep(0.02)
        assert run.poll() is None and busy, "the run ended before an actor could be killed"
        os.kill(busy[0], signal.SIGKILL)  # mid-batch, as the kernel's OOM killer would
        code = run.wait(timeout=HANG_S)
    assert code == 0, err.read_text()
    assert "Traceback" not in err.read_text()
    done = [json.loads(line) for line in out.read_text().splitlines()]  # every line a result
    assert sorted(r["path"] for r in done) == sorted(expected)  # each image once
    assert {r["path"]: r["caption"] for r in done} == expected


def test_ray_auto_with_no_cluster_is_one_line(tiny_model: tuple[Path, Path], images: Path, tmp_path: Path) -> None:
    """As on a machine with no Ray running: Ray's search for one finds no process and no address file."""
    model, mmproj = tiny_model
    nothing_running = ("import sys, ray._private.services as s\n"
                       "def none(): return []\n"
                       "none.cache_clear = lambda: None\n"
                       "s.find_gcs_addresses = none\n"
                       "from caprl_local.cli import main\n"
                       "sys.exit(main())")
    env = {**os.environ, "RAY_TMPDIR": str(tmp_path / "ray"), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    (tmp_path / "ray").mkdir()
    run = subprocess.run([sys.executable, "-c", nothing_running, "caption", str(images / "photo.jpg"), "-m", str(model),
                          "--mmproj", str(mmproj), "--ray", "auto"], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=HANG_S)
    assert run.returncode == 1, run.stderr
    assert run.stdout == ""
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: no Ray cluster is running"), run.stderr
    assert "ray start --head" in lines[0] and "unexpected" not in lines[0]


# In-process: one local Ray instance for the rest of the module, and caption actors with a crash
# built in (classes defined in the tests, which Ray ships to its workers by value).

@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    from caprl_local.ray import init_local

    if ray.is_initialized():
        ray.shutdown()
    init_local(num_cpus=2, logging_level=logging.ERROR, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def paths(images: Path) -> list[str]:
    return [str(images / name) for name in GOOD[:6]]


@pytest.fixture(scope="module")
def expected(tiny_model: tuple[Path, Path], paths: list[str]) -> list[str]:
    from caprl_local import Captioner

    with Captioner(*tiny_model, threads=1, parallel=1) as cap:
        return [r.text for r in cap.caption_many(paths, max_tokens=8)]  # type: ignore[union-attr]


def _run(actor: type, ds: Any, tiny_model: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    import caprl_local.ray as ray_module

    monkeypatch.setattr(ray_module, "_CaptionActor", actor)
    model, mmproj = tiny_model
    out = ray_module.caption_dataset(ds, model=str(model), mmproj=str(mmproj), parallel=1, max_tokens=8, batch_size=2,
                                     actors=2)
    return sorted(out.take_all(), key=lambda row: row["id"])


def _deaths(record: Path) -> int:
    return len(record.read_text().splitlines()) if record.exists() else 0


def test_an_actor_that_dies_once_costs_nothing_and_null_columns_stay_none(
        cluster: None, tiny_model: tuple[Path, Path], paths: list[str], expected: list[str],
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from caprl_local.ray import _CaptionActor

    record, victim = tmp_path / "deaths", paths[3]

    class DiesOnce(_CaptionActor):
        def _caption(self, images: list[Any]) -> list[Any]:
            if victim in images and not record.exists():
                record.write_text(f"{os.getpid()}\n")
                os._exit(1)  # as llama.cpp's crash, or the OOM killer, ends an actor
            return super()._caption(images)

    ds = ray.data.from_items([{"image": p, "id": i, "note": None} for i, p in enumerate(paths)])
    rows = _run(DiesOnce, ds, tiny_model, monkeypatch)
    assert _deaths(record) == 1
    assert [row["id"] for row in rows] == list(range(len(paths)))  # every image once
    assert [row["caption"] for row in rows] == expected  # as a local run captions them
    assert all(row["error"] is None and row["error_kind"] is None and row["note"] is None for row in rows), rows


def test_a_poison_image_is_that_images_failure_after_bounded_tries(
        cluster: None, tiny_model: tuple[Path, Path], paths: list[str], expected: list[str],
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Encoded bytes this time, and two images that kill their actor on every try."""
    from caprl_local.ray import BATCH_TRIES, IMAGE_TRIES, _CaptionActor

    record = tmp_path / "deaths"
    data = [Path(p).read_bytes() for p in paths]
    poison = {data[1], data[4]}

    class Poisoned(_CaptionActor):
        def _caption(self, images: list[Any]) -> list[Any]:
            if poison & set(images):
                with record.open("a") as f:
                    f.write(f"{os.getpid()} {len(images)}\n")
                os._exit(1)
            return super()._caption(images)

    ds = ray.data.from_items([{"image": b, "id": i} for i, b in enumerate(data)])
    rows = _run(Poisoned, ds, tiny_model, monkeypatch)
    assert [row["id"] for row in rows] == list(range(len(paths)))
    for i, row in enumerate(rows):
        if data[i] in poison:
            assert row["caption"] is None and row["error_kind"] == "EngineError", row
            assert row["error"].startswith(f"<{len(data[i])} bytes>: ") and "died" in row["error"]
            assert "\n" not in row["error"]
        else:
            assert row["caption"] == expected[i] and row["error"] is None
    assert 0 < _deaths(record) <= 2 * (BATCH_TRIES + IMAGE_TRIES)  # each poison batch: its tries, then one alone


def test_an_actor_that_dies_loading_every_time_ends_the_run_in_one_line(
        cluster: None, tiny_model: tuple[Path, Path], paths: list[str], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    import caprl_local.ray as ray_module
    from caprl_local.errors import EngineError

    record = tmp_path / "deaths"

    class DiesLoading(ray_module._CaptionActor):
        def _load(self, *args: Any) -> None:
            with record.open("a") as f:
                f.write(f"{os.getpid()}\n")
            os._exit(1)

    monkeypatch.setattr(ray_module, "_CaptionActor", DiesLoading)
    model, mmproj = tiny_model
    captioner = ray_module.RayCaptioner(str(model), mmproj=str(mmproj), parallel=1)
    with pytest.raises(EngineError) as caught:
        list(captioner.caption_many(paths[:2], max_tokens=8))
    message = str(caught.value)
    assert "\n" not in message and f"died {ray_module.LOAD_TRIES} times in a row loading it" in message, message
    assert isinstance(caught.value.__cause__, ray.exceptions.RayError)  # translated once, from Ray's error
    assert _deaths(record) == ray_module.LOAD_TRIES


def test_an_actor_that_cannot_start_is_one_line(cluster: None, tiny_model: tuple[Path, Path], paths: list[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """An error that is not caprl-local's own (Ray passes on only its text) still ends as one line."""
    import caprl_local.ray as ray_module
    from caprl_local.errors import CaprlError

    class Broken(ray_module._CaptionActor):
        def _load(self, *args: Any) -> None:
            raise RuntimeError("the loader broke")

    monkeypatch.setattr(ray_module, "_CaptionActor", Broken)
    model, mmproj = tiny_model
    with pytest.raises(CaprlError) as caught:
        list(ray_module.RayCaptioner(str(model), mmproj=str(mmproj)).caption_many(paths[:1]))
    assert str(caught.value) == "a Ray caption actor could not start: RuntimeError: the loader broke"
    assert isinstance(caught.value.__cause__, ray.exceptions.RayActorError)


def test_a_model_error_in_the_actors_arrives_typed(cluster: None, tiny_model: tuple[Path, Path], paths: list[str],
                                                   tmp_path: Path) -> None:
    from caprl_local.errors import ModelFileError
    from caprl_local.ray import RayCaptioner

    _, mmproj = tiny_model
    with pytest.raises(ModelFileError) as caught:
        list(RayCaptioner(str(tmp_path / "missing.gguf"), mmproj=str(mmproj)).caption_many(paths[:1]))
    assert "missing.gguf" in str(caught.value) and "\n" not in str(caught.value)


def test_caption_dataset_passes_ray_no_deprecated_arguments(cluster: None, tiny_model: tuple[Path, Path]) -> None:
    from caprl_local.ray import caption_dataset

    model, mmproj = tiny_model
    ds = ray.data.from_items([{"image": "a.jpg"}])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Ray's RayDeprecationWarning (ray_remote_args go in Ray 2.64) among them
        caption_dataset(ds, model=str(model), mmproj=str(mmproj), actors=2)
