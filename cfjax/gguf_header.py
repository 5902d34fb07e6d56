"""A small GGUF header reader: metadata and tensor index, read with plain file reads.

`gguf.GGUFReader` memory-maps the file and builds numpy views for every one of the ~100k strings
of an embedded vocabulary, which takes seconds; loading weights needs only the scalar metadata and
the tensor index, so this reader decodes scalars and strings, skips arrays unless asked for them
(the tokenizer's), and remembers where each entry lies (to copy the tokenizer entries byte for
byte). Every length is checked against the file size: a truncated or corrupt file is a one-line
error naming the file.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Collection
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?"}
_SCALARS |= {10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_DEFAULT_ALIGNMENT = 32


class ArrayValue(NamedTuple):
    """An array entry, not decoded: element type and length."""

    item_type: int
    length: int


class TensorInfo(NamedTuple):
    """Where one tensor's bytes are and how to read them."""

    name: str
    qtype: Any  # gguf.GGMLQuantizationType
    shape: tuple  # numpy order (rows, cols): the reverse of ggml's ne
    offset: int  # absolute file offset
    n_bytes: int


@dataclasses.dataclass
class Header:
    """A parsed GGUF header."""

    version: int
    metadata: dict[str, Any]  # scalars and strings decoded; arrays as ArrayValue
    spans: dict[str, tuple[int, int]]  # file byte range of each key/value entry
    tensors: list[TensorInfo]


class _Cursor:
    def __init__(self, f, file: Path, size: int):
        self.f, self.file, self.size = f, file, size

    def fail(self, what: str) -> ValueError:
        return ValueError(f"{self.file}: not a readable GGUF file (truncated or corrupt?): {what}")

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise self.fail(f"header ends early at byte {self.f.tell()} of {self.size}")
        return data

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def skip(self, n: int) -> None:
        if self.f.tell() + n > self.size:
            raise self.fail(f"an entry of {n} bytes runs past the end of the file ({self.size})")
        self.f.seek(n, 1)

    def string(self) -> str:
        n = self.unpack("<Q")
        if self.f.tell() + n > self.size:
            raise self.fail(f"a string of {n} bytes runs past the end of the file ({self.size})")
        return self.read(n).decode("utf-8", errors="replace")

    def value(self, vtype: int, decode_array: bool = False):
        if vtype == _STRING:
            return self.string()
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype != _ARRAY:
            raise self.fail(f"unknown metadata type {vtype}")
        item, n = self.unpack("<I"), self.unpack("<Q")
        if item == _STRING:
            if decode_array:
                return [self.string() for _ in range(n)]
            for _ in range(n):
                self.skip(self.unpack("<Q"))
        elif item in _SCALARS:
            fmt = _SCALARS[item]
            if decode_array:
                return np.frombuffer(self.read(n * struct.calcsize(fmt)), fmt).tolist()
            self.skip(n * struct.calcsize(fmt))
        else:
            raise self.fail(f"unsupported array element type {item}")
        return ArrayValue(item, n)


def read_header(file: str | Path, arrays: Collection[str] = ()) -> Header:
    """Parse a GGUF file's metadata and tensor index (versions 2 and 3, little-endian).

    Arrays are skipped (an `ArrayValue` in `metadata`) except those named in `arrays`, decoded
    into lists as `gguf.ReaderField.contents()` gives them (a vocabulary of 100k strings: ~0.2 s,
    where `gguf.GGUFReader` takes seconds).
    """
    import gguf

    file = Path(file)
    size = file.stat().st_size
    with open(file, "rb") as f:
        c = _Cursor(f, file, size)
        if c.read(4) != b"GGUF":
            raise c.fail("no GGUF magic")
        version = c.unpack("<I")
        if version not in (2, 3):
            raise c.fail(f"unsupported version {version} (big-endian files are not supported)")
        n_tensors, n_kv = c.unpack("<Q"), c.unpack("<Q")
        metadata, spans = {}, {}
        for _ in range(n_kv):
            start = f.tell()
            key = c.string()
            metadata[key] = c.value(c.unpack("<I"), decode_array=key in arrays)
            spans[key] = (start, f.tell())
        infos = []
        for _ in range(n_tensors):
            name = c.string()
            n_dims = c.unpack("<I")
            if not 1 <= n_dims <= 4:
                raise c.fail(f"tensor {name!r} has {n_dims} dimensions")
            dims = [c.unpack("<Q") for _ in range(n_dims)]
            try:
                qtype = gguf.GGMLQuantizationType(c.unpack("<I"))
            except ValueError as e:
                raise c.fail(f"tensor {name!r}: {e}") from None
            infos.append((name, qtype, dims, c.unpack("<Q")))
        align = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or align < 1 or align & (align - 1):
            raise c.fail(f"general.alignment {align!r} is not a power of two")
        data_start = -(-f.tell() // align) * align
    tensors = []
    for name, qtype, dims, offset in infos:
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        n_bytes = int(np.prod(dims)) // block * type_size
        shape = tuple(int(d) for d in reversed(dims))
        tensors.append(TensorInfo(name, qtype, shape, data_start + offset, n_bytes))
    return Header(version, metadata, spans, tensors)


def write_metadata_only(src: Path, header: Header, keys: list[str], dst: Path) -> None:
    """Write a tensorless GGUF holding `keys`' entries of `src`, copied byte for byte."""
    with open(src, "rb") as f, open(dst, "wb") as out:
        out.write(b"GGUF" + struct.pack("<IQQ", 3, 0, len(keys)))
        for key in keys:
            start, end = header.spans[key]
            f.seek(start)
            out.write(f.read(end - start))
