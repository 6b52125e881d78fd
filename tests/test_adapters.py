"""Per-request LoRA adapters (adapters.py): a batch whose rows are on adapter a, adapter b and the base model
gives each row what the model with that adapter merged alone gives, over plain, oneDNN-packed and int8 linears,
and an engine decodes rows on different adapters in one step with each merged engine's greedy tokens. The two
adapters are real PEFT files (train/lora.py's add_lora + save_adapter) of different ranks, alphas and targets.
Run: .venv/bin/python -m pytest tests/test_adapters.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gemmakit.adapters import RowLoRA, adapter_names, attach_adapters, parse_specs, set_rows
from gemmakit.checkpoints import load_model
from gemmakit.engine import Engine
from gemmakit.quantize import Int8Linear, quantize_model
from gemmakit.runtime.packing import PackedLinear, pack_linears
from gemmakit.runtime.plan import prepare_weights
from gemmakit.sampling import SamplingParams
from gemmakit.train.lora import LoRALinear, add_lora, load_adapter, merge_lora, save_adapter
from tests.helpers import hf_model, tiny

# Different ranks, alphas and targets (q_proj in both): a module may carry one adapter, both or none.
ADAPTERS = {"a": dict(r=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"), seed=1),
            "b": dict(r=8, alpha=32.0, targets=("q_proj", "k_proj", "o_proj", "gate_proj", "up_proj"), seed=2)}
IDS = torch.randint(3, 1000, (4, 21), generator=torch.Generator().manual_seed(0))


def make_adapter(base: Path, out: Path, r: int, alpha: float, targets: tuple[str, ...], seed: int) -> Path:
    """A PEFT adapter for the checkpoint in `base`, with random B (as after training, not PEFT's zero init)."""
    model = load_model(base)
    add_lora(model, r=r, alpha=alpha, targets=targets)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.copy_(0.05 * torch.randn(m.lora_B.weight.shape, generator=g))
    save_adapter(model, out, base_model=str(base))
    return out


def make_checkpoint(variant: str, path: Path) -> tuple[Path, dict[str, Path]]:
    """A tiny HF checkpoint of `variant` in path/base and the two ADAPTERS for it beside it."""
    hf_model(tiny(variant)).save_pretrained(path / "base")
    return path / "base", {name: make_adapter(path / "base", path / name, **spec) for name, spec in ADAPTERS.items()}


@pytest.fixture(scope="module", params=["gemma3", "e2b"])
def checkpoint(request, tmp_path_factory):
    return make_checkpoint(request.param, tmp_path_factory.mktemp(request.param))


def merged(base: Path, adapter: Path | None):
    model = load_model(base)
    if adapter is not None:
        load_adapter(model, adapter)
        merge_lora(model)
    return model


@torch.no_grad()
def test_each_row_of_a_mixed_batch_is_its_adapter_merged_alone(checkpoint):
    base, dirs = checkpoint
    model = load_model(base)
    assert attach_adapters(model, dirs) == ["a", "b"] == adapter_names(model)
    wrapped = [m for m in model.modules() if isinstance(m, RowLoRA)]
    assert sorted({len(m.adapters) for m in wrapped}) == [1, 2]  # q_proj carries both, others one
    rows = ["a", "b", None, "a"]
    set_rows(model, torch.tensor([-1 if n is None else ["a", "b"].index(n) for n in rows]))
    got = model(IDS)
    # References run the same batch (the products of a 4-row batch, as `got`'s) and give row i for row i.
    want = {name: merged(base, dirs.get(name))(IDS) for name in ("a", "b", None)}
    # Merging alone moves e2b's logits by ~2e-4 (W + s·BA rounds differently; PLE and KV sharing carry it on):
    # its rows equal the un-merged single-adapter model to 1e-5, and the merged one to that rounding.
    tol = 1e-5 if base.parent.name.startswith("gemma3") else 1e-3
    for name in ("a", "b"):
        single = load_model(base)
        load_adapter(single, dirs[name])
        alone = single(IDS)
        assert (want[name] - want[None]).abs().max() > 0.1  # the adapter matters
        for i in (i for i, n in enumerate(rows) if n == name):
            torch.testing.assert_close(got[i], want[name][i], atol=tol, rtol=0)
            torch.testing.assert_close(got[i], alone[i], atol=1e-5, rtol=0)
    assert torch.equal(got[2], want[None][2])  # a base row: the base model's own products, nothing added
    set_rows(model, torch.tensor([1, 1, 1, 1]))  # every row on one adapter: the single-product path
    torch.testing.assert_close(model(IDS), want["b"], atol=tol, rtol=0)


@torch.no_grad()
def test_adapters_wrap_packed_and_int8_linears(tmp_path):
    base, dirs = make_checkpoint("gemma3", tmp_path)
    packed = pack_linears(load_model(base))
    attach_adapters(packed, dirs)
    assert all(isinstance(m.base_layer, PackedLinear) for m in packed.modules() if isinstance(m, RowLoRA))
    set_rows(packed, torch.tensor([0, 1, -1, 0]))
    got = packed(IDS)
    for i, name in enumerate(["a", "b", None, "a"]):
        torch.testing.assert_close(got[i], merged(base, dirs.get(name))(IDS)[i], atol=1e-4, rtol=0)  # oneDNN vs MKL

    quantized = quantize_model(load_model(base), "int8")
    plain_int8 = quantized(IDS)
    attach_adapters(quantized, dirs)
    assert all(isinstance(m.base_layer, Int8Linear) for m in quantized.modules() if isinstance(m, RowLoRA))
    ids = [0, 1, -1, 0]
    set_rows(quantized, torch.tensor(ids))
    got = quantized(IDS)
    assert torch.equal(got[2], plain_int8[2])
    # int8 products depend on the batch's row count (bf16 GEMM for prompts, the int8 kernel below): each row is
    # checked against the same batch with every row on that row's adapter.
    for i, index in enumerate(ids):
        set_rows(quantized, torch.tensor([index] * len(ids)))
        assert torch.equal(got[i], quantized(IDS)[i])
        if index >= 0:
            assert (got[i] - plain_int8[i]).abs().max() > 0.1


def test_an_engine_decodes_rows_on_two_adapters_in_one_step_with_merged_tokens(tmp_path):
    base, dirs = make_checkpoint("gemma3", tmp_path)
    model = load_model(base)
    prepare_weights(model, None, compile=False)  # the serving layout (oneDNN-packed where it packs fp32)
    engine = Engine(model, max_batch=4, context=128)
    attach_adapters(model, dirs)  # after the engine is built: the runtime selects rows before every forward
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 1000, (n,), generator=g).tolist() for n in (5, 9, 7, 12)]
    names = ["a", "b", None, "b"]
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    reqs = [engine.submit(p, greedy, adapter=n) for p, n in zip(prompts, names, strict=True)]
    engine.step()  # admits all four; every later step decodes rows on a, b and the base together
    assert sorted(r.adapter for r in engine.running.values()) == [-1, 0, 1, 1]
    while engine.has_work:
        engine.step()
    for name in ("a", "b", None):
        alone = merged(base, dirs.get(name))
        prepare_weights(alone, None, compile=False)
        one = Engine(alone, max_batch=1, context=128)
        for p, n, r in zip(prompts, names, reqs, strict=True):
            if n == name:
                assert r.tokens == one.generate([p], greedy)[0].tokens, name
    with pytest.raises(ValueError, match="no adapter named 'c'"):
        engine.submit(prompts[0], greedy, adapter="c")


def test_bad_adapters_are_refused_and_leave_the_model_untouched(tmp_path):
    base, dirs = make_checkpoint("gemma3", tmp_path)
    model = load_model(base)

    def refused(adapters: dict, match: str) -> None:
        with pytest.raises(ValueError, match=match):
            attach_adapters(model, adapters)
        assert not any(isinstance(m, RowLoRA) for m in model.modules()) and adapter_names(model) == []

    refused({"a": dirs["a"], "x": tmp_path / "nowhere"}, "adapter 'x'.*not a readable PEFT adapter")
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "adapter_model.safetensors").write_bytes((dirs["b"] / "adapter_model.safetensors").read_bytes())
    config = json.loads((dirs["b"] / "adapter_config.json").read_text())
    (wrong / "adapter_config.json").write_text(json.dumps({**config, "r": 4}))  # says 4, holds rank 8
    refused({"a": dirs["a"], "w": wrong}, r"adapter 'w'.*gate_proj has A \[8, 64\].*r=4 needs A \[4, 64\]")
    hf_model(tiny("gemma3-27b")).save_pretrained(tmp_path / "other")  # 7 layers, other head sizes
    refused({"o": make_adapter(tmp_path / "other", tmp_path / "o", 4, 8.0, ("q_proj",), 0)},
            r"adapter 'o'.*q_proj has A \[4, 64\] and B \[32, 4\]")
    refused({"bad name": dirs["a"]}, "adapter name 'bad name'")
    attach_adapters(model, {"a": dirs["a"]})
    with pytest.raises(ValueError, match="'a' is already attached"):
        attach_adapters(model, {"a": dirs["b"]})
    set_rows(model, torch.tensor([0, -1]))
    with pytest.raises(RuntimeError, match="a batch of 3 rows, but set_rows gave 2 adapter ids"):
        model(IDS[:3])


def test_adapter_specs(tmp_path):
    base, dirs = make_checkpoint("gemma3", tmp_path)
    assert parse_specs([f"a={dirs['a']}", f"b={dirs['b']}"]) == dirs
    for spec, match in ((str(dirs["a"]), "give NAME=DIR"), ("=x", "give NAME=DIR"), (f"a={tmp_path}/no", "no such"),
                        (f"a={base}", "not a PEFT LoRA adapter"), (f"a b={dirs['a']}", "adapter name 'a b'")):
        with pytest.raises(ValueError, match=match):
            parse_specs([spec])
    with pytest.raises(ValueError, match="given twice"):
        parse_specs([f"a={dirs['a']}", f"a={dirs['b']}"])
