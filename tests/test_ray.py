"""The same batch on Ray: a local Ray instance with the tiny model, through the CLI and caption_dataset."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import HANG_S, descendants, run_cli

ray = pytest.importorskip("ray")

GOOD = ["photo.jpg", "alpha.png", "cmyk.jpg", "palette.png", "rotated.jpg", "deep16.png", "pixel.png", "animated.gif"]


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def folder(images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ray-photos")
    for i in range(24):
        shutil.copy(images / GOOD[i % len(GOOD)], out / f"img{i:02d}{Path(GOOD[i % len(GOOD)]).suffix}")
    for broken in ("text.jpg", "truncated.jpg"):
        shutil.copy(images / broken, out / broken)
    return out


def test_a_ray_run_writes_what_a_local_run_writes_and_resumes_after_a_kill(
        tiny_model: tuple[Path, Path], folder: Path, tmp_path: Path) -> None:
    model, mmproj = tiny_model
    common = ["-m", str(model), "--mmproj", str(mmproj), "-t", "1", "-n", "200", "--parallel", "1", "--format", "jsonl"]
    local = tmp_path / "local.jsonl"
    assert run_cli("caption", str(folder), *common, "-o", str(local)).returncode == 1  # the broken images
    out = tmp_path / "ray.jsonl"
    args = [sys.executable, "-m", "caprl_local", "caption", str(folder), *common, "-o", str(out),
            "--ray", "--ray-actors", "2"]
    run = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + HANG_S
    while time.monotonic() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 2):
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)  # the driver dies mid-run
    run.communicate(timeout=HANG_S)
    again = subprocess.run(args, capture_output=True, text=True, timeout=HANG_S)
    assert again.returncode == 1, again.stderr  # the broken images again
    assert "Traceback" not in again.stderr and "2 failed" in again.stderr
    done = records(out)
    assert sorted(r["path"] for r in done) == sorted(r["path"] for r in records(local))  # each image once
    assert {r["path"]: r.get("caption") for r in done} == {r["path"]: r.get("caption") for r in records(local)}
    assert {r["path"]: r.get("error_kind") for r in done if "error" in r} == {
        str(folder / "text.jpg"): "ImageError", str(folder / "truncated.jpg"): "ImageError"}


def test_caption_dataset_adds_caption_columns(tiny_model: tuple[Path, Path], images: Path) -> None:
    from caprl_local import Captioner
    from caprl_local.ray import caption_dataset, init_local

    model, mmproj = tiny_model
    paths = [str(images / n) for n in GOOD[:4]] + [str(images / "empty.jpg")]
    with Captioner(model, mmproj, threads=1, parallel=1) as cap:
        expected = [r.text if hasattr(r, "text") else None for r in cap.caption_many(paths, max_tokens=10)]
    init_local(num_cpus=2)
    try:
        ds = ray.data.from_items([{"image": p, "id": i} for i, p in enumerate(paths)])
        rows = sorted(caption_dataset(ds, model=str(model), mmproj=str(mmproj), parallel=1, max_tokens=10,
                                      batch_size=2).take_all(), key=lambda row: row["id"])
    finally:
        ray.shutdown()
    assert [row["caption"] for row in rows] == expected
    assert rows[-1]["error_kind"] == "ImageError" and "empty" in rows[-1]["error"]
    assert all(row["generated_tokens"] == 10 for row in rows[:-1])
    assert all(row["error"] is None and row["error_kind"] is None for row in rows[:-1])  # None, never NaN


def _listening(pids: set[int]) -> list[str]:
    """The local addresses every TCP socket of these processes listens on (from /proc/net)."""
    inodes: set[str] = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*") if Path(f"/proc/{pid}/fd").is_dir() else []:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    addresses = []
    for table, size in (("tcp", 8), ("tcp6", 32)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            parts = line.split()
            if parts[3] == "0A" and parts[9] in inodes:  # LISTEN
                raw = parts[1].split(":")[0]
                words = [bytes.fromhex(raw[i:i + 8])[::-1] for i in range(0, size, 8)]
                addresses.append(str(ipaddress.ip_address(b"".join(words))))
    return addresses


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads the sockets from Linux's /proc")
def test_a_local_instance_listens_on_loopback_only() -> None:
    """The instance --ray and init_local start: every socket of Ray's processes on 127.0.0.1."""
    from caprl_local.ray import init_local

    if ray.is_initialized():
        ray.shutdown()
    init_local(num_cpus=1)
    try:
        ray.get(ray.remote(lambda: 1).remote())  # a worker started, too
        addresses = _listening(descendants(os.getpid()))
    finally:
        ray.shutdown()
    assert addresses, "no listening sockets found"
    loopback = [a for a in addresses if ipaddress.ip_address(a).is_loopback
                or getattr(ipaddress.ip_address(a), "ipv4_mapped", None) in (ipaddress.ip_address("127.0.0.1"),)]
    assert loopback == addresses, addresses
