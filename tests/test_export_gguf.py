"""`export_gguf` writes Gemma 3 GGUF files that gemmakit and llama.cpp (llama-cpp-python) both load with the
model's logits and the tokenizer's ids (checkpoints/export_gguf.py), and refuses what it cannot write faithfully.
Run: .venv/bin/python -m pytest tests/test_export_gguf.py (add -m slow for the real 270M model)
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from gemmakit.checkpoints import load_model_and_tokenizer
from gemmakit.checkpoints.export_gguf import export_gguf
from gemmakit.checkpoints.gguf import load_gguf
from gemmakit.model import Gemma
from gemmakit.quantize import quantize_model
from gemmakit.runtime.packing import pack_linears
from gemmakit.tokenizer import Tokenizer
from tests.helpers import tiny

PROMPT = "The quick brown fox jumps over the lazy dog, then naps in the sun."  # 19 tokens: past the window of 8
STRINGS = [
    "Hello, world!", "naïve café — 日本語のテキスト 🤖👍🏽 𠜎", "a   b\t\tc\n\n\nd    e", "  leading, trailing   ",
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n", "<bos>x<eos> <start_of_image>",
    "def f(x):\n\tif x:\n\t\treturn x  *  2\n", "control \x00\x07\x1b[31mred \x7f", "almost <eos special",
]


@pytest.fixture(scope="module")
def tokenizer(default_model) -> Tokenizer:
    """Gemma 3's real 262k vocabulary, read from the embedded GGUF (so it remembers that file)."""
    return Tokenizer.from_gguf(default_model)


def random_model(vocab_size: int) -> Gemma:
    """A tiny random Gemma 3 with everything llama.cpp must be told: a last layer forced full (not llama.cpp's
    default pattern), a local RoPE theta of its own, linear scaling, a logit softcap."""
    config = tiny("gemma3").replace(name="tiny-export", vocab_size=vocab_size, rope_local_base_freq=20_000.0,
                                    rope_scaling_factor=8.0, final_logit_softcapping=30.0)
    torch.manual_seed(0)
    model = Gemma(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # norms away from 0, so a missing +1 cannot pass
            p.copy_(0.5 * (torch.rand_like(p) - 0.5)) if "norm" in name else p.normal_(0.0, 0.08)
    return model


@pytest.fixture(scope="module")
def model() -> Gemma:
    """On the real 262k vocabulary, for the tests that tokenize."""
    return random_model(262144)


@pytest.fixture(scope="module")
def small() -> Gemma:
    """On a 1000-row vocabulary (fast to write and load), for the tests that only compare logits."""
    return random_model(1000)


def byte_tokenizer() -> Tokenizer:
    """A byte-fallback BPE of specials and the 256 byte pieces only: 259 tokens, padded to 1000 in the file."""
    from tokenizers import AddedToken, normalizers
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import BPE

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    backend = Backend(BPE(vocab=vocab, merges=[], byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<pad>", "<eos>", "<bos>")])
    return Tokenizer(backend, bos_id=2, eos_id=1, pad_id=0)


def llama(path):
    """llama.cpp on `path`, keeping every position's logits, with an f32 KV cache (its f16 default would add
    an error of its own)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(str(path), logits_all=True, n_ctx=64, n_threads=2, type_k=0, type_v=0,
                           flash_attn=False, verbose=False)


def llama_logits(llm, ids: list[int]) -> torch.Tensor:
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[: len(ids)]))


@torch.no_grad()
def test_f32_export_gives_the_same_logits_and_ids_in_gemmakit_and_llama_cpp(model, tokenizer, tmp_path):
    """An f32 file reloads bit for bit in gemmakit; llama.cpp computes the model's logits from it and, with the
    source GGUF's vocabulary arrays copied over, tokenizes text id for id as gemmakit does."""
    path = export_gguf(model, tmp_path / "tiny.gguf", tokenizer, "f32")
    ids = tokenizer.encode(PROMPT)
    want = model(torch.tensor([ids]))[0]
    again = load_gguf(path)
    assert again.config.layer_types == model.config.layer_types
    torch.testing.assert_close(again(torch.tensor([ids]))[0], want, atol=1e-6, rtol=0)
    # ~3e-3 is llama.cpp's own floor here: its CPU GELU reads an f16 lookup table even in an f32 model.
    llm = llama(path)
    theirs = llama_logits(llm, ids)
    torch.testing.assert_close(theirs, want, atol=1e-2, rtol=0)
    assert torch.equal(theirs.argmax(-1), want.argmax(-1))
    for text in STRINGS:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tokenizer.encode(text), text


@pytest.mark.parametrize("dtype", ["bf16", "q8_0"])
@torch.no_grad()
def test_rounded_types_store_the_gguf_rounding_of_each_matrix(dtype, small, tmp_path):
    """bf16 / q8_0 files hold exactly gguf's rounding of the matrices (norms stay f32), and llama.cpp runs them."""
    path = export_gguf(small, tmp_path / f"tiny-{dtype}.gguf", byte_tokenizer(), dtype)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == dtype.upper() and types["blk.0.attn_norm.weight"] == "F32"
    assert "output.weight" not in types  # tied head: llama.cpp reuses the embedding
    qtype = gguf.GGMLQuantizationType[dtype.upper()]
    rounded = Gemma(small.config).eval()
    rounded.load_state_dict({k: _round(v, qtype) if v.ndim == 2 else v for k, v in small.state_dict().items()})
    ids = torch.randint(0, 1000, (19,), generator=torch.Generator().manual_seed(1)).tolist()
    want = rounded(torch.tensor([ids]))[0]
    torch.testing.assert_close(load_gguf(path)(torch.tensor([ids]))[0], want, atol=1e-5, rtol=0)
    # llama.cpp also rounds the activations to the weights' type (bf16 / q8_0 dot products): a looser match.
    theirs = llama_logits(llama(path), ids)
    assert (theirs - want).abs().max() < 0.3 and (theirs - want).abs().mean() < 0.03


def _round(t: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(t.numpy(), qtype), qtype))


def test_a_tokenizer_json_vocabulary_tokenizes_in_llama_cpp_as_in_gemmakit(model, tokenizer, tmp_path):
    """Without a source GGUF the vocabulary is derived from the BPE; llama.cpp then splits text id for id as
    gemmakit does (special tokens, whitespace runs, byte fallback), and keeps the chat template."""
    llama_cpp = pytest.importorskip("llama_cpp")
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    plain = Tokenizer(tokenizer.backend, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, template)
    assert plain.gguf_source is None
    path = export_gguf(model, tmp_path / "derived.gguf", plain, "f16")
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    for text in STRINGS:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == plain.encode(text), text
    assert llm.metadata["tokenizer.chat_template"] == template


def test_an_existing_file_is_never_overwritten(small, tmp_path):
    """The destination is refused before any work, and left as it was."""
    path = tmp_path / "taken.gguf"
    path.write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="already exists"):
        export_gguf(small, path, byte_tokenizer())
    assert path.read_bytes() == b"mine"


def test_models_gguf_cannot_hold_faithfully_are_refused(tmp_path):
    """Quantized / packed models and an attention scale llama.cpp would not use: clear errors, no file (Gemma 4
    is tests/test_export_gguf4.py's)."""
    vocab = byte_tokenizer()
    with pytest.raises(ValueError, match="Int8Linear"):
        export_gguf(quantize_model(Gemma(tiny("gemma3")), "int8"), tmp_path / "q.gguf", vocab)
    with pytest.raises(ValueError, match="PackedLinear"):
        export_gguf(pack_linears(Gemma(tiny("gemma3"))), tmp_path / "p.gguf", vocab)
    with pytest.raises(ValueError, match="attention scale"):  # query_pre_attn_scalar 16 with head_dim 8
        export_gguf(Gemma(tiny("gemma3-27b")), tmp_path / "scale.gguf", vocab)
    with pytest.raises(ValueError, match="unknown GGUF type"):
        export_gguf(Gemma(tiny("gemma3")), tmp_path / "t.gguf", vocab, "q4_k")
    assert not list(tmp_path.iterdir())


def test_export_command_writes_gguf(small, tmp_path, capsys):
    """`gemmakit export --format gguf` turns an HF directory into one GGUF file with the directory's logits and
    tokenizer (padded to the embedding's rows), and never writes over it."""
    from gemmakit.checkpoints.export import export_hf
    from gemmakit.cli import main

    export_hf(small, tmp_path / "hf", byte_tokenizer())
    out = tmp_path / "tiny.gguf"
    args = ["export", "--model", str(tmp_path / "hf"), "--format", "gguf", "--gguf-type", "f32", "--out", str(out)]
    assert main(args) == 0
    ids = torch.tensor([[2, 72, 108, 33, 999, 500]])
    with torch.no_grad():
        torch.testing.assert_close(load_gguf(out)(ids), small(ids), atol=1e-6, rtol=0)
    again = Tokenizer.from_gguf(out, cache_dir=tmp_path / "cache")
    assert again.vocab_size == 1000 and again.encode("Hi é") == byte_tokenizer().encode("Hi é")
    assert main(args) == 2 and "already exists" in capsys.readouterr().err


@pytest.mark.slow
@torch.no_grad()
def test_the_default_270m_exported_as_f16_generates_alike_in_llama_cpp(default_model, tmp_path):
    """The embedded 270M, written as f16: llama.cpp greedily continues two prompts with the same 8 tokens as
    gemmakit running the written file, and tokenizes text as gemmakit does."""
    import gemmakit
    from gemmakit.sampling import SamplingParams

    model, tok = load_model_and_tokenizer(default_model)
    path = export_gguf(model, tmp_path / "gemma-3-270m-f16.gguf", tok, "f16")
    del model
    llm = gemmakit.load(path)
    theirs = llama(path)
    for prompt in ("The capital of France is", "def fibonacci(n):\n"):
        ids = llm.tokenizer.encode(prompt)
        ours = list(llm.engine.stream(ids, SamplingParams(max_tokens=8)))
        assert _greedy(theirs, ids, 8) == ours, prompt
    for text in STRINGS:
        assert theirs.tokenize(text.encode(), add_bos=True, special=True) == tok.encode(text), text


def _greedy(llm, ids: list[int], n: int) -> list[int]:
    """llama.cpp's argmax continuation, one eval per token (no sampler settings to get wrong)."""
    out = [int(llama_logits(llm, ids)[-1].argmax())]
    for _ in range(n - 1):
        llm.eval(out[-1:])
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
    return out
