"""
Bit-level helpers shared by the GGUF block decoders (`quants.py`, `quants_iq.py`).

They live apart so that both decoder modules can use them without importing each other: `quants.py` is the
public entry point and imports the lookup-table decoders from `quants_iq.py`, which must not import it back.
Every helper takes a view of [n_blocks, bytes] uint8 data and stays in integer dtypes; floats appear only
where a block's own float16 field is read.
"""

from __future__ import annotations

import torch


def f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """Read the float16 field at byte `start` of every block as an [n_blocks, 1] float32 column."""
    # contiguous() makes the 2-byte slice aligned so it can be reinterpreted as float16
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def words(fields: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterpret little-endian bytes [n, k] as [n, k / size] words of the signed `dtype` (int16/int32).
    Callers mask after every shift, so the sign extension of an arithmetic shift never reaches a result."""
    return fields.contiguous().view(dtype)


def nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Split bytes [..., k] into [..., 2, k]: low nibbles first, then high nibbles (ggml's order)."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-2)


def paired_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Split bytes [n, k] into [n, 2k] with each byte's low nibble followed by its high one (the order of
    the 4-bit sub-block scales of IQ2_XS/IQ2_S/IQ3_S/IQ4_XS, unlike the values' `nibbles`)."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def bits(packed: torch.Tensor, width: int) -> torch.Tensor:
    """Split bytes [..., k] into [..., 8 // width, k] fields of `width` bits, least significant first."""
    shifts = torch.arange(0, 8, width, dtype=torch.uint8).unsqueeze(-1)
    return (packed.unsqueeze(-2) >> shifts) & ((1 << width) - 1)


def bits_inner(packed: torch.Tensor, width: int) -> torch.Tensor:
    """Split bytes [n, k] into [n, k * 8 // width] fields with the field axis innermost: byte b holds
    fields b * (8 // width) onwards, as a little-endian bitfield reads (bit i -> value i for width 1)."""
    shifts = torch.arange(0, 8, width, dtype=torch.uint8)
    return ((packed.unsqueeze(-1) >> shifts) & ((1 << width) - 1)).reshape(packed.shape[0], -1)
