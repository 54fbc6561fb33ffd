"""Bytes from the Hub: a resumable, verified, locked download of one file.

hub.py decides *what* to fetch and *where* it goes (cache.py), hubhttp.py speaks HTTP; this
module only moves bytes. A file is downloaded into a hidden ``.<name>.part`` beside its final
path (where an interrupted download resumes), checked against the sha256 the Hub publishes, and
only then renamed into place, so every visible file is complete and verified; its size is noted
under ``<cache>/.verified`` for later checks without the network.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import logging
import os
import shutil
import time
import urllib.error
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .cache import keep_record, lock_path, part_path
from .errors import CaprlError, DownloadError, NoSpaceError
from .hubhttp import ConnectionClosed, endpoint_url, hf, open_url, translate_error
from .printable import human_size, shown

log = logging.getLogger("caprl_local")

_SPACE_MARGIN = 64 * 1024 * 1024  # keep this much free beyond the file itself
_RETRIES = 3  # brief network failures retried (with resume) before a pull gives up
READ_TIMEOUT_S = 30.0  # a connection that sends nothing for this long has stalled
STALLS = 2  # stalled attempts without a single byte before a pull gives up


@dataclass(frozen=True)
class DownloadProgress:
    """Progress of one file's download, reported as data to a callback."""

    filename: str
    downloaded: int
    total: int | None


ProgressCallback = Callable[[DownloadProgress], None]


class Fetchable(Protocol):
    """What a download needs to know of a file (hub.RemoteFile is one); read-only, like a frozen dataclass."""

    @property
    def repo(self) -> str: ...

    @property
    def filename(self) -> str: ...

    @property
    def size(self) -> int: ...

    @property
    def sha256(self) -> str | None: ...


# --- one file ----------------------------------------------------------------------------------


def fetch(remote: Fetchable, final: Path, *, token: str | None = None, progress: ProgressCallback | None = None,
          root: Path | None = None, verify: bool = False) -> Path:
    """Download one file to `final` (resuming a partial one), verify it, and return `final`.

    huggingface_hub's own downloader discards partial files when a transfer fails, so a cut
    connection would restart a 2 GB file from zero; this one keeps ``.<name>.part`` beside the
    final file and continues it with an HTTP Range request. A file lock serialises processes
    pulling the same file: the second one waits, then finds the file in place. Lock files
    stay (deleting one another process waits on would let two download at once), under
    ``root/.locks`` when ``root``, a folder above `final`, is given; so are the records of what
    each file was verified against (``root/.verified``). A `final` of the wrong size is
    downloaded again; with `verify`, so is one whose sha256 differs from the Hub's (a read of the
    whole file, which is why only a pull asks for it).
    """
    WeakFileLock = hf().utils.WeakFileLock
    doing = f"downloading {remote.repo}/{shown(remote.filename)}"
    part = part_path(final)
    try:
        if final.exists() and not final.is_file():  # a folder (or a device) where the file goes
            raise DownloadError(f"{doing}: {final} is {'a folder' if final.is_dir() else 'not a regular file'}, "
                                "where the downloaded file goes; remove it, then download again")
        complete = _is_complete(final, remote)
        corrupt = complete and verify and _corrupt(final, remote)
        if complete and not corrupt:
            keep_record(final, root, remote.size, remote.sha256)
            return final
        if corrupt:
            log.warning("%s does not match the Hub's sha256; downloading it again", final)
        final.parent.mkdir(parents=True, exist_ok=True)
        lock = lock_path(final, root)
        lock.parent.mkdir(parents=True, exist_ok=True)
        with WeakFileLock(lock):
            if not corrupt and _is_complete(final, remote):  # another process finished it while we waited
                keep_record(final, root, remote.size, remote.sha256)
                return final
            _check_space(part, remote)
            _download(remote, part, token=token, progress=progress)
            _verify(part, remote)
            os.replace(part, final)
            keep_record(final, root, remote.size, remote.sha256)
    except CaprlError:
        raise
    except Exception as exc:  # noqa: BLE001 - network and disk failures become one typed error
        raise translate_error(exc, doing, final.parent, token=token, repo=remote.repo) from exc
    log.info("verified %s (%s)", final, human_size(remote.size))
    return final


def _is_complete(final: Path, remote: Fetchable) -> bool:
    # Only a verified file is ever renamed into place, so the right size means done.
    return final.is_file() and final.stat().st_size == remote.size


def _corrupt(final: Path, remote: Fetchable) -> bool:
    return bool(remote.sha256) and _sha256(final) != (remote.sha256 or "").lower()


def _download(remote: Fetchable, part: Path, *, token: str | None, progress: ProgressCallback | None) -> None:
    """Fetch the file's bytes into `part`, continuing what is already there; retry brief failures."""
    url = f"{endpoint_url()}/{remote.repo}/resolve/main/{urllib.parse.quote(remote.filename)}"
    attempts = stalls = 0
    while True:
        have = part.stat().st_size if part.exists() else 0
        if have == remote.size:
            return
        if have > remote.size:  # longer than the real file: nothing in it to resume from
            part.unlink()
            continue
        try:
            ranged = {"Range": f"bytes={have}-"} if have else {}
            with open_url(url, token=token, timeout=READ_TIMEOUT_S, headers=ranged) as response, \
                    open(part, "ab" if have else "wb") as out:
                if have and response.status != 206:  # the server ignored the range: start over
                    out.truncate(0)
                    have = 0
                done = have
                while chunk := response.read(min(1 << 20, remote.size - done + 1)):
                    done += len(chunk)
                    if done > remote.size:  # more than the listing said: never let a server fill the disk
                        break
                    out.write(chunk)
                    attempts = stalls = 0  # progress was made: brief failures may be retried again
                    if progress is not None:
                        progress(DownloadProgress(remote.filename, done, remote.size))
                out.flush()
                os.fsync(out.fileno())
            if done > remote.size:
                part.unlink()
                raise DownloadError(f"{remote.repo}/{shown(remote.filename)}: the Hub sent more than the {remote.size:,} "
                                    "bytes its listing gives; the download was deleted, try again later")
            if done < remote.size:
                raise ConnectionClosed(f"connection closed after {done:,} of {remote.size:,} bytes")
            return
        except urllib.error.HTTPError as exc:
            if exc.code == 416:  # the partial file is longer than the real one: start over
                part.unlink(missing_ok=True)
                continue
            raise
        except TimeoutError as exc:
            stalls += 1
            if part.exists() and part.stat().st_size == 0:
                part.unlink()  # nothing to resume from
            if stalls >= STALLS:
                raise ConnectionClosed(f"the server stopped sending ({stalls} times {READ_TIMEOUT_S:g} s without a "
                                        "byte)") from exc
            log.warning("download of %s stalled; trying again", remote.filename)
        except (ConnectionError, http.client.HTTPException, urllib.error.URLError) as exc:
            if isinstance(getattr(exc, "reason", None), TimeoutError):  # a stall before the headers
                stalls += 1
                if stalls >= STALLS:
                    raise ConnectionClosed(f"the server stopped answering ({stalls} times {READ_TIMEOUT_S:g} s)") from exc
                continue
            attempts += 1
            # Refused twice before a single byte arrived: the server is down, not flaky; fail fast.
            if attempts > _RETRIES or isinstance(exc, urllib.error.URLError) and have == 0 and attempts > 1:
                raise
            log.warning("download of %s interrupted (%s); resuming", remote.filename, exc)
            time.sleep(0.5 * attempts)


def _verify(part: Path, remote: Fetchable) -> None:
    digest = _sha256(part)
    if remote.sha256 and digest != remote.sha256.lower():
        part.unlink(missing_ok=True)  # never resume from bad bytes
        raise DownloadError(
            f"{remote.repo}/{shown(remote.filename)}: checksum mismatch (got sha256 {digest[:12]}..., "
            f"expected {shown(remote.sha256[:12])}...); the corrupt download was deleted, pull again"
        )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(functools.partial(fh.read, 1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_space(part: Path, remote: Fetchable) -> None:
    # Checked before the first byte: a full disk halfway through a 2 GB file helps nobody.
    have = part.stat().st_size if part.exists() else 0
    needed = remote.size - have + _SPACE_MARGIN
    free = shutil.disk_usage(part.parent).free
    if free < needed:
        raise NoSpaceError(
            f"{shown(remote.filename)}: needs {human_size(needed)} of disk space but {part.parent} has {human_size(free)} "
            "free; free some space or keep the cache on a larger disk"
        )
