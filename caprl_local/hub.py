"""Model files from the Hugging Face Hub: resolve what to fetch, keep it in the cache, list and remove it.

Cached files (cache.py: where they go, which names may) are used without any network call once
their size matches the one they were verified with. Which files a model needs is read from the
Hub's real file listings, so any publisher's naming works. The bytes themselves are transfer.py's
and all HTTP hubhttp.py's; this module never imports huggingface_hub.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .cache import (
    PROJECTOR_NAME,
    CachedFile,
    RemoteFile,
    bad_name,
    cache_names,
    cache_root,
    cached_file,
    check_repo,
    classify,
    final_path,
    keep_record,
    list_cached,
    lock_path,
    parse_quant,
    part_path,
    partial_downloads,
    record_path,
    recorded_size,
    same_quant,
)
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
from .hubhttp import endpoint_url, read_listing
from .printable import human_size, shown, some
from .registry import DEFAULT_MODEL, ModelSpec, get_model, is_repo_id
from .transfer import DownloadProgress, ProgressCallback, fetch

# DownloadProgress and ProgressCallback (transfer.py), and the cache's types (cache.py), are part
# of this module's API (download_model's progress callback, list_cached): callers import them from here.
__all__ = [
    "CachedFile", "DownloadProgress", "ModelFiles", "ModelListing", "ProgressCallback", "RemoteFile",
    "cache_root", "download_model", "list_cached", "list_models", "list_repo_files", "parse_quant",
    "remove_model", "resolve", "spec_for",
]

log = logging.getLogger("caprl_local")


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


# --- paths -------------------------------------------------------------------------------


def _offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


# --- listing -------------------------------------------------------------------------------


def list_repo_files(repo: str, *, token: str | None = None) -> list[RemoteFile]:
    """The GGUFs in a Hub repo with their sizes and sha256, from the Hub's tree API.

    Asked directly rather than through HfApi, whose retries keep a user waiting for half a minute
    when the network is down. A listing is network data: one whose GGUF names would not stay
    inside the repo's cache entry (``../``, absolute, control characters, ...) is refused whole,
    not filtered: a Hub that sends such a name is not to be trusted with the others either, and
    a silently skipped entry would turn into a confusing "no such quant".
    """
    check_repo(repo)
    doing = f"listing {repo}"
    entries = read_listing(f"{endpoint_url()}/api/models/{repo}/tree/main?recursive=true", token=token,
                           repo=repo, doing=doing)
    files = []
    for entry in entries:
        if not (isinstance(entry, dict) and isinstance(entry.get("path"), str) and isinstance(entry.get("size"), int)
                and not isinstance(entry["size"], bool) and 0 <= entry["size"] < 1 << 50):
            raise DownloadError(f"{doing}: the Hub's answer is not a file listing (entries without a path or size); "
                                "try again later")
        name = entry["path"]
        if entry.get("type") != "file" or not name.lower().endswith(".gguf"):
            continue  # never fetched, never a path: its name does not matter
        problem = bad_name(name)
        if problem:
            raise DownloadError(f"{doing}: the Hub lists a file named '{shown(name)}' ({problem}), which cannot be a "
                                "path in the cache; refusing the listing, nothing was downloaded")
        lfs = entry.get("lfs")
        oid = lfs.get("oid") if isinstance(lfs, dict) else None
        sha = oid.lower() if isinstance(oid, str) and re.fullmatch(r"[0-9a-fA-F]{64}", oid) else None
        remote = classify(repo, name, entry["size"], sha)
        if remote is not None:
            files.append(remote)
    return files


# --- resolution ----------------------------------------------------------------------------


def spec_for(name: str) -> ModelSpec:
    """A registry entry by name, or an ad-hoc spec for a bare owner/repo."""
    if is_repo_id(name):
        try:
            spec = get_model(name)
        except UnknownModelError:
            spec = ModelSpec(name=name, repo=name, architecture="", default_quant="Q4_K_M")
    else:
        spec = get_model(name)
    for repo in (spec.repo, spec.imatrix_repo, spec.mmproj_repo):
        if repo is not None:  # a repo id becomes a folder of the cache: it must be one the Hub could have
            check_repo(repo, UnknownModelError)
    return spec


def _pick(files: Iterable[RemoteFile], quant: str, *, imatrix: bool, what: str, where: str) -> RemoteFile:
    # An imatrix repo may name its files without "i1-"; a static pick never takes an i1 file.
    candidates = [f for f in files if not f.projector and (imatrix or not f.imatrix)]
    matches = sorted((f for f in candidates if same_quant(f.quant, quant)), key=lambda f: f.imatrix != imatrix)
    if matches:
        return matches[0]
    available = some(sorted(candidates, key=lambda f: f.size), lambda f: f"{shown(f.quant, 40)} ({human_size(f.size)})")
    raise UnknownModelError(
        f"{what}: no {'imatrix ' if imatrix else ''}quant {quant} in {where}; "
        + (f"available: {available}" if available else "it has no GGUF quants")
    )


def _pick_projector(files: Iterable[RemoteFile], quant: str) -> RemoteFile | None:
    projectors = [f for f in files if f.projector]
    exact = [f for f in projectors if same_quant(f.quant, quant)]
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
            if not same_quant(mmproj.quant, mmproj_quant):
                log.warning("%s has no %s projector; using %s", mrepo, mmproj_quant, shown(mmproj.filename))
            return model, mmproj
    raise UnknownModelError(f"{spec.name}: no vision projector (mmproj) found in {', '.join(listings)}")


def _resolve_cached(spec: ModelSpec, root: Path, *, quant: str | None, imatrix: bool,
                    mmproj_quant: str | None) -> tuple[CachedFile, CachedFile]:
    quant = quant or spec.default_quant
    mmproj_quant = mmproj_quant or spec.default_mmproj_quant
    repo = _model_repo(spec, imatrix)
    cached = [c for c in list_cached(root) if c.repo in {repo, spec.mmproj_repo or spec.repo}]
    models = [c for c in cached if c.repo == repo and not c.projector and c.quant and (imatrix or not c.imatrix)]
    model = next((c for c in models if same_quant(c.quant or "", quant)), None)
    projectors = [c for c in cached if c.projector]
    mmproj = next((c for c in projectors if same_quant(c.quant or "", mmproj_quant)),
                  projectors[0] if projectors else None)
    if model is None or mmproj is None:
        have = some(sorted({c.quant for c in models if c.quant}), lambda q: shown(q, 40)) or "nothing"
        raise OfflineError(
            f"{spec.name} {quant}{' (imatrix)' if imatrix else ''} is not in the cache ({have} cached) and the "
            "network may not be used; download it while online",
            model=spec.name, quant=quant, imatrix=imatrix, quant_is_default=quant == spec.default_quant)
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
    verify: bool = False,
) -> ModelFiles:
    """Make a model's text GGUF and projector available locally and return their paths.

    ``name`` is a registry name (``caprl-3b``), a Hub repo (``owner/name``), or a local .gguf
    (with ``mmproj``, or the one projector beside it). Cached files are used without any
    network call once their size is checked against the one they were verified with; missing or
    damaged ones are downloaded (again) unless offline. ``verify`` (what a pull asks for) checks the
    cached files against the Hub's listing, their sha256 included, and repairs any that differ.
    """
    path = Path(name).expanduser()
    if name.lower().endswith(".gguf") or path.exists():
        return ModelFiles(path, Path(mmproj).expanduser() if mmproj else _projector_beside(path),
                          quant=(parse_quant(path.name) or (None,))[0])
    if mmproj is not None:
        raise CaprlError(f"{name}: a projector (mmproj) goes with a model given as a .gguf path, not with a model name")
    spec = spec_for(name)
    root = cache_root(cache_dir)
    offline = offline or _offline_env()
    cached, damage = None, None
    try:
        model_c, mmproj_c = _resolve_cached(spec, root, quant=quant, imatrix=imatrix, mmproj_quant=mmproj_quant)
    except OfflineError:
        if offline:
            raise
    else:
        cached = ModelFiles(model_c.path, mmproj_c.path, spec.name, model_c.quant, mmproj_c.quant,
                            spec.architecture or None, spec.prompt)
        damage = _damage(root, model_c) or _damage(root, mmproj_c)
        if damage is None and (offline or not verify):
            return cached
        if damage is not None and offline:
            raise OfflineError(f"{spec.name}: {damage}, and the network may not be used; download it again while "
                               "online", model=spec.name, quant=quant or spec.default_quant, imatrix=imatrix,
                               quant_is_default=quant in (None, spec.default_quant))
        if damage is not None:
            log.warning("%s; downloading it again", damage)
    try:
        model_r, mmproj_r = resolve(spec, quant=quant, imatrix=imatrix, mmproj_quant=mmproj_quant, token=token)
    except HubUnreachableError as exc:
        if cached is None or damage is not None:
            # Nothing whole to fall back on, so going offline would not help either: say what is missing and the way left.
            missing = damage or (f"{spec.name} {quant or spec.default_quant}{' (imatrix)' if imatrix else ''} "
                                 "is not cached")
            raise HubUnreachableError(f"{exc}; {missing}: to caption without the Hub, give the path of a .gguf model "
                                      "file you already have in place of the name") from exc
        log.warning("%s; the cached files could not be verified against it", exc)  # still whole, so still usable
        return cached
    # The projector first: it is small, so a bad token or a full disk shows before the big download.
    mmproj_path = fetch(mmproj_r, final_path(root, mmproj_r.repo, mmproj_r.filename), token=token,
                        progress=progress, root=root, verify=verify)
    model_path = fetch(model_r, final_path(root, model_r.repo, model_r.filename), token=token,
                       progress=progress, root=root, verify=verify)
    return ModelFiles(model_path, mmproj_path, spec.name, model_r.quant, mmproj_r.quant,
                      spec.architecture or None, spec.prompt)


def _damage(root: Path, cached: CachedFile) -> str | None:
    """Why a cached file cannot be used as it is, or None. Its size is checked against the one it was
    verified with; a file cached without that record has its GGUF header read instead (then recorded)."""
    want = recorded_size(cached.path, root)
    if want is None:
        try:
            read_gguf(cached.path, role="cached file")
        except ModelFileError:
            return f"the cached {cached.path} is not a whole GGUF file"
        keep_record(cached.path, root, cached.size, None)
        return None
    return None if want == cached.size else f"the cached {cached.path} has {cached.size:,} bytes, not the {want:,} it had"


def _projector_beside(model: Path) -> Path:
    """The one projector GGUF in the model's folder, if there is exactly one."""
    if read_gguf(model, role="model").is_projector:  # the projector given as the model: say that first
        raise ModelFileError(f"model {model}: is a vision projector (mmproj), not a text model; "
                             "give the text model's .gguf as the model")
    found = sorted(p for p in model.parent.glob("*.gguf") if PROJECTOR_NAME.search(p.name) and p != model)
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
    error: str | None = None  # why `available` is None, or (beside it) which of the model's repos did not answer


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
            found: list[RemoteFile] = []
            answered, failures = 0, []
            for repo in dict.fromkeys(repos):
                try:
                    found += list_repo_files(repo)
                    answered += 1
                except HubUnreachableError as exc:
                    failures, online = [str(exc)], False  # the Hub is down: no waiting on it again, here or later
                    unreachable = "the Hub could not be reached"
                    break
                except (DownloadError, OfflineError) as exc:
                    failures.append(str(exc))  # this repo only (missing, private): its siblings are still shown
            available = tuple(found) if answered and online else None
            error = "; ".join(failures) or None  # with `available`, what the listing lacks (one repo did not answer)
        out.append(ModelListing(spec, available, tuple(c for c in cached if c.repo in repos), error))
    return out


def remove_model(name: str, *, quant: str | None = None,
                 cache_dir: str | os.PathLike[str] | None = None) -> list[CachedFile]:
    """Delete a model's cached files (one quant, or all with its projector), dangling links in their
    place included; returns what was removed."""
    spec = spec_for(name)
    root = cache_root(cache_dir)
    repos = {r for r in (spec.repo, spec.imatrix_repo, spec.mmproj_repo) if r}
    mine = [c for c in list_cached(root) if c.repo in repos]
    for repo, filename, path in cache_names(root / "models"):
        if repo in repos and path.is_symlink() and not path.exists():
            link = cached_file(repo, filename, path, 0)
            mine += [link] if link is not None else []
    if quant is not None:
        mine = [c for c in mine if not c.projector and c.quant and same_quant(c.quant, quant)]
    for c in mine:
        c.path.unlink(missing_ok=True)
        for leftover in (part_path(c.path), lock_path(c.path, root), lock_path(c.path), record_path(c.path, root)):
            leftover.unlink(missing_ok=True)
    if quant is None:  # partial downloads of files that never completed, too
        for repo in repos:
            for leftover in partial_downloads(root / "models" / repo):
                leftover.unlink(missing_ok=True)
    return mine
