"""EmbeddingGemma: gemmakit's Embedder against sentence-transformers 6.3 / transformers 5.23 on a random tiny model
with EmbeddingGemma's structure, saved as a real sentence-transformers directory.

Run: .venv/bin/python -m pytest -q tests/test_embeddings.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from gemmakit.embeddings import EmbeddingError, InputTooLong, load_embedder

# EmbeddingGemma-300m's geometry scaled down: 3 query heads sharing 1 KV head, head_dim = hidden / heads,
# intermediate 1.5x hidden, five sliding layers then a full one, dense head 4x wide. The stored window 8 is a
# radius of 4 once bidirectional, and the texts below run to 30+ tokens, so the window matters.
HIDDEN, WINDOW, MAX_LEN = 48, 8, 64
PROMPTS = {"query": "task: search result | query: ", "document": "title: none | text: "}
TEXTS = ["the quick brown fox", "hello world", "a longer text about the lazy dog and the quick brown fox",
         "search", "title of a document about dogs and foxes and the world"]
CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world search query document text title none",
          "task result clustering classification about foxes and dogs in the world"]


def small_tokenizer(vocab_size: int) -> Any:
    """A BPE tokenizer trained on CORPUS that adds <bos> ... <eos>, as Gemma's does."""
    from tokenizers import Tokenizer, models, normalizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.train_from_iterator(CORPUS * 10, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                             special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>", special_tokens=[("<bos>", 2),
                                                                                              ("<eos>", 1)])
    return tok


def make_embedding_dir(root: Path) -> Path:
    """A random tiny EmbeddingGemma-shaped model saved by sentence-transformers itself: (root / "st")."""
    import transformers
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer
    config = transformers.Gemma3TextConfig(
        vocab_size=300, hidden_size=HIDDEN, intermediate_size=72, num_hidden_layers=6, num_attention_heads=3,
        num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW,
        max_position_embeddings=128, use_bidirectional_attention=True)
    torch.manual_seed(0)
    model = transformers.Gemma3TextModel(config)
    with torch.no_grad():  # norms away from their zero init, weights at a scale that keeps activations lively
        for name, p in model.named_parameters():
            p.copy_(0.5 * (torch.rand_like(p) - 0.5) if "norm" in name else torch.randn_like(p) * 0.08)
    backbone = root / "backbone"
    model.save_pretrained(backbone)
    tok = small_tokenizer(300)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                                pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(backbone)
    modules = [Transformer(str(backbone), max_seq_length=MAX_LEN), Pooling(HIDDEN, "mean"),
               Dense(HIDDEN, 4 * HIDDEN, bias=False, activation_function=torch.nn.Identity()),
               Dense(4 * HIDDEN, HIDDEN, bias=False, activation_function=torch.nn.Identity()), Normalize()]
    for dense in modules[2:4]:
        torch.nn.init.normal_(dense.linear.weight, std=0.2)
    SentenceTransformer(modules=modules, prompts=PROMPTS).save(str(root / "st"))
    # tokenizer.json adds <bos> and <eos>, as EmbeddingGemma's does; transformers 5 ignores a tokenizer_config
    # that says otherwise when tokenizer.json is there, and so must the Embedder.
    config_file = root / "st" / "tokenizer_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "add_eos_token": False}))
    return root / "st"


@pytest.fixture(scope="module")
def st_dir(tmp_path_factory) -> Path:
    return make_embedding_dir(tmp_path_factory.mktemp("embeddinggemma"))


@pytest.fixture(scope="module")
def reference(st_dir):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(st_dir), device="cpu")


@pytest.fixture(scope="module")
def embedder(st_dir):
    return load_embedder(st_dir)


def st_encode(reference, texts, **kw) -> torch.Tensor:
    return reference.encode(texts, normalize_embeddings=True, convert_to_tensor=True, **kw)


def test_padded_batch_matches_sentence_transformers(embedder, reference):
    """Texts of different lengths in one padded batch embed as sentence-transformers embeds them (fp32, 1e-5)."""
    got = embedder.embed(TEXTS)
    torch.testing.assert_close(got, st_encode(reference, TEXTS), rtol=0, atol=1e-5)
    assert got.shape == (len(TEXTS), HIDDEN)
    assert (got @ got.T).fill_diagonal_(0).abs().max() < 0.99  # distinct texts, distinct vectors


def test_task_prompts_and_dimensions_match(embedder, reference):
    """A task's prompt, a given prompt and Matryoshka truncation (then re-normalised) as sentence-transformers."""
    torch.testing.assert_close(embedder.embed(TEXTS, task="query", dimensions=16),
                               st_encode(reference, TEXTS, prompt_name="query", truncate_dim=16), rtol=0, atol=1e-5)
    torch.testing.assert_close(embedder.embed(TEXTS, prompt="title: none | text: "),
                               st_encode(reference, TEXTS, prompt_name="document"), rtol=0, atol=1e-5)
    assert not torch.allclose(embedder.embed(TEXTS, task="query"), embedder.embed(TEXTS), atol=1e-3)


def test_attention_is_bidirectional_with_the_halved_window(embedder, reference):
    """Causal attention, or the stored window used as the radius, would not reproduce the reference."""
    want = st_encode(reference, TEXTS)
    encoder = embedder.encoder
    try:
        encoder.bidirectional = False
        assert (embedder.embed(TEXTS) - want).abs().max() > 1e-2
        encoder.bidirectional = True
        encoder.backbone.config.sliding_window = 2 * WINDOW  # a radius of WINDOW instead of WINDOW // 2
        assert (embedder.embed(TEXTS) - want).abs().max() > 1e-2
    finally:
        encoder.bidirectional, encoder.backbone.config.sliding_window = True, WINDOW
    torch.testing.assert_close(embedder.embed(TEXTS), want, rtol=0, atol=1e-5)


def test_token_ids_are_the_tokenizers(embedder, st_dir):
    """prompt + text tokenised as transformers tokenises it, tokenizer.json's <bos> and <eos> included."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(st_dir))
    texts = [PROMPTS["query"] + t for t in TEXTS]
    assert embedder.tokenize(TEXTS, task="query") == hf(texts)["input_ids"]
    assert embedder.tokenize(["x"])[0][-1] == hf.eos_token_id


def test_a_text_embeds_the_same_alone_and_in_a_batch(embedder):
    """Padding never leaks into a row: each text alone equals its row of the batch."""
    batch = embedder.embed(TEXTS, batch_size=len(TEXTS))
    for i, text in enumerate(TEXTS):
        torch.testing.assert_close(embedder.embed([text])[0], batch[i], rtol=0, atol=1e-5)


def test_too_long_input_is_refused_by_index_or_truncated_as_the_reference(embedder, reference):
    """Over max_seq_length: an error naming the input, or with truncate=True sentence-transformers' result."""
    long = " ".join(reversed(" ".join(CORPUS).split())) * 2
    assert len(reference.tokenizer(long)["input_ids"]) > MAX_LEN
    with pytest.raises(InputTooLong) as e:
        embedder.embed(["short", long])
    assert e.value.index == 1 and e.value.limit == MAX_LEN and "input 1" in str(e.value)
    torch.testing.assert_close(embedder.embed([long], truncate=True), st_encode(reference, [long]),
                               rtol=0, atol=1e-5)


def test_bad_options_are_named(embedder):
    """Unknown task, bad dimensions, out-of-vocabulary ids: clear errors, not a crash in the forward."""
    with pytest.raises(EmbeddingError, match="unknown task 'nope'.*document, query"):
        embedder.embed(["x"], task="nope")
    for bad in (0, HIDDEN + 1, -3):
        with pytest.raises(EmbeddingError, match="dimensions must be an integer from 1 to 48"):
            embedder.embed(["x"], dimensions=bad)
    with pytest.raises(EmbeddingError, match="input 1 holds token id 300"):
        embedder.embed_ids([[2, 5], [2, 300]])


def test_unsupported_modules_are_refused_by_name(st_dir, tmp_path):
    """A pooling mode or text option gemmakit does not implement is an error naming it, not silently ignored."""
    import shutil

    from gemmakit.checkpoints.common import CheckpointError

    copy = tmp_path / "st"
    shutil.copytree(st_dir, copy)
    (copy / "1_Pooling" / "config.json").write_text(json.dumps({"embedding_dimension": HIDDEN,
                                                                 "pooling_mode": "cls"}))
    with pytest.raises(CheckpointError, match=r"pooling \['cls'\] is not supported"):
        load_embedder(copy)
    shutil.copy(st_dir / "1_Pooling" / "config.json", copy / "1_Pooling" / "config.json")
    (copy / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": MAX_LEN, "do_lower_case": True}))
    with pytest.raises(CheckpointError, match="do_lower_case is not supported"):
        load_embedder(copy)


def test_cli_writes_npy_and_jsonl(embedder, st_dir, tmp_path):
    """`gemmakit embed`: arguments to an .npy file (atomically), stdin lines to JSON lines, same vectors."""
    out = tmp_path / "e.npy"
    cli = [sys.executable, "-m", "gemmakit.cli", "embed", str(st_dir)]
    subprocess.run([*cli, *TEXTS[:2], "--task", "query", "--dimensions", "16", "--format", "npy", "-o", str(out)],
                   check=True, capture_output=True)
    np.testing.assert_allclose(np.load(out), embedder.embed(TEXTS[:2], task="query", dimensions=16).numpy(),
                               atol=1e-6)
    lines = subprocess.run([*cli, "--format", "jsonl"], input="\n".join(TEXTS), text=True, check=True,
                           capture_output=True).stdout.splitlines()
    got = np.array([json.loads(line)["embedding"] for line in lines])
    np.testing.assert_allclose(got, embedder.embed(TEXTS).numpy(), atol=1e-6)
    bad = subprocess.run([*cli, "x", "--task", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: unknown task 'nope'")


def test_embedding_gemma2_dirs_go_to_its_encoder(tmp_path):
    """A directory whose config says embedding_gemma2_text runs gemma2.py's encoder; the Embedder adds the
    tokenizer, prompts and normalisation: normalise(the reference's mean-pooled output)."""
    import transformers

    from tests.test_embedding_gemma2 import reference, sentence_embedding

    model = reference()
    model.language_model.save_pretrained(tmp_path)
    tok = small_tokenizer(90)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>").save_pretrained(tmp_path)
    (tmp_path / "config_sentence_transformers.json").write_text(json.dumps({"prompts": PROMPTS}))
    embedder = load_embedder(tmp_path)
    rows = embedder.tokenize(TEXTS, task="query")
    ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    want = torch.nn.functional.normalize(sentence_embedding(model, ids, mask), dim=-1)
    torch.testing.assert_close(embedder.embed(TEXTS, task="query"), want, rtol=0, atol=1e-5)
    assert embedder.dimension == 24
