"""The compiled decode step computes what the eager one does (compiled.py).
Run: .venv/bin/python -m pytest tests/test_compiled.py
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from gemmakit.checkpoints import load_model
from gemmakit.config import FULL, SLIDING
from gemmakit.engine import Engine
from gemmakit.runtime.compiled import compile_supported, configure_inductor
from gemmakit.runtime.probe import onednn_packs, wide_vectors
from gemmakit.runtime.steps import Runtime
from gemmakit.sampling import SamplingParams
from tests.helpers import WINDOW, assert_same_until_a_tie, hf_model, tiny

pytestmark = pytest.mark.skipif(not compile_supported("cpu"), reason="torch.compile needs a C++ compiler here")


@pytest.mark.parametrize("name, dtype, tol, prefix", [("gemma3", torch.float32, 1e-4, 8),
                                                     ("e2b", torch.float32, 1e-4, 8),
                                                     ("gemma3-27b", torch.bfloat16, 0.02, 3)])
def test_compiled_decode_equals_eager(name, dtype, tol, prefix, tmp_path):
    """Greedy tokens AND logits of the compiled one-row decode match eager decoding, past the sliding window,
    on a Gemma 3 and a KV-sharing Gemma 4 layout, and in bf16 (whose decode attention reads the query heads
    grouped per KV head) with two KV heads. The sequences may part only at a tie to rounding: in bf16 this
    random model's logits are nearly flat, and held to AVX2 two of them round equal at the fourth token."""
    hf_model(tiny(name)).save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype=dtype)
    prompt = torch.randint(0, 1000, (WINDOW + 3,), generator=torch.Generator().manual_seed(1)).tolist()
    params = SamplingParams(max_tokens=3 * WINDOW, logprobs=2)
    eager_engine = Engine(model, max_batch=1, context=128)
    eager = eager_engine.generate([prompt], params)[0]
    engine = Engine(model, max_batch=1, context=128, compile=True)
    assert engine.compiled and not eager_engine.compiled
    compiled = engine.generate([prompt], params)[0]
    assert_same_until_a_tie(compiled, eager, tol, prefix=prefix)  # a rounding tie may go either way in bf16


def test_compiled_steps_attend_over_the_used_slots_in_one_graph(tmp_path, monkeypatch):
    """In a long context a compiled CPU step attends over the slots its positions can reach, full-attention
    layers and rings alike, passed as a marker tensor's symbolic size: slots past the span are never read, and
    a later request whose spans are all new, short of the ring and past it, runs without compiling anything.
    Both decode as eager steps do."""
    config = dataclasses.replace(tiny("gemma3"), sliding_window=88)  # a ring of 96 slots
    hf_model(config).save_pretrained(tmp_path)
    model = load_model(tmp_path)
    spans, marker, prefill_part, poison = [], Runtime._span_marker, Runtime.prefill_part, [True]
    monkeypatch.setattr(Runtime, "_span_marker", lambda self, span: spans.append(span) or marker(self, span))

    def poisoned(self, *args, **kwargs):
        out = prefill_part(self, *args, **kwargs)
        if poison[0]:  # the first request's slots past its span claim position 0: a step that read them would
            for pos in self.cache.slot_pos.values():  # attend to these values as well
                pos[:, 64:] = 0
            for v in self.cache.v.values():
                v[:, :, 64:] = 100.0
        return out
    monkeypatch.setattr(Runtime, "prefill_part", poisoned)
    prompts = [torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (10, 100)]
    params = [SamplingParams(max_tokens=n, logprobs=2) for n in (40, 60)]  # positions up to 49, then 159
    engine = Engine(model, max_batch=1, context=256, compile=True)
    assert engine.runtime.cache.slots == {FULL: 256, SLIDING: 96}
    first = engine.generate([prompts[0]], params[0])[0]
    assert set(spans) == {64}
    poison[0] = False
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    second = engine.generate([prompts[1]], params[1])[0]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # spans 128-160: no new graph
    assert {128, 160} <= set(spans)
    eager = Engine(model, max_batch=1, context=256)
    for got, prompt, p in ((first, prompts[0], params[0]), (second, prompts[1], params[1])):
        assert_same_until_a_tie(got, eager.generate([prompt], p)[0], 1e-4, prefix=8)


def test_partly_filled_batches_run_the_padded_full_batch_step(tmp_path):
    """Two to three of four rows busy: the compiled full-batch step with throw-away rows gives the tokens and
    logprobs of eager decoding, and rows freed on the way are reused cleanly."""
    hf_model(tiny("gemma3")).save_pretrained(tmp_path)
    model = load_model(tmp_path)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (5, WINDOW + 2, 3)]
    params = [SamplingParams(max_tokens=n, logprobs=1) for n in (2 * WINDOW, WINDOW, 3 * WINDOW)]
    want = Engine(model, max_batch=4, context=128).generate(prompts, params)
    engine = Engine(model, max_batch=4, context=128, compile=True)

    def eager(*args):
        raise AssertionError("a partly filled batch took the eager step")
    engine.runtime._forward_logits = eager  # the compiled step keeps the original; only eager calls land here
    got = engine.generate(prompts, params)
    got += engine.generate(prompts[:2], params[:2])  # rows that held throw-away tokens, prefilled again
    for a, b in zip(got, want + want[:2], strict=True):
        assert a.tokens == b.tokens
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4)


def test_compiled_engines_of_different_models_share_a_process(tmp_path):
    """Dynamo caches graphs per code object and the engine drops its module guards: an int4 engine built after
    an fp32 one of the same shapes must run its own graph (it used to try the fp32 one's: KeyError), and
    decode what its eager twin decodes."""
    hf_model(tiny("gemma3").replace(vocab_size=1024)).save_pretrained(tmp_path)
    prompt = torch.randint(0, 1000, (12,), generator=torch.Generator().manual_seed(3)).tolist()
    params = SamplingParams(max_tokens=4, logprobs=1)
    Engine(load_model(tmp_path), max_batch=1, context=64, compile=True).generate([prompt], params)
    int4 = load_model(tmp_path, quantize="int4")
    want = Engine(int4, max_batch=1, context=64).generate([prompt], params)[0]
    got = Engine(int4, max_batch=1, context=64, compile=True).generate([prompt], params)[0]
    assert got.tokens == want.tokens
    for a, b in zip(got.logprobs, want.logprobs, strict=True):  # int4 keeps v_proj int8, whose compiled
        assert a.logprob == pytest.approx(b.logprob, abs=0.05)   # one-row product is fp32, eager's bf16


def test_compiled_int4_engines_run_prompts_as_unpacked_gemms(monkeypatch, tmp_path):
    """A compiled CPU engine gives its int4 linears a compiled unpack: a prompt of UNPACK_ROWS rows or more
    multiplies a bf16 W^T instead of calling the int4 kernel (which runs at the fp32 FMA rate), warm-up builds
    those kernels, and the tokens and logprobs are the eager engine's, whose prompts take the kernel."""
    from gemmakit.cache import COMPILED_BYTES, UNPACK_KERNEL_BYTES
    from gemmakit.quantize import UNPACK_ROWS, Int4Linear
    from gemmakit.quantize_codes import cpu_int4_block_rows

    if cpu_int4_block_rows(64) is None:
        pytest.skip("this machine's int4 packing is not the blocked nibble layout the unpack reads")
    if not onednn_packs(torch.bfloat16):  # test_runtime_probe.py checks the plan's choice there
        pytest.skip("no fast oneDNN bf16 GEMM here: the plan keeps int4 prompts on the int4 kernel")
    hf_model(tiny("gemma3").replace(vocab_size=1024, intermediate_size=128)).save_pretrained(tmp_path)
    int4 = load_model(tmp_path, quantize="int4")
    prompt = torch.randint(0, 1000, (UNPACK_ROWS + 16,), generator=torch.Generator().manual_seed(4)).tolist()
    params = SamplingParams(max_tokens=6, logprobs=2)
    want = Engine(int4, max_batch=1, context=128).generate([prompt], params)[0]
    # No prefix cache: the same prompt again would be mostly restored, leaving the kernel a short tail.
    engine = Engine(int4, max_batch=1, context=128, compile=True, prefix_cache=False)
    unpacking = [m for m in int4.modules() if isinstance(m, Int4Linear) and m.unpack is not None]
    assert len(unpacking) >= 3 * int4.config.num_hidden_layers  # q, o, gate, up, down: those tiled by 64 rows
    # One kernel per weight shape (q = o, gate = up, down, the tiny head), each counted in the memory forecast.
    assert engine.memory["compiled"] == COMPILED_BYTES + 4 * UNPACK_KERNEL_BYTES
    engine.warmup()  # builds the unpack kernels too: the first long prompt compiles nothing more
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert engine.generate([prompt], params)[0].tokens
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    kernel_rows = []
    original = torch._weight_int4pack_mm_for_cpu
    monkeypatch.setattr(torch, "_weight_int4pack_mm_for_cpu",
                        lambda x, *a: kernel_rows.append(x.shape[0]) or original(x, *a))
    got = engine.generate([prompt], params)[0]
    # The prompt's only kernel calls are the k_projs (16 rows out: not tiled by 64); one-row calls remain.
    assert [r for r in kernel_rows if r > 1] == [len(prompt)] * int4.config.num_hidden_layers
    assert 1 in kernel_rows
    assert_same_until_a_tie(got, want, 0.05, prefix=2)


def test_one_row_matmuls_are_decomposed_at_any_width():
    """The inductor setting that makes CPU decode fast covers a vocabulary-sized head (262k rows), where its
    code is AVX-512 (under AVX2 the bound stays: tests/test_runtime_probe.py checks that)."""
    import torch._inductor.config as inductor_config

    if not wide_vectors():
        pytest.skip("inductor's reduction over the head is slower than torch's GEMV below AVX-512")

    configure_inductor()
    bounds = inductor_config.post_grad_fusion_options["decompose_mm_pass"]
    assert bounds["cpu_max_other_dimension_decomposition"] >= 262_144


def test_compiled_decode_rows_run_int8_matmuls_as_fused_reductions():
    """Inside `small_row_reductions` (the runtime's compiled decode steps) an int8 matmul of up to
    REDUCE_ROWS rows is an fp32 dequantize-multiply-reduce per row: the packed kernel reads the codes at a
    fraction of the bandwidth. Its input is materialised first when there are several rows, or inductor would
    recompute a cheap producer (a norm, here) once per row for every weight row. It equals the fp32 product;
    more rows, or a call outside the block, take the kernel."""
    from torch.profiler import profile

    from gemmakit.quantize import REDUCE_ROWS, int8_matmul, small_row_reductions
    from gemmakit.quantize_codes import quantize_int8

    torch.manual_seed(0)
    q, s = quantize_int8(torch.randn(4096, 640) * 0.02)
    gain = torch.randn(640)
    step = torch.compile(lambda h: int8_matmul(F.rms_norm(h, (640,), gain), q, s), dynamic=False)
    for rows, kernel in ((1, False), (3, False), (REDUCE_ROWS, False), (REDUCE_ROWS + 1, True)):
        h = torch.randn(rows, 640)
        want = F.rms_norm(h, (640,), gain) @ (q.float() * s.float()[:, None]).T
        with profile() as prof, small_row_reductions(REDUCE_ROWS):
            got = step(h)
        ops = {e.key for e in prof.key_averages()}
        assert any("_weight_int8pack_mm" in k for k in ops) == kernel
        assert any("materialize" in k for k in ops) == (1 < rows <= REDUCE_ROWS)
        assert torch.allclose(got.float(), want, atol=0.02 * want.abs().max().item())
        if not kernel:
            assert torch.allclose(got, want, atol=1e-4)  # fp32 all the way
    with profile() as prof:  # outside the runtime's compiled steps: the kernel, whatever the rows
        step(torch.randn(1, 640))
    assert any("_weight_int8pack_mm" in e.key for e in prof.key_averages())


# Compiles a norm + one-row matmul (a decode step in miniature) and prints how far it is from eager.
_ISA_CHILD = r"""
import json, torch, torch.nn.functional as F
from gemmakit.runtime.compiled import configure_inductor, inductor_cache_dir
from gemmakit.runtime.probe import inductor_isa
configure_inductor()
torch.manual_seed(0)
w, gain, h = torch.randn(4096, 640) * 0.02, torch.randn(640), torch.randn(1, 640)
got = torch.compile(lambda h: F.rms_norm(h, (640,), gain) @ w.T, dynamic=False)(h)
print(json.dumps({"isa": inductor_isa(), "dir": inductor_cache_dir(),
                  "err": (got - F.rms_norm(h, (640,), gain) @ w.T).abs().max().item()}))
"""


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="holding ATen to AVX2 needs an x86 build")
def test_kernels_cached_for_one_isa_are_not_reused_under_another(tmp_path):
    """Two runs share one gemmakit cache (a home directory seen by an AVX-512 and an AVX2 machine; CI's second
    pass): the run held to AVX2 must not load the kernel the AVX-512 run cached. Inductor's cache does not key
    by ISA, and that kernel gave errors of order 1 there; gemmakit keeps one cache directory per ISA, also when
    a parent process passed its own directory on (as tests/conftest.py does to the CLI runs it starts)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from gemmakit.runtime.probe import inductor_isa

    if inductor_isa() in ("", "avx2"):
        pytest.skip("needs a CPU whose native vector ISA is wider than AVX2")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "GEMMAKIT_CACHE_DIR": str(tmp_path), "TORCHINDUCTOR_CACHE_DIR":
           str(tmp_path / "inductor" / inductor_isa()), "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root)])}
    runs = []
    for held in ({}, {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}):
        done = subprocess.run([sys.executable, "-c", _ISA_CHILD], env={**env, **held}, cwd=root,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert runs[1]["isa"] == "avx2" and runs[0]["isa"] != "avx2"
    assert all(r["err"] < 1e-4 for r in runs), runs
    assert runs[0]["dir"] != runs[1]["dir"] and all(r["dir"].startswith(str(tmp_path)) for r in runs)
