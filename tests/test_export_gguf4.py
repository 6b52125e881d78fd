"""Gemma 4 GGUF export (checkpoints/export_gguf4.py, gguf_write.py): tiny random models of each released
variant's structure, written by gemmakit, run in llama.cpp (llama-cpp-python) with gemmakit's logits and greedy
tokens (and read back by gemmakit's own GGUF loader), tokenize text as gemmakit does, and stream one tensor at a
time.
Run: .venv/bin/python -m pytest tests/test_export_gguf4.py
"""

from __future__ import annotations

import json
import tracemalloc

import gguf
import numpy as np
import pytest
import torch

from gemmakit.checkpoints.export_gguf import export_gguf
from gemmakit.checkpoints.export_gguf4 import gguf_name, hf_shapes, write_gemma4_gguf
from gemmakit.checkpoints.gguf import load_gguf
from gemmakit.model import Gemma
from gemmakit.quantize import quantize_model
from gemmakit.runtime.packing import pack_linears
from gemmakit.tokenizer import Tokenizer
from tests.helpers import greedy_without_cache, tiny

llama_cpp = pytest.importorskip("llama_cpp")

# tiny("e2b") shares the KV of 4 of its 10 layers, which leaves a sliding layer last before the shared ones;
# the released E2B (20 of 35) and E4B end that run with a full layer, and llama.cpp relies on it. Sharing 5
# of 10 is E2B's real layout.
VARIANTS = {"e2b": tiny("e2b").replace(num_kv_shared_layers=5), "12b": tiny("12b"), "26b-a4b": tiny("26b-a4b"),
            "31b": tiny("31b")}
IDS = torch.randint(0, 1000, (19,), generator=torch.Generator().manual_seed(1)).tolist()  # past the window of 8
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<|turn>", "<turn|>", "<|channel>", "<channel|>"]
CORPUS = ["the quick brown fox jumps over the lazy dog", "then naps in the sun", "hello world, hello there",
          "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)", "user model thought"]
STRINGS = ["Hello, world!", "the  quick\tbrown\n\nfox  ", "naïve café — 日本語 🤖", "  leading, trailing   ",
           "<|turn>user\nhi there<turn|>\n<|turn>model\n<|channel>thought<channel|>", "fibonacci(n - 1)\n"]
TEMPLATE = "{% for m in messages %}<|turn>{{ m['role'] }}\n{{ m['content'] }}<turn|>\n{% endfor %}"


# A wide embedding gives logits of ~15 with clear leaders, and a wide router clear top-k margins, so that
# neither greedy tokens nor expert choices hang on rounding.
STD = {"embed_tokens": 0.5, "proj": 4.0}


def random_model(config, seed: int = 0) -> Gemma:
    """Random weights, with norms, scales and layer scalars away from 1 so a dropped or misplaced one shows."""
    torch.manual_seed(seed)
    model = Gemma(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("scale"):
                p.copy_(1.0 + 0.5 * (torch.rand_like(p) - 0.5))
            else:
                p.normal_(0.0, STD.get(name.rsplit(".", 2)[-2], 0.05))  # "proj": the MoE router's
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(0.5 + torch.rand_like(b))
    return model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small only wait on a second thread (most of all on a busy machine); llama.cpp runs on
    one too (`llama`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models() -> dict[str, Gemma]:
    return {name: random_model(config) for name, config in VARIANTS.items()}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return bpe_tokenizer()


def bpe_tokenizer() -> Tokenizer:
    """A Gemma-style BPE (spaces as "▁", byte fallback, special added tokens) with merges trained on a few
    lines: 9 specials, 256 byte pieces and ~190 learned pieces, padded to 1000 in the file."""
    from tokenizers import AddedToken, decoders, normalizers
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    trained = Backend(BPE())
    trained.normalizer = normalizers.Replace(" ", "\u2581")
    trained.train_from_iterator(CORPUS, BpeTrainer(vocab_size=200, show_progress=False))
    spec = json.loads(trained.to_str())["model"]
    pieces = sorted(spec["vocab"], key=spec["vocab"].get)
    vocab = {t: i for i, t in enumerate(SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + pieces)}
    merges = [tuple(m) for m in spec["merges"]]
    backend = Backend(BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return Tokenizer(backend, bos_id=2, eos_id=1, pad_id=0, chat_template=TEMPLATE)


def llama(path, **kw):
    """llama.cpp on `path`, keeping every position's logits, with an f32 KV cache (its f16 default would add
    an error of its own), on one thread."""
    return llama_cpp.Llama(str(path), logits_all=True, n_ctx=64, n_threads=1, n_threads_batch=1, type_k=0, type_v=0,
                           flash_attn=False, verbose=False, **kw)


def llama_logits(llm, ids: list[int]) -> torch.Tensor:
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[: len(ids)]))


def greedy_after(llm, logits: torch.Tensor, n: int) -> list[int]:
    """llama.cpp's argmax continuation of the prompt it just evaluated (to `logits`), one eval per token."""
    out = [int(logits[-1].argmax())]
    for _ in range(n - 1):
        llm.eval(out[-1:])
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
@torch.no_grad()
def test_f32_export_runs_in_llama_cpp_with_gemmakit_logits(variant, models, tokenizer, tmp_path):
    """Each variant's structure (PLE, KV sharing and the double-wide MLP; K = V full layers with their own KV
    heads; the MoE block beside the dense MLP; proportional RoPE on 2x-wide full heads) gives gemmakit's
    logits in llama.cpp, and the same 8 greedy tokens."""
    model = models[variant]
    path = export_gguf(model, tmp_path / f"{variant}.gguf", tokenizer, "f32")
    llm = llama(path)
    want = model(torch.tensor([IDS]))[0]
    theirs = llama_logits(llm, IDS)
    # llama.cpp's CPU GELU reads an f16 table even in an f32 model: errors of ~1e-3 on logits of ~15, more
    # through the experts' extra GELUs; a missing +-25% norm, scale or rotation errs by 1 and more.
    err = (theirs - want).abs()
    assert err.max() < 5e-2 and err.mean() < 5e-3, (err.max(), err.mean())
    assert torch.equal(theirs.argmax(-1), want.argmax(-1))
    assert greedy_after(llm, theirs, 8) == greedy_without_cache(model, IDS, 8)
    # and gemmakit's own GGUF loader reads the file back to the same model, bit for bit
    torch.testing.assert_close(load_gguf(path)(torch.tensor([IDS]))[0], want, atol=1e-6, rtol=0)


# (variant, type, max and mean logit error allowed): llama.cpp also rounds the activations to the weights'
# type (bf16 / q8_0 dot products), more so through the MoE block's extra matrices and expert choices.
ROUNDED = [("31b", "bf16", 0.3, 0.03), ("e2b", "q8_0", 1.0, 0.1), ("26b-a4b", "bf16", 1.5, 0.15),
           ("26b-a4b", "q8_0", 6.0, 0.5)]


@pytest.mark.parametrize(("variant", "dtype", "max_err", "mean_err"), ROUNDED)
@torch.no_grad()
def test_rounded_types_store_gguf_rounding_and_run_in_llama_cpp(variant, dtype, max_err, mean_err, models,
                                                                 tokenizer, tmp_path):
    """bf16 / q8_0 files hold exactly gguf's rounding of each matrix (norms, scales and the router in f32;
    matrices whose rows are not whole Q8_0 blocks in f16, as the converter), and llama.cpp runs them with the
    rounded model's logits to the type's precision."""
    model = models[variant]
    path = export_gguf(model, tmp_path / f"{variant}-{dtype}.gguf", tokenizer, dtype)
    stored = {t.name: t for t in gguf.GGUFReader(path).tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA4, model.config.num_hidden_layers)
    rounded = {k: _round(k, v, dtype) for k, v in model.state_dict().items()}
    for key, want in rounded.items():
        t = stored.pop(gguf_name(key, names))
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        assert torch.equal(torch.from_numpy(got), want), key
    assert list(stored) == ["rope_freqs.weight"]
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == dtype.upper() and types["blk.0.attn_norm.weight"] == "F32"
    if variant == "26b-a4b":
        assert types["blk.0.ffn_gate_up_exps.weight"] == dtype.upper() and types["blk.0.ffn_gate_inp.weight"] == "F32"
        assert types["blk.0.ffn_down_exps.weight"] == ("F16" if dtype == "q8_0" else "BF16")  # rows of 24
    rounded_model = Gemma(model.config).eval()
    rounded_model.load_state_dict(rounded)
    want = rounded_model(torch.tensor([IDS]))[0]
    torch.testing.assert_close(load_gguf(path)(torch.tensor([IDS]))[0], want, atol=1e-4, rtol=0)
    llm = llama(path)
    theirs = llama_logits(llm, IDS)
    err = (theirs - want).abs()
    assert err.max() < max_err and err.mean() < mean_err, (err.max(), err.mean())
    if variant != "26b-a4b":  # a rounding may change an expert choice, and with it a token
        assert greedy_after(llm, theirs, 8) == greedy_without_cache(rounded_model, IDS, 8)


def _round(key: str, t: torch.Tensor, dtype: str) -> torch.Tensor:
    if t.ndim < 2 or "router.proj" in key:
        return t
    qtype = gguf.GGMLQuantizationType[dtype.upper()]
    if t.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        qtype = gguf.GGMLQuantizationType.F16
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(t.numpy(), qtype), qtype))


def test_vocabulary_tokenizes_in_llama_cpp_as_in_gemmakit(models, tokenizer, tmp_path):
    """llama.cpp's gemma4 BPE, given the pieces and merges, splits text id for id as the tokenizer does
    (spaces, newlines, byte fallback, special and channel tokens) and keeps the chat template; the vocabulary
    survives a round trip through gemmakit."""
    path = export_gguf(models["31b"], tmp_path / "vocab.gguf", tokenizer, "f16")
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    assert llm.metadata["tokenizer.ggml.model"] == "gemma4"
    assert llm.metadata["tokenizer.chat_template"] == TEMPLATE
    for text in STRINGS:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tokenizer.encode(text), text
    types = gguf.GGUFReader(path).fields["tokenizer.ggml.token_type"]
    kinds = [int(types.parts[i][0]) for i in types.data]
    assert kinds[5] == gguf.TokenType.CONTROL and kinds[7] == gguf.TokenType.USER_DEFINED  # <|turn>, <|channel>
    assert kinds[9] == gguf.TokenType.BYTE and kinds[999] == gguf.TokenType.UNUSED
    # gemmakit reads the vocabulary back as the same tokenizer, and writes it out again unchanged
    again = Tokenizer.from_gguf(path, cache_dir=tmp_path / "cache")
    assert [again.encode(text) for text in STRINGS] == [tokenizer.encode(text) for text in STRINGS]
    assert export_gguf(models["31b"], tmp_path / "again.gguf", again, "f16").read_bytes() == path.read_bytes()


def test_streaming_writer_fetches_each_tensor_once_and_holds_one_at_a_time(tokenizer, tmp_path):
    """`write_gemma4_gguf` from a Config and a callable writes the same bytes as `export_gguf`, asks for every
    HF tensor once in file order, and while writing holds about one converted tensor (numpy's allocations,
    which tracemalloc sees), not the ~10 MB of them all."""
    model = random_model(VARIANTS["e2b"].replace(hidden_size=256, intermediate_size=512))
    state = model.state_dict()
    asked: list[str] = []

    def fetch(name: str) -> torch.Tensor:
        asked.append(name)
        return state[name]

    exported = export_gguf(model, tmp_path / "a.gguf", tokenizer, "f16")
    tracemalloc.start()
    streamed = write_gemma4_gguf(tmp_path / "b.gguf", model.config, fetch, tokenizer, "f16")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert streamed.read_bytes() == exported.read_bytes()
    assert asked == list(hf_shapes(model.config)) == list(state)
    converted = [2 * t.numel() for t in state.values()]  # f16 bytes
    # the output array and one chunk's conversion, plus the vocabulary and metadata (under 1 MiB)
    assert peak < 2 * max(converted) + (1 << 20) < sum(converted) / 4, (peak, max(converted), sum(converted))


def test_a_file_of_a_config_loads_in_llama_cpp_without_a_model_or_tokenizer(tmp_path):
    """What a benchmark writes: random tensors of a config's shapes, the placeholder byte vocabulary."""
    config = VARIANTS["26b-a4b"]
    shapes = hf_shapes(config)
    path = write_gemma4_gguf(tmp_path / "random.gguf", config, lambda name: torch.randn(shapes[name]), None, "q8_0")
    llm = llama(path)
    assert llm.n_vocab() == config.vocab_size and np.isfinite(llama_logits(llm, IDS[:4]).numpy()).all()


@torch.no_grad()
def test_export_command_writes_a_gemma4_gguf(models, tokenizer, tmp_path, capsys):
    """`gemmakit export --format gguf` turns a Gemma 4 HF directory into a GGUF that llama.cpp runs with the
    model's logits, and never writes over it."""
    from gemmakit.checkpoints.export import export_hf
    from gemmakit.cli import main

    model = models["12b"]
    export_hf(model, tmp_path / "hf", tokenizer)
    out = tmp_path / "tiny-12b.gguf"
    args = ["export", "--model", str(tmp_path / "hf"), "--format", "gguf", "--gguf-type", "f32", "--out", str(out)]
    assert main(args) == 0
    err = (llama_logits(llama(out), IDS) - model(torch.tensor([IDS]))[0]).abs()
    assert err.max() < 3e-2
    assert main(args) == 2 and "already exists" in capsys.readouterr().err


def test_what_llama_cpp_would_run_differently_is_refused(tokenizer, tmp_path):
    """A KV-sharing layout llama.cpp does not derive, RoPE scaling, a PLE table of another vocabulary, quantized
    or packed models, a tokenizer without merges: clear errors, no file."""
    cases = [(Gemma(tiny("e2b")), "KV-shared layer 6 reads layer 5's.*gemma4 would give it layer 4's"),
             (Gemma(tiny("31b").replace(rope_scaling_factor=8.0)), "RoPE scaling"),
             (Gemma(tiny("e4b").replace(num_kv_shared_layers=0, vocab_size_per_layer_input=500)), "PLE table"),
             (quantize_model(Gemma(tiny("31b")), "int8"), "Int8Linear"),
             (pack_linears(Gemma(tiny("31b"))), "PackedLinear")]
    for model, message in cases:
        with pytest.raises(ValueError, match=message):
            export_gguf(model, tmp_path / "refused.gguf", tokenizer)
    from tests.test_export_gguf import byte_tokenizer

    with pytest.raises(ValueError, match="no BPE merges"):
        export_gguf(Gemma(tiny("31b")), tmp_path / "refused.gguf", byte_tokenizer())
    # tensors that do not fit the config: before writing (a mapping), or as the odd one comes (a callable)
    config, state = tiny("31b"), Gemma(tiny("31b")).state_dict()
    with pytest.raises(ValueError, match="layer_scalar is missing from the tensors"):
        write_gemma4_gguf(tmp_path / "refused.gguf", config, {k: v for k, v in state.items()
                                                              if k != "model.layers.0.layer_scalar"}, tokenizer)
    with pytest.raises(ValueError, match=r"o_proj.weight: got a tensor of shape \(64, 64\), expected \(64, 128\)"):
        write_gemma4_gguf(tmp_path / "refused.gguf", config, lambda k: state[k] if "o_proj" not in k
                          else torch.zeros(64, 64), tokenizer)
    assert not list(tmp_path.iterdir())


@torch.no_grad()
def test_q4_0_export_holds_gguf_rounding_and_runs_in_llama_cpp(models, tokenizer, tmp_path):
    """--gguf-type q4_0 (the QAT releases' type, what Ollama users pull): matrices hold exactly gguf's Q4_0
    rounding, gemmakit reads the file back to the rounded model, and llama.cpp runs it pointing the same way
    (it also rounds activations to 8 bits, which 4-bit weights make visible)."""
    model = models["31b"]
    path = export_gguf(model, tmp_path / "31b-q4_0.gguf", tokenizer, "q4_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["blk.0.attn_norm.weight"] == "F32"
    rounded_model = Gemma(model.config).eval()
    rounded_model.load_state_dict({k: _round(k, v, "q4_0") for k, v in model.state_dict().items()})
    want = rounded_model(torch.tensor([IDS]))[0]
    torch.testing.assert_close(load_gguf(path)(torch.tensor([IDS]))[0], want, atol=1e-4, rtol=0)
    theirs = llama_logits(llama(path), IDS)
    assert torch.nn.functional.cosine_similarity(theirs, want, dim=-1).min() > 0.9
