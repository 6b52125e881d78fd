"""
Dequantize GGUF tensor data into torch tensors.

GGUF files store most weights in llama.cpp's block quantization formats. This module turns the raw
bytes that `gguf.GGUFReader` hands out into ordinary float tensors, so the rest of gemmakit only ever
sees plain PyTorch weights.

Why torch and not numpy: gguf ships a reference numpy dequantizer, but it is single-threaded and
materialises several float32 temporaries per step. Here every block format is decoded with a handful
of whole-tensor torch ops (uint8 shifts and masks, then a single int->float conversion that is scaled
in place and becomes the output), which run multi-threaded and stay in uint8 as long as possible. No
Python loop runs per block; each format is a fixed sequence of reshapes over an [n_blocks, bytes] view.
The results match gguf's numpy implementation bit for bit (same float32 operation order).

Block layouts (little-endian; "d"/"m" are float16 scale/min; a value is d * q (- or +) m):

    Q8_0  32 values, 34 B:  d | 32 x int8 q                        -> d * q
    Q4_0  32 values, 18 B:  d | 16 B nibbles (lo = values 0..15, hi = 16..31)   -> d * (q - 8)
    Q4_1  32 values, 20 B:  d | m | 16 B nibbles                   -> d * q + m
    Q5_0  32 values, 22 B:  d | 4 B high bits (bit i -> value i) | 16 B nibbles -> d * (q - 16)
    Q5_1  32 values, 24 B:  d | m | 4 B high bits | 16 B nibbles   -> d * q + m
    Q4_K  256 values, 144 B "super-block" of 8 sub-blocks of 32:
          d | dmin | 12 B packed 6-bit (scale, min) x 8 | 128 B nibbles
          (each 32 B chunk holds two sub-blocks: lo nibbles then hi nibbles)
          -> d * scale_j * q - dmin * min_j
    Q5_K  256 values, 176 B:  d | dmin | 12 B scales/mins | 32 B high bits | 128 B nibbles
          (high bit of sub-block j is bit j of the 32 B high-bit array)
    Q6_K  256 values, 210 B:  128 B low nibbles | 64 B 2-bit highs | 16 x int8 scale | d
          (16 sub-blocks of 16; -> d * scale_j * (q - 32))

Types not listed in SUPPORTED (the IQ*/TQ*/Q2_K/Q3_K families, ...) are rejected with a ValueError
that tells the user how to re-quantize the file.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

T = GGMLQuantizationType
Decoder = Callable[[torch.Tensor], torch.Tensor]

# -----------------------------------------------------------------------------
# small helpers shared by the block decoders


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """Read the float16 field at byte `start` of every block as an [n_blocks, 1] float32 column."""
    # contiguous() makes the 2-byte slice aligned so it can be reinterpreted as float16
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Split bytes [..., k] into [..., 2, k]: low nibbles first, then high nibbles (ggml's order)."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-2)


def _bits(packed: torch.Tensor, width: int) -> torch.Tensor:
    """Split bytes [..., k] into [..., 8 // width, k] fields of `width` bits, least significant first."""
    shifts = torch.arange(0, 8, width, dtype=torch.uint8).unsqueeze(-1)
    return (packed.unsqueeze(-2) >> shifts) & ((1 << width) - 1)


def _low_bits_32(qh: torch.Tensor) -> torch.Tensor:
    """Unpack a little-endian uint32 bitfield stored as bytes [n, 4] into [n, 32] bits (bit i -> value i)."""
    # byte b holds values 8b..8b+7, so the bit axis must end up innermost (unlike _bits)
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((qh.unsqueeze(-1) >> shifts) & 1).reshape(qh.shape[0], 32)


def _k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack Q4_K/Q5_K's 12 bytes of 6-bit (scale, min) pairs into two [n, 8] uint8 tensors."""
    # bytes 0-3: scales 0-3 (+2 top bits of scales 4-7), bytes 4-7: mins 0-3 (+2 top bits of mins 4-7),
    # bytes 8-11: low nibble = low 4 bits of scales 4-7, high nibble = low 4 bits of mins 4-7
    sc, mn, lo = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    scale = torch.cat((sc & 0x3F, (lo & 0x0F) | ((sc >> 2) & 0x30)), dim=-1)
    minimum = torch.cat((mn & 0x3F, (lo >> 4) | ((mn >> 2) & 0x30)), dim=-1)
    return scale, minimum


# -----------------------------------------------------------------------------
# block decoders: [n_blocks, type_size] uint8 -> [n_blocks, block_size] float32


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    # converting first and scaling in place beats a mixed int8*float32 kernel by ~2x on CPU, and the
    # float copy of q becomes the output, so there is still only one float32 allocation
    return blocks[:, 2:].view(torch.int8).float().mul_(_f16(blocks, 0))


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    q = _nibbles(blocks[:, 2:]).reshape(-1, 32)
    return (q.view(torch.int8) - 8).float().mul_(_f16(blocks, 0))


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    q = _nibbles(blocks[:, 4:]).reshape(-1, 32)
    return q.float().mul_(_f16(blocks, 0)).add_(_f16(blocks, 2))


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    q = _nibbles(blocks[:, 6:]).reshape(-1, 32) | (_low_bits_32(blocks[:, 2:6]) << 4)
    return (q.view(torch.int8) - 16).float().mul_(_f16(blocks, 0))


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    q = _nibbles(blocks[:, 8:]).reshape(-1, 32) | (_low_bits_32(blocks[:, 4:8]) << 4)
    return q.float().mul_(_f16(blocks, 0)).add_(_f16(blocks, 2))


def _k_affine(blocks: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Apply Q4_K/Q5_K's per-sub-block affine map to q [n, 8, 32]; returns [n, 256]."""
    scale, minimum = _k_scales(blocks[:, 4:16])
    # same association as ggml: (d * scale) * q - (dmin * min), so results are bit-identical
    dl = (_f16(blocks, 0) * scale).unsqueeze(-1)
    ml = (_f16(blocks, 2) * minimum).unsqueeze(-1)
    return q.float().mul_(dl).sub_(ml).reshape(-1, 256)


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    q = _nibbles(blocks[:, 16:].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    return _k_affine(blocks, q)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    low = _nibbles(blocks[:, 48:].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    high = _bits(blocks[:, 16:48], 1)  # [n, 8, 32]: bit j of byte l is the high bit of sub-block j
    return _k_affine(blocks, low | (high << 4))


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    # two halves of 128 values; within a half, value 32k + l takes nibble (k // 2) of ql[32 * (k % 2) + l]
    # and 2-bit field k of qh[l], which is exactly what the nibble/bit splits below line up
    low = _nibbles(blocks[:, :128].reshape(-1, 2, 64)).reshape(-1, 8, 32)
    high = _bits(blocks[:, 128:192].reshape(-1, 2, 32), 2).reshape(-1, 8, 32)
    q = ((low | (high << 4)).view(torch.int8) - 32).reshape(-1, 16, 16)
    dl = (_f16(blocks, 208) * blocks[:, 192:208].view(torch.int8)).unsqueeze(-1)
    return q.float().mul_(dl).reshape(-1, 256)


# -----------------------------------------------------------------------------
# 4-bit codes as they are stored, for int4 kernels: [n_blocks, bytes] -> (q [n, G], scale [n, G/32], zero)
# with value = scale * q + zero over each group of 32 consecutive values


def _q4_0_codes(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d = _f16(blocks, 0)
    return _nibbles(blocks[:, 2:]).reshape(-1, 32), d, -8 * d


def _q4_1_codes(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _nibbles(blocks[:, 4:]).reshape(-1, 32), _f16(blocks, 0), _f16(blocks, 2)


def _q4_k_codes(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    scale, minimum = _k_scales(blocks[:, 4:16])
    q = _nibbles(blocks[:, 16:].reshape(-1, 4, 32)).reshape(-1, 256)
    return q, _f16(blocks, 0) * scale, -(_f16(blocks, 2) * minimum)


_CODES = {T.Q4_0: _q4_0_codes, T.Q4_1: _q4_1_codes, T.Q4_K: _q4_k_codes}
FOUR_BIT: frozenset[GGMLQuantizationType] = frozenset(_CODES)


def four_bit_codes(data: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, int]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The stored 4-bit codes of a Q4_0 / Q4_1 / Q4_K matrix `shape` [N, K], undecoded: (q uint8 [N, K] in
    0..15, scale and zero float32 [N, K / 32]) with w = scale * q + zero per group of 32 inputs, which is
    what `dequantize` computes. An int4 kernel with groups of 32 can run these codes as they are."""
    if qtype not in FOUR_BIT:
        raise ValueError(f"{getattr(qtype, 'name', qtype)} does not store 4-bit codes")
    n, k = shape
    q, scale, zero = _CODES[qtype](_blocks(data, qtype, shape))
    return q.reshape(n, k), scale.reshape(n, k // 32), zero.reshape(n, k // 32)


def _f32(raw: torch.Tensor) -> torch.Tensor:
    # the only decoder whose result would alias the (read-only) file mapping, so copy it out
    return raw.view(torch.float32).clone()


_DECODERS: dict[GGMLQuantizationType, Decoder] = {
    T.F32: _f32,
    T.F16: lambda raw: raw.view(torch.float16).float(),
    T.BF16: lambda raw: raw.view(torch.bfloat16).float(),
    T.Q8_0: _q8_0,
    T.Q4_0: _q4_0,
    T.Q4_1: _q4_1,
    T.Q5_0: _q5_0,
    T.Q5_1: _q5_1,
    T.Q4_K: _q4_k,
    T.Q5_K: _q5_k,
    T.Q6_K: _q6_k,
}
_FLOAT_TYPES = frozenset({T.F32, T.F16, T.BF16})

SUPPORTED: frozenset[GGMLQuantizationType] = frozenset(_DECODERS)

# Types that store more than 4 bits a weight (Q5_*, Q6_K, Q8_0, floats). In a file that mixes them with 4-bit
# blocks, `--quantize int4` keeps the precision its quantizer chose, to the nearest kernel: these matrices go
# to int8 rather than being rounded to 4 bits (checkpoints.gguf). llama.cpp's Q4_K_M gives half the attn_v and
# ffn_down matrices Q6_K or Q8_0 as sensitive ones, and Q5_0 to every matrix whose rows are not whole Q4_K
# super-blocks (the 270M's 640-wide q/k/gate/up); re-fitted to int4, the 270M's Q5_0 ones cost 2 points of
# perplexity (25.8 -> 27.8).
WIDE: frozenset[GGMLQuantizationType] = SUPPORTED - FOUR_BIT

# -----------------------------------------------------------------------------
# public entry point


def _raw_bytes(data: np.ndarray) -> torch.Tensor:
    """Zero-copy flat uint8 view of a (possibly read-only memmap) numpy array."""
    flat = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    # GGUFReader maps the file read-only and torch warns about that. Every decoder only reads from
    # this view and allocates its own output, so sharing the mapping is safe and saves a full copy.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(flat)


def _check_supported(qtype: GGMLQuantizationType) -> None:
    if qtype in SUPPORTED:
        return
    name = getattr(qtype, "name", str(qtype))
    supported = ", ".join(sorted(t.name for t in SUPPORTED))
    raise ValueError(
        f"GGUF tensor type {name} is not supported by gemmakit (supported: {supported}). "
        "Re-quantize the model to a supported type, e.g. with llama.cpp: "
        "`llama-quantize --allow-requantize model.gguf out.gguf Q8_0` (or Q4_K_M)."
    )


def dequantize(
    data: np.ndarray,
    qtype: GGMLQuantizationType,
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Decode one GGUF tensor's data (as given by `GGUFReader(...).tensors[i].data`) into `shape`/`dtype`.

    `shape` is the PyTorch shape, i.e. the reversed GGUF `ne`. Math is float32; the cast to `dtype`
    happens once at the end.
    """
    _check_supported(qtype)
    return _DECODERS[qtype](_blocks(data, qtype, shape)).reshape(shape).to(dtype)


def _blocks(data: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> torch.Tensor:
    """The data as [n_blocks, type_size] bytes (float types: flat), checked against `shape`."""
    raw = _raw_bytes(data)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    numel = int(np.prod(shape, dtype=np.int64))
    if raw.numel() * block_size != numel * type_size:
        raise ValueError(
            f"{qtype.name} data holds {raw.numel()} bytes, which does not match shape {tuple(shape)} "
            f"({numel} values at {type_size} bytes per {block_size} values)"
        )
    return raw if qtype in _FLOAT_TYPES else raw.view(-1, type_size)
