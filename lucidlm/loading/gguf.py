"""Reading GGUF files: the header, the metadata and the tensor directory.

GGUF (llama.cpp's format, spec: github.com/ggml-org/ggml/blob/master/docs/gguf.md) is

    magic "GGUF" | version u32 | tensor_count u64 | kv_count u64
    kv_count x (key: string, value_type: u32, value)
    tensor_count x (name: string, n_dims: u32, dims: u64[n_dims], ggml_type: u32, offset: u64)
    padding to `general.alignment` (default 32)
    tensor data, each tensor at data_start + offset

with little-endian integers and strings stored as (u64 length, utf-8 bytes). We parse the
header ourselves with `struct` rather than with the `gguf` package's reader because that
reader builds a numpy view for every one of the ~50k vocabulary strings and takes
seconds; this parser takes tens of milliseconds. Tensor data is memory-mapped, not read.

Dims are listed fastest-varying first (ggml's `ne[0]` is the row length), so a PyTorch
weight of shape (out_features, in_features) appears here as dims [in, out].
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ModelFileError
from .quants import GGML_TYPES, tensor_nbytes

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # ggml tensors have at most 4 dimensions

# value_type -> struct format for the scalar types of the metadata
_SCALAR_FORMATS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i",
    6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in the file and how it is encoded."""

    name: str
    dims: tuple[int, ...]  # ggml order: dims[0] is the contiguous row length
    ggml_type: int
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """The PyTorch shape (slowest-varying first), e.g. (out_features, in_features)."""
        return tuple(reversed(self.dims))

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.ggml_type].name if self.ggml_type in GGML_TYPES else f"type {self.ggml_type}"

    @property
    def n_elements(self) -> int:
        return math.prod(self.dims)


class _Cursor:
    """Sequential little-endian reads from a buffer, reporting truncation clearly."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            raise ModelFileError(f"{self.path}: GGUF header is truncated at byte {self.pos}")
        chunk = self.buf[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        length = self.scalar("<Q")
        if length > len(self.buf):
            raise ModelFileError(f"{self.path}: corrupt GGUF string length {length} at byte {self.pos}")
        return bytes(self.take(length)).decode("utf-8", errors="replace")

    def strings(self, count: int) -> list[str]:
        """`count` consecutive strings. Vocabularies hold 50k-260k of them, so instead of
        decoding each one, we find where each starts (`_string_starts`) and decode all of them
        with a single call: their 8-byte length prefixes are overwritten with NUL bytes, the
        region decodes as one text, and splitting it at each run of 8 NULs gives the strings.
        (A NUL inside a string, or bytes that are not UTF-8, fall back to one decode each.)"""
        begin = self.pos
        starts = self._string_starts(count)  # moves self.pos past the strings
        region = np.frombuffer(self.buf, dtype=np.uint8, count=self.pos - begin, offset=begin).copy()
        region[(starts[:, None] - begin + np.arange(8)).reshape(-1)] = 0
        try:
            text = str(region.data, "utf-8")
        except UnicodeDecodeError:
            text = None
        if text is not None and text.count("\0") == 8 * count:
            return text.split("\0" * 8)[1:]
        unpack_length = struct.Struct("<Q").unpack_from
        return [str(self.buf[s + 8 : s + 8 + unpack_length(self.buf, s)[0]], "utf-8", "replace") for s in starts.tolist()]

    def _string_starts(self, count: int) -> np.ndarray:
        """Offsets of the length prefixes of `count` consecutive strings; moves past them."""
        buf, pos, end = self.buf, self.pos, len(self.buf)
        starts = []
        append = starts.append
        # Fast pass for the usual case, every string shorter than 256 bytes: a length is then
        # its first byte (the 7 others are zero, which we check at once afterwards), so one
        # index per string does instead of a struct unpack.
        try:
            for _ in range(count):
                append(pos)
                pos += 8 + buf[pos]
        except IndexError:  # ran off the end: a longer string or a truncated file
            pass
        else:
            offsets = np.array(starts, dtype=np.int64)
            if pos <= end and not np.frombuffer(buf, dtype=np.uint8)[offsets[:, None] + np.arange(1, 8)].any():
                self.pos = pos
                return offsets
        # Exact pass.
        pos, starts = self.pos, []
        unpack_length = struct.Struct("<Q").unpack_from
        for _ in range(count):
            if pos + 8 > end:
                raise ModelFileError(f"{self.path}: GGUF header is truncated at byte {pos}")
            starts.append(pos)
            (length,) = unpack_length(buf, pos)
            if pos + 8 + length > end:
                raise ModelFileError(f"{self.path}: GGUF header is truncated at byte {pos + 8}")
            pos += 8 + length
        self.pos = pos
        return np.array(starts, dtype=np.int64)

    def value(self, value_type: int):
        if value_type in _SCALAR_FORMATS:
            return self.scalar(_SCALAR_FORMATS[value_type])
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            item_type, count = self.scalar("<I"), self.scalar("<Q")
            if count > len(self.buf):
                raise ModelFileError(f"{self.path}: a GGUF array of {count} items does not fit in the "
                                     f"{len(self.buf)} bytes read: the file is truncated or corrupt")
            if item_type in _SCALAR_FORMATS:
                # One struct call for the whole array: token types and scores are 50k+ long.
                fmt = _SCALAR_FORMATS[item_type]
                size = struct.calcsize(fmt)
                return list(struct.unpack(f"<{count}{fmt[1]}", self.take(size * count)))
            if item_type == _STRING:
                return self.strings(count)
            return [self.value(item_type) for _ in range(count)]
        raise ModelFileError(f"{self.path}: unknown GGUF metadata value type {value_type}")


class GGUFFile:
    """An opened GGUF file: `metadata` (key -> python value) and `tensors` (name -> TensorInfo).

    Tensor bytes stay on disk, memory-mapped; `raw(name)` returns a read-only numpy view.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise ModelFileError(f"model file not found: {self.path}")
        if self.path.is_dir():
            raise ModelFileError(f"{self.path} is a directory, not a GGUF file")
        with open(self.path, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise ModelFileError(f"{self.path} is not a GGUF file (it does not start with 'GGUF')")
            f.seek(0)
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.metadata, self.tensors = self._parse_header()

    def _parse_header(self):
        cur = _Cursor(memoryview(self._mmap), self.path)
        cur.take(4)
        version = cur.scalar("<I")
        if version not in (2, 3):
            raise ModelFileError(f"{self.path}: unsupported GGUF version {version} (expected 2 or 3)")
        n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
        if n_tensors > 1_000_000 or n_kv > 1_000_000:
            raise ModelFileError(f"{self.path}: corrupt GGUF header ({n_tensors} tensors, {n_kv} keys)")
        metadata = {}
        for _ in range(n_kv):
            key = cur.string()
            metadata[key] = cur.value(cur.scalar("<I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.scalar("<I")
            if n_dims > MAX_DIMS:
                raise ModelFileError(f"{self.path}: corrupt GGUF tensor '{name}' with {n_dims} dimensions")
            dims = tuple(cur.scalar("<Q") for _ in range(n_dims))
            infos.append((name, dims, cur.scalar("<I"), cur.scalar("<Q")))
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment % 8:
            raise ModelFileError(f"{self.path}: invalid general.alignment {alignment!r} (must be a positive multiple of 8)")
        data_start = (cur.pos + alignment - 1) // alignment * alignment

        tensors = {}
        for name, dims, ggml_type, offset in infos:
            nbytes = tensor_nbytes(ggml_type, dims, name)  # raises for unknown types
            start = data_start + offset
            if start + nbytes > len(self._mmap):
                raise ModelFileError(
                    f"{self.path} is truncated: tensor '{name}' needs bytes up to {start + nbytes:,} "
                    f"but the file has {len(self._mmap):,}"
                )
            tensors[name] = TensorInfo(name, dims, ggml_type, start, nbytes)
        return metadata, tensors

    def close(self) -> None:
        """Unmap the file. Arrays returned by `raw` must no longer be used (copy what you keep)."""
        try:
            self._mmap.close()
        except BufferError:  # a view is still alive somewhere; the mapping goes when it does
            pass

    def release(self, name: str) -> None:
        """Drop the tensor's mapped pages from this process (they stay in the OS page cache):
        call it once the tensor is copied out, so that loading does not hold the whole file
        in memory on top of the model (`raw` still works after it: the pages come back)."""
        info = self.tensors[name]
        start = info.offset // mmap.PAGESIZE * mmap.PAGESIZE
        try:
            self._mmap.madvise(mmap.MADV_DONTNEED, start, info.offset + info.nbytes - start)
        except (AttributeError, ValueError, OSError):  # no madvise here (Windows), or a closed file
            pass

    def raw(self, name: str) -> np.ndarray:
        """The tensor's encoded bytes as a read-only uint8 view of the mapped file."""
        info = self.tensors[name]
        return np.frombuffer(self._mmap, dtype=np.uint8, count=info.nbytes, offset=info.offset)

    def map_tensor(self, name: str) -> torch.Tensor:
        """The tensor's encoded bytes as a uint8 tensor over a mapping of the file of its own: no
        copy, and nothing read until used. Pages count towards the process's memory only once
        touched, so a table read a few rows at a time (an embedding) stays mostly on disk or in
        the OS page cache. The mapping lives as long as the tensor does (`close` leaves it) and is
        private (copy-on-write): writes would never reach the file. The file must not shrink while
        it is mapped (reading a page past a truncated end kills the process: SIGBUS)."""
        info = self.tensors[name]
        start = info.offset // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
        with open(self.path, "rb") as f:
            mapping = mmap.mmap(f.fileno(), info.offset + info.nbytes - start, access=mmap.ACCESS_COPY, offset=start)
        try:  # rows are read in no order: no read-ahead of neighbouring pages into memory
            mapping.madvise(mmap.MADV_RANDOM)
        except (AttributeError, OSError):  # no madvise (Windows)
            pass
        return torch.frombuffer(mapping, dtype=torch.uint8, count=info.nbytes, offset=info.offset - start)

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise ModelFileError(f"{self.path}: GGUF metadata has no 'general.architecture'")
        return arch
