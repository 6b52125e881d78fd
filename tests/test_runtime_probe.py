"""Nothing crashes on a CPU that lacks a feature a fast path wants (runtime/probe.py).

The crash this guards against: on CPUs without AVX-512 (most laptops, AMD Zen 2/3, ARM), oneDNN refuses to
reorder a bf16 weight, and packing a bf16 model or building the bf16 copy of the head screen raised before the
first token. oneDNN and ATen are held to AVX2 in a child process (ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY),
which reproduces that refusal on an AVX-512 machine.
Run: .venv/bin/python -m pytest tests/test_runtime_probe.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gemmakit.runtime.probe import onednn_packs, report

AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
ROOT = Path(__file__).resolve().parents[1]

# Packs a tiny Gemma (every linear and the tied head), builds eager and screened engines in fp32 and bf16, and
# prints what the probes said and the greedy tokens of the packed and plain models.
_CHILD = r"""
import copy, json, torch
from gemmakit.engine import Engine
from gemmakit.model import Gemma
from gemmakit.runtime.packing import pack_linears
from gemmakit.runtime.probe import report
from gemmakit.sampling import SamplingParams
from tests.helpers import tiny

from gemmakit.runtime import gemv

out = {"probes": report(), "runs": {}, "gemv": gemv.unavailable() is None}
for dtype in (torch.float32, torch.bfloat16):
    torch.manual_seed(0)
    plain = Gemma(tiny("gemma3").replace(vocab_size=1024)).eval().to(dtype)
    packed = pack_linears(copy.deepcopy(plain))
    prompts = [[2, 5, 9, 14], [2, 7]]
    params = SamplingParams(max_tokens=6)
    engine = Engine(packed, max_batch=2, context=64)
    got = [r.tokens for r in engine.generate(prompts, params)]
    want = [r.tokens for r in Engine(plain, max_batch=2, context=64, screen=False).generate(prompts, params)]
    out["runs"][str(dtype)] = {"packed": got, "plain": want, "plan": engine.plan.describe()}
print(json.dumps(out))
"""


def _run_child(env_extra: dict[str, str]) -> dict:
    env = {**os.environ, **env_extra, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    done = subprocess.run([sys.executable, "-c", _CHILD], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_probes_answer_without_raising():
    probes = report()
    assert set(probes) >= {"aten", "onednn_fp32_pack", "onednn_bf16_pack"}
    assert onednn_packs(torch.float16) is False  # not a dtype packing.py uses: never tried, never true
    if torch.backends.mkldnn.is_available():
        assert probes["onednn_fp32_pack"] is True  # every x86-64 oneDNN packs fp32


@pytest.mark.skipif(sys.platform != "linux" or not torch.backends.mkldnn.is_available(),
                    reason="holding oneDNN to AVX2 needs an x86 oneDNN")
def test_packed_engines_run_under_avx2_limits():
    """Under AVX2 the bf16 probe says no (as on a real AVX2 CPU), and packed fp32/bf16 engines, head screen
    included, run and give the plain model's greedy tokens."""
    out = _run_child(AVX2)
    assert out["probes"]["aten"] == "AVX2"
    assert out["probes"]["onednn_bf16_pack"] is False
    for dtype, run in out["runs"].items():
        assert run["packed"] == run["plain"], dtype
    # An eager fp32 engine's screen would read a packed bf16 copy: there is none, so where gemmakit's AVX2 kernels
    # build they screen (an int8 copy, and one-row steps an int4 copy where its pass timed faster), else an x86
    # torch screens through fbgemm's fp16 copy, and anything else computes the full head.
    fp32_plan = out["runs"]["torch.float32"]["plan"]
    if out["gemv"]:
        for plan in (fp32_plan, out["runs"]["torch.bfloat16"]["plan"]):
            assert ("head screen: int8 copy (gemmakit's AVX2 kernel, up to 8 rows" in plan
                    or "head screen: int4 copy for one-row steps, int8 copy for steps of 2 rows (gemmakit's AVX2 "
                       "kernels; the int4 pass timed here" in plan), plan
    elif out["probes"]["fbgemm_fp16"]:
        assert "head screen: fp16 copy (fbgemm, every step)" in fp32_plan
    else:
        assert "head screen: off (oneDNN cannot pack bf16 here)" in fp32_plan


_PLAN_CHILD = r"""
import json, torch
from gemmakit.model import Gemma
from gemmakit.quantize import quantize_model
from gemmakit.runtime.plan import make_plan, prepare_weights
from gemmakit.runtime import gemv
from gemmakit.runtime.probe import fbgemm_fp16, inductor_isa
from tests.helpers import tiny

torch.manual_seed(0)
model = quantize_model(Gemma(tiny("gemma3").replace(vocab_size=1024)).eval(), "int8")
plan = make_plan(model, max_batch=2, context=64, compile=True, screen=True)
int4 = make_plan(quantize_model(Gemma(tiny("gemma3").replace(vocab_size=1024)).eval(), "int4", group_size=32),
                 max_batch=2, context=64, compile=True, screen=True)
bf16_model = Gemma(tiny("gemma3").replace(vocab_size=1024)).eval().to(torch.bfloat16)
layout = prepare_weights(bf16_model, pack=None, compile=True)
bf16 = make_plan(bf16_model, max_batch=1, context=64, compile=True, screen=True)
from gemmakit.runtime.compiled import configure_inductor
configure_inductor()
from torch._inductor.fx_passes import decompose_mem_bound_mm as decompose
print(json.dumps({"isa": inductor_isa(), "rows": plan.int8_reduce_rows, "line": plan.describe(),
                  "decompose_width": decompose.cpu_max_other_dimension_decomposition,
                  "default_width": decompose.CPU_MAX_OTHER_DIMENSION_DECOMPOSITION,
                  "int4_unpack": int4.int4_unpack, "int4_line": int4.describe(), "bf16_line": bf16.describe(),
                  "bf16_layout": layout, "fbgemm": fbgemm_fp16(), "gemv": gemv.unavailable() is None}))
"""


@pytest.mark.skipif(sys.platform != "linux" or not torch.backends.mkldnn.is_available(),
                    reason="holding ATen to AVX2 needs an x86 build")
def test_compiled_int8_decode_keeps_the_kernel_where_vectors_are_narrow():
    """Inductor's int8 reductions pay on AVX-512 only: under AVX2 the plan keeps torch's int8 kernel in
    compiled steps (they were many times slower than eager decoding there) and says so; int4 prompts stay on
    the int4 kernel too (their unpack feeds a bf16 GEMM that AVX2 emulates), bf16 heads get no int8
    screen, and bf16 models multiply prompts in fp32."""
    from gemmakit.runtime.compiled import compile_supported

    if not compile_supported("cpu"):
        pytest.skip("torch.compile needs a C++ compiler here")
    env = {**os.environ, **AVX2, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    done = subprocess.run([sys.executable, "-c", _PLAN_CHILD], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    held = json.loads(done.stdout.strip().splitlines()[-1])
    assert held["isa"] == "avx2" and held["rows"] == 0
    assert ("int8 decode: gemmakit's AVX2 kernel" if held["gemv"] else
            "int8 decode: int8 kernel (inductor's avx2 reductions are slower)") in held["line"]
    assert not held["int4_unpack"] and "int4 prompts: int4 kernel (no fast bf16 GEMM here)" in held["int4_line"]
    # A bf16 head's screen is an int8 pass of the same kind, slower than the full head there, unless gemmakit's
    # AVX2 kernels make the pass (a one-row engine's: an int4 copy's, where it timed faster).
    screens = (["head screen: int8 copy (gemmakit's AVX2 kernel", "head screen: int4 copy for one-row steps ("]
               if held["gemv"] else
               ["head screen: off (the bf16 head streams through fbgemm fp16)" if held["fbgemm"] else
                "head screen: off (int8 copy: inductor's avx2 reductions are slower)"])
    assert any(screen in held["bf16_line"] for screen in screens), held["bf16_line"]
    # Inductor's reduction over the vocabulary head is slower than torch's GEMV there: the bound stays.
    assert held["decompose_width"] == held["default_width"] < 262144
    assert "one-row head product on torch's GEMV: inductor's avx2 reduction is slower" in held["line"]
    # No fast bf16 GEMM either: a bf16 model multiplies through fbgemm's fp16 copies where torch has fbgemm
    # (packing.HalfLinear), and otherwise its prompts multiply in fp32 (packing.UpcastLinear).
    if held["fbgemm"]:
        assert "bf16 linears multiplied through fbgemm fp16" in held["bf16_layout"]
        assert "fbgemm fp16 (no fast bf16 GEMM here)" in held["bf16_line"]
    else:
        assert "bf16 linears multiply prompts in fp32" in held["bf16_layout"]
        assert "bf16 products of 8+ rows in fp32" in held["bf16_line"]
