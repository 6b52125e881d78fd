"""A faster, bounded `gguf.GGUFReader` for files with large metadata arrays (the 262k-entry Gemma vocabulary).

The stock reader walks every array element in Python, building one numpy view per element: about 11 s for
the Gemma 3 270M file on this 2-core machine, more than everything else in loading the model together. This
subclass changes how metadata arrays are parsed:
- arrays of numbers become one numpy view, so `field.contents()` still returns the whole list;
- arrays of strings become one byte region whose strings `string_array()` decodes on demand, so a model load
  that never looks at the vocabulary never pays for it.

It also makes every count and length in the file answer to the file's size before anything loops or maps on
it, because the stock reader trusts them: its reads past the end return short arrays that parsing carries on
with, and a string array declaring 2^40 entries is walked entry by entry (days). Here
- every read that would run past the end of the file raises, so each loop step consumes bytes or stops;
- metadata keys, tensors, array lengths and dimensions have generous caps (`MAX_*`) checked before looping;
- each tensor's data must lie inside the file, checked on Python integers before numpy multiplies its dims.
Parsing is thus linear in the file size, and no allocation is larger than the file; `open_gguf` turns every
refusal into a `CheckpointError` that says what to do.
"""

from __future__ import annotations

import math
import mmap
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from gemmakit.checkpoints.common import CheckpointError

MAX_FIELDS = 1 << 16  # metadata keys; real files carry about 40
MAX_TENSORS = 1 << 20  # the largest models have a few thousand
MAX_ARRAY = 1 << 24  # entries in one metadata array: 64x the 262k-entry Gemma vocabulary
MAX_DIMS = 4  # GGML_MAX_DIMS


class Damaged(ValueError):
    """A structural fault found while parsing; `open_gguf` reports it as a `CheckpointError`."""


class FastGGUFReader(gguf.GGUFReader):
    def __init__(self, path: str | Path):
        super().__init__(path, "r")

    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> np.ndarray:
        count, size = int(count), len(self.data)
        end = int(offset) + np.dtype(dtype).itemsize * count
        if offset < 0 or count < 0 or end > size:
            raise Damaged(f"a field at byte {offset} needs {end - offset} bytes but the file ends at byte {size}")
        return super()._get(offset, dtype, count, override_order)

    def _build_fields(self, offs: int, count: int) -> int:
        if int(count) > MAX_FIELDS:
            raise Damaged(f"the header declares {int(count)} metadata keys (at most {MAX_FIELDS} are read)")
        return super()._build_fields(offs, count)

    def _build_tensor_info(self, offs: int, count: int) -> tuple[int, list[gguf.ReaderField]]:
        if int(count) > MAX_TENSORS:
            raise Damaged(f"the header declares {int(count)} tensors (at most {MAX_TENSORS} are read)")
        return super()._build_tensor_info(offs, count)

    def _get_tensor_info_field(self, orig_offs: int) -> gguf.ReaderField:
        n_dims = int(self._get(orig_offs + 8 + int(self._get(orig_offs, np.uint64)[0]), np.uint32)[0])
        if n_dims > MAX_DIMS:
            raise Damaged(f"a tensor at byte {orig_offs} declares {n_dims} dimensions (GGUF allows {MAX_DIMS})")
        return super()._get_tensor_info_field(orig_offs)

    def _build_tensors(self, start_offs: int, fields: list[gguf.ReaderField]) -> None:
        for field in fields:  # checked on Python ints: numpy's product of uint64 dims wraps around silently
            _check_tensor(field, start_offs, len(self.data))
        super()._build_tensors(start_offs, fields)

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list[Any], list[int], list[Any]]:
        raw_type = int(raw_type)
        if raw_type != GGUFValueType.ARRAY:
            if raw_type not in GGUFValueType._value2member_map_:
                raise Damaged(f"a metadata value at byte {orig_offs} has unknown type {raw_type}")
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        count = self._get(orig_offs + 4, np.uint64)
        start, n = orig_offs + 12, int(count[0])
        if n > MAX_ARRAY or n * _min_size(int(raw_itype[0])) > len(self.data) - start:
            raise Damaged(f"a metadata array at byte {orig_offs} declares {n} entries, more than the "
                          f"{len(self.data) - start} bytes left in the file (or than {MAX_ARRAY}) can hold")
        itype = GGUFValueType(raw_itype[0])
        nptype = self.gguf_scalar_to_np.get(itype)
        if self.byte_order != "I" or itype not in (GGUFValueType.STRING, *self.gguf_scalar_to_np):
            return super()._get_field_parts(orig_offs, raw_type)  # nested arrays and swapped files: stock
        if nptype is not None:
            values = self._get(start, nptype, n)
            return 12 + values.nbytes, [raw_itype, count, values], [2], [GGUFValueType.ARRAY, itype]
        end, size, view = start, len(self.data), memoryview(self.data)
        for _ in range(n):  # only the lengths are read here; the bytes stay in the memory map
            if end + 8 > size:
                raise Damaged(f"the string array at byte {orig_offs} runs past the end of the file")
            end += 8 + int.from_bytes(view[end:end + 8], "little")
        if end > size:
            raise Damaged(f"the string array at byte {orig_offs} runs past the end of the file")
        region = self.data[start:end]
        return end - orig_offs, [raw_itype, count, region], [2], [GGUFValueType.ARRAY, itype]


def _min_size(raw_itype: int) -> int:
    """The fewest bytes one array entry of this type can take (a string: its 8-byte length)."""
    if raw_itype not in GGUFValueType._value2member_map_:
        raise Damaged(f"a metadata array has unknown entry type {raw_itype}")
    t = GGUFValueType(raw_itype)
    if t in (GGUFValueType.STRING, GGUFValueType.ARRAY):
        return 8 if t == GGUFValueType.STRING else 12
    return np.dtype(gguf.GGUFReader.gguf_scalar_to_np[t]).itemsize


def _check_tensor(field: gguf.ReaderField, start_offs: int, size: int) -> None:
    name = bytes(field.parts[1]).decode("utf-8", errors="replace")
    dims, raw, offset = [int(d) for d in field.parts[3]], int(field.parts[4][0]), int(field.parts[5][0])
    if raw not in GGMLQuantizationType._value2member_map_:
        raise Damaged(f"tensor {name!r} has unknown type {raw}")
    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(raw)]
    if dims and dims[0] % block:
        raise Damaged(f"tensor {name!r}: rows of {dims[0]} values are not whole blocks of {block}")
    nbytes = math.prod(dims) * type_size // block
    if start_offs + offset + nbytes > size:
        raise Damaged(f"tensor {name!r} (dims {dims}) needs bytes {start_offs + offset}..{start_offs + offset + nbytes}"
                      f" but the file ends at byte {size}")


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
