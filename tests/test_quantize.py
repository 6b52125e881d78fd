"""Weight-only quantization: packed int8/int4 linears match fp32, a quantized Gemma keeps its logits, memory drops.
Run: .venv/bin/python -m pytest tests/test_quantize.py
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gemmakit.model import Experts, Gemma
from gemmakit.quantize import (
    UNPACK_ROWS,
    Int4Linear,
    Int8Linear,
    QuantizedEmbedding,
    QuantizedExperts,
    quantize_model,
    quantized_bytes,
)
from gemmakit.quantize_codes import cpu_int4_block_rows, cpu_int4_layout, pack_int4, quantize_int4_packed
from tests.helpers import tiny

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a shared CPU OpenMP's spin-waits make them ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def _gemma(variant: str = "gemma3", embed_std: float = 1.0) -> Gemma:
    """A tiny random Gemma; vocab 1024 so the tied head meets the CPU int4 kernel's N % 16 rule."""
    torch.manual_seed(0)
    model = Gemma(tiny(variant).replace(vocab_size=1024)).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, embed_std)
        for name, p in model.named_parameters():
            if "experts." in name:  # created with torch.empty
                p.normal_(0.0, 0.1)
    return model


def _ids(batch: int = 2, length: int = 24) -> torch.Tensor:
    return torch.randint(0, 1000, (batch, length), generator=torch.Generator().manual_seed(1))


def _linear(n_out: int, n_in: int, device: str = "cpu") -> tuple[nn.Linear, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Linear(n_in, n_out, bias=False, device=device), torch.randn(3, 5, n_in, device=device)


def test_int8_linear_matches_fp32():
    """Int8Linear is within 1% (relative Frobenius) of the fp32 linear, with the leading dims kept."""
    lin, x = _linear(96, 256)
    q = Int8Linear.from_weight(lin.weight)
    assert q(x).shape == (3, 5, 96) and q(x).dtype == torch.float32
    assert _rel(q(x), lin(x)) < 0.01


def test_int8_linear_with_ragged_in_features():
    """K not a multiple of 16 (where the bf16 CPU kernel misreads the tail) still computes correctly."""
    lin, x = _linear(48, 24)
    q = Int8Linear.from_weight(lin.weight)
    assert q.scales.dtype == torch.float32
    assert _rel(q(x), lin(x)) < 0.01


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_linear_matches_fp32(group_size):
    """Int4Linear is within 7.5% of the fp32 linear (a wrong packing or scale layout gives ~100%)."""
    lin, x = _linear(64, 256)
    q = Int4Linear.from_weight(lin.weight, group_size)
    assert q(x).shape == (3, 5, 64)
    assert _rel(q(x), lin(x)) < 0.075


def test_int4_needs_packable_shapes():
    """Int4Linear refuses a group size not dividing K, an unsupported group size and N % 16 != 0 on CPU."""
    for n_out, n_in, group_size in ((64, 96, 64), (64, 64, 16), (40, 64, 32)):
        with pytest.raises(ValueError, match="int4"):
            Int4Linear.from_weight(torch.randn(n_out, n_in), group_size)


def test_quantize_model_rejects_bad_arguments():
    """Unknown modes, unsupported int4 group sizes and a second quantization are clear ValueErrors."""
    with pytest.raises(ValueError, match="mode"):
        quantize_model(_gemma(), "fp8")
    with pytest.raises(ValueError, match="group_size"):
        quantize_model(_gemma(), "int4", group_size=48)
    model = quantize_model(_gemma(), "int8")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, "int4")


def test_module_names_are_kept():
    """Quantized linears keep their HF names, and the tied head becomes `lm_head` next to an int8 table."""
    model = quantize_model(_gemma(), "int8")
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.q_proj, Int8Linear) and isinstance(model.lm_head, Int8Linear)
    assert isinstance(model.model.embed_tokens, QuantizedEmbedding)
    assert "model.layers.0.mlp.down_proj.weight" in model.state_dict()
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert model.lm_head.weight is model.model.embed_tokens.qweight  # one int8 copy serves both


def test_int4_falls_back_to_int8_where_it_cannot_pack():
    """With group size 64, the K=96 down_proj of the tiny model is int8 while the other linears are int4."""
    mlp = quantize_model(_gemma(), "int4", group_size=64).model.layers[0].mlp
    assert isinstance(mlp.gate_proj, Int4Linear) and isinstance(mlp.down_proj, Int8Linear)


def test_int4_keeps_attention_values_at_int8():
    """Under int4 every v_proj is int8 (the most sensitive kind, INT8_UNDER_INT4) and its neighbours int4;
    under int8 nothing changes."""
    for layer in quantize_model(_gemma(), "int4").model.layers:
        attn = layer.self_attn
        assert isinstance(attn.v_proj, Int8Linear)
        assert all(isinstance(m, Int4Linear) for m in (attn.q_proj, attn.k_proj, attn.o_proj, layer.mlp.up_proj))
    assert isinstance(quantize_model(_gemma(), "int8").model.layers[0].self_attn.v_proj, Int8Linear)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_embedding_rows_equal_the_head(mode):
    """The quantized table looks up exactly the rows the quantized head multiplies with (the tie survives)."""
    model = quantize_model(_gemma(), mode)
    table, head = model.model.embed_tokens, model.lm_head
    rows = table(torch.arange(1024))
    assert rows.dtype == torch.float32 and rows.shape == (1024, 64)
    from_head = head(torch.eye(64)).t()  # x = I gives the dequantized weight, in the kernel's bf16
    assert _rel(from_head, rows) < 0.005
    assert _rel(rows, _gemma().model.embed_tokens.weight) < (0.01 if mode == "int8" else 0.1)


@pytest.mark.parametrize("k", [64, 640, 2048])
def test_the_cpu_int4_layout_is_read_off_the_kernel(k):
    """Each code of a packed block is found at its (byte, nibble): unpacking rebuilds any code matrix, block
    after block (here 3 blocks of random codes)."""
    offset, shift = cpu_int4_layout(k)
    codes = torch.randint(0, 16, (3 * offset.shape[0], k), dtype=torch.uint8)
    packed = pack_int4(codes)
    rows, width = offset.shape[0], packed.shape[1]
    ids = torch.arange(codes.shape[0])
    at = (ids - ids % rows)[:, None] * width + offset[ids % rows]
    assert torch.equal((packed.flatten()[at] >> shift[ids % rows]) & 15, codes)


@pytest.mark.parametrize("n, k", [(128, 64), (2048, 640), (640, 2048)])
def test_int4_unpack_gives_the_kernels_weight(n, k):
    """The strided unpack that compiled prompts use rebuilds the weight the int4 kernel multiplies by: the
    kernel applied to I gives W^T (in bf16); both must agree to bf16 rounding of the dequantized values."""
    from gemmakit.quantize_codes import unpack_int4_transposed

    rows = cpu_int4_block_rows(k)
    if rows is None:
        pytest.skip("this machine's int4 packing is not the blocked nibble layout the unpack reads")
    lin = Int4Linear.from_weight(torch.randn(n, k) * 0.02, group_size=32)
    want = torch._weight_int4pack_mm_for_cpu(torch.eye(k, dtype=torch.bfloat16), lin.weight, 32, lin.scales_and_zeros)
    scales, zeros = lin.scales_and_zeros.permute(2, 0, 1).contiguous()
    got = unpack_int4_transposed(lin.weight, scales, zeros, rows)
    assert got.dtype == torch.bfloat16 and got.shape == (k, n)
    torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -8, atol=1e-6)


def test_int8_prompt_rows_run_as_a_bf16_gemm(monkeypatch):
    """From UNPACK_ROWS rows an int8 linear casts its weight to bf16 for a plain GEMM instead of the int8 kernel;
    the result agrees with the kernel's to bf16 rounding, and fewer rows still take the kernel, bit for bit."""
    lin = Int8Linear.from_weight(torch.randn(128, 640))
    x = torch.randn(UNPACK_ROWS, 640)
    before_short, before_long = lin(x[:8]), torch._weight_int8pack_mm(x.bfloat16(), lin.weight, lin.scales)
    kernel_calls = []
    original = torch._weight_int8pack_mm
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: kernel_calls.append(a[0].shape[0]) or original(*a))
    assert torch.equal(lin(x[:8]), before_short)
    assert _rel(lin(x), before_long) < 5e-3
    assert kernel_calls == [8]


def test_the_int4_table_reads_the_packed_head_in_place():
    """The int4 embedding looks rows up in the head's own packed codes: the same rows, bit for bit, as a
    separate nibble copy of those codes would give, one vocabulary's worth of memory less."""
    model = quantize_model(_gemma(), "int4")
    table, head = model.model.embed_tokens, model.lm_head
    assert table.packed and table.qweight is head.weight
    w = _gemma().model.embed_tokens.weight.detach()
    _, sz, nibbles = quantize_int4_packed(w, 32, nibbles=True)
    assert torch.equal(sz, head.scales_and_zeros)
    separate = QuantizedEmbedding(nibbles, head.scales_and_zeros, w.dtype, None, 32)
    ids = torch.tensor([[0, 1, 255, 256, 1023], [511, 512, 7, 900, 64]])
    assert torch.equal(table(ids), separate(ids))
    assert torch.equal(table.dequantize(), separate.dequantize())
    # torch's packing here stores blocks as [D, R/2] bytes (either vector width): lookups index the blocks
    # directly rather than gathering each code's byte, and read the same codes as the general map.
    rows = cpu_int4_block_rows(w.shape[1])
    assert table.halves == (rows // 2 if rows else None)
    mapped = QuantizedEmbedding(head.weight, head.scales_and_zeros, w.dtype, None, 32, cpu_int4_layout(w.shape[1]))
    mapped.halves = None
    assert torch.equal(table(ids), mapped(ids)) and torch.equal(table.dequantize(), mapped.dequantize())
    before = quantized_bytes(model)
    model.model.embed_tokens = separate
    layout = table.code_offsets.nbytes + table.code_shifts.nbytes  # the map, for a block of 256 rows
    assert quantized_bytes(model) - before == nibbles.numel() - layout  # the saving: the nibble copy, less the map
    model.model.embed_tokens = table
    assert "code_offsets" not in model.state_dict() and "(in the head)" in repr(table)


def test_compiled_int4_rows_store_their_codes_before_the_products():
    """A screen rescores its candidates as x . rows(ids) in the compiled step. Inductor fused the gather of the
    rows' codes into those products and redid the block arithmetic for every code, which took longer than the
    rest of an 8-row pick; the codes are now stored first (an op it cannot see into), and the result is the
    eager one."""
    from torch.profiler import profile

    model = quantize_model(_gemma(), "int4")
    table = model.model.embed_tokens
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, table.num_embeddings, (8, 65), generator=g)
    x = torch.randn(8, table.embedding_dim, generator=g)
    rescore = torch.compile(lambda x, ids: (x[:, None, :] * table.rows(ids, torch.float32)).sum(-1), dynamic=False)
    with profile() as prof:
        got = rescore(x, ids)
    assert any("materialize" in e.key for e in prof.key_averages())
    assert torch.allclose(got, (x[:, None, :] * table.rows(ids, torch.float32)).sum(-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["gemma3", "e2b", "26b-a4b", "31b"])
@pytest.mark.parametrize("mode, min_cosine", [("int8", 0.999), ("int4", 0.98)])
def test_quantized_gemma_logits_stay_close(variant, mode, min_cosine):
    """A quantized tiny Gemma's logits point the same way as fp32's (cosine per position)."""
    ids = _ids()
    with torch.no_grad():
        want = _gemma(variant)(ids)
        got = quantize_model(_gemma(variant), mode)(ids)
    cosine = F.cosine_similarity(got.flatten(0, 1), want.flatten(0, 1), dim=-1)
    assert cosine.mean() > min_cosine and cosine.min() > min_cosine - 0.05


@pytest.mark.parametrize("mode, min_agree", [("int8", 0.9), ("int4", 0.6)])
def test_greedy_tokens_mostly_agree(mode, min_agree):
    """Greedy next tokens mostly agree with fp32's (random weights leave many near-ties; the real-model
    numbers are in benchmarks/quant_quality.py)."""
    ids = _ids(2, 32)
    with torch.no_grad():
        want = _gemma(embed_std=0.2)(ids).argmax(-1)
        got = quantize_model(_gemma(embed_std=0.2), mode)(ids).argmax(-1)
    assert (want == ids).float().mean() < 0.5  # not just echoing the input token, which a tied head favours
    assert (got == want).float().mean() >= min_agree


def test_moe_experts_are_quantized():
    """MoE experts keep their names quantized: int8 rows under int8; under int4, int4 groups for each matrix the
    kernel takes (the tiny down_proj's 24 inputs are not whole groups of 32, so it stays int8); the router stays
    full precision."""
    layer = quantize_model(_gemma("26b-a4b"), "int8").model.layers[0]
    assert isinstance(layer.experts, QuantizedExperts) and layer.experts.down_proj.dtype == torch.int8
    assert layer.experts.group_sizes == {"gate_up_proj": 0, "down_proj": 0}
    layer = quantize_model(_gemma("26b-a4b"), "int4").model.layers[0]
    assert layer.experts.group_sizes == {"gate_up_proj": 32, "down_proj": 0}
    assert isinstance(layer.router.proj, nn.Linear)


def _experts(inter: int = 64, hidden: int = 64, experts: int = 4) -> Experts:
    torch.manual_seed(0)
    e = Experts(tiny("26b-a4b").replace(hidden_size=hidden, moe_intermediate_size=inter, num_experts=experts))
    with torch.no_grad():
        for p in e.parameters():
            p.normal_(0.0, 0.1)
    return e


def test_int4_experts_compute_what_their_codes_say():
    """Each int4 expert's product equals the product with its own dequantized codes (bf16 activations), so the
    stacked per-expert operands are the right ones; and they stay near the fp32 experts."""
    e = _experts()
    q = QuantizedExperts.from_experts(e, "int4")
    assert q.group_sizes == {"gate_up_proj": 32, "down_proj": 32} and q.gate_up_proj.shape[0] == 4
    x = torch.randn(5, 64)
    weights, index = torch.rand(5, 2), torch.tensor([[0, 3], [1, 2], [3, 0], [2, 2], [1, 0]])
    with torch.no_grad():
        got, want = q(x, weights, index), e(x, weights, index)
        for i in range(4):  # one expert at a time against a linear rebuilt from that expert's codes
            lin = Int4Linear(q.gate_up_proj[i], q.gate_up_proj_scales[i], 32, 128, 64)
            assert torch.equal(q._product("gate_up_proj", i, x), lin(x))
    assert (got - want).norm() / want.norm() < 0.2  # two int4 matrices in a row; a wrong operand gives ~1


def test_int4_experts_keep_codes_given_to_them():
    """Codes from a file (w = scale * q + zero per group of 32) become the experts' operands unchanged: the
    product equals the one with those weights decoded in float, to bf16 rounding."""
    g = torch.Generator().manual_seed(0)
    codes, dense = {}, {}
    for name, (n, k) in {"gate_up_proj": (128, 64), "down_proj": (64, 64)}.items():
        q = torch.randint(0, 16, (4 * n, k), dtype=torch.uint8, generator=g)
        scale, zero = torch.rand(4 * n, k // 32, generator=g) * 0.02, torch.randn(4 * n, k // 32, generator=g) * 0.05
        codes[name] = (q, scale, zero)
        s, z = (t.to(torch.bfloat16).float()[..., None] for t in (scale, zero + 8 * scale))  # what the kernel keeps
        dense[name] = ((q.float().view(4 * n, k // 32, 32) - 8) * s + z).view(4, n, k)
    q = QuantizedExperts.from_int4_codes(codes, experts=4)
    e = _experts()
    with torch.no_grad():
        e.gate_up_proj.copy_(dense["gate_up_proj"])
        e.down_proj.copy_(dense["down_proj"])
        x, weights, index = torch.randn(3, 64), torch.rand(3, 2), torch.tensor([[0, 1], [2, 3], [3, 1]])
        got, want = q(x, weights, index), e(x.to(torch.bfloat16).float(), weights, index)
    assert (got - want).norm() / want.norm() < 0.02


@pytest.mark.parametrize("mode, ratio", [("int8", 0.3), ("int4", 0.25)])
def test_resident_memory_drops(mode, ratio):
    """Quantized bytes, the embedding table included, fall below `ratio` of fp32's."""
    fp32 = quantized_bytes(_gemma())
    assert quantized_bytes(quantize_model(_gemma(), mode)) < ratio * fp32


def test_bf16_model_quantizes():
    """A bf16 model quantizes too: the table comes back in bf16 and the logits track the bf16 model's."""
    ids = _ids()
    with torch.no_grad():
        want = _gemma().to(torch.bfloat16)(ids)
        model = quantize_model(_gemma().to(torch.bfloat16), "int4")
        got = model(ids)
    assert model.model.embed_tokens.dtype == torch.bfloat16 and got.dtype == torch.bfloat16
    assert F.cosine_similarity(got.flatten(0, 1).float(), want.flatten(0, 1).float(), dim=-1).mean() > 0.98


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("n_in", [256, 640])
def test_cuda_linears_match_fp32(mode, n_in):
    """On CUDA the packed int8 / tensor-core int4 linears match the fp32 linear as on CPU."""
    lin, x = _linear(128, n_in, device="cuda")
    q = Int8Linear.from_weight(lin.weight) if mode == "int8" else Int4Linear.from_weight(lin.weight, 32)
    assert _rel(q(x), lin(x)) < (0.01 if mode == "int8" else 0.075)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("mode, min_cosine", [("int8", 0.999), ("int4", 0.98)])
def test_cuda_quantized_gemma_logits_stay_close(mode, min_cosine):
    """A tiny Gemma quantized on CUDA keeps its logits close to the fp32 model's on CUDA."""
    ids = _ids().cuda()
    with torch.no_grad():
        want = _gemma().cuda()(ids)
        got = quantize_model(_gemma().cuda(), mode)(ids)
    assert F.cosine_similarity(got.flatten(0, 1), want.flatten(0, 1), dim=-1).mean() > min_cosine


@pytest.mark.parametrize("variant", ["gemma3", "26b-a4b"])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantize_while_loading_equals_quantizing_after(variant, mode, tmp_path):
    """`load_model(quantize=...)` quantizes module by module as tensors arrive and ends with exactly the model
    that loading in full precision and then calling quantize_model gives (tensors bit for bit, no fp Linear
    left outside the router)."""
    from gemmakit.checkpoints import load_model
    from tests.helpers import hf_model

    hf_model(tiny(variant).replace(vocab_size=1024)).save_pretrained(tmp_path)
    after = quantize_model(load_model(tmp_path), mode)
    streamed = load_model(tmp_path, quantize=mode)
    want, got = after.state_dict(), streamed.state_dict()
    assert got.keys() == want.keys()
    for key, t in want.items():
        assert torch.equal(got[key], t), key
    assert not any(isinstance(m, nn.Linear) for name, m in streamed.named_modules() if "router" not in name)
    ids = _ids()
    assert torch.equal(streamed(ids), after(ids))


def test_chunked_int4_packing_equals_whole_matrix_packing():
    """A table taller than the quantizer's row chunk (with a ragged last chunk) packs exactly as one piece."""
    from gemmakit.quantize_codes import _block_rows, pack_int4, pack_nibbles, quantize_int4, quantize_int4_packed

    w = torch.randn(2 * _block_rows(64) + 64, 64, generator=torch.Generator().manual_seed(3))
    packed, sz, nibbles = quantize_int4_packed(w, 32, nibbles=True)
    q, want_sz = quantize_int4(w, 32)
    assert torch.equal(packed, pack_int4(q)) and torch.equal(sz, want_sz) and torch.equal(nibbles, pack_nibbles(q))
