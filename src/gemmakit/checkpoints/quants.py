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

    Q2_K  256 values, 84 B:  16 B (4-bit scale | 4-bit min << 4) per 16 | 64 B 2-bit q | d | dmin
          (value 32k + l of a 128-value half is 2-bit field k of byte l)  -> d * sc_j * q - dmin * m_j
    Q3_K  256 values, 110 B:  32 B high bits | 64 B 2-bit q as Q2_K | 12 B 16 x 6-bit scales | d
          (q - 4 where the high bit is CLEAR; scales stored + 32)        -> d * (sc_j - 32) * q
    TQ1_0 256 values, 54 B:  48 B + 4 B of base-3 digits, 5 (4) per byte as a fraction of 256 | d -> d * (t - 1)
    TQ2_0 256 values, 66 B:  64 B 2-bit codes laid out as Q2_K's | d          -> d * (t - 1), t in 0..2

Lookup-table types (decoded in quants_iq.py, whose tables all come from the gguf library):

    IQ4_NL  32 values, 18 B:  d | 16 B nibbles as Q4_0                   -> d * kvalues[q] (16 levels)
    IQ4_XS  256 values, 136 B: d | 2 B 2-bit scale highs | 4 B scale lows | 8 x 16 B nibbles
            (8 sub-blocks of 32, 6-bit scales stored + 32)               -> d * (sc_j - 32) * kvalues[q]
    IQ3_XXS 256 values, 98 B: d | 64 B indices into a 256 x 4 grid | 8 x uint32 (4 x 7-bit index into 128
            sign patterns, 4-bit scale)                                  -> d * (0.5 + s) * 0.5 * +-grid
    IQ3_S   256 values, 110 B: d | 64 B + 8 B high bits: 9-bit indices into a 512 x 4 grid | 32 B sign bits
            | 4 B 4-bit scales, one per 32                               -> d * (1 + 2s) * +-grid
    IQ2_XXS 256 values, 66 B: d | 8 x (4 indices into a 256 x 8 grid, uint32 of 4 sign patterns + scale)
                                                                         -> d * (0.5 + s) * 0.25 * +-grid
    IQ2_XS  256 values, 74 B: d | 32 x uint16 (9-bit 512 x 8 grid index, 7-bit sign pattern) | 8 B scales
    IQ2_S   256 values, 82 B: d | 32 B + 8 B 2-bit highs: 10-bit 1024 x 8 grid indices | 32 B sign bits
            | 8 B 4-bit scales, one per 16 (both as IQ2_XXS's formula)
    IQ1_S   256 values, 50 B: d | 32 B + 3-bit highs: 11-bit indices into a 2048 x 8 grid of -1/0/1 |
            8 x uint16 (4 index highs, 3-bit scale, delta sign)         -> d * (2s + 1) * (grid +- 0.125)
    IQ1_M   256 values, 56 B: 32 B indices | 16 B nibbles (3-bit index high, delta sign) | 4 x uint16 of
            3-bit scales whose top nibbles together hold the float16 d   -> as IQ1_S, scale per 16
    MXFP4   32 values, 17 B:  E8M0 exponent byte | 16 B nibbles as Q4_0  -> 2^(e-128) * e2m1x2[q]
    NVFP4   64 values, 36 B:  4 x UE4M3 scale byte, one per 16 | 4 x 8 B nibbles -> ue4m3/2 * e2m1x2[q]

Every type gguf's reference can dequantize is decoded. The rest (Q8_K and Q8_1, which llama.cpp only uses
for activations, Q1_0, the integer types) is rejected with a ValueError that tells the user how to
re-quantize the file. How each type is held under `--quantize` is `describe`'s business (see WIDE).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from gemmakit.checkpoints.quants_bits import bits, bits_inner, f16, nibbles
from gemmakit.checkpoints.quants_iq import DECODERS as _LOOKUP_DECODERS

T = GGMLQuantizationType
Decoder = Callable[[torch.Tensor], torch.Tensor]

# -----------------------------------------------------------------------------
# block decoders: [n_blocks, type_size] uint8 -> [n_blocks, block_size] float32


def _k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack Q4_K/Q5_K's 12 bytes of 6-bit (scale, min) pairs into two [n, 8] uint8 tensors."""
    # bytes 0-3: scales 0-3 (+2 top bits of scales 4-7), bytes 4-7: mins 0-3 (+2 top bits of mins 4-7),
    # bytes 8-11: low nibble = low 4 bits of scales 4-7, high nibble = low 4 bits of mins 4-7
    sc, mn, lo = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    scale = torch.cat((sc & 0x3F, (lo & 0x0F) | ((sc >> 2) & 0x30)), dim=-1)
    minimum = torch.cat((mn & 0x3F, (lo >> 4) | ((mn >> 2) & 0x30)), dim=-1)
    return scale, minimum


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    # converting first and scaling in place beats a mixed int8*float32 kernel by ~2x on CPU, and the
    # float copy of q becomes the output, so there is still only one float32 allocation
    return blocks[:, 2:].view(torch.int8).float().mul_(f16(blocks, 0))


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    q = nibbles(blocks[:, 2:]).reshape(-1, 32)
    return (q.view(torch.int8) - 8).float().mul_(f16(blocks, 0))


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    q = nibbles(blocks[:, 4:]).reshape(-1, 32)
    return q.float().mul_(f16(blocks, 0)).add_(f16(blocks, 2))


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    q = nibbles(blocks[:, 6:]).reshape(-1, 32) | (bits_inner(blocks[:, 2:6], 1) << 4)
    return (q.view(torch.int8) - 16).float().mul_(f16(blocks, 0))


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    q = nibbles(blocks[:, 8:]).reshape(-1, 32) | (bits_inner(blocks[:, 4:8], 1) << 4)
    return q.float().mul_(f16(blocks, 0)).add_(f16(blocks, 2))


def _k_affine(blocks: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Apply Q4_K/Q5_K's per-sub-block affine map to q [n, 8, 32]; returns [n, 256]."""
    scale, minimum = _k_scales(blocks[:, 4:16])
    # same association as ggml: (d * scale) * q - (dmin * min), so results are bit-identical
    dl = (f16(blocks, 0) * scale).unsqueeze(-1)
    ml = (f16(blocks, 2) * minimum).unsqueeze(-1)
    return q.float().mul_(dl).sub_(ml).reshape(-1, 256)


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    q = nibbles(blocks[:, 16:].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    return _k_affine(blocks, q)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    low = nibbles(blocks[:, 48:].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    high = bits(blocks[:, 16:48], 1)  # [n, 8, 32]: bit j of byte l is the high bit of sub-block j
    return _k_affine(blocks, low | (high << 4))


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    # two halves of 128 values; within a half, value 32k + l takes nibble (k // 2) of ql[32 * (k % 2) + l]
    # and 2-bit field k of qh[l], which is exactly what the nibble/bit splits below line up
    low = nibbles(blocks[:, :128].reshape(-1, 2, 64)).reshape(-1, 8, 32)
    high = bits(blocks[:, 128:192].reshape(-1, 2, 32), 2).reshape(-1, 8, 32)
    q = ((low | (high << 4)).view(torch.int8) - 32).reshape(-1, 16, 16)
    dl = (f16(blocks, 208) * blocks[:, 192:208].view(torch.int8)).unsqueeze(-1)
    return q.float().mul_(dl).reshape(-1, 256)


def _q2_k(blocks: torch.Tensor) -> torch.Tensor:
    # 16 B of (4-bit scale | 4-bit min << 4), one per 16 values | 64 B 2-bit codes | d | dmin;
    # value 32k + l of each 128-value half is 2-bit field k of that half's byte l
    q = bits(blocks[:, 16:80].reshape(-1, 2, 32), 2).reshape(-1, 16, 16)
    sc = blocks[:, :16]
    dl = (f16(blocks, 80) * (sc & 0x0F)).unsqueeze(-1)
    ml = (f16(blocks, 82) * (sc >> 4)).unsqueeze(-1)
    return q.float().mul_(dl).sub_(ml).reshape(-1, 256)


def _q3_k(blocks: torch.Tensor) -> torch.Tensor:
    # 32 B high bits (bit j of byte l: value 32j + l; a CLEAR bit subtracts 4) | 64 B 2-bit codes as in Q2_K |
    # 12 B of 16 x 6-bit signed scales (low nibbles in bytes 0-7, 2-bit highs in bytes 8-11) | d
    low = bits(blocks[:, 32:96].reshape(-1, 2, 32), 2).reshape(-1, 16, 16)
    high = bits(blocks[:, :32].unsqueeze(1), 1).reshape(-1, 16, 16)
    q = low.view(torch.int8) - ((high ^ 1) << 2).view(torch.int8)
    scale_lo = nibbles(blocks[:, 96:104]).reshape(-1, 16)
    scale_hi = bits(blocks[:, 104:108], 2).reshape(-1, 16)
    scales = ((scale_lo | (scale_hi << 4)).view(torch.int8) - 32).float()
    dl = (f16(blocks, 108) * scales).unsqueeze(-1)
    return q.float().mul_(dl).reshape(-1, 256)


def _tq1_0(blocks: torch.Tensor) -> torch.Tensor:
    # ternary, base-3 digits packed 5 per byte as a fixed-point fraction: digit i of byte b is
    # (b * 3**i mod 256) * 3 >> 8. 32 B give 5 x 32 values, 16 B 5 x 16, 4 B 4 x 4 | d; -> d * (digit - 1)
    n = blocks.shape[0]
    pow3 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.uint8).unsqueeze(-1)
    parts = (blocks[:, :32].unsqueeze(1) * pow3, blocks[:, 32:48].unsqueeze(1) * pow3,
             blocks[:, 48:52].unsqueeze(1) * pow3[:4])
    q = torch.cat([p.reshape(n, -1) for p in parts], dim=-1)  # uint8 products wrap mod 256, as in ggml
    digits = (q.to(torch.int16) * 3) >> 8
    return (digits.to(torch.int8) - 1).float().mul_(f16(blocks, 52))


def _tq2_0(blocks: torch.Tensor) -> torch.Tensor:
    # ternary as 2-bit codes laid out like Q2_K's (no scales) | d; -> d * (code - 1)
    q = bits(blocks[:, :64].reshape(-1, 2, 32), 2).reshape(-1, 256)
    return (q.view(torch.int8) - 1).float().mul_(f16(blocks, 64))


# -----------------------------------------------------------------------------
# 4-bit codes as they are stored, for int4 kernels: [n_blocks, bytes] -> (q [n, G], scale [n, G/32], zero)
# with value = scale * q + zero over each group of 32 consecutive values


def _q4_0_codes(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d = f16(blocks, 0)
    return nibbles(blocks[:, 2:]).reshape(-1, 32), d, -8 * d


def _q4_1_codes(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return nibbles(blocks[:, 4:]).reshape(-1, 32), f16(blocks, 0), f16(blocks, 2)


def _q4_k_codes(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    scale, minimum = _k_scales(blocks[:, 4:16])
    q = nibbles(blocks[:, 16:].reshape(-1, 4, 32)).reshape(-1, 256)
    return q, f16(blocks, 0) * scale, -(f16(blocks, 2) * minimum)


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
    T.Q2_K: _q2_k,
    T.Q3_K: _q3_k,
    T.TQ1_0: _tq1_0,
    T.TQ2_0: _tq2_0,
    **_LOOKUP_DECODERS,
}
_FLOAT_TYPES = frozenset({T.F32, T.F16, T.BF16})

SUPPORTED: frozenset[GGMLQuantizationType] = frozenset(_DECODERS)



def bits_per_weight(qtype: GGMLQuantizationType) -> float:
    """Bits a type stores per weight, scales included (Q4_K 4.5, Q6_K 6.5625, IQ2_XXS 2.0625)."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    return 8 * type_size / block_size


# Types that store more than 4.5 bits a weight (Q5_*, Q6_K, Q8_0, floats), Q4_1 aside as it keeps its codes.
# In a file that mixes them with 4-bit blocks, `--quantize int4` keeps the precision its quantizer chose, to
# the nearest kernel: these matrices go to int8 rather than being rounded to 4 bits (checkpoints.gguf).
# llama.cpp's Q4_K_M gives half the attn_v and ffn_down matrices Q6_K or Q8_0 as sensitive ones, and Q5_0 to
# every matrix whose rows are not whole Q4_K super-blocks (the 270M's 640-wide q/k/gate/up); re-fitting
# those to int4 costs perplexity (docs/performance.md). Everything at 4.5 bits or less (the IQ*, TQ*, Q2_K,
# Q3_K, IQ4_*, MXFP4/NVFP4 types) is no more precise than int4, and is decoded and re-fitted like floats.
WIDE: frozenset[GGMLQuantizationType] = frozenset(
    t for t in SUPPORTED - FOUR_BIT if bits_per_weight(t) > 4.5
)


def describe(types: Mapping[GGMLQuantizationType, int], quantize: str | None) -> str:
    """How a GGUF's tensors are held once loaded with `quantize` (None, "int8" or "int4"), as a phrase for
    the one-line load summary, e.g. "Q4_K x 120 kept as int4 codes; Q6_K x 18, Q8_0 x 2 to int8; IQ3_S x 4
    decoded, then int4". `types` counts the file's tensors per type. This mirrors `checkpoints.gguf`: int4
    keeps the codes of FOUR_BIT types (v_proj aside) and, in a file that also has types of 4.5 bits
    or fewer, puts WIDE matrices at int8; every other tensor is decoded to float, then quantized in the
    model's mode if it is a matrix. Types gemmakit cannot decode are named as such."""
    mixed = quantize == "int4" and any(t not in WIDE for t in types)

    def how(qtype: GGMLQuantizationType) -> str:
        if qtype not in SUPPORTED:
            return "not supported"
        target = "int8" if mixed and qtype in WIDE else quantize
        if qtype in _FLOAT_TYPES:
            return f"float (matrices {target})" if quantize else "float"
        if quantize == "int4" and qtype in FOUR_BIT:
            return "kept as int4 codes"
        if target is None:
            return "decoded to float"
        return "to int8" if target == "int8" and mixed else f"decoded, then {target}"

    groups: dict[str, list[str]] = {}
    for qtype, count in sorted(types.items(), key=lambda kv: (-kv[1], kv[0].name)):
        groups.setdefault(how(qtype), []).append(f"{getattr(qtype, 'name', qtype)} x {count}")
    return "; ".join(f"{', '.join(names)} {phrase}" for phrase, names in groups.items())

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
