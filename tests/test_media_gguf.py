"""llama.cpp's split layout for multimodal models: a text GGUF plus an mmproj GGUF of a tiny Gemma 3 vision model,
written the way llama.cpp's converter writes them (gemmakit's exporters; their layout is checked against
llama.cpp's own tables in tests/test_mmproj.py), loads to the same model as the HF directory it came from,
and llama.cpp's mtmd running the same pair agrees on the logits after an image.
Run: .venv/bin/python -m pytest tests/test_media_gguf.py
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
from PIL import Image

from gemmakit.checkpoints import CheckpointError, load_model, load_model_and_tokenizer
from gemmakit.checkpoints.export_gguf import export_gguf
from gemmakit.media.prompt import encode_with_media
from gemmakit.media.soft import PromptMedia, batch_media
from gemmakit.media.towers import MediaInput, encode, towers
from tests.media_models import MEDIA, hf_multimodal
from tests.mtmd import mtmd_session

# Placeholder ids of the byte-level vocabulary below (transformers' config says the same ids).
IDS = {"boi_token_index": 259, "eoi_token_index": 260, "image_token_index": 261}


def media_tokenizer():
    """A byte-fallback BPE (enough for llama.cpp to load the text GGUF) with Gemma 3's image tokens."""
    from tokenizers import AddedToken, normalizers
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import BPE

    from gemmakit.tokenizer import Tokenizer

    specials = ["<pad>", "<eos>", "<bos>"]
    media = ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]
    vocab = {t: i for i, t in enumerate(specials)} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    vocab |= {t: 259 + i for i, t in enumerate(media)}
    backend = Backend(BPE(vocab=vocab, merges=[], byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials + media])
    return Tokenizer(backend, bos_id=2, eos_id=1, pad_id=0)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gguf")
    hf = hf_multimodal("gemma3-4b", ids=IDS)
    with torch.no_grad():  # llama.cpp's converter stores this one matrix in f16 whatever the file type
        w = hf.model.multi_modal_projector.mm_input_projection_weight
        w.copy_(w.half().float())
    hf.save_pretrained(tmp / "hf")
    from_hf = load_model(tmp / "hf")
    text = export_gguf(from_hf, tmp / "tiny-gemma3.gguf", media_tokenizer(), "f32")
    from_gguf, tokenizer = load_model_and_tokenizer(text)  # finds mmproj-tiny-gemma3.gguf beside it
    return from_hf, from_gguf, tokenizer, text


def _prompt(model, tokenizer):
    items = encode(model, [MediaInput("image", Image.open(MEDIA / "scene.jpg"))])
    return encode_with_media(tokenizer, model.config, "look at <start_of_image> and say", items, add_bos=True)


def test_text_gguf_plus_mmproj_loads_to_the_hf_model(pair):
    from_hf, from_gguf, tokenizer, text = pair
    assert (text.parent / "mmproj-tiny-gemma3.gguf").is_file()
    assert {k: from_gguf.config.media_token(k) for k in ("boi", "eoi", "image")} == {"boi": 259, "eoi": 260,
                                                                                      "image": 261}
    a, b = towers(from_hf), towers(from_gguf)
    assert a.keys() == b.keys() == {"vision_tower", "multi_modal_projector"}
    for name in a:
        for (k, x), (k2, y) in zip(a[name].state_dict().items(), b[name].state_dict().items(), strict=True):
            assert k == k2
            # The one stored as 1 + w (llama.cpp's Gemma norm convention) comes back to float rounding.
            torch.testing.assert_close(x, y, atol=1e-6 if "norm" in k else 0, rtol=0)
    ids, media = _prompt(from_gguf, tokenizer)
    pos = torch.arange(len(ids))[None]
    with torch.no_grad():
        want = from_hf(torch.tensor([ids]), media=batch_media([media], pos, from_hf.config.bidirectional_kinds))
        got = from_gguf(torch.tensor([ids]), media=batch_media([media], pos, from_gguf.config.bidirectional_kinds))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_a_wrong_or_missing_mmproj_is_refused(pair, tmp_path):
    _, _, _, text = pair
    text_only, _ = load_model_and_tokenizer(text, mmproj=False)
    assert text_only.config.multimodal is None and not towers(text_only)
    with pytest.raises(CheckpointError, match="not an mmproj"):
        load_model_and_tokenizer(text, mmproj=text)


def test_llama_cpp_runs_the_pair_to_the_same_logits(pair):
    """llama.cpp's mtmd encodes the image with the mmproj, decodes the prompt with the text GGUF, and its
    next-token logits after `<image> and say` equal gemmakit's (and so transformers')."""
    from_hf, _, tokenizer, text = pair
    side = 56  # already the tower's size: both resizes are the identity, only the models are compared
    image = np.asarray(Image.open(MEDIA / "scene.jpg").convert("RGB").resize((side, side), Image.BICUBIC)).copy()
    with mtmd_session(text, text.parent / "mmproj-tiny-gemma3.gguf") as s:
        s.tokenize(b"look at " + s.mtmd.mtmd_default_marker() + b" and say", s.image(image))
        ids = _chunk_ids(s.mtmd, s.chunks)
        n_past = s.llama_cpp.llama_pos(0)
        assert s.mtmd.mtmd_helper_eval_chunks(s.ctx, s.llm._ctx.ctx, s.chunks, 0, 0, 64, True,
                                              ctypes.byref(n_past)) == 0
        theirs = np.ctypeslib.as_array(s.llama_cpp.llama_get_logits_ith(s.llm._ctx.ctx, -1),
                                       shape=(from_hf.config.vocab_size,)).copy()
    # gemmakit on the same pixels (llama.cpp normalises with the file's mean/std, 0.5) and the same token ids.
    pixels = (torch.from_numpy(image).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    from gemmakit.media.siglip import gemma3_image_embeddings

    t = towers(from_hf)
    with torch.no_grad():
        soft = gemma3_image_embeddings(t["vision_tower"], t["multi_modal_projector"], pixels[None])[0]
    # llama.cpp spells the image as <start_of_image> N slots <end_of_image> without transformers' "\n\n" around
    # it: compare the models on llama.cpp's own ids.
    slots = torch.tensor([i for i, t in enumerate(ids) if t == IDS["image_token_index"]])
    media = PromptMedia(soft, slots, [(int(slots[0]), int(slots[-1]) + 1)])
    pos = torch.arange(len(ids))[None]
    with torch.no_grad():
        ours = from_hf(torch.tensor([ids]), media=batch_media([media], pos, from_hf.config.bidirectional_kinds))[0, -1]
    diff = float(np.abs(ours.numpy() - theirs).max())
    print(f"llama.cpp vs gemmakit next-token logits after an image: max abs diff {diff:.2e}")
    assert diff < 5e-3


def _chunk_ids(mtmd, chunks) -> list[int]:
    """The token ids mtmd lays out: text chunks' ids, and the image chunk as its soft-token placeholders."""
    ids = []
    for i in range(mtmd.mtmd_input_chunks_size(chunks)):
        chunk = mtmd.mtmd_input_chunks_get(chunks, i)
        if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
            n = ctypes.c_size_t(0)
            p = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
            ids += [p[j] for j in range(n.value)]
        else:
            ids += [IDS["image_token_index"]] * mtmd.mtmd_input_chunk_get_n_tokens(chunk)
    return ids


def test_the_cli_takes_the_pair(pair, tmp_path, capsys):
    """`--mmproj` names the tower file (here a copy away from the text GGUF); without it, none is found."""
    import shutil

    from gemmakit.cli import main

    _, _, _, text = pair
    alone = tmp_path / "text.gguf"
    shutil.copy(text, alone)
    towers_file = shutil.copy(text.parent / "mmproj-tiny-gemma3.gguf", tmp_path / "elsewhere.gguf")
    args = ["generate", "--model", str(alone), "--chat-format", "gemma3", "--chat", "hi", "--image",
            str(MEDIA / "scene.jpg"), "--max-tokens", "2"]
    assert main([*args, "--mmproj", str(towers_file)]) in (0, None)
    capsys.readouterr()
    assert main(args) == 2
    assert "text-only" in capsys.readouterr().err
