"""Tests for gemmakit.checkpoints.quants: torch dequantization must match gguf's numpy reference."""

from __future__ import annotations

import warnings

import gguf
import numpy as np
import pytest
import torch

from gemmakit.checkpoints.quants import FOUR_BIT, SUPPORTED, dequantize, four_bit_codes
from tests.helpers import default_gguf, weight_error

T = gguf.GGMLQuantizationType
GGUF_PATH = default_gguf()

# byte offsets of the float16 scale/min fields inside one block of each quantized type
F16_FIELDS = {
    T.Q8_0: (0,),
    T.Q4_0: (0,),
    T.Q4_1: (0, 2),
    T.Q5_0: (0,),
    T.Q5_1: (0, 2),
    T.Q4_K: (0, 2),
    T.Q5_K: (0, 2),
    T.Q6_K: (208,),
}
QUANT_TYPES = sorted(F16_FIELDS, key=lambda t: t.name)


def random_quant(qtype: T, rows: int, blocks_per_row: int, seed: int = 0) -> tuple[np.ndarray, tuple]:
    """Random but valid quantized bytes [rows, bytes_per_row] (finite f16 scales) and its torch shape."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows * blocks_per_row, type_size), dtype=np.uint8)
    # random bytes would make some f16 scales NaN/Inf, whose propagation is not what we want to compare
    for offset in F16_FIELDS[qtype]:
        scales = rng.uniform(-2.0, 2.0, size=(blocks.shape[0], 1)).astype(np.float16)
        blocks[:, offset : offset + 2] = scales.view(np.uint8)
    data = blocks.reshape(rows, blocks_per_row * type_size)
    data.setflags(write=False)  # like GGUFReader's read-only memmap
    return data, (rows, blocks_per_row * block_size)


def reference(data: np.ndarray, qtype: T) -> torch.Tensor:
    """gguf's own numpy dequantization, as a float32 torch tensor."""
    return torch.from_numpy(np.array(gguf.quants.dequantize(data, qtype), dtype=np.float32))


def test_supported_covers_required_types():
    """SUPPORTED lists at least the float types and every quantized type tested here."""
    assert {T.F32, T.F16, T.BF16, *F16_FIELDS} <= SUPPORTED


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_quant_matches_gguf_reference(qtype: T):
    """Every quantized type decodes bit-identically to gguf.quants.dequantize on a multi-row tensor."""
    data, shape = random_quant(qtype, rows=5, blocks_per_row=3)
    out = dequantize(data, qtype, shape)
    assert out.shape == shape and out.dtype == torch.float32
    torch.testing.assert_close(out, reference(data, qtype).reshape(shape), rtol=0, atol=0)


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_quant_is_not_constant(qtype: T):
    """Random payloads decode to many distinct values (guards against a decoder ignoring its bits)."""
    data, shape = random_quant(qtype, rows=2, blocks_per_row=2, seed=1)
    assert dequantize(data, qtype, shape).unique().numel() > 32


def test_f32_round_trip():
    """F32 data comes back unchanged, as a writable copy detached from the source array."""
    src = np.random.default_rng(0).standard_normal((3, 7)).astype(np.float32)
    out = dequantize(src, T.F32, (3, 7))
    assert torch.equal(out, torch.from_numpy(src))
    out.zero_()
    assert np.any(src != 0)


def test_f16_round_trip():
    """F16 data decodes to exactly its float32 values."""
    src = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float16)
    assert torch.equal(dequantize(src, T.F16, (4, 6)), torch.from_numpy(src.astype(np.float32)))


def test_bf16_round_trip():
    """BF16 data, given as raw uint8 bytes like GGUFReader does, decodes to exactly the original values."""
    src = torch.randn(4, 6).to(torch.bfloat16)
    raw = src.view(torch.uint8).numpy()  # [4, 12] bytes, as the reader returns for BF16
    assert torch.equal(dequantize(raw, T.BF16, (4, 6)), src.float())


def test_output_dtype_is_cast_at_the_end():
    """The dtype argument only casts the float32 result."""
    data, shape = random_quant(T.Q4_K, rows=2, blocks_per_row=1)
    out = dequantize(data, T.Q4_K, shape, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, dequantize(data, T.Q4_K, shape).to(torch.bfloat16))


def test_one_dimensional_shape():
    """A 1-D tensor (e.g. a norm weight) decodes to shape [n]."""
    data, (rows, cols) = random_quant(T.Q8_0, rows=1, blocks_per_row=4)
    assert dequantize(data, T.Q8_0, (cols,)).shape == (cols,)


def test_read_only_input_emits_no_warning():
    """Read-only (memmap-like) inputs are handled without torch's non-writable-array warning."""
    data, shape = random_quant(T.Q6_K, rows=2, blocks_per_row=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dequantize(data, T.Q6_K, shape)


def test_unsupported_type_raises():
    """An unsupported type (Q8_K, which llama.cpp uses for activations only) raises ValueError naming the type
    and suggesting a re-quantization."""
    data = np.zeros((1, gguf.GGML_QUANT_SIZES[T.Q8_K][1]), dtype=np.uint8)
    with pytest.raises(ValueError, match="Q8_K") as err:
        dequantize(data, T.Q8_K, (1, 256))
    assert "Q8_0" in str(err.value) and "llama-quantize" in str(err.value)


def test_shape_mismatch_raises():
    """A shape whose size does not match the byte count raises ValueError."""
    data, (rows, cols) = random_quant(T.Q8_0, rows=2, blocks_per_row=2)
    with pytest.raises(ValueError, match="does not match shape"):
        dequantize(data, T.Q8_0, (rows, cols + 32))


@pytest.mark.skipif(not GGUF_PATH.exists(), reason=f"{GGUF_PATH} not downloaded")
def test_real_gguf_file_matches_reference():
    """On the real 270M GGUF, a few tensors of each type present match gguf.quants.dequantize exactly."""
    from gemmakit.checkpoints.gguf_reader import open_gguf

    reader = open_gguf(GGUF_PATH)
    by_type: dict[T, list] = {}
    for tensor in reader.tensors:
        # skip the huge token embedding so the test stays fast; other Q8_0 tensors cover the type
        if tensor.n_elements < 20_000_000:
            by_type.setdefault(tensor.tensor_type, []).append(tensor)
    assert by_type
    for qtype, tensors in by_type.items():
        for tensor in tensors[:3]:
            shape = tuple(reversed(tensor.shape.tolist()))
            out = dequantize(tensor.data, qtype, shape)
            expected = reference(tensor.data, qtype).reshape(shape)
            assert torch.equal(out, expected), f"{tensor.name} ({qtype.name})"


@pytest.mark.parametrize("qtype", sorted(FOUR_BIT, key=lambda t: t.name), ids=lambda t: t.name)
def test_four_bit_codes_are_what_dequantize_decodes(qtype: T):
    """Codes in 0..15 with a scale and zero per 32 values reproduce the decoded matrix exactly (same f32 ops)."""
    data, (rows, cols) = random_quant(qtype, rows=4, blocks_per_row=2)
    q, scale, zero = four_bit_codes(data, qtype, (rows, cols))
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and scale.shape == zero.shape == (rows, cols // 32)
    groups = q.float().view(rows, -1, 32)
    rebuilt = (groups * scale[..., None] + zero[..., None]).view(rows, cols)
    torch.testing.assert_close(rebuilt, dequantize(data, qtype, (rows, cols)), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="does not store 4-bit codes"):
        four_bit_codes(data, T.Q8_0, (rows, cols))


@pytest.mark.skipif(not GGUF_PATH.exists(), reason=f"{GGUF_PATH} not downloaded")
def test_int4_loading_keeps_the_gguf_q4_codes():
    """`--quantize int4` runs a Q4_K matrix of the real file on its stored codes: its int4 weight equals the
    file's values up to bf16 rounding of scale and zero, far closer than re-fitting the decoded values. Every
    linear the file stores wider than 4 bits (Q5_0, Q6_K, Q8_0) is int8 instead, and only its 4-bit ones int4
    (but v_proj, which int4 always keeps at int8)."""
    from gemmakit.checkpoints import load_model
    from gemmakit.checkpoints.gguf_reader import open_gguf
    from gemmakit.quantize import Int4Linear, Int8Linear

    tensors = {t.name: t for t in open_gguf(GGUF_PATH).tensors}
    tensor = tensors["blk.0.attn_output.weight"]
    assert tensor.tensor_type == T.Q4_K
    shape = tuple(reversed(tensor.shape.tolist()))
    want = dequantize(tensor.data, tensor.tensor_type, shape)
    model = load_model(GGUF_PATH, quantize="int4")
    # The loader's own name map (gguf's HF -> GGUF table) finds each linear's stored tensor.
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, model.config.num_hidden_layers)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, Int4Linear | Int8Linear) and ".layers." in n]
    seen = set()
    for name, linear in linears:
        stored = tensors[name_map.get_name(name) + ".weight"].tensor_type
        seen.add(stored)
        four_bit = stored in FOUR_BIT and not name.endswith("v_proj")
        assert isinstance(linear, Int4Linear if four_bit else Int8Linear), (name, stored)
    assert len(linears) == 7 * model.config.num_hidden_layers
    assert {T.Q4_K, T.Q5_0, T.Q6_K, T.Q8_0} <= seen
    linear = model.model.layers[0].self_attn.o_proj
    kept, refit = weight_error(linear, want), weight_error(Int4Linear.from_weight(want, 32), want)
    assert kept < 0.006 and kept < refit / 5, (kept, refit)
