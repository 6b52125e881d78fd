"""Files that llama.cpp's own quantizer writes load in gemmakit and compute what llama.cpp computes from them.

The embedded 270M is re-quantized by `llama_model_quantize` (the library behind `llama-quantize`) to types that
reach gemmakit's weights by different paths:

- Q4_0 everywhere (the token embedding too), loaded with quantize="int4": every matrix stays on the file's own
  4-bit codes (Int4Linear, and the tied head/table from token_embd's codes), nothing is re-fitted;
- Q2_K, loaded in fp32: llama.cpp stores o_proj/down_proj as Q3_K (the 640-wide rows of the others fall back to
  Q4_0/Q5_0, the embedding to Q8_0), so the Q3_K decoder's output is what the model computes with.

What "computes the same" means: llama.cpp rounds the activations to 8 bits for its quantized dot products,
gemmakit does not, so the logits differ by a little and greedy decoding may take the other token where two are
nearly tied. Each case therefore asserts: the greedy tokens are equal until a first difference, and there the
two tokens were within MARGIN logits for gemmakit (a near tie that rounding decides); and top-1 agreement over
a real text at least TOP1_MIN. A decoder that puts values in the wrong places (sub-blocks one place off in
Q3_K) brings top-1 agreement to nothing. One error this cannot see: a uniform scale on o_proj or down_proj,
which Gemma's post-attention / post-MLP norms cancel; tests/test_quants.py holds every decoder to gguf's
reference bit for bit for that. benchmarks/gguf_quants.py gives the same figures for every type.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from gemmakit.checkpoints import load_model
from gemmakit.checkpoints.gguf_reader import open_gguf
from gemmakit.engine import Engine
from gemmakit.sampling import SamplingParams
from gemmakit.tokenizer import Tokenizer
from tests.helpers import weight_error

llama_cpp = pytest.importorskip("llama_cpp")

PROMPTS = ["The capital of France is", "Once upon a time, in a small village,"]
NEW = 8
TEXT = Path(__file__).resolve().parent.parent / "benchmarks" / "data" / "corpus.txt"
# A first greedy difference must be a near tie: gemmakit's logit for its own token at most this far above its
# logit for llama.cpp's. The near ties llama.cpp's activation rounding decides are well under it (the margins
# of every type are in docs/performance.md); values decoded into the wrong places move logits by whole units.
MARGIN = 0.5
# Top-1 agreement with llama.cpp over 127 tokens of corpus.txt: room below what these files reach
# (docs/performance.md) for the activation rounding, far above what a wrongly decoded model agrees on.
TOP1_MIN = 0.85


def requantize(src: Path, dst: Path, ftype: str, embedding: int | None = None) -> Path:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.allow_requantize = True  # the source is itself quantized (Q4_K_M)
    params.nthread = 2
    if embedding is not None:
        params.token_embedding_type = embedding
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) == 0
    return dst


def types_in(path: Path) -> dict[str, str]:
    # gemmakit's reader: the stock one walks the 262k-entry vocabulary entry by entry (~12 s a file); the
    # tensor table both read is parsed by the same gguf code
    return {t.name: t.tensor_type.name for t in open_gguf(path).tensors}


def llama_greedy_and_top1(path: Path, prompts: list[list[int]], text: list[int]
                          ) -> tuple[list[list[int]], torch.Tensor]:
    llm = llama_cpp.Llama(str(path), n_ctx=len(text), n_batch=len(text), n_threads=2, logits_all=True,
                          type_k=0, type_v=0, flash_attn=False, verbose=False)
    llm.eval(text)
    top1 = torch.from_numpy(np.array(llm.scores[:len(text) - 1])).argmax(-1)
    greedy = []
    for prompt in prompts:
        llm.reset()
        llm.eval(prompt)
        tokens: list[int] = []
        for _ in range(NEW):
            tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval(tokens[-1:])
        greedy.append(tokens)
    return greedy, top1


@torch.inference_mode()
def assert_like_llama_cpp(model: torch.nn.Module, path: Path, tok: Tokenizer) -> None:
    prompts = [tok.encode(p) for p in PROMPTS]
    text = [tok.bos_id, *tok.encode(TEXT.read_text(encoding="utf-8"), add_bos=False)[:127]]
    want, their_top1 = llama_greedy_and_top1(path, prompts, text)
    top1 = (model(torch.tensor([text]))[0, :-1].argmax(-1) == their_top1).float().mean().item()
    assert top1 >= TOP1_MIN, top1
    engine = Engine(model, max_batch=1, context=64)
    for prompt, theirs in zip(prompts, want, strict=True):
        got = list(engine.stream(prompt, SamplingParams(max_tokens=NEW)))
        k = next((i for i, (a, b) in enumerate(zip(got, theirs, strict=True)) if a != b), NEW)
        if k < NEW:
            logits = model(torch.tensor([prompt + got[:k]]))[0, -1].float()
            assert logits[got[k]] - logits[theirs[k]] <= MARGIN, (prompt, k, got, theirs)


def test_q4_0_file_runs_on_its_own_codes_like_llama_cpp(default_model, tmp_path):
    """Q4_0 everywhere under --quantize int4: the linears are Int4Linear on the file's codes and the model
    decodes like llama.cpp on the same file."""
    from gemmakit.quantize import Int4Linear

    path = requantize(default_model, tmp_path / "q4_0.gguf", "Q4_0", embedding=int(gguf.GGMLQuantizationType.Q4_0))
    assert set(types_in(path).values()) == {"Q4_0", "F32"}
    model = load_model(path, quantize="int4")
    layer = model.model.layers[0]
    assert all(isinstance(m, Int4Linear) for m in (layer.self_attn.q_proj, layer.mlp.gate_proj, model.lm_head))
    # on the file's codes: only the scales' rounding apart from the stored weights (a re-fit is several % off)
    stored = next(t for t in open_gguf(path).tensors if t.name == "blk.0.attn_q.weight")
    w = torch.from_numpy(gguf.quants.dequantize(stored.data, stored.tensor_type)).reshape(layer.self_attn.q_proj
                                                                                          .out_features, -1)
    assert weight_error(layer.self_attn.q_proj, w) < 0.01
    assert_like_llama_cpp(model, path, Tokenizer.from_gguf(path))


def test_q2_k_file_decodes_its_q3_k_matrices_like_llama_cpp(default_model, tmp_path):
    """llama.cpp's Q2_K mix of the 270M (Q3_K o_proj/down_proj) loads in fp32 and decodes like llama.cpp."""
    path = requantize(default_model, tmp_path / "q2_k.gguf", "Q2_K")
    types = types_in(path)
    assert types["blk.0.attn_output.weight"] == "Q3_K" and types["blk.0.ffn_down.weight"] == "Q3_K"
    assert_like_llama_cpp(load_model(path), path, Tokenizer.from_gguf(path))
