"""Model files from the Hugging Face Hub: resolve, download, verify, cache.

The only module that imports huggingface_hub. A file is downloaded into a hidden
``.<name>.part`` (where an interrupted download resumes), checked against the sha256
the Hub publishes, and only then renamed to ``<cache>/models/<owner>/<repo>/<name>``.
Every visible file there is complete and verified, and is used without any network call.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CaprlError, DownloadError, OfflineError, UnknownModelError
from .registry import DEFAULT_MODEL, ModelSpec, get_model, is_repo_id

log = logging.getLogger("caprl_local")

# GGUF quant names as they appear in file names (case-insensitive), e.g. Q4_K_M, IQ4_XS, f16.
_QUANT = r"(?:I?Q[1-8](?:_[0-9A-Z]+)*|[BF]F?16|F32|TQ[12]_0|MXFP4)"
_QUANT_IN_NAME = re.compile(rf"(?:^|[.\-_])(i1-)?({_QUANT})\.gguf$", re.IGNORECASE)
_PROJECTOR_NAME = re.compile(r"mmproj|vision|projector", re.IGNORECASE)
_SPACE_MARGIN = 64 * 1024 * 1024  # keep this much free beyond the file itself
_RETRIES = 3  # brief network failures retried (with resume) before a pull gives up


@dataclass(frozen=True)
class RemoteFile:
    """A GGUF in a Hub repo, as its file listing describes it."""

    repo: str
    filename: str
    size: int
    sha256: str | None  # from the LFS pointer; None for files stored outside LFS
    quant: str  # as written in the file name, e.g. Q4_K_M or f16
    projector: bool
    imatrix: bool


@dataclass(frozen=True)
class ModelFiles:
    """The local paths of a text model and its vision projector, ready for llama.cpp."""

    model: Path
    mmproj: Path
    name: str | None = None  # registry name, if it came from one
    quant: str | None = None
    mmproj_quant: str | None = None
    architecture: str | None = None
    prompt: str | None = None  # the model's own caption prompt, if the registry knows it


@dataclass(frozen=True)
class DownloadProgress:
    """Progress of one file's download, reported as data to a callback."""

    filename: str
    downloaded: int
    total: int | None


@dataclass(frozen=True)
class CachedFile:
    """A verified file in the cache."""

    repo: str
    filename: str
    path: Path
    size: int
    quant: str | None
    projector: bool
    imatrix: bool


ProgressCallback = Callable[[DownloadProgress], None]


# --- paths -------------------------------------------------------------------------------


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where models are cached: the argument, else $CAPRL_LOCAL_HOME, else the platform's cache dir."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("CAPRL_LOCAL_HOME"):
        return Path(os.environ["CAPRL_LOCAL_HOME"]).expanduser()
    from platformdirs import user_cache_path

    return user_cache_path("caprl-local")


def _final_path(root: Path, repo: str, filename: str) -> Path:
    return root / "models" / repo / filename


def _offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _endpoint() -> str | None:
    # Read at call time: huggingface_hub reads HF_ENDPOINT once, at import.
    return os.environ.get("HF_ENDPOINT") or None


def _endpoint_url() -> str:
    return (_endpoint() or "https://huggingface.co").rstrip("/")


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


# --- file names ----------------------------------------------------------------------------


def parse_quant(filename: str) -> tuple[str, bool] | None:
    """(quant, is imatrix) from a GGUF file name, or None if it names no quant."""
    base = filename.rsplit("/", 1)[-1]
    match = _QUANT_IN_NAME.search(base)
    if not match:
        return None
    return match.group(2), bool(match.group(1)) or ".i1-" in base.lower()


def _classify(repo: str, filename: str, size: int, sha256: str | None) -> RemoteFile | None:
    if not filename.lower().endswith(".gguf"):
        return None
    parsed = parse_quant(filename)
    projector = bool(_PROJECTOR_NAME.search(filename.rsplit("/", 1)[-1]))
    if parsed is None:
        if not projector:
            return None
        parsed = ("f16", False)  # a projector named without precision: llama.cpp's default is f16
    return RemoteFile(repo, filename, size, sha256, parsed[0], projector, parsed[1])


def _same_quant(a: str, b: str) -> bool:
    return a.upper() == b.upper()


# --- listing -------------------------------------------------------------------------------


def list_repo_files(repo: str, *, token: str | None = None) -> list[RemoteFile]:
    """The GGUFs in a Hub repo with their sizes and sha256, from the Hub's tree API.

    Asked directly rather than through HfApi, whose retries keep a user waiting
    for half a minute when the network is down.
    """
    url: str | None = f"{_endpoint_url()}/api/models/{repo}/tree/main?recursive=true"
    entries: list[dict[str, Any]] = []
    try:
        while url:
            with _open(url, token=token, timeout=20) as response:
                entries += json.load(response)
                url = _next_page(response.headers.get("Link"))
    except Exception as exc:  # noqa: BLE001 - every Hub failure becomes one typed error
        raise _translate(exc, f"listing {repo}") from exc
    files = []
    for entry in entries:
        if entry.get("type") != "file":
            continue
        lfs = entry.get("lfs") or {}
        remote = _classify(repo, entry["path"], int(entry["size"]), lfs.get("oid"))
        if remote is not None:
            files.append(remote)
    return files


def _open(url: str, *, token: str | None, timeout: float, headers: dict[str, str] | None = None) -> Any:
    """An HTTP request with the Hub's headers (token, user agent); redirects elsewhere drop the token."""
    hub_headers = _hf().utils.build_hf_headers(token=token, library_name="caprl-local")
    request = urllib.request.Request(url, headers={**hub_headers, **(headers or {})})
    return urllib.request.build_opener(_DropAuthOnRedirect()).open(request, timeout=timeout)


def _next_page(link: str | None) -> str | None:
    match = re.search(r'<([^>]+)>;\s*rel="next"', link or "")
    return match.group(1) if match else None


def list_cached(root: Path | None = None) -> list[CachedFile]:
    """Every verified file in the cache."""
    models = cache_root(root) / "models"
    out = []
    for path in sorted(models.glob("*/*/**/*.gguf")) if models.is_dir() else []:
        rel = path.relative_to(models).parts
        repo, filename = "/".join(rel[:2]), "/".join(rel[2:])
        if filename.startswith(".") or path.name.startswith("."):
            continue  # a temporary file of a download in progress
        kind = _classify(repo, filename, path.stat().st_size, None)  # named as on the Hub, read the same way
        if kind is not None:
            out.append(CachedFile(repo, filename, path, kind.size, kind.quant, kind.projector, kind.imatrix))
    return out


# --- resolution ----------------------------------------------------------------------------


def spec_for(name: str) -> ModelSpec:
    """A registry entry by name, or an ad-hoc spec for a bare owner/repo."""
    if is_repo_id(name):
        try:
            return get_model(name)
        except UnknownModelError:
            return ModelSpec(name=name, repo=name, architecture="", default_quant="Q4_K_M")
    return get_model(name)


def _pick(files: Iterable[RemoteFile], quant: str, *, imatrix: bool, what: str, where: str) -> RemoteFile:
    # An imatrix repo may name its files without "i1-"; a static pick never takes an i1 file.
    candidates = [f for f in files if not f.projector and (imatrix or not f.imatrix)]
    matches = sorted((f for f in candidates if _same_quant(f.quant, quant)), key=lambda f: f.imatrix != imatrix)
    if matches:
        return matches[0]
    available = ", ".join(f"{f.quant} ({_human(f.size)})" for f in sorted(candidates, key=lambda f: f.size))
    raise UnknownModelError(
        f"{what}: no {'imatrix ' if imatrix else ''}quant {quant} in {where}; "
        + (f"available: {available}" if available else "it has no GGUF quants")
    )


def _pick_projector(files: Iterable[RemoteFile], quant: str) -> RemoteFile | None:
    projectors = [f for f in files if f.projector]
    exact = [f for f in projectors if _same_quant(f.quant, quant)]
    return (exact or sorted(projectors, key=lambda f: -f.size) or [None])[0]


def _model_repo(spec: ModelSpec, imatrix: bool) -> str:
    if not imatrix:
        return spec.repo
    if spec.imatrix_repo:
        return spec.imatrix_repo
    if spec.name == spec.repo:  # a bare owner/repo: its imatrix quants, if any, sit beside the static ones
        return spec.repo
    raise UnknownModelError(f"{spec.name}: no imatrix quants are published; leave out --imatrix")


def resolve(
    spec: ModelSpec,
    *,
    quant: str | None = None,
    imatrix: bool = False,
    mmproj_quant: str | None = None,
    token: str | None = None,
) -> tuple[RemoteFile, RemoteFile]:
    """Choose the text model and projector files from the repos' real file listings."""
    quant = quant or spec.default_quant
    mmproj_quant = mmproj_quant or spec.default_mmproj_quant
    repo = _model_repo(spec, imatrix)
    listings: dict[str, list[RemoteFile]] = {repo: list_repo_files(repo, token=token)}
    model = _pick(listings[repo], quant, imatrix=imatrix, what=spec.name, where=repo)
    # The projector: the quant's own repo first, then the registry's projector repo.
    for mrepo in dict.fromkeys([repo, spec.mmproj_repo or spec.repo]):
        if mrepo not in listings:
            listings[mrepo] = list_repo_files(mrepo, token=token)
        mmproj = _pick_projector(listings[mrepo], mmproj_quant)
        if mmproj is not None:
            if not _same_quant(mmproj.quant, mmproj_quant):
                log.warning("%s has no %s projector; using %s", mrepo, mmproj_quant, mmproj.filename)
            return model, mmproj
    raise UnknownModelError(f"{spec.name}: no vision projector (mmproj) found in {', '.join(listings)}")


def _resolve_cached(spec: ModelSpec, root: Path, *, quant: str | None, imatrix: bool,
                    mmproj_quant: str | None) -> tuple[CachedFile, CachedFile]:
    quant = quant or spec.default_quant
    mmproj_quant = mmproj_quant or spec.default_mmproj_quant
    repo = _model_repo(spec, imatrix)
    cached = [c for c in list_cached(root) if c.repo in {repo, spec.mmproj_repo or spec.repo}]
    models = [c for c in cached if c.repo == repo and not c.projector and c.quant and (imatrix or not c.imatrix)]
    model = next((c for c in models if _same_quant(c.quant or "", quant)), None)
    projectors = [c for c in cached if c.projector]
    mmproj = next((c for c in projectors if _same_quant(c.quant or "", mmproj_quant)), projectors[0] if projectors else None)
    if model is None or mmproj is None:
        have = ", ".join(sorted({c.quant for c in models if c.quant})) or "nothing"
        pull = f"caprl-local pull {spec.name}" + (f" --quant {quant}" if quant != spec.default_quant else "") \
            + (" --imatrix" if imatrix else "")
        raise OfflineError(
            f"{spec.name} {quant}{' (imatrix)' if imatrix else ''} is not in the cache ({have} cached) and the "
            f"network may not be used; run `{pull}` while online"
        )
    return model, mmproj


# --- download ------------------------------------------------------------------------------


def fetch(remote: RemoteFile, *, root: Path, token: str | None = None,
          progress: ProgressCallback | None = None) -> Path:
    """Download one file (resuming a partial one), verify it, and move it into the cache.

    huggingface_hub's own downloader discards partial files when a transfer fails, so a cut
    connection would restart a 2 GB file from zero; this one keeps ``.<name>.part`` beside the
    final file and continues it with an HTTP Range request. A file lock serialises processes
    pulling the same file: the second one waits, then finds the file in place.
    """
    WeakFileLock = _hf().utils.WeakFileLock
    final = _final_path(root, remote.repo, remote.filename)
    if _is_complete(final, remote):
        return final
    part = final.with_name(f".{final.name}.part")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        with WeakFileLock(final.with_name(f".{final.name}.lock")):
            if _is_complete(final, remote):  # another process finished it while we waited
                return final
            _check_space(part, remote)
            _download(remote, part, token=token, progress=progress)
            _verify(part, remote)
            os.replace(part, final)
    except CaprlError:
        raise
    except Exception as exc:  # noqa: BLE001 - network and disk failures become one typed error
        raise _translate(exc, f"downloading {remote.repo}/{remote.filename}", final.parent) from exc
    log.info("verified %s (%s)", final, _human(remote.size))
    return final


def _is_complete(final: Path, remote: RemoteFile) -> bool:
    return final.is_file() and final.stat().st_size == remote.size


def _download(remote: RemoteFile, part: Path, *, token: str | None, progress: ProgressCallback | None) -> None:
    """Fetch the file's bytes into `part`, continuing what is already there; retry brief failures."""
    import urllib.request
    from urllib.parse import quote

    url = f"{_endpoint_url()}/{remote.repo}/resolve/main/{quote(remote.filename)}"
    attempts = 0
    while True:
        have = part.stat().st_size if part.exists() else 0
        if have == remote.size:
            return
        try:
            ranged = {"Range": f"bytes={have}-"} if have else {}
            with _open(url, token=token, timeout=30, headers=ranged) as response, \
                    open(part, "ab" if have else "wb") as out:
                if have and response.status != 206:  # the server ignored the range: start over
                    out.truncate(0)
                    have = 0
                done = have
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    done += len(chunk)
                    attempts = 0  # progress was made: brief failures may be retried again
                    if progress is not None:
                        progress(DownloadProgress(remote.filename, done, remote.size))
                out.flush()
                os.fsync(out.fileno())
            if done < remote.size:
                raise ConnectionError(f"connection closed after {done:,} of {remote.size:,} bytes")
            return
        except urllib.error.HTTPError as exc:
            if exc.code == 416:  # the partial file is longer than the real one: start over
                part.unlink(missing_ok=True)
                continue
            raise
        except (ConnectionError, TimeoutError, http.client.HTTPException, urllib.error.URLError) as exc:
            attempts += 1
            if attempts > _RETRIES or isinstance(exc, urllib.error.URLError) and have == 0 and attempts > 1:
                raise
            log.warning("download of %s interrupted (%s); resuming", remote.filename, exc)
            time.sleep(0.5 * attempts)


class _DropAuthOnRedirect(urllib.request.HTTPRedirectHandler):
    """Follow the Hub's redirects to its file storage without sending the token there."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlsplit(newurl).netloc != urllib.parse.urlsplit(req.full_url).netloc:
            new.headers = {k: v for k, v in new.headers.items() if k.lower() != "authorization"}
            new.unredirected_hdrs = {k: v for k, v in new.unredirected_hdrs.items() if k.lower() != "authorization"}
        return new


def _verify(part: Path, remote: RemoteFile) -> None:
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


def _check_space(part: Path, remote: RemoteFile) -> None:
    have = part.stat().st_size if part.exists() else 0
    needed = remote.size - have + _SPACE_MARGIN
    free = shutil.disk_usage(part.parent).free
    if free < needed:
        raise DownloadError(
            f"{remote.filename}: needs {_human(needed)} of disk space but {part.parent} has {_human(free)} free; "
            "free some space or use --cache-dir on a larger disk"
        )


def _translate(exc: Exception, doing: str, folder: Path | None = None) -> CaprlError:
    """One place where network and disk exceptions become ours."""
    if isinstance(exc, CaprlError):
        return exc
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return DownloadError(f"{doing}: the disk is full ({folder}); free some space and pull again to resume")
    if isinstance(exc, urllib.error.HTTPError):
        if exc.code in (401, 403):
            return DownloadError(f"{doing}: access denied (HTTP {exc.code}); set HF_TOKEN to a token that can read it")
        if exc.code == 404:
            return DownloadError(f"{doing}: not found on {_endpoint_url()} (HTTP 404); check the name")
        return DownloadError(f"{doing}: the Hub answered HTTP {exc.code}; try again later")
    if isinstance(exc, ConnectionError) and "connection closed" in str(exc):
        return DownloadError(f"{doing}: {exc}; run the same command again to resume where it stopped")
    if isinstance(exc, (urllib.error.URLError, OSError, http.client.HTTPException, ValueError)):
        reason = getattr(exc, "reason", None) or exc
        return DownloadError(
            f"{doing}: cannot reach {_endpoint_url()} ({reason}); check the network, "
            "or use --offline with files already cached"
        )
    raise exc  # a bug of ours: let it surface as one


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit in ("B", "KB") else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"  # pragma: no cover


# --- the public entry points ---------------------------------------------------------------


def download_model(
    name: str = DEFAULT_MODEL,
    *,
    mmproj: str | os.PathLike[str] | None = None,
    quant: str | None = None,
    imatrix: bool = False,
    mmproj_quant: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    offline: bool = False,
    progress: ProgressCallback | None = None,
    token: str | None = None,
) -> ModelFiles:
    """Make a model's text GGUF and projector available locally and return their paths.

    ``name`` is a registry name (``caprl-3b``), a Hub repo (``owner/name``), or a local .gguf
    (with ``mmproj``, or the one projector beside it). Cached files are used without any
    network call; missing ones are downloaded unless offline.
    """
    path = Path(name).expanduser()
    if name.lower().endswith(".gguf") or path.exists():
        return ModelFiles(path, Path(mmproj).expanduser() if mmproj else _projector_beside(path),
                          quant=(parse_quant(path.name) or (None,))[0])
    if mmproj is not None:
        raise CaprlError("--mmproj goes with a model given as a .gguf path, not with a model name")
    spec = spec_for(name)
    root = cache_root(cache_dir)
    try:
        model_c, mmproj_c = _resolve_cached(spec, root, quant=quant, imatrix=imatrix, mmproj_quant=mmproj_quant)
        return ModelFiles(model_c.path, mmproj_c.path, spec.name, model_c.quant, mmproj_c.quant,
                          spec.architecture or None, spec.prompt)
    except OfflineError:
        if offline or _offline_env():
            raise
    model_r, mmproj_r = resolve(spec, quant=quant, imatrix=imatrix, mmproj_quant=mmproj_quant, token=token)
    mmproj_path = fetch(mmproj_r, root=root, token=token, progress=progress)
    model_path = fetch(model_r, root=root, token=token, progress=progress)
    return ModelFiles(model_path, mmproj_path, spec.name, model_r.quant, mmproj_r.quant,
                      spec.architecture or None, spec.prompt)


def _projector_beside(model: Path) -> Path:
    """The one projector GGUF in the model's folder, if there is exactly one."""
    found = sorted(p for p in model.parent.glob("*.gguf") if _PROJECTOR_NAME.search(p.name) and p != model)
    if len(found) == 1:
        return found[0]
    where = f"{model.parent}" if model.parent.is_dir() else f"{model.parent} (no such folder)"
    raise CaprlError(
        f"{model}: give its vision projector with --mmproj "
        + (f"({len(found)} *mmproj*.gguf files in {where})" if found else f"(none found in {where})")
    )


@dataclass(frozen=True)
class ModelListing:
    """What is known of one registry model: what the Hub offers (None if unreachable) and what is cached."""

    spec: ModelSpec
    available: tuple[RemoteFile, ...] | None
    cached: tuple[CachedFile, ...]
    error: str | None = None  # why `available` is None, when the Hub was asked


def list_models(*, cache_dir: str | os.PathLike[str] | None = None, offline: bool = False) -> list[ModelListing]:
    """Every registry model with its published quants (unless offline) and its cached files."""
    from .registry import load_registry

    root = cache_root(cache_dir)
    cached = list_cached(root)
    out = []
    online = not (offline or _offline_env())
    for spec in load_registry().values():
        repos = [r for r in (spec.repo, spec.imatrix_repo, spec.mmproj_repo) if r]
        available: tuple[RemoteFile, ...] | None = None
        error = None if online else "offline"
        if online:
            try:
                available = tuple(f for repo in dict.fromkeys(repos) for f in list_repo_files(repo))
            except (DownloadError, OfflineError) as exc:
                error = str(exc)
                online = "cannot reach" not in error  # the Hub is down: do not wait on it again
        out.append(ModelListing(spec, available, tuple(c for c in cached if c.repo in repos), error))
    return out


def remove_model(name: str, *, quant: str | None = None, cache_dir: str | os.PathLike[str] | None = None) -> list[CachedFile]:
    """Delete a model's cached files (one quant, or all with its projector); returns what was removed."""
    spec = spec_for(name)
    root = cache_root(cache_dir)
    repos = {r for r in (spec.repo, spec.imatrix_repo, spec.mmproj_repo) if r}
    mine = [c for c in list_cached(root) if c.repo in repos]
    if quant is not None:
        mine = [c for c in mine if not c.projector and c.quant and _same_quant(c.quant, quant)]
    for c in mine:
        c.path.unlink(missing_ok=True)
        for leftover in (f".{c.path.name}.part", f".{c.path.name}.lock"):
            c.path.with_name(leftover).unlink(missing_ok=True)
    if quant is None:  # partial downloads of files that never completed, too
        for repo in repos:
            for leftover in (root / "models" / repo).glob(".*.part"):
                leftover.unlink(missing_ok=True)
    return mine
