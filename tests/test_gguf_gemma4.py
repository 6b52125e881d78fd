"""Gemma 4 GGUF files laid out as llama.cpp's converter writes them (tests/gguf_llamacpp_layout.py): gemmakit
loads them to the logits of the model they were written from, and llama.cpp itself runs the same files to the
same logits, so the fixture's layout is llama.cpp's and not only gemmakit's idea of it.

llama.cpp's CPU GELU reads a float16 table (ggml's GGML_GELU_FP16): its input and output are rounded to half
precision, so its logits sit ~1e-3 away from any fp32 model. Compared with llama.cpp, gemmakit runs with that
same rounded GELU (`_llamacpp_gelu`), which leaves the layout as the only thing that could make them differ;
a swapped tensor, a wrong RoPE or norm moves logits by 0.1 or more. Its matmuls on quantized weights also
round the activations (to Q8 blocks), which this random tiny model amplifies to a few tenths: there only
the direction of the logits is compared.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gemmakit.checkpoints import CheckpointError, load_model
from gemmakit.checkpoints.gguf import load_gguf
from gemmakit.model import Gemma
from gemmakit.quantize import Int4Linear
from gemmakit.tokenizer import Tokenizer
from tests.gguf_llamacpp_layout import build_vocab, write_gemma4_gguf
from tests.helpers import hf_model, tiny, weight_error

llama_cpp = pytest.importorskip("llama_cpp")
Q = gguf.GGMLQuantizationType
IDS = [2, 105, 811, 300, 17, 42, 560, 107, 640, 99, 12, 700, 8, 901]  # longer than the sliding window (8)


def _config(name: str):
    """tiny(name), with KV sharing laid out as in the released E2B/E4B: llama.cpp does not read which layer a
    shared layer takes K/V from but assumes the last two non-shared layers are sliding then full."""
    c = tiny(name)
    if name == "e2b":
        return c.replace(num_kv_shared_layers=5)
    if name == "e4b":
        return c.replace(num_kv_shared_layers=6)
    return c


@pytest.fixture(scope="module")
def vocab():
    return build_vocab(1000)


def _write(tmp_path: Path, name: str, vocab, qtype=Q.F32, wide=(), **kw):
    config = _config(name)
    ref = hf_model(config)
    path = tmp_path / f"{name}-{qtype.name}.gguf"
    stored = write_gemma4_gguf(path, config.to_hf(), ref.state_dict(), qtype=qtype, wide=wide, vocab=vocab, **kw)
    return path, config, ref, stored


def _model_of(config, stored) -> Gemma:
    """The model the file describes: gemmakit's, with the weights as stored (after quantization)."""
    model = Gemma(config).eval()
    missing, unexpected = model.load_state_dict(stored, strict=False)
    assert not missing and not unexpected
    return model


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]


@contextlib.contextmanager
def _llamacpp_gelu():
    """F.gelu as ggml's CPU kernel computes it: 0 below -10, x above 10, else a float16 table lookup."""
    exact = F.gelu

    def gelu(x, approximate="none"):
        y = exact(x.half().float(), approximate="tanh").half().float()
        return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, y))

    F.gelu = gelu
    try:
        yield
    finally:
        F.gelu = exact


def _llama(path: Path):
    # float32 KV cache and no flash attention: llama.cpp's defaults round K and V to float16
    return llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=64, verbose=False, type_k=0, type_v=0,
                           flash_attn=False)


CASES = [("e2b", Q.F32), ("e2b", Q.Q4_0), ("26b-a4b", Q.F32), ("26b-a4b", Q.Q4_0), ("31b", Q.F32),
         ("31b", Q.Q8_0), ("e4b", Q.F32)]


@pytest.mark.parametrize(("name", "qtype"), CASES, ids=[f"{n}-{q.name}" for n, q in CASES])
def test_converter_layout_loads_and_llamacpp_agrees(tmp_path, vocab, name, qtype):
    """A converter-layout file loads to its config and to the logits of the weights it stores (for F32: the
    HF source model's), and llama.cpp, running the same file, agrees on the logits and the greedy tokens
    (quantized files: llama.cpp rounds activations to 8 bits for those matmuls, so only roughly).
    Q4_0 files mix in Q8_0 (attn_v, as dynamic quants keep it wider), F16 (rows that are not whole blocks,
    e.g. E2B's per-layer table and the 26B's expert down projections) and F32 (norms, router, scales)."""
    path, config, ref, stored = _write(tmp_path, name, vocab, qtype, wide=("attn_v",))
    model = load_model(path)
    assert model.config.replace(name=config.name) == config
    want = _model_of(config, stored)
    got = _logits(model)
    assert torch.allclose(got, _logits(want), atol=1e-5, rtol=0)
    if qtype == Q.F32:
        with torch.no_grad():
            assert torch.allclose(got, ref(torch.tensor([IDS])).logits[0], atol=1e-5, rtol=0)
    llm = _llama(path)
    llm.eval(IDS)
    theirs = torch.from_numpy(np.array(llm.scores[: len(IDS)]))
    with _llamacpp_gelu():
        ours = _logits(model)
    if qtype == Q.F32:
        assert (theirs - ours).abs().max() < 1e-2
        greedy = [int(_logits(model, IDS[:k])[-1].argmax()) for k in range(4, 9)]
        assert [int(theirs[k - 1].argmax()) for k in range(4, 9)] == greedy
    else:  # llama.cpp rounds activations to Q8 blocks for these matmuls: close, not equal
        assert F.cosine_similarity(theirs, ours, dim=-1).min() > 0.75

def test_q4_0_loads_with_int4_keeping_its_codes(tmp_path):
    """Google's QAT releases are Q4_0 throughout. Loaded with quantize="int4", the linears and the tied
    head/table run on the file's own codes (nothing re-fitted: their effective weights equal the stored ones
    but for bf16 scales), the wider matrices of a mixed file stay int8, and the model still answers like the
    stored weights."""
    config = tiny("31b").replace(vocab_size=1024)  # int4 packs 16-row tiles: 1000 rows would stay int8
    path = tmp_path / "qat.gguf"
    stored = write_gemma4_gguf(path, config.to_hf(), hf_model(config).state_dict(), qtype=Q.Q4_0,
                               wide=("attn_v",), vocab=build_vocab(1024))
    model = load_model(path, quantize="int4")
    layer = model.model.layers[0]
    assert not isinstance(layer.self_attn.v_proj, Int4Linear)  # Q8_0 in the file: int8 here
    for linear, key in ((layer.self_attn.q_proj, "model.layers.0.self_attn.q_proj.weight"),
                        (model.lm_head, "model.embed_tokens.weight")):
        w = stored[key]
        assert isinstance(linear, Int4Linear)
        assert weight_error(linear, w) < min(1e-2, weight_error(Int4Linear.from_weight(w), w) / 5)
    ids = torch.tensor([0, 5, 300, 1023])
    table = stored["model.embed_tokens.weight"]
    assert (model.model.embed_tokens(ids) - table[ids]).abs().max() < 1e-2 * table.abs().max()
    want = _logits(_model_of(config, stored))
    # bf16 compute: close, not equal (this random model amplifies it along the sequence)
    assert F.cosine_similarity(_logits(model), want, dim=-1).mean() > 0.95


def test_q4_0_experts_keep_their_codes_under_int4(tmp_path, vocab):
    """A 26B-A4B's experts are nearly all of its bytes: under int4 both Q4_0 expert stacks run on the file's
    codes (not re-fitted), while a layer whose down projection is not 4-bit loads the ordinary way."""
    config = tiny("26b-a4b").replace(moe_intermediate_size=32)  # expert rows of whole Q4_0 blocks
    ref = hf_model(config)
    path = tmp_path / "moe.gguf"
    stored = write_gemma4_gguf(path, config.to_hf(), ref.state_dict(), qtype=Q.Q4_0, vocab=vocab)
    experts = load_model(path, quantize="int4").model.layers[0].experts
    assert experts.group_sizes == {"gate_up_proj": 32, "down_proj": 32}
    w = stored["model.layers.0.experts.gate_up_proj"][3]
    got = experts._product("gate_up_proj", 3, torch.eye(w.shape[1])).float().T
    refit = weight_error(Int4Linear.from_weight(w), w)
    assert (got - w).norm() / w.norm() < min(1e-2, refit / 5)
    path, *_ = _write(tmp_path, "26b-a4b", vocab, Q.Q4_0)  # down_proj rows of 24: F16 in the file
    assert load_model(path, quantize="int4").model.layers[0].experts.group_sizes["down_proj"] == 0  # int8


class _Tensor:
    def __init__(self, shape, data=None):
        self.shape, self.data, self.tensor_type = shape, data, Q.F32


@pytest.mark.parametrize("name", ["gemma-4-e2b", "gemma-4-e4b", "gemma-4-12b", "gemma-4-26b-a4b", "gemma-4-31b"])
def test_released_configs_come_back_from_the_converters_metadata(tmp_path, name):
    """The metadata llama.cpp's converter writes for each released Gemma 4 (and the facts it leaves to the
    tensors: rope_freqs, attn_v present or not, the PLE table's rows) gives back the registry's config."""
    from gemmakit.checkpoints.gguf import _Meta, metadata
    from gemmakit.checkpoints.gguf_gemma4 import check_kv_sharing, gemma4_config
    from gemmakit.checkpoints.gguf_reader import open_gguf
    from gemmakit.config import Config
    from gemmakit.registry import config_for
    from tests.gguf_llamacpp_layout import _write_hparams

    c = config_for(name)
    w = gguf.GGUFWriter(str(tmp_path / "meta.gguf"), "gemma4")
    _write_hparams(w, c.to_hf(), c.num_hidden_layers, ())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    pairs, rotated = c.global_head_dim // 2, int(c.global_head_dim * c.partial_rotary_factor / 2)
    freqs = np.array([1.0] * rotated + [1e30] * (pairs - rotated), np.float32)
    tensors = {"rope_freqs.weight": _Tensor([pairs], freqs),
               "per_layer_token_embd.weight": _Tensor([1, c.vocab_size_per_layer_input])}
    if not c.attention_k_eq_v:
        tensors |= {f"blk.{i}.attn_v.weight": _Tensor([1]) for i in range(c.num_hidden_layers)}
    meta = _Meta(metadata(open_gguf(tmp_path / "meta.gguf")), "gemma4", name)
    kw = gemma4_config(meta, tensors, name)
    assert Config(name=c.name, vocab_size=c.vocab_size, eos_token_id=c.eos_token_id, **kw) == c
    check_kv_sharing(c, name)  # llama.cpp reads their KV sharing as the model does

STRINGS = ["Hello world", "  two leading spaces", "tabs\tand\ttabs", "a\n\nb\n\n\nc\n", "\n\n\n\n", " \n \n ",
           "digits 1234567890 3.14 2026", "Über café naïve résumé", "日本語 中文 🙂 ✓", "\u00a0nbsp\u3000ideo\r\n",
           "<|turn>user\nHi there!<turn|>\n<|turn>model\n", '<|tool_call>call:f{a:<|"|>x<|"|>}<tool_call|>',
           "<|think|>\n<|channel>thought<channel|>", "x<eos>y<bos>z<pad>", "def add(a, b):\n    return a + b", ""]


def test_tokenizer_and_template_equal_llamacpps(tmp_path, vocab):
    """Tokenizer.from_gguf on a Gemma 4 file ("gemma4" BPE vocabulary) encodes every string to llama.cpp's ids
    (special tokens parsed, as a rendered chat prompt needs), decodes them back, and carries the template."""
    path, *_ = _write(tmp_path, "12b", vocab)
    tok = Tokenizer.from_gguf(path, cache_dir=tmp_path / "cache")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    for s in STRINGS:
        ids = tok.encode(s)
        assert ids == llm.tokenize(s.encode(), add_bos=True, special=True), s
        assert tok.decode(ids[1:]) == s
    assert tok.encode("<|turn>")[1:] == [105] and tok.bos_id == 2 and tok.eos_id == 1
    assert "<|turn>" in tok.chat_template
    cached = Tokenizer.from_gguf(path, cache_dir=tmp_path / "cache")
    assert [cached.encode(s) for s in STRINGS] == [tok.encode(s) for s in STRINGS]


@pytest.mark.parametrize(("kw", "needle"), [
    (dict(skip_keys=("sliding_window_pattern",)), "gemma4.attention.sliding_window_pattern"),
    (dict(skip_keys=("key_length_swa",)), "gemma4.attention.key_length_swa"),
    (dict(extra=(("feed_forward_length", [96, 96, 96]),)), "gemma4.feed_forward_length has 3 entries"),
    (dict(extra=(("head_count_kv", [2] * 6),)), "gemma4.attention.head_count_kv has 6 entries"),
    (dict(extra=(("head_count_kv", [2, 1, 2, 2, 2, 1, 1]),)), "gemma4.attention.head_count_kv differs"),
    (dict(extra=(("rope_dimension_count", 8),)), "gemma4.rope.dimension_count"),
    (dict(arch="gemma5"), "'gemma5'"),
], ids=["missing-pattern", "missing-key-length-swa", "short-ffn-array", "short-kv-array", "mixed-kv",
        "partial-rope-dims", "unknown-arch"])
def test_bad_metadata_is_a_checkpoint_error_naming_the_key(tmp_path, vocab, kw, needle):
    path, *_ = _write(tmp_path, "12b", vocab, **kw)
    with pytest.raises(CheckpointError, match=needle.replace("|", r"\|").replace("[", r"\[")):
        load_gguf(path)


def test_kv_sharing_llamacpp_would_read_otherwise_is_refused(tmp_path, vocab):
    """tiny("e2b") shares K/V from its last non-shared layer, which is sliding: llama.cpp would give its sliding
    shared layers the full layer before it. Such a file describes two different models: refused."""
    config = tiny("e2b")
    path = tmp_path / "shared.gguf"
    write_gemma4_gguf(path, config.to_hf(), hf_model(config).state_dict(), vocab=vocab)
    with pytest.raises(CheckpointError, match="KV-shared layer 6 would read layer 4's K/V in llama.cpp"):
        load_gguf(path)


def test_rope_freqs_other_than_proportional_are_refused(tmp_path, vocab):
    """rope_freqs carries the proportional RoPE; divisors gemmakit's RoPE cannot express are refused."""
    path, *_ = _write(tmp_path, "12b", vocab)
    reader = gguf.GGUFReader(str(path), "r+")
    freqs = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    freqs.data[-1] = 2.0
    del reader
    with pytest.raises(CheckpointError, match="rope_freqs.weight is not proportional RoPE"):
        load_gguf(path)

