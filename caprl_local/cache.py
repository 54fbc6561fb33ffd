"""The model cache on disk: where a listed file goes, which names may go there, what is there.

Cached files live at ``<cache>/models/<owner>/<repo>/<name>``, named as on the Hub. Names in a
listing are network data: only plain relative ones, made of safe parts, that stay inside the
repo's own folder ever become paths (checked when the listing is read and again where the path
is built). Beside them, out of sight: ``.<name>.part`` (a download in progress), ``.locks/`` and
``.verified/`` (the size and sha256 each file was verified with).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from .errors import CaprlError, DownloadError
from .hubhttp import translate_error
from .printable import shown
from .registry import valid_repo_id
from .safefiles import write_atomic

log = logging.getLogger("caprl_local")


# GGUF quant names as they appear in file names (case-insensitive), e.g. Q4_K_M, IQ4_XS, f16.
_QUANT = r"(?:I?Q[1-8](?:_[0-9A-Z]+)*|[BF]F?16|F32|TQ[12]_0|MXFP4)"
_QUANT_IN_NAME = re.compile(rf"(?:^|[.\-_])(i1-)?({_QUANT})\.gguf$", re.IGNORECASE)
PROJECTOR_NAME = re.compile(r"mmproj|vision|projector", re.IGNORECASE)


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
class CachedFile:
    """A verified file in the cache."""

    repo: str
    filename: str
    path: Path
    size: int
    quant: str | None
    projector: bool
    imatrix: bool


def parse_quant(filename: str) -> tuple[str, bool] | None:
    """(quant, is imatrix) from a GGUF file name, or None if it names no quant."""
    base = filename.rsplit("/", 1)[-1]
    match = _QUANT_IN_NAME.search(base)
    if not match:
        return None
    return match.group(2), bool(match.group(1)) or ".i1-" in base.lower()


def classify(repo: str, filename: str, size: int, sha256: str | None) -> RemoteFile | None:
    if not filename.lower().endswith(".gguf"):
        return None
    parsed = parse_quant(filename)
    projector = bool(PROJECTOR_NAME.search(filename.rsplit("/", 1)[-1]))
    if parsed is None:
        if not projector:
            return None
        parsed = ("f16", False)  # a projector named without precision: llama.cpp's default is f16
    return RemoteFile(repo, filename, size, sha256, parsed[0], projector, parsed[1])


def same_quant(a: str, b: str) -> bool:
    return a.upper() == b.upper()


def cached_file(repo: str, filename: str, path: Path, size: int) -> CachedFile | None:
    kind = classify(repo, filename, size, None)  # named as on the Hub, read the same way
    return None if kind is None else CachedFile(repo, filename, path, size, kind.quant, kind.projector, kind.imatrix)


def list_cached(root: Path | None = None) -> list[CachedFile]:
    """Every verified file in the cache; a dangling link or anything else that is not a regular file is
    skipped (and logged)."""
    out = []
    for repo, filename, path in cache_names(cache_root(root) / "models"):
        try:
            st = path.stat()
        except OSError as exc:
            log.warning("skipping %s in the cache: %s", path, "a dangling link" if path.is_symlink() else exc.strerror)
            continue
        if not stat.S_ISREG(st.st_mode):
            log.warning("skipping %s in the cache: %s", path, "a folder" if stat.S_ISDIR(st.st_mode) else "not a file")
            continue
        cached = cached_file(repo, filename, path, st.st_size)
        if cached is not None:
            out.append(cached)
    return out


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where models are cached: the argument, else $CAPRL_LOCAL_HOME, else the platform's cache dir."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("CAPRL_LOCAL_HOME"):
        return Path(os.environ["CAPRL_LOCAL_HOME"]).expanduser()
    from platformdirs import user_cache_path

    return user_cache_path("caprl-local")


def final_path(root: Path, repo: str, filename: str) -> Path:
    """Where a listed file is cached: inside ``<root>/models/<owner>/<repo>/``, or DownloadError.

    The listing was checked already (list_repo_files); this is the check at the point of use, which
    also refuses a symbolic link in the cache that would lead the download somewhere else.
    """
    check_repo(repo)
    problem = bad_name(filename)
    if problem:
        raise DownloadError(f"{repo}: refusing the file name '{shown(filename)}' ({problem}); it cannot be a "
                            "path in the cache")
    entry = root / "models" / repo
    path = entry.joinpath(*filename.split("/"))
    try:
        home = entry.resolve()
        # The folders must stay inside; the file itself may be a dangling link (it is replaced, never written through).
        escapes = not path.parent.resolve().is_relative_to(home) or (path.exists() and not path.resolve().is_relative_to(home))
    except RuntimeError:  # a loop of links (before Python 3.13)
        escapes = True
    except OSError as exc:
        if exc.errno != errno.ELOOP:  # a folder we may not look into, say: a local problem, said as one
            raise translate_error(exc, f"downloading {repo}/{filename}", entry) from exc
        escapes = True
    if escapes:
        raise DownloadError(f"{repo}/{filename}: {path} leads outside {entry} through a symbolic link; "
                            "remove the link, then download again")
    return path


_NOT_IN_NAMES = frozenset('\\:*?"<>|')  # separators, drive letters and what Windows refuses
_DEVICES = frozenset({"CON", "PRN", "AUX", "NUL", *(f"{d}{i}" for d in ("COM", "LPT") for i in range(10))})


def check_repo(repo: str, error: type[CaprlError] = DownloadError) -> None:
    if not valid_repo_id(repo):
        raise error(f"'{shown(repo)}' is not a Hub repo id (owner/name, of letters, digits, '.', '_' and '-', "
                    "without '..'); check the name")


def bad_name(name: str) -> str | None:
    """Why a listed file name may not become a path in the cache, or None for a plain relative name
    made of safe components (like the Hub's own ``Q4_K_M/model.Q4_K_M.gguf``)."""
    if not name or len(name) > 1000:
        return "empty" if not name else "over 1000 characters"
    if not name.isprintable():
        return "control or invisible characters"
    if name.startswith("/"):
        return "an absolute path"
    bad = _NOT_IN_NAMES.intersection(name)
    if bad:
        return f"the character '{shown(min(bad))}'"
    parts = name.split("/")
    if len(parts) > 8:
        return "more than 8 folders deep"
    for part in parts:
        if part in ("", ".", ".."):
            return f"a {part!r} component" if part else "an empty component"
        if part[0] in ". " or part[-1] in ". ":
            return "a component that is hidden or starts or ends with a space or dot"
        if len(part.encode()) > 200:
            return "a component over 200 bytes"
        if part.split(".")[0].upper() in _DEVICES:
            return "a device name"
    return None


def cache_names(models: Path) -> list[tuple[str, str, Path]]:
    """(repo, filename, path) of every visible *.gguf name in ``models/<owner>/<repo>/``, whatever it
    is (a file, a link, a folder); linked folders are followed, each real folder once."""
    out, seen = [], set()
    for top, dirs, names in os.walk(models, followlinks=True):
        try:
            st = os.stat(top)
        except OSError:
            dirs[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:  # a link back to a folder already walked
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = Path(top).relative_to(models).parts
        if len(rel) < 2:
            continue
        for name in [*names, *dirs]:  # hidden ones are downloads in progress (transfer.part_path)
            if name.lower().endswith(".gguf") and not name.startswith("."):
                out.append(("/".join(rel[:2]), "/".join((*rel[2:], name)), Path(top, name)))
    return sorted(out)


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


def record_path(final: Path, root: Path) -> Path:
    """Where what a cached file was verified against is noted: under ``root/.verified``, out of sight."""
    return root / ".verified" / final.relative_to(root).with_name(f"{final.name}.json")


def keep_record(final: Path, root: Path | None, size: int, sha256: str | None) -> None:
    """Note a verified file's size (and sha256), so later runs can check it without the network."""
    if root is None:
        return
    path = record_path(final, root)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps({"size": size, "sha256": sha256}))
    except (OSError, CaprlError) as exc:  # a read-only cache still works, only without the quick check
        log.debug("cannot note %s: %s", path, exc)


def recorded_size(final: Path, root: Path) -> int | None:
    """The size `final` had when it was verified, or None if that was not noted."""
    try:
        with open(record_path(final, root), "rb") as fh:
            data = json.loads(fh.read(4096))
    except (OSError, ValueError):
        return None
    size = data.get("size") if isinstance(data, dict) else None
    return size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else None

