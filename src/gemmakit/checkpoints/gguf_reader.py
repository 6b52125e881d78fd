"""A faster `gguf.GGUFReader` for files with large metadata arrays (the 262k-entry Gemma vocabulary).

The stock reader walks every array element in Python, building one numpy view per element: about 11 s for
the Gemma 3 270M file on this 2-core machine, more than everything else in loading the model together. This
subclass changes only how metadata arrays are parsed:
- arrays of numbers become one numpy view, so `field.contents()` still returns the whole list;
- arrays of strings become one byte region whose strings `string_array()` decodes on demand, so a model load
  that never looks at the vocabulary never pays for it.
Tensor infos, offsets and data are parsed by the stock code, unchanged.
"""

from __future__ import annotations

import mmap
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGUFValueType

from gemmakit.checkpoints.common import CheckpointError


class FastGGUFReader(gguf.GGUFReader):
    def __init__(self, path: str | Path):
        super().__init__(path, "r")

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list[Any], list[int], list[Any]]:
        if GGUFValueType(raw_type) != GGUFValueType.ARRAY or self.byte_order != "I":
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        count = self._get(orig_offs + 4, np.uint64)
        start, n, itype = orig_offs + 12, int(count[0]), GGUFValueType(raw_itype[0])
        nptype = self.gguf_scalar_to_np.get(itype)
        if nptype is not None:
            values = self._get(start, nptype, n)
            return 12 + values.nbytes, [raw_itype, count, values], [2], [GGUFValueType.ARRAY, itype]
        if itype != GGUFValueType.STRING:
            return super()._get_field_parts(orig_offs, raw_type)
        end, view = start, memoryview(self.data)
        for _ in range(n):  # only the lengths are read here; the bytes stay in the memory map
            end += 8 + int.from_bytes(view[end:end + 8], "little")
        region = self.data[start:end]
        return end - orig_offs, [raw_itype, count, region], [2], [GGUFValueType.ARRAY, itype]


def string_array(field: gguf.ReaderField) -> list[str]:
    """Decode a string array parsed by `FastGGUFReader` (or by the stock reader)."""
    if len(field.data) != 1 or field.types[-1] != GGUFValueType.STRING:
        return list(field.contents())
    raw = field.parts[field.data[0]].tobytes()
    out, o = [], 0
    for _ in range(int(field.parts[field.data[0] - 1][0])):
        n = int.from_bytes(raw[o:o + 8], "little")
        out.append(raw[o + 8:o + 8 + n].decode("utf-8", errors="replace"))
        o += 8 + n
    return out


def number_array(field: gguf.ReaderField) -> np.ndarray:
    """A numeric metadata array as one numpy array, without a Python list in between."""
    if len(field.data) == 1:
        return np.asarray(field.parts[field.data[0]])
    return np.asarray(field.contents())


def open_gguf(path: str | Path) -> FastGGUFReader:
    """Open a GGUF file, turning every way it can be damaged into one clear `CheckpointError`."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"no such GGUF file: {p}")
    with p.open("rb") as f:
        head = f.read(24)
    if len(head) < 24:
        raise CheckpointError(f"{p}: only {len(head)} bytes, too short for a GGUF file; download it again")
    if head[:4] != b"GGUF":
        raise CheckpointError(f"{p}: it starts with {head[:4]!r}, not the GGUF magic b'GGUF'; check the path")
    try:
        return FastGGUFReader(p)
    except Exception as e:  # the reader raises bare ValueError/IndexError/KeyError on damaged files
        raise CheckpointError(f"{p} is not a readable GGUF file ({type(e).__name__}: {e}); it may be truncated "
                              "or corrupt: download it again or re-convert it") from e


def release_pages(reader: gguf.GGUFReader, offset: int, nbytes: int) -> None:
    """Drop the file pages of bytes [offset, offset + nbytes) that are already dequantized from this
    process's resident set. The mapping is read-only and file-backed, so nothing is lost (a later read would
    fault them back in); without this a whole GGUF file ends up resident while it loads, on top of the
    model being built from it."""
    mm = getattr(reader.data, "_mmap", None)
    if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages inside the range only
    stop = (offset + nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if stop > start:
        mm.madvise(mmap.MADV_DONTNEED, start, stop - start)
