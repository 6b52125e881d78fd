"""oneDNN-packed weights compute what the plain ones do (packing.py), eager and compiled, in the engine.
Run: .venv/bin/python -m pytest tests/test_packing.py
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from gemmakit.engine import Engine
from gemmakit.model import Gemma
from gemmakit.quantize import Int4Linear, quantize_model
from gemmakit.runtime import packing
from gemmakit.runtime import plan as plan_module
from gemmakit.runtime.compiled import compile_supported
from gemmakit.runtime.packing import (
    UPCAST_ROWS,
    HalfLinear,
    PackedLinear,
    UpcastLinear,
    pack_linears,
    packed_bytes,
    packing_supported,
)
from gemmakit.runtime.plan import make_plan, model_bytes, prepare_weights
from gemmakit.runtime.probe import fbgemm_fp16
from gemmakit.sampling import SamplingParams
from tests.helpers import WINDOW, tiny

pytestmark = pytest.mark.skipif(not packing_supported(torch.zeros(1)), reason="this torch has no oneDNN")


def _gemma(variant: str, dtype: torch.dtype = torch.float32) -> Gemma:
    torch.manual_seed(0)
    model = Gemma(tiny(variant).replace(vocab_size=1024)).eval().to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "experts." in name:  # created with torch.empty
                p.normal_(0.0, 0.1)
    return model


def _ids(batch: int = 2, length: int = 3 * WINDOW) -> torch.Tensor:
    return torch.randint(0, 1000, (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("variant", ["gemma3", "e2b", "26b-a4b"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@torch.inference_mode()
def test_packed_model_logits_match(variant, dtype, tol):
    """Every linear and the tied head packed (bf16: where oneDNN packs bf16; elsewhere left plain, as on AVX2
    CPUs); logits equal the plain model's within the dtype's rounding."""
    plain = _gemma(variant, dtype)
    packed = pack_linears(copy.deepcopy(plain))
    assert isinstance(packed.lm_head, PackedLinear) == packing_supported(torch.zeros(1, dtype=dtype))
    assert isinstance(packed.model.layers[0].self_attn.q_proj, PackedLinear) == packing_supported(
        torch.zeros(1, dtype=dtype))
    want, got = plain(_ids()).float(), packed(_ids()).float()
    assert ((got - want).norm() / want.norm()).item() < tol
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.95


@torch.inference_mode()
def test_keep_plain_keeps_checkpoint_names_and_counts_memory():
    plain = _gemma("gemma3")
    before = model_bytes(plain)
    packed = pack_linears(copy.deepcopy(plain), keep_plain=True)
    assert packed.state_dict().keys() == plain.state_dict().keys()  # the head aliases the embedding
    layer_bytes = sum(p.numel() * 4 for n, p in plain.named_parameters() if n.endswith("proj.weight"))
    head_bytes = plain.model.embed_tokens.weight.numel() * 4
    assert packed_bytes(packed) == layer_bytes + head_bytes
    assert model_bytes(packed) == before + layer_bytes + head_bytes
    dropped = pack_linears(copy.deepcopy(plain))  # without the plain copies the layers cost nothing extra
    assert not any(k.endswith("proj.weight") for k in dropped.state_dict())
    assert model_bytes(dropped) == before + head_bytes
    assert pack_linears(dropped) is dropped and packed_bytes(dropped) == layer_bytes + head_bytes  # idempotent


@torch.inference_mode()
def test_quantized_modules_are_left_alone():
    model = quantize_model(_gemma("gemma3"), "int4", group_size=32)
    q_proj = model.model.layers[0].self_attn.q_proj
    pack_linears(model)
    assert model.model.layers[0].self_attn.q_proj is q_proj and isinstance(q_proj, Int4Linear)
    assert not isinstance(model.lm_head, PackedLinear)


@pytest.mark.parametrize("keep_plain", [False, True])
def test_engine_on_packed_weights_decodes_like_plain(keep_plain):
    """Batched greedy decoding past the sliding window: same tokens on packed weights, eager and compiled
    (compiled one-row steps use the plain copies when kept; full-batch steps the packed ones)."""
    plain = _gemma("gemma3")
    packed = pack_linears(copy.deepcopy(plain), keep_plain=keep_plain)
    prompts = [_ids(1, n)[0].tolist() for n in (WINDOW + 3, 5, 2 * WINDOW)]
    # Different lengths, so the batch shrinks to one row (a one-row step) after passing through two.
    params = [SamplingParams(max_tokens=n, logprobs=1) for n in (2 * WINDOW, WINDOW, 3 * WINDOW)]
    want = Engine(plain, max_batch=3, context=64).generate(prompts, params)
    compile = keep_plain and compile_supported("cpu")
    engine = Engine(packed, max_batch=3, context=64, compile=compile)
    got = engine.generate(prompts, params)
    assert engine.compiled == compile
    for a, b in zip(got, want, strict=True):
        assert a.tokens == b.tokens
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4)


def test_gradients_through_packed_weights_are_refused():
    """The packed op has no backward: asking for gradients fails loudly instead of silently dropping them."""
    model = pack_linears(torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False)), head=False)
    x = torch.randn(2, 64, requires_grad=True)
    with pytest.raises(RuntimeError, match="packed weights are for inference"):
        model(x)
    with torch.no_grad():
        assert model(x).shape == (2, 32)


@torch.inference_mode()
def test_upcast_linear_multiplies_many_rows_in_fp32_a_block_at_a_time(monkeypatch):
    """Where bf16 has no fast GEMM (AVX2), prompts multiply in fp32 on the exact upcast weight: the result is
    the fp32 product rounded once to bf16, however many weight blocks it is split into; a step of fewer than
    UPCAST_ROWS rows takes the ordinary bf16 product."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 80, bias=False).to(torch.bfloat16)
    up = UpcastLinear.wrap(linear)
    assert up.weight is linear.weight and up.state_dict().keys() == linear.state_dict().keys()
    x = torch.randn(3, UPCAST_ROWS, 96).to(torch.bfloat16)
    want = F.linear(x.float(), linear.weight.float()).to(torch.bfloat16)
    assert torch.equal(up(x), want)
    monkeypatch.setattr(packing, "_UPCAST_BLOCK", 96 * 7)  # 7 weight rows at a time: 12 blocks, a short tail
    assert torch.equal(up(x), want)
    few = x[0, : UPCAST_ROWS - 1]
    assert torch.equal(up(few), F.linear(few, linear.weight))


@torch.inference_mode()
def test_upcasting_reaches_biased_linears_and_the_image_towers_patch_convolution(monkeypatch):
    """An image tower in bf16 on such a CPU: its biased linears and its patch convolution (which torch runs
    with a slow reference loop in bf16 there) multiply in fp32, its weights stay where its code reads them,
    and its soft tokens are the fp32 products rounded to bf16."""
    from gemmakit.media.siglip import SiglipVisionConfig, SiglipVisionTower
    from gemmakit.runtime.packing import UpcastConv2d, upcast_linears

    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 80).to(torch.bfloat16)
    x = torch.randn(UPCAST_ROWS, 96).to(torch.bfloat16)
    up = UpcastLinear.wrap(linear)
    assert up.bias is linear.bias and torch.equal(up(x), F.linear(x.float(), linear.weight.float(),
                                                                  linear.bias.float()).to(torch.bfloat16))
    monkeypatch.setattr(packing, "_UPCAST_BLOCK", 96 * 7)  # the bias split with the weight's blocks
    assert torch.equal(up(x), F.linear(x.float(), linear.weight.float(), linear.bias.float()).to(torch.bfloat16))
    tower = SiglipVisionTower(SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                                 num_attention_heads=2, image_size=56, patch_size=14,
                                                 vision_use_head=False)).to(torch.bfloat16)
    pixels = torch.randn(2, 3, 56, 56).to(torch.bfloat16)
    conv = tower.vision_model.embeddings.patch_embedding
    want = F.conv2d(pixels.float(), conv.weight.float(), conv.bias.float(), stride=14).to(torch.bfloat16)
    assert upcast_linears(tower) == 1 + 4 + 2  # the patch conv, q/k/v/out, fc1/fc2
    assert isinstance(tower.vision_model.embeddings.patch_embedding, UpcastConv2d)
    assert torch.equal(tower.vision_model.embeddings.patch_embedding(pixels), want)
    assert tower(pixels).dtype == torch.bfloat16


@torch.inference_mode()
def test_bf16_models_multiply_prompts_in_fp32_where_onednn_packs_no_bf16(monkeypatch):
    """prepare_weights on a machine whose oneDNN refuses bf16 (as AVX2 CPUs do) gives every bf16 linear an
    UpcastLinear, keeps the checkpoint's names, computes what the plain model does, and the plan says so."""
    monkeypatch.setattr(plan_module, "onednn_packs", lambda dtype: dtype != torch.bfloat16)
    monkeypatch.setattr(packing, "fbgemm_fp16", lambda: False)  # as on ARM: no fbgemm
    plain = _gemma("gemma3", torch.bfloat16)
    model = copy.deepcopy(plain)
    assert "bf16 linears multiply prompts in fp32" in prepare_weights(model, pack=None, compile=False)
    assert isinstance(model.model.layers[0].mlp.down_proj, UpcastLinear)
    assert model.state_dict().keys() == plain.state_dict().keys()
    want, got = plain(_ids()).float(), model(_ids()).float()
    assert ((got - want).norm() / want.norm()).item() < 2e-2
    line = make_plan(model, max_batch=1, context=64, compile=False, screen=False).describe()
    assert f"bf16 products of {UPCAST_ROWS}+ rows in fp32" in line
    fp32 = _gemma("gemma3")
    prepare_weights(fp32, pack=False, compile=False)  # fp32 models are never upcast
    assert not any(isinstance(m, UpcastLinear) for m in fp32.modules())


needs_fbgemm = pytest.mark.skipif(not fbgemm_fp16(), reason="fbgemm's fp16 product is in x86 builds of torch only")


@needs_fbgemm
@torch.inference_mode()
def test_half_linear_is_the_bf16_product_up_to_summation_order():
    """bf16 weights through fbgemm's fp16 copy: every bf16 value at or above 2^-17 is exact in fp16, so the
    product is the fp32 sum of the same terms, rounded to bf16 (compared with the exact fp32 product of the
    bf16 operands), at one row, a batch's 8 and a prompt's 100; the tiniest weights lose under 2^-25 each."""
    g = torch.Generator().manual_seed(3)
    w = (0.05 * torch.randn(96, 640, generator=g)).bfloat16()
    w[0, :8] = torch.tensor([2.0**-17, 3 * 2.0**-20, 2.0**-24, 1e-9, -2.0**-14, 60000.0, 1 + 2.0**-7, 0.0])
    half = HalfLinear(w)
    for rows in (1, 8, 100):
        x = torch.randn(rows, 640, generator=g).bfloat16()
        want = x.float() @ w.float().T
        got = half(x)
        assert got.dtype == torch.bfloat16 and got.shape == (rows, 96)
        # Rounding to bf16 of sums that differ only in order (and 2^-25 per tiny weight): one bf16 step.
        assert ((got.float() - want).abs() <= want.abs() * 2.0**-7 + 1e-3).all()


@needs_fbgemm
@torch.inference_mode()
def test_a_tall_weight_packs_and_multiplies_in_blocks_of_rows(monkeypatch):
    """A head is packed a block of rows at a time on all threads (fbgemm packs on one): the blocks' products,
    side by side, are the whole weight's."""
    w = (0.05 * torch.randn(100, 64, generator=torch.Generator().manual_seed(5))).bfloat16()
    whole = HalfLinear(w)
    monkeypatch.setattr(packing, "_HALF_BLOCK_ROWS", 32)
    blocked = HalfLinear(w)
    assert len(packing._HALF[blocked.handle]) == 4 and len(packing._HALF[whole.handle]) == 1
    x = torch.randn(3, 64).bfloat16()
    assert torch.equal(blocked(x), whole(x))


@needs_fbgemm
@torch.inference_mode()
def test_bf16_models_take_fbgemm_fp16_where_onednn_packs_no_bf16(monkeypatch):
    """prepare_weights on a machine whose oneDNN refuses bf16 (AVX2) but whose torch has fbgemm: every decoder
    linear and the tied head multiply through fp16 copies, the checkpoint's names stay, the memory is counted,
    the plan says so, and an engine decodes the plain bf16 model's greedy tokens."""
    monkeypatch.setattr(plan_module, "onednn_packs", lambda dtype: dtype != torch.bfloat16)
    plain = _gemma("gemma3", torch.bfloat16)
    model = copy.deepcopy(plain)
    said = prepare_weights(model, pack=None, compile=False)
    linears = sum(isinstance(m, torch.nn.Linear) for m in plain.modules())
    assert said == f"plain layout, {linears + 1} bf16 linears multiplied through fbgemm fp16"
    assert isinstance(model.model.layers[0].mlp.down_proj, HalfLinear) and isinstance(model.lm_head, HalfLinear)
    assert model.state_dict().keys() == plain.state_dict().keys()
    assert packed_bytes(model) == sum(HalfLinear.bytes_for(*p.shape) for p in plain.parameters() if p.dim() == 2)
    want, got = plain(_ids()).float(), model(_ids()).float()
    assert ((got - want).norm() / want.norm()).item() < 1e-2
    assert "fbgemm fp16 (no fast bf16 GEMM here)" in make_plan(model, 1, 64, False, False).describe()
    prompts = [_ids(1, n)[0].tolist() for n in (WINDOW + 3, 5)]
    params = SamplingParams(max_tokens=WINDOW)
    got_tokens = [r.tokens for r in Engine(model, max_batch=2, context=64).generate(prompts, params)]
    assert got_tokens == [r.tokens for r in Engine(plain, max_batch=2, context=64).generate(prompts, params)]
    # `--pack off` keeps torch's own product (the upcast form for prompts).
    untouched = copy.deepcopy(plain)
    assert "fbgemm" not in prepare_weights(untouched, pack=False, compile=False)


@needs_fbgemm
def test_half_linear_takes_gradients_through_the_bf16_weight():
    """Training a model prepared for serving: products that need gradients use the bf16 weight itself."""
    w = torch.nn.Parameter((0.05 * torch.randn(32, 64)).bfloat16())
    half = HalfLinear(w)
    x = torch.randn(2, 64).bfloat16()
    half(x).float().sum().backward()
    assert w.grad is not None and torch.equal(w.grad, x.float().sum(0).expand(32, 64).bfloat16())
