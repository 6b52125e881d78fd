"""Every GGUF block type beyond Q4/Q5/Q6/Q8 decodes bit for bit like gguf's numpy reference, on blocks written
by llama.cpp's own quantizer (ggml through ctypes) and on random blocks; and how each is held under --quantize."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from gemmakit.checkpoints.quants import FOUR_BIT, SUPPORTED, WIDE, bits_per_weight, dequantize, describe
from tests.helpers import default_gguf

T = gguf.GGMLQuantizationType
GGUF_PATH = default_gguf()

# byte offsets of the float16 fields of one block; IQ1_M spreads its d over four nibbles, MXFP4 and NVFP4
# have one-byte scales: random_blocks makes those valid separately
F16_FIELDS = {
    T.Q2_K: (80, 82), T.Q3_K: (108,), T.TQ1_0: (52,), T.TQ2_0: (64,),
    T.IQ1_S: (0,), T.IQ1_M: (), T.IQ2_XXS: (0,), T.IQ2_XS: (0,), T.IQ2_S: (0,),
    T.IQ3_XXS: (0,), T.IQ3_S: (0,), T.IQ4_NL: (0,), T.IQ4_XS: (0,), T.MXFP4: (), T.NVFP4: (),
}
NEW_TYPES = sorted(F16_FIELDS, key=lambda t: t.name)


def reference(data: np.ndarray, qtype: T) -> torch.Tensor:
    """gguf's own numpy dequantization, as a float32 torch tensor."""
    return torch.from_numpy(np.array(gguf.quants.dequantize(data, qtype), dtype=np.float32))


def assert_bit_identical(data: np.ndarray, qtype: T, shape: tuple[int, int]) -> torch.Tensor:
    want = reference(data, qtype).reshape(shape)
    assert not want.isnan().any(), "the comparison is only meaningful on NaN-free data"
    got = dequantize(data, qtype, shape)
    assert got.shape == shape and got.dtype == torch.float32
    # equal bit patterns, so -0.0 vs 0.0 counts as a difference too
    mismatch = (got.view(torch.int32) != want.view(torch.int32)).sum().item()
    assert mismatch == 0, f"{qtype.name}: {mismatch} of {want.numel()} values differ"
    return got


# -----------------------------------------------------------------------------
# blocks written by llama.cpp

# Run in a child process, twice in parallel: ggml_quantize_init builds the IQ1/IQ2 search tables under a
# global lock, seconds of one core for IQ1_S and IQ2_S alone, so two processes halve the wait on two cores.
QUANTIZER = r"""
import ctypes, sys
from pathlib import Path
import numpy as np

lib = ctypes.CDLL(sys.argv[1])
lib.ggml_quantize_init.argtypes = [ctypes.c_int]
lib.ggml_quantize_init.restype = None
lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
lib.ggml_row_size.restype = ctypes.c_size_t
# size_t ggml_quantize_chunk(type, const float * src, void * dst, int64_t start, int64_t nrows,
#                            int64_t n_per_row, const float * imatrix)
lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                    ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
lib.ggml_quantize_chunk.restype = ctypes.c_size_t
work = Path(sys.argv[2])
for qtype in map(int, sys.argv[3:]):
    lib.ggml_quantize_init(qtype)
    for source in sorted(work.glob("src_*.npy")):
        x = np.ascontiguousarray(np.load(source), dtype=np.float32)
        rows, cols = x.shape
        # importance = mean square of each column, as llama-imatrix collects it (IQ1_S/IQ2_* require one)
        imatrix = np.ascontiguousarray((x * x).mean(axis=0))
        dst = np.zeros((rows, lib.ggml_row_size(qtype, cols)), dtype=np.uint8)
        written = lib.ggml_quantize_chunk(qtype, x.ctypes.data, dst.ctypes.data, 0, rows, cols, imatrix.ctypes.data)
        assert written == dst.size, (qtype, written, dst.size)
        np.save(work / f"q{qtype}_{source.stem[4:]}.npy", dst)
"""


def _ggml_base() -> Path:
    spec = importlib.util.find_spec("llama_cpp")
    assert spec is not None and spec.submodule_search_locations, "llama-cpp-python is a test dependency"
    return Path(spec.submodule_search_locations[0]) / "lib" / "libggml-base.so"


def _sources() -> dict[str, np.ndarray]:
    """Float matrices to quantize: two of the 270M's real weights when the file is there (rows of the token
    embedding, paired up into 1280-wide rows so 256-value blocks fit, and blk.0's ffn_down), and a Gaussian
    matrix with 1% outliers 20 times as large, which stresses the scale choice."""
    rng = np.random.default_rng(0)
    gauss = rng.standard_normal((16, 1024)).astype(np.float32)
    gauss[rng.random(gauss.shape) < 0.01] *= 20
    sources = {"gauss": gauss}
    if GGUF_PATH.exists():
        from gemmakit.checkpoints.gguf_reader import open_gguf

        tensors = {t.name: t for t in open_gguf(GGUF_PATH).tensors}
        embd, down = tensors["token_embd.weight"], tensors["blk.0.ffn_down.weight"]
        width = int(embd.shape[0])
        sources["embd"] = dequantize(embd.data[:64], embd.tensor_type, (64, width)).reshape(32, 2 * width).numpy()
        down_shape = tuple(int(n) for n in reversed(down.shape))
        sources["ffn_down"] = dequantize(down.data, down.tensor_type, down_shape)[:24].numpy()
    return sources


@pytest.fixture(scope="module")
def llama_blocks(tmp_path_factory) -> dict[tuple[T, str], tuple[np.ndarray, np.ndarray]]:
    """(type, source name) -> (llama.cpp's quantized bytes [rows, row bytes], the float source)."""
    work = tmp_path_factory.mktemp("ggml")
    sources = _sources()
    for name, x in sources.items():
        np.save(work / f"src_{name}.npy", x)
    slow = [T.IQ1_S, T.IQ1_M]  # IQ1_M reuses IQ1_S's tables
    fast = [t for t in NEW_TYPES if t not in slow]
    procs = [subprocess.Popen([sys.executable, "-c", QUANTIZER, str(_ggml_base()), str(work),
                               *(str(t.value) for t in group)], stderr=subprocess.PIPE, text=True)
             for group in (slow, fast)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    return {(t, name): (np.load(work / f"q{t.value}_{name}.npy"), x) for t in NEW_TYPES for name, x in sources.items()}


@pytest.mark.parametrize("qtype", NEW_TYPES, ids=lambda t: t.name)
def test_llama_cpp_blocks_match_reference(qtype: T, llama_blocks):
    """Blocks quantized by llama.cpp itself (with an importance matrix) from real 270M weights and from an
    outlier-heavy Gaussian matrix decode exactly like gguf.quants.dequantize, and approximate their source."""
    names = sorted(name for t, name in llama_blocks if t == qtype)
    assert "gauss" in names and (len(names) == 3 or not GGUF_PATH.exists())
    for name in names:
        data, x = llama_blocks[qtype, name]
        data.setflags(write=False)  # like GGUFReader's read-only memmap
        got = assert_bit_identical(data, qtype, x.shape)
        # a sanity check of the harness, not of quality: the decoded matrix points the source's way
        cosine = torch.nn.functional.cosine_similarity(got.flatten(), torch.from_numpy(x).flatten(), dim=0)
        assert cosine > 0.5, (name, float(cosine))


# -----------------------------------------------------------------------------
# random blocks


def random_blocks(qtype: T, rows: int, blocks_per_row: int, seed: int = 0) -> tuple[np.ndarray, tuple[int, int]]:
    """Random bytes [rows, row bytes] whose scale fields are replaced by finite values, and the torch shape."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    n = rows * blocks_per_row
    blocks = rng.integers(0, 256, size=(n, type_size), dtype=np.uint8)
    for offset in F16_FIELDS[qtype]:
        blocks[:, offset : offset + 2] = rng.uniform(-2, 2, size=(n, 1)).astype(np.float16).view(np.uint8)
    if qtype == T.IQ1_M:  # the float16 d is the top nibbles of the four uint16 scale words (bytes 49, 51, ...)
        d = rng.uniform(-2, 2, size=n).astype(np.float16).view(np.uint16)
        for i in range(4):
            nibble = ((d >> (4 * i)) & 0xF).astype(np.uint8)
            blocks[:, 49 + 2 * i] = (blocks[:, 49 + 2 * i] & 0x0F) | (nibble << 4)
    if qtype == T.MXFP4:  # E8M0 exponent: keep 2^(e - 127) well inside float32 so no product overflows
        blocks[:, 0] = rng.integers(100, 150, size=n)
    if qtype == T.NVFP4:  # UE4M3 scales: every byte value decodes to a finite float
        blocks[:, :4] = rng.integers(0, 256, size=(n, 4))
    data = blocks.reshape(rows, blocks_per_row * type_size)
    data.setflags(write=False)
    return data, (rows, blocks_per_row * block_size)


@pytest.mark.parametrize("qtype", NEW_TYPES, ids=lambda t: t.name)
def test_random_blocks_match_reference(qtype: T):
    """Random payloads (every grid index, sign pattern and scale code) decode bit-identically, to many values."""
    data, shape = random_blocks(qtype, rows=7, blocks_per_row=3 if gguf.GGML_QUANT_SIZES[qtype][0] == 256 else 24)
    got = assert_bit_identical(data, qtype, shape)
    assert got.unique().numel() > 32  # guards against a decoder that ignores its bits


def test_every_type_gguf_can_decode_is_supported():
    """SUPPORTED covers every block type gguf's reference can dequantize; the new ones are all there."""
    decodable = set()
    for qtype in T:
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        try:
            gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
        except NotImplementedError:
            continue
        decodable.add(qtype)
    assert set(NEW_TYPES) <= decodable <= SUPPORTED


# -----------------------------------------------------------------------------
# how the types are held under --quantize


def test_wide_means_more_than_four_and_a_half_bits():
    """WIDE (kept at int8 among int4 codes) holds exactly the non-code types over 4.5 bits a weight: none of
    the new ones, all of which are too coarse or not affine to keep as int4 codes either."""
    assert {t.name for t in WIDE} == {"F32", "F16", "BF16", "Q8_0", "Q5_0", "Q5_1", "Q5_K", "Q6_K"}
    for qtype in NEW_TYPES:
        assert qtype not in WIDE and qtype not in FOUR_BIT and bits_per_weight(qtype) <= 4.5


def test_describe_says_how_each_type_is_held():
    """describe() names each type present with its count and whether it keeps int4 codes, goes to int8, or is
    decoded (then quantized in the model's mode)."""
    counts = {T.Q4_K: 120, T.Q6_K: 18, T.IQ3_S: 4, T.F32: 40}
    assert describe(counts, None) == "Q4_K x 120, Q6_K x 18, IQ3_S x 4 decoded to float; F32 x 40 float"
    assert describe(counts, "int4") == ("Q4_K x 120 kept as int4 codes; F32 x 40 float (matrices int8); "
                                        "Q6_K x 18 to int8; IQ3_S x 4 decoded, then int4")
    assert describe(counts, "int8") == ("Q4_K x 120, Q6_K x 18, IQ3_S x 4 decoded, then int8; "
                                        "F32 x 40 float (matrices int8)")
    # a file below 4.5 bits a weight without 4-bit codes still keeps its wide matrices at int8; a file of wide
    # types only has none singled out, so int4 re-fits everything
    assert describe({T.IQ4_XS: 100, T.Q6_K: 10}, "int4") == "IQ4_XS x 100 decoded, then int4; Q6_K x 10 to int8"
    assert describe({T.Q8_0: 100, T.F32: 10}, "int4") == "Q8_0 x 100 decoded, then int4; F32 x 10 float (matrices int4)"
    assert describe({T.Q8_K: 1}, None) == "Q8_K x 1 not supported"
