"""Read a GGUF file's header (metadata and tensor table) without loading weights.

llama.cpp answers a wrong or damaged file with a null pointer and a log line at
best; reading the header first lets us say exactly what is wrong with which
file, and keeps files that could make llama.cpp abort away from it.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .errors import ModelFileError

_MAGIC = b"GGUF"
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9

# ggml type id -> (elements per block, bytes per block), from ggml's type traits.
_TYPE_SIZES = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 9: (32, 40),
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
    16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110),
    22: (256, 82), 23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8),
    29: (256, 56), 30: (1, 2), 34: (256, 54), 35: (256, 66), 39: (32, 17), 40: (64, 36), 41: (128, 18),
}


@dataclass(frozen=True)
class GGUFInfo:
    """What a GGUF header says about a file."""

    path: Path
    metadata: Mapping[str, Any]  # arrays of more than 16 items are kept only as their length
    tensors: Mapping[str, tuple[int, tuple[int, ...]]]  # name -> (ggml type id, dims in ggml order)
    types: Mapping[str, int]  # metadata key -> its GGUF value type (4 u32, 6 f32, 7 bool, 8 string, 9 array...)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    @property
    def is_projector(self) -> bool:
        return self.architecture == "clip"


class _Reader:
    def __init__(self, buf: mmap.mmap | bytes, name: str) -> None:
        self.buf, self.pos, self.name = buf, 0, name

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise EOFError
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.take("Q")
        if self.pos + n > len(self.buf):
            raise EOFError
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return bytes(raw).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, n = self.take("I"), self.take("Q")
            if n > len(self.buf):
                raise EOFError
            if n > 16:  # tokenizer vocabularies: skip fast, keep the length
                self.skip_array(itype, n)
                return n
            return [self.value(itype) for _ in range(n)]
        raise ValueError(f"unknown metadata value type {vtype}")

    def skip_array(self, itype: int, n: int) -> None:
        if itype in _SCALARS:
            self.pos += n * struct.calcsize(_SCALARS[itype])
        elif itype == _STRING:
            unpack, buf, pos = struct.Struct("<Q").unpack_from, self.buf, self.pos
            for _ in range(n):
                pos += 8 + unpack(buf, pos)[0]
            self.pos = pos
        else:
            for _ in range(n):
                self.value(itype)
        if self.pos > len(self.buf):
            raise EOFError


def read_gguf(path: str | os.PathLike[str], *, role: str = "model file") -> GGUFInfo:
    """Parse the header of a GGUF file; raise ModelFileError naming it if it is not one."""
    p = Path(path)
    name = f"{role} {p}"
    try:
        if p.is_dir():
            raise ModelFileError(f"{name}: is a directory, not a .gguf file")
        size = p.stat().st_size
        if size == 0:
            raise ModelFileError(f"{name}: file is empty; download it again")
        with open(p, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if buf[:4] != _MAGIC:
                raise ModelFileError(f"{name}: not a GGUF file (wrong magic bytes); pass a .gguf model file")
            return _parse(_Reader(buf, name), p, size)
    except FileNotFoundError as exc:
        raise ModelFileError(f"{name}: no such file; check the path") from exc
    except PermissionError as exc:
        raise ModelFileError(f"{name}: permission denied; check the file's permissions") from exc
    except (EOFError, struct.error) as exc:  # struct.error: a field runs past the end of the file
        raise ModelFileError(f"{name}: file is truncated (header cut short); download it again") from exc
    except (ValueError, UnicodeDecodeError, OverflowError) as exc:
        raise ModelFileError(f"{name}: corrupt GGUF header ({exc}); download it again") from exc
    except OSError as exc:
        raise ModelFileError(f"{name}: cannot read file ({exc.strerror or exc})") from exc


def _name(r: _Reader, what: str) -> str:
    """A key or tensor name, refused when garbled: it would end up in messages."""
    name = r.string()
    if len(name) > 256 or not name.isprintable():
        raise ValueError(f"a {what} is garbled ({name[:24]!r}...)")
    return name


def _parse(r: _Reader, path: Path, size: int) -> GGUFInfo:
    r.pos = 4
    version = r.take("I")
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version}")
    n_tensors, n_kv = r.take("Q"), r.take("Q")
    if n_tensors > 1 << 24 or n_kv > 1 << 24:
        raise ValueError("impossible tensor or key count")
    if n_tensors + n_kv > size:  # each takes bytes: the rest of the file is missing
        raise EOFError
    meta: dict[str, Any] = {}
    types: dict[str, int] = {}
    for _ in range(n_kv):
        key = _name(r, "metadata key")
        types[key] = r.take("I")
        meta[key] = r.value(types[key])
    tensors: list[tuple[list[int], int, int]] = []
    table: dict[str, tuple[int, tuple[int, ...]]] = {}
    for _ in range(n_tensors):
        tname = _name(r, "tensor name")
        n_dims = r.take("I")
        if n_dims > 4:
            raise ValueError(f"tensor {tname} has {n_dims} dimensions")
        dims = [r.take("Q") for _ in range(n_dims)]
        ttype, offset = r.take("I"), r.take("Q")
        table[tname] = (ttype, tuple(dims))
        tensors.append((dims, ttype, offset))
    align = meta.get("general.alignment", 32)
    if isinstance(align, bool) or not isinstance(align, int) or not 0 < align <= 1 << 16 or align & (align - 1):
        raise ValueError(f"general.alignment is {align!r}, not a power of two")
    data_start = (r.pos + align - 1) // align * align
    data_end = data_start  # where the last tensor ends, if every tensor type is known to us
    for dims, ttype, offset in tensors:
        if ttype not in _TYPE_SIZES:
            break
        block, nbytes = _TYPE_SIZES[ttype]
        count = 1
        for d in dims:
            count *= d
        data_end = max(data_end, data_start + offset + count // block * nbytes)
    else:
        if data_end > size:
            raise ModelFileError(f"{r.name}: file is truncated ({size:,} of {data_end:,} bytes); download it again")
    return GGUFInfo(path, MappingProxyType(meta), MappingProxyType(table), MappingProxyType(types))
