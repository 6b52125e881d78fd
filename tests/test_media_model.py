"""Images and audio through the whole model: gemmakit's loader, processors, towers, prompt expansion and
decoder against transformers 5.23's `*ForConditionalGeneration` on the same checkpoint and pixels.

Each variant keeps its real structure (tests/media_models.py): Gemma 3 4B (SigLIP, image blocks bidirectional on
every layer), Gemma 4 E2B (vision with clipped linears + the audio conformer, PLE, purely causal), Gemma 4 31B
(standardized vision, image blocks bidirectional on sliding layers only, cut by the window) and the 12B unified
(encoder-free, blocks bidirectional on both kinds, not cut by the window). Prompts are longer than the window and
an image has more soft tokens than the window holds, so each masking rule is exercised.
Run: .venv/bin/python -m pytest tests/test_media_model.py
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from gemmakit.checkpoints import load_model
from gemmakit.engine import Engine
from gemmakit.media.audio_features import read_audio
from gemmakit.media.prompt import encode_with_media, placeholder
from gemmakit.media.soft import batch_media
from gemmakit.media.towers import MediaInput, encode
from gemmakit.sampling import SamplingParams
from tests.media_models import MEDIA, VARIANTS, hf_multimodal, word_tokenizer, words

BUDGET = 70  # Gemma 4 soft tokens per image: small, yet more than the tiny window of 8


def _inputs(variant: str) -> list[MediaInput]:
    items = [MediaInput("image", Image.open(MEDIA / "scene.jpg")), MediaInput("image", Image.open(MEDIA / "tall.png"))]
    if variant in ("e2b", "12b"):
        items.append(MediaInput("audio", read_audio(MEDIA / "tone.flac")[:9000]))
    return items


def _prompt(model, items) -> str:
    parts = [words(3, 7)]
    for i, item in enumerate(items):
        parts += [placeholder(model.config, item.kind), words(20 + 5 * i, 5)]
    return " ".join(parts)


def _hf_logits(hf, variant: str, ids: list[int], items: list[MediaInput]) -> torch.Tensor:
    """transformers' logits for the same ids, fed the pixels / features its own processors would give
    (ours equal them: tests/test_media_gemma*.py)."""
    t = torch.tensor([ids])
    images = [i.value for i in items if i.kind == "image"]
    clips = [i.value for i in items if i.kind == "audio"]
    kw: dict = {}
    if variant == "gemma3-4b":
        from gemmakit.media.gemma3_images import Gemma3ImageProcessorConfig, preprocess_images

        kw["pixel_values"], _ = preprocess_images(images, Gemma3ImageProcessorConfig.from_hf(
            {"image_seq_length": 4, "size": {"height": 56, "width": 56}}))
        kw["token_type_ids"] = (t == hf.config.image_token_id).long()
    elif variant == "12b":
        from gemmakit.media.gemma4_unified_inputs import preprocess_unified_audio, preprocess_unified_images

        x, a = preprocess_unified_images(images, BUDGET), preprocess_unified_audio(clips)
        kw.update(pixel_values=x.pixel_values, image_position_ids=x.image_position_ids,
                  input_features=a.input_features, input_features_mask=a.input_features_mask)
    else:
        from gemmakit.media.audio_features import extract_features
        from gemmakit.media.gemma4_images import process_images

        kw["pixel_values"], kw["image_position_ids"], _ = process_images(images, BUDGET)
        if clips:
            f = extract_features(clips)
            kw.update(input_features=torch.from_numpy(f.input_features),
                      input_features_mask=torch.from_numpy(f.input_features_mask))
    if variant != "gemma3-4b":
        kw["mm_token_type_ids"] = (t == hf.config.image_token_id).long() + 3 * (t == hf.config.audio_token_id)
    with torch.no_grad():
        return hf(input_ids=t, **kw).logits[0]


@pytest.fixture(scope="module", params=VARIANTS)
def pair(request, tmp_path_factory):
    hf = hf_multimodal(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return request.param, hf, load_model(path)


def _ours(model, items):
    expanded = encode(model, items, BUDGET)
    return encode_with_media(word_tokenizer(), model.config, _prompt(model, items), expanded, add_bos=True)


def test_logits_match_transformers(pair):
    """Same checkpoint, same media: gemmakit's logits equal transformers' to 1e-4 over the whole prompt."""
    variant, hf, model = pair
    items = _inputs(variant)
    ids, media = _ours(model, items)
    assert len(media.spans) == 2 and all(e - s > 8 for s, e in media.spans[1:]) or variant == "gemma3-4b"
    expected = _hf_logits(hf, variant, ids, items)
    positions = torch.arange(len(ids))[None]
    with torch.no_grad():
        got = model(torch.tensor([ids]), media=batch_media([media], positions, model.config.bidirectional_kinds))[0]
    assert expected.std() > 0.1, "random weights too small for the comparison to mean anything"
    print(f"{variant}: {media.embeds.shape[0]} soft tokens, logits max |diff| {(got - expected).abs().max():.2e}")
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    # The soft tokens matter: the same ids with the placeholders left as text give other logits.
    with torch.no_grad():
        plain = model(torch.tensor([ids]))[0]
    assert (plain - expected).abs().max() > 1e-2


def test_engine_greedy_tokens_batched_and_alone(pair):
    """The engine (cache, chunked prefill that never cuts an image, rows mixing media and text) gives the
    greedy tokens of a cache-free full forward, for a media row next to a text-only row and alone."""
    variant, _, model = pair
    items = _inputs(variant)[:2]
    ids, media = _ours(model, items)
    text_ids = [2, *range(40, 60)]
    n = 6
    want = _greedy_full(model, ids, media, n)
    engine = Engine(model, max_batch=2, context=512, prefill_chunk=16, check_memory=False, screen=False)
    greedy = SamplingParams(temperature=0.0, max_tokens=n)
    both = engine.generate([ids, text_ids], greedy, media=[media, None])
    alone = engine.generate([ids], greedy, media=[media])
    assert both[0].tokens == want and alone[0].tokens == want
    assert both[1].tokens == _greedy_full(model, text_ids, None, n)


def _greedy_full(model, ids, media, n) -> list[int]:
    ids, out = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            pos = torch.arange(len(ids))[None]
            soft = batch_media([media], pos, model.config.bidirectional_kinds) if media is not None else None
            nxt = int(model(torch.tensor([ids]), media=soft)[0, -1].argmax())
            ids.append(nxt)
            out.append(nxt)
    return out


def test_chunk_ends_never_cut_an_image():
    from gemmakit.media.soft import PromptMedia

    pm = PromptMedia(torch.zeros(10, 4), torch.arange(5, 15), [(5, 15)])
    assert pm.safe_chunk_end(0, 8) == 5 and pm.safe_chunk_end(0, 16) == 16 and pm.safe_chunk_end(5, 8) == 15
    assert np.array_equal(pm.positions.numpy(), np.arange(5, 15))
