"""Which files a folder gives to caption: images and videos, by their names; and which of the two an input is.

Pure: lists folders, opens no file. An animated GIF is an image (its first frame), as the Captioner reads it;
a video is a name with one of :data:`~caprl_local.video.VIDEO_SUFFIXES`, as the Captioner tells one.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Iterator
from typing import Literal

from .errors import CaprlError
from .video import VIDEO_SUFFIXES, is_video

log = logging.getLogger("caprl_local")

Media = Literal["image", "video"]

#: File name extensions of images taken from folders (files named explicitly are tried whatever their name).
IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff",
    ".tga", ".ppm", ".pgm", ".pbm", ".ico", ".avif", ".jp2",
})
#: ... and of videos.
VIDEO_EXTENSIONS = frozenset(VIDEO_SUFFIXES)
#: Everything a folder scan takes.
MEDIA_EXTENSIONS = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS


def media_of(path: str | os.PathLike[str]) -> Media:
    """"video" for a name the Captioner reads as a video, else "image"."""
    return "video" if is_video(path) else "image"


def media_in(folder: str, recursive: bool, within: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """The images and videos in a folder, as their parts below it: hidden names skipped, links to folders
    not followed (as pathlib's rglob), in no particular order."""
    here = os.path.join(folder, *within)
    try:
        with os.scandir(here) as entries:
            listed = list(entries)
    except OSError as exc:
        if not within:
            raise CaprlError(f"{folder}: cannot read this folder ({exc.strerror or exc})") from exc
        log.warning("%s: cannot read this folder (%s); its images and videos are left out", here, exc.strerror or exc)
        return
    for entry in listed:
        if entry.name.startswith("."):
            continue
        try:
            if recursive and entry.is_dir(follow_symlinks=False):
                yield from media_in(folder, recursive, (*within, entry.name))
            elif os.path.splitext(entry.name)[1].lower() in MEDIA_EXTENSIONS and entry.is_file():
                yield (*within, entry.name)
        except OSError:
            continue  # gone since it was listed


def pattern_root(pattern: str) -> str:
    """The folder a glob pattern starts from: its leading parts without wildcards."""
    drive, rest = os.path.splitdrive(pattern)
    parts = rest.replace(os.altsep, os.sep).split(os.sep) if os.altsep else rest.split(os.sep)
    fixed = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return drive + (os.sep.join(fixed) or (os.sep if rest.startswith(os.sep) else "."))
