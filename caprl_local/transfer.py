"""Bytes from the Hub: HTTP with the Hub's headers, and a resumable, verified, locked download of one file.

The only module that imports huggingface_hub or speaks HTTP; hub.py decides *what* to fetch and
*where* it goes, this module only moves bytes. A file is downloaded into a hidden
``.<name>.part`` beside its final path (where an interrupted download resumes), checked against
the sha256 the Hub publishes, and only then renamed into place, so every visible file is
complete and verified. Network and disk exceptions become caprl-local's errors here, once.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import http.client
import logging
import os
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from .errors import CaprlError, DownloadError, HubUnreachableError, NoSpaceError

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


# --- HTTP ------------------------------------------------------------------------------------


def endpoint_url() -> str:
    """The Hub's base URL: $HF_ENDPOINT, else huggingface.co.

    Read at call time, not cached: huggingface_hub reads HF_ENDPOINT once, at import,
    and tests (and long-lived apps) change it afterwards.
    """
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


@functools.cache
def _hf() -> Any:
    """huggingface_hub, imported on first use, with its own stderr log handler removed:
    the library never prints; its records still reach logging's root for apps to show."""
    import huggingface_hub
    import huggingface_hub.utils

    hf_log = logging.getLogger("huggingface_hub")
    for handler in list(hf_log.handlers):
        if type(handler) is logging.StreamHandler:
            hf_log.removeHandler(handler)
    hf_log.propagate = True
    return huggingface_hub


def open_url(url: str, *, token: str | None, timeout: float, headers: dict[str, str] | None = None) -> Any:
    """An HTTP request with the Hub's headers (token, user agent); redirects elsewhere drop the token."""
    hub_headers = _hf().utils.build_hf_headers(token=token, library_name="caprl-local")
    request = urllib.request.Request(url, headers={**hub_headers, **(headers or {})})
    return urllib.request.build_opener(_DropAuthOnRedirect()).open(request, timeout=timeout)


class _DropAuthOnRedirect(urllib.request.HTTPRedirectHandler):
    """Follow the Hub's redirects to its file storage without sending the token there."""

    def redirect_request(self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str,
                         headers: http.client.HTTPMessage, newurl: str) -> urllib.request.Request | None:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlsplit(newurl).netloc != urllib.parse.urlsplit(req.full_url).netloc:
            new.headers = {k: v for k, v in new.headers.items() if k.lower() != "authorization"}
            new.unredirected_hdrs = {k: v for k, v in new.unredirected_hdrs.items() if k.lower() != "authorization"}
        return new


# --- where a download lives until it is verified ---------------------------------------------


def part_path(final: Path) -> Path:
    """The hidden file `final`'s bytes accumulate in; a later pull resumes from it."""
    return final.with_name(f".{final.name}.part")


def lock_path(final: Path, root: Path | None = None) -> Path:
    """The lock file that serialises processes pulling the same file: under ``root/.locks``
    (out of sight, as the Hub's own cache keeps them), else beside the file."""
    if root is None:
        return final.with_name(f".{final.name}.lock")
    return root / ".locks" / final.relative_to(root).with_name(f"{final.name}.lock")


def partial_downloads(folder: Path) -> list[Path]:
    """Every unfinished download in a folder, including those whose final file never appeared."""
    return sorted(folder.glob(".*.part"))


# --- one file ----------------------------------------------------------------------------------


class _ConnectionClosed(ConnectionError):
    """The server ended a transfer early; a ConnectionError so the retry loop resumes it."""


def fetch(remote: Fetchable, final: Path, *, token: str | None = None,
          progress: ProgressCallback | None = None, root: Path | None = None) -> Path:
    """Download one file to `final` (resuming a partial one), verify it, and return `final`.

    huggingface_hub's own downloader discards partial files when a transfer fails, so a cut
    connection would restart a 2 GB file from zero; this one keeps ``.<name>.part`` beside the
    final file and continues it with an HTTP Range request. A file lock serialises processes
    pulling the same file: the second one waits, then finds the file in place. Lock files
    stay (deleting one another process waits on would let two download at once), under
    ``root/.locks`` when ``root``, a folder above `final`, is given.
    """
    WeakFileLock = _hf().utils.WeakFileLock
    if _is_complete(final, remote):
        return final
    part = part_path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        lock = lock_path(final, root)
        lock.parent.mkdir(parents=True, exist_ok=True)
        with WeakFileLock(lock):
            if _is_complete(final, remote):  # another process finished it while we waited
                return final
            _check_space(part, remote)
            _download(remote, part, token=token, progress=progress)
            _verify(part, remote)
            os.replace(part, final)
    except CaprlError:
        raise
    except Exception as exc:  # noqa: BLE001 - network and disk failures become one typed error
        raise translate_error(exc, f"downloading {remote.repo}/{remote.filename}", final.parent) from exc
    log.info("verified %s (%s)", final, human_size(remote.size))
    return final


def _is_complete(final: Path, remote: Fetchable) -> bool:
    # Only a verified file is ever renamed into place, so the right size means done.
    return final.is_file() and final.stat().st_size == remote.size


def _download(remote: Fetchable, part: Path, *, token: str | None, progress: ProgressCallback | None) -> None:
    """Fetch the file's bytes into `part`, continuing what is already there; retry brief failures."""
    url = f"{endpoint_url()}/{remote.repo}/resolve/main/{urllib.parse.quote(remote.filename)}"
    attempts = stalls = 0
    while True:
        have = part.stat().st_size if part.exists() else 0
        if have == remote.size:
            return
        try:
            ranged = {"Range": f"bytes={have}-"} if have else {}
            with open_url(url, token=token, timeout=READ_TIMEOUT_S, headers=ranged) as response, \
                    open(part, "ab" if have else "wb") as out:
                if have and response.status != 206:  # the server ignored the range: start over
                    out.truncate(0)
                    have = 0
                done = have
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    done += len(chunk)
                    attempts = stalls = 0  # progress was made: brief failures may be retried again
                    if progress is not None:
                        progress(DownloadProgress(remote.filename, done, remote.size))
                out.flush()
                os.fsync(out.fileno())
            if done < remote.size:
                raise _ConnectionClosed(f"connection closed after {done:,} of {remote.size:,} bytes")
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
                raise _ConnectionClosed(f"the server stopped sending ({stalls} times {READ_TIMEOUT_S:g} s without a "
                                        "byte)") from exc
            log.warning("download of %s stalled; trying again", remote.filename)
        except (ConnectionError, http.client.HTTPException, urllib.error.URLError) as exc:
            if isinstance(getattr(exc, "reason", None), TimeoutError):  # a stall before the headers
                stalls += 1
                if stalls >= STALLS:
                    raise _ConnectionClosed(f"the server stopped answering ({stalls} times {READ_TIMEOUT_S:g} s)") from exc
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
            f"{remote.repo}/{remote.filename}: checksum mismatch (got sha256 {digest[:12]}..., "
            f"expected {remote.sha256[:12]}...); the corrupt download was deleted, pull again"
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
            f"{remote.filename}: needs {human_size(needed)} of disk space but {part.parent} has {human_size(free)} "
            "free; free some space or keep the cache on a larger disk"
        )


# --- errors and sizes ----------------------------------------------------------------------------


def translate_error(exc: Exception, doing: str, folder: Path | None = None) -> CaprlError:
    """One place where network and disk exceptions become ours.

    A Hub that cannot be reached at all becomes HubUnreachableError, so callers that
    would ask it again (list_models) can stop by type instead of by message text.
    """
    if isinstance(exc, CaprlError):
        return exc
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return NoSpaceError(f"{doing}: the disk is full ({folder}); free some space, then download again to resume")
    if isinstance(exc, urllib.error.HTTPError):
        if exc.code in (401, 403):
            return DownloadError(f"{doing}: access denied (HTTP {exc.code}); set HF_TOKEN to a token that can read it")
        if exc.code == 404:
            return DownloadError(f"{doing}: not found on {endpoint_url()} (HTTP 404); check the name")
        return DownloadError(f"{doing}: the Hub answered HTTP {exc.code}; try again later")
    if isinstance(exc, _ConnectionClosed):
        return DownloadError(f"{doing}: {exc}; run the same command again to resume where it stopped")
    if isinstance(exc, (urllib.error.URLError, OSError, http.client.HTTPException, ValueError)):
        reason = getattr(exc, "reason", None) or exc
        return HubUnreachableError(
            f"{doing}: cannot reach {endpoint_url()} ({reason}); check the network"
        )
    raise exc  # a bug of ours: let it surface as one


def human_size(n: int) -> str:
    """A byte count for messages: 950 B, 12 KB, 1.5 MB, 2.3 GB."""
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit in ("B", "KB") else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"  # pragma: no cover
