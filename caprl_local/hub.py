"""Model files from the Hugging Face Hub: resolve what to fetch, keep it in the cache, list and remove it.

Cached files live at ``<cache>/models/<owner>/<repo>/<name>``; every visible file there is complete
and verified (transfer.py puts it there only then) and is used without any network call. Which
files a model needs is read from the Hub's real file listings, so any publisher's naming works.
The bytes themselves, and all HTTP, are transfer.py's; this module never imports huggingface_hub.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import (
    CaprlError,
    DownloadError,
    HubUnreachableError,
    ModelFileError,
    NoProjectorError,
    OfflineError,
    UnknownModelError,
)
from .ggufmeta import read_gguf
from .registry import DEFAULT_MODEL, ModelSpec, get_model, is_repo_id
from .transfer import (
    DownloadProgress,
    ProgressCallback,
    endpoint_url,
    fetch,
    human_size,
    lock_path,
    open_url,
    part_path,
    partial_downloads,
    translate_error,
)

# DownloadProgress and ProgressCallback are defined in transfer but are part of this module's API
# (download_model's progress callback): callers import them from here.
__all__ = [
    "CachedFile", "DownloadProgress", "ModelFiles", "ModelListing", "ProgressCallback", "RemoteFile",
    "cache_root", "download_model", "list_cached", "list_models", "list_repo_files", "parse_quant",
    "remove_model", "resolve", "spec_for",
]

log = logging.getLogger("caprl_local")

# GGUF quant names as they appear in file names (case-insensitive), e.g. Q4_K_M, IQ4_XS, f16.
_QUANT = r"(?:I?Q[1-8](?:_[0-9A-Z]+)*|[BF]F?16|F32|TQ[12]_0|MXFP4)"
_QUANT_IN_NAME = re.compile(rf"(?:^|[.\-_])(i1-)?({_QUANT})\.gguf$", re.IGNORECASE)
_PROJECTOR_NAME = re.compile(r"mmproj|vision|projector", re.IGNORECASE)


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
class CachedFile:
    """A verified file in the cache."""

    repo: str
    filename: str
    path: Path
    size: int
    quant: str | None
    projector: bool
    imatrix: bool


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
    url: str | None = f"{endpoint_url()}/api/models/{repo}/tree/main?recursive=true"
    entries: list[dict[str, Any]] = []
    try:
        while url:
            with open_url(url, token=token, timeout=20) as response:
                entries += _listing_page(response, repo)
                url = _next_page(response.headers.get("Link"))
    except Exception as exc:  # noqa: BLE001 - every Hub failure becomes one typed error
        raise translate_error(exc, f"listing {repo}") from exc
    files = []
    for entry in entries:
        if entry.get("type") != "file":
            continue
        lfs = entry.get("lfs")
        oid = lfs.get("oid") if isinstance(lfs, dict) else None
        remote = _classify(repo, entry["path"], entry["size"], oid if isinstance(oid, str) else None)
        if remote is not None:
            files.append(remote)
    return files


def _listing_page(response: Any, repo: str) -> list[dict[str, Any]]:
    """One page of a repo's file listing, or DownloadError if the answer is not one (a captive
    portal's HTML page, a proxy's error, a truncated body)."""
    kind = response.headers.get_content_type()
    try:
        page = json.loads(response.read())
    except ValueError:
        raise DownloadError(f"listing {repo}: {endpoint_url()} answered with {kind}, not the Hub's JSON; "
                            "check HF_ENDPOINT or the network's proxy") from None
    if not isinstance(page, list) or not all(
            isinstance(e, dict) and isinstance(e.get("path"), str) and isinstance(e.get("size"), int)
            and not isinstance(e.get("size"), bool) and e["size"] >= 0 for e in page):
        raise DownloadError(f"listing {repo}: the Hub's answer is not a file listing (entries without a path "
                            "or size); try again later")
    return page


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
            continue  # a hidden file of a download in progress (transfer.part_path), not yet verified
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
    available = ", ".join(f"{f.quant} ({human_size(f.size)})" for f in sorted(candidates, key=lambda f: f.size))
    raise UnknownModelError(
        f"{what}: no {'imatrix ' if imatrix else ''}quant {quant} in {where}; "
        + (f"available: {available}" if available else "it has no GGUF quants")
    )


def _pick_projector(files: Iterable[RemoteFile], quant: str) -> RemoteFile | None:
    projectors = [f for f in files if f.projector]
    exact = [f for f in projectors if _same_quant(f.quant, quant)]
    ranked = exact or sorted(projectors, key=lambda f: -f.size)  # else the largest: the most precise
    return ranked[0] if ranked else None


def _model_repo(spec: ModelSpec, imatrix: bool) -> str:
    if not imatrix:
        return spec.repo
    if spec.imatrix_repo:
        return spec.imatrix_repo
    if spec.name == spec.repo:  # a bare owner/repo: its imatrix quants, if any, sit beside the static ones
        return spec.repo
    raise UnknownModelError(f"{spec.name}: no imatrix quants are published; use its static quants")


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
    mmproj = next((c for c in projectors if _same_quant(c.quant or "", mmproj_quant)),
                  projectors[0] if projectors else None)
    if model is None or mmproj is None:
        have = ", ".join(sorted({c.quant for c in models if c.quant})) or "nothing"
        raise OfflineError(
            f"{spec.name} {quant}{' (imatrix)' if imatrix else ''} is not in the cache ({have} cached) and the "
            "network may not be used; download it while online",
            model=spec.name, quant=None if quant == spec.default_quant else quant, imatrix=imatrix)
    return model, mmproj

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
        raise CaprlError(f"{name}: a projector (mmproj) goes with a model given as a .gguf path, not with a model name")
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
    # The projector first: it is small, so a bad token or a full disk shows before the big download.
    mmproj_path = fetch(mmproj_r, _final_path(root, mmproj_r.repo, mmproj_r.filename), token=token,
                        progress=progress, root=root)
    model_path = fetch(model_r, _final_path(root, model_r.repo, model_r.filename), token=token,
                       progress=progress, root=root)
    return ModelFiles(model_path, mmproj_path, spec.name, model_r.quant, mmproj_r.quant,
                      spec.architecture or None, spec.prompt)


def _projector_beside(model: Path) -> Path:
    """The one projector GGUF in the model's folder, if there is exactly one."""
    if read_gguf(model, role="model").is_projector:  # the projector given as the model: say that first
        raise ModelFileError(f"model {model}: is a vision projector (mmproj), not a text model; "
                             "give the text model's .gguf as the model")
    found = sorted(p for p in model.parent.glob("*.gguf") if _PROJECTOR_NAME.search(p.name) and p != model)
    if len(found) == 1:
        return found[0]
    raise NoProjectorError(
        f"{model}: no vision projector (mmproj) given, and "
        + (f"{len(found)} *mmproj*.gguf files beside it; name the one to use" if found
           else f"none beside it in {model.parent}; name the projector's .gguf")
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
    unreachable = None
    for spec in load_registry().values():
        repos = [r for r in (spec.repo, spec.imatrix_repo, spec.mmproj_repo) if r]
        available: tuple[RemoteFile, ...] | None = None
        error = unreachable or (None if online else "offline")
        if online:
            try:
                available = tuple(f for repo in dict.fromkeys(repos) for f in list_repo_files(repo))
            except HubUnreachableError as exc:
                error, online = str(exc), False  # the Hub is down: do not wait on it again for the next models
                unreachable = "the Hub could not be reached"
            except (DownloadError, OfflineError) as exc:
                error = str(exc)  # this repo only (missing, private): the next models are still asked
        out.append(ModelListing(spec, available, tuple(c for c in cached if c.repo in repos), error))
    return out


def remove_model(name: str, *, quant: str | None = None,
                 cache_dir: str | os.PathLike[str] | None = None) -> list[CachedFile]:
    """Delete a model's cached files (one quant, or all with its projector); returns what was removed."""
    spec = spec_for(name)
    root = cache_root(cache_dir)
    repos = {r for r in (spec.repo, spec.imatrix_repo, spec.mmproj_repo) if r}
    mine = [c for c in list_cached(root) if c.repo in repos]
    if quant is not None:
        mine = [c for c in mine if not c.projector and c.quant and _same_quant(c.quant, quant)]
    for c in mine:
        c.path.unlink(missing_ok=True)
        for leftover in (part_path(c.path), lock_path(c.path, root), lock_path(c.path)):
            leftover.unlink(missing_ok=True)
    if quant is None:  # partial downloads of files that never completed, too
        for repo in repos:
            for leftover in partial_downloads(root / "models" / repo):
                leftover.unlink(missing_ok=True)
    return mine
