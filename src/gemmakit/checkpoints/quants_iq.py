"""
Torch decoders for the GGUF block types whose codes index a lookup table: the IQ* "importance" families,
IQ4_NL/IQ4_XS, and the MXFP4/NVFP4 micro-float formats.

None of these is affine in its stored codes: a code picks a row of a fixed grid of 4 or 8 values (IQ1-IQ3),
or one of 16 non-uniform levels (IQ4_*, E2M1 for the FP4 types), and sign bits flip single values. So unlike
Q4_0/Q4_K they cannot keep their codes for an int4 kernel; they are decoded to float once at load time.

Every table (the IQ grids, the 128-entry sign patterns `ksigns`, the IQ4 and E2M1 levels, the E8M0 and UE4M3
scale encodings) is taken from the `gguf` library at run time and converted to torch once, so the decoders
cannot drift from the reference they are tested against. Scale decodings are read as 256-entry tables by
running gguf's own converters over every byte value, which reproduces their edge cases exactly.

As in `quants.py`, each decoder is a fixed sequence of whole-tensor ops on [n_blocks, type_size] bytes and
equals `gguf.quants.dequantize` bit for bit: products are formed in the reference's float32 order, except that
a sign is applied to a grid value before the scale, which is exact (rounding is symmetric in sign).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import gguf.quants as ref
import numpy as np
import torch
from gguf import GGMLQuantizationType

from gemmakit.checkpoints.quants_bits import bits_inner, f16, nibbles, paired_nibbles, words

T = GGMLQuantizationType

# -----------------------------------------------------------------------------
# tables, read from gguf once


@functools.cache
def _grid(name: str) -> torch.Tensor:
    """gguf's value grid of an IQ type as float32 [entries, 4 or 8] (IQ1_M shares IQ1_S's)."""
    cls = getattr(ref, name)
    cls.init_grid()
    return torch.from_numpy(np.array(cls.grid, dtype=np.float32).reshape(cls.grid_shape))


@functools.cache
def _ksigns() -> torch.Tensor:
    """The 128 sign patterns of IQ2_XXS/IQ2_XS/IQ3_XXS as float32 [128, 8] of +-1 (bit i set: value i negated)."""
    patterns = torch.from_numpy(np.frombuffer(ref.IQ2_XXS.ksigns, dtype=np.uint8).copy())
    return 1.0 - 2.0 * bits_inner(patterns.unsqueeze(-1), 1).float()


@functools.cache
def _levels(name: str) -> torch.Tensor:
    """The 16 levels a 4-bit code stands for (IQ4_NL's non-uniform ones, doubled E2M1 for the FP4 types)."""
    return torch.tensor(getattr(ref, name).kvalues, dtype=torch.float32)


@functools.cache
def _scale_table(name: str) -> torch.Tensor:
    """A one-byte scale encoding decoded for all 256 byte values by gguf's own converter, as float32 [256]."""
    convert = {"MXFP4": ref.MXFP4.e8m0_to_fp32_half, "NVFP4": ref.NVFP4.ue4m3_to_fp32}[name]
    return torch.from_numpy(np.asarray(convert(np.arange(256, dtype=np.uint8)), dtype=np.float32).copy())


def _rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table[index] for an integer index of any shape: rows of a 2-D table, or entries of a 1-D one."""
    picked = table.index_select(0, index.reshape(-1).to(torch.int32))
    return picked.reshape(*index.shape, *table.shape[1:])


@functools.cache
def _sign_bytes() -> torch.Tensor:
    """Every byte of explicit sign bits (IQ2_S, IQ3_S) as float32 [256, 8] of +-1, bit i for value i: one
    row gather per byte costs far less than unpacking bits into float temporaries of the output's size."""
    return 1.0 - 2.0 * bits_inner(torch.arange(256, dtype=torch.uint8).unsqueeze(-1), 1).float()


# -----------------------------------------------------------------------------
# decoders: [n_blocks, type_size] uint8 -> [n_blocks, block_size] float32


def _iq2_xxs(blocks: torch.Tensor) -> torch.Tensor:
    # d | 8 x (4 grid-index bytes, uint32 aux): aux = 4 x 7-bit sign-pattern indices | 4-bit scale
    n = blocks.shape[0]
    groups = blocks[:, 2:].reshape(n, 8, 8)
    aux = words(groups[:, :, 4:].reshape(n, 32), torch.int32)  # [n, 8]
    db = (f16(blocks, 0) * (0.5 + ((aux >> 28) & 0xF).float()) * 0.25).reshape(n, 8, 1, 1)
    signs = (aux.unsqueeze(-1) >> torch.tensor([0, 7, 14, 21], dtype=torch.int32)) & 0x7F
    values = _rows(_grid("IQ2_XXS"), groups[:, :, :4]).mul_(_rows(_ksigns(), signs))
    return values.mul_(db).reshape(n, 256)


def _iq2_xs(blocks: torch.Tensor) -> torch.Tensor:
    # d | 32 x uint16 (9-bit grid index, 7-bit sign pattern) | 8 B of 4-bit scales, one per 16 values
    n = blocks.shape[0]
    qs = words(blocks[:, 2:66], torch.int16)
    db = (f16(blocks, 0) * (0.5 + paired_nibbles(blocks[:, 66:74]).float()) * 0.25).reshape(n, 16, 1, 1)
    values = _rows(_grid("IQ2_XS"), qs & 0x1FF).mul_(_rows(_ksigns(), (qs >> 9) & 0x7F))
    return values.reshape(n, 16, 2, 8).mul_(db).reshape(n, 256)


def _iq2_s(blocks: torch.Tensor) -> torch.Tensor:
    # d | 32 B low 8 bits of grid indices | 32 B sign bits | 8 B 2-bit index highs | 8 B 4-bit scales
    n = blocks.shape[0]
    index = blocks[:, 2:34].int() | (bits_inner(blocks[:, 66:74], 2).int() << 8)
    db = (f16(blocks, 0) * (0.5 + paired_nibbles(blocks[:, 74:82]).float()) * 0.25).reshape(n, 16, 1, 1)
    values = _rows(_grid("IQ2_S"), index).mul_(_rows(_sign_bytes(), blocks[:, 34:66]))
    return values.reshape(n, 16, 2, 8).mul_(db).reshape(n, 256)


def _iq3_xxs(blocks: torch.Tensor) -> torch.Tensor:
    # d | 64 B grid indices (4 values each) | 8 x uint32 aux as in IQ2_XXS, with a 0.5 factor
    n = blocks.shape[0]
    aux = words(blocks[:, 66:98], torch.int32)
    db = (f16(blocks, 0) * (0.5 + ((aux >> 28) & 0xF).float()) * 0.5).reshape(n, 8, 1, 1)
    signs = (aux.unsqueeze(-1) >> torch.tensor([0, 7, 14, 21], dtype=torch.int32)) & 0x7F
    values = _rows(_grid("IQ3_XXS"), blocks[:, 2:66]).reshape(n, 8, 4, 8).mul_(_rows(_ksigns(), signs))
    return values.mul_(db).reshape(n, 256)


def _iq3_s(blocks: torch.Tensor) -> torch.Tensor:
    # d | 64 B low 8 bits of grid indices | 8 B index high bits | 32 B sign bits | 4 B 4-bit scales
    n = blocks.shape[0]
    index = blocks[:, 2:66].int() | (bits_inner(blocks[:, 66:74], 1).int() << 8)
    db = (f16(blocks, 0) * (1 + 2 * paired_nibbles(blocks[:, 106:110])).float()).reshape(n, 8, 1)
    # sign byte k covers values 8k..8k+7, i.e. grid rows 2k and 2k+1
    values = _rows(_grid("IQ3_S"), index).reshape(n, 32, 8).mul_(_rows(_sign_bytes(), blocks[:, 74:106]))
    return values.reshape(n, 8, 32).mul_(db).reshape(n, 256)


def _iq1_s(blocks: torch.Tensor) -> torch.Tensor:
    # d | 32 B low 8 bits of grid indices | 8 x uint16: 4 x 3-bit index highs, 3-bit scale, delta sign
    n = blocks.shape[0]
    qh = words(blocks[:, 34:50], torch.int16).int()  # [n, 8]
    dl = (f16(blocks, 0) * (2 * ((qh >> 12) & 7) + 1)).reshape(n, 8, 1, 1)
    delta = torch.where((qh & 0x8000) == 0, 0.125, -0.125).float().reshape(n, 8, 1, 1)
    highs = (qh.unsqueeze(-1) >> torch.tensor([0, 3, 6, 9], dtype=torch.int32)) & 7
    index = blocks[:, 2:34].int() | (highs.reshape(n, 32) << 8)
    values = _rows(_grid("IQ1_S"), index).reshape(n, 8, 4, 8).add_(delta)
    return values.mul_(dl).reshape(n, 256)


def _iq1_m(blocks: torch.Tensor) -> torch.Tensor:
    # 32 B low 8 bits of grid indices | 16 B nibbles (3-bit index high, delta sign) | 4 x uint16 holding
    # 4 x 3-bit scales each, with the block's float16 d spread over their top nibbles
    n = blocks.shape[0]
    sc = blocks[:, 48:56]
    d_bytes = torch.stack(((sc[:, 1] >> 4) | (sc[:, 3] & 0xF0), (sc[:, 5] >> 4) | (sc[:, 7] & 0xF0)), dim=-1)
    d = d_bytes.contiguous().view(torch.float16).float()  # [n, 1]
    scales = (words(sc, torch.int16).int().unsqueeze(-1) >> torch.tensor([0, 3, 6, 9], dtype=torch.int32)) & 7
    dl = (d * (2 * scales.reshape(n, 16) + 1)).reshape(n, 8, 2, 1, 1)
    qh = paired_nibbles(blocks[:, 32:48])  # [n, 32], one per group of 8 values
    delta = torch.where((qh & 0x08) == 0, 0.125, -0.125).float().reshape(n, 8, 2, 2, 1)
    index = blocks[:, :32].int() | ((qh & 0x07).int() << 8)
    values = _rows(_grid("IQ1_S"), index).reshape(n, 8, 2, 2, 8).add_(delta)
    return values.mul_(dl).reshape(n, 256)


def _iq4_nl(blocks: torch.Tensor) -> torch.Tensor:
    # 32 values: d | 16 B nibbles (lo = values 0..15, hi = 16..31) indexing 16 non-uniform levels
    q = nibbles(blocks[:, 2:]).reshape(-1, 32)
    return _rows(_levels("IQ4_NL"), q).mul_(f16(blocks, 0))


def _iq4_xs(blocks: torch.Tensor) -> torch.Tensor:
    # d | uint16 of 8 x 2-bit scale highs | 4 B 4-bit scale lows | 8 x 16 B nibbles (IQ4_NL's layout per 32)
    n = blocks.shape[0]
    highs = bits_inner(blocks[:, 2:4], 2)
    scales = ((paired_nibbles(blocks[:, 4:8]) | (highs << 4)).view(torch.int8) - 32).float()
    dl = (f16(blocks, 0) * scales).reshape(n, 8, 1)
    q = nibbles(blocks[:, 8:].reshape(n, 8, 16)).reshape(n, 8, 32)
    return _rows(_levels("IQ4_NL"), q).mul_(dl).reshape(n, 256)


def _mxfp4(blocks: torch.Tensor) -> torch.Tensor:
    # 32 values: E8M0 shared exponent byte | 16 B nibbles of E2M1 codes (lo = values 0..15)
    q = nibbles(blocks[:, 1:]).reshape(-1, 32)
    d = _rows(_scale_table("MXFP4"), blocks[:, :1])  # [n, 1]
    return _rows(_levels("MXFP4"), q).mul_(d)


def _nvfp4(blocks: torch.Tensor) -> torch.Tensor:
    # 64 values: 4 x UE4M3 scale byte, one per 16 | 4 x 8 B nibbles of E2M1 codes (lo = first 8 of the 16)
    n = blocks.shape[0]
    q = nibbles(blocks[:, 4:].reshape(n, 4, 8)).reshape(n, 4, 16)
    d = _rows(_scale_table("NVFP4"), blocks[:, :4]).unsqueeze(-1)  # [n, 4, 1]
    return _rows(_levels("NVFP4"), q).mul_(d).reshape(n, 64)


DECODERS: dict[GGMLQuantizationType, Callable[[torch.Tensor], torch.Tensor]] = {
    T.IQ2_XXS: _iq2_xxs,
    T.IQ2_XS: _iq2_xs,
    T.IQ2_S: _iq2_s,
    T.IQ3_XXS: _iq3_xxs,
    T.IQ3_S: _iq3_s,
    T.IQ1_S: _iq1_s,
    T.IQ1_M: _iq1_m,
    T.IQ4_NL: _iq4_nl,
    T.IQ4_XS: _iq4_xs,
    T.MXFP4: _mxfp4,
    T.NVFP4: _nvfp4,
}
