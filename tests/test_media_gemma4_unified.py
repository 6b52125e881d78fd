"""Gemma 4 12B unified (encoder-free) inputs against transformers 5.23 on the shared media fixtures.

The HF reference is a tiny `Gemma4UnifiedModel` with the real geometry (48 px squares of 6912 values,
640-sample frames, the 1120-row position table) and small widths, with every parameter randomised so a
swapped norm or a missing bias shows.  HF's unified image processor needs torchvision, which is not
installed: its reference here is HF's PIL Gemma 4 processor (same resize and 16 px patches) followed by
the unified processor's own `patches_merge` / `pad_along_first_dim`, read from its source.
"""

from __future__ import annotations

import ast
import math
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from gemmakit.media.gemma4_unified import (
    UnifiedAudioConfig,
    UnifiedAudioEmbedder,
    UnifiedVisionConfig,
    UnifiedVisionEmbedder,
    normalise_unified_key,
    unified_audio_embeddings,
    unified_image_embeddings,
)
from gemmakit.media.gemma4_unified_inputs import (
    AUDIO_TOKEN,
    BOA_TOKEN,
    BOI_TOKEN,
    EOA_TOKEN,
    EOI_TOKEN,
    IMAGE_TOKEN,
    expand_unified_prompt,
    prepare_unified_inputs,
    preprocess_unified_audio,
    preprocess_unified_images,
)

MEDIA = Path(__file__).parent / "fixtures" / "media"
IMAGES = ("scene.jpg", "tall.png", "transparent.png")
TOKEN_IDS = {BOI_TOKEN: 10, IMAGE_TOKEN: 11, EOI_TOKEN: 12, BOA_TOKEN: 13, AUDIO_TOKEN: 14, EOA_TOKEN: 15}
TEXT_ID = 7


def _images() -> list[Image.Image]:
    return [Image.open(MEDIA / name) for name in IMAGES]


def _clips() -> list[np.ndarray]:
    tone, rate = sf.read(MEDIA / "tone.flac", dtype="float32")
    assert rate == 16_000 and tone.ndim == 1
    # A clip ending mid-frame next to a longer one: both the frame padding and the batch padding show.
    return [tone, tone[:1000].copy()]


@pytest.fixture(scope="module")
def hf_model():
    from transformers.models.gemma4_unified.configuration_gemma4_unified import Gemma4UnifiedConfig
    from transformers.models.gemma4_unified.modeling_gemma4_unified import Gemma4UnifiedModel

    torch.manual_seed(0)
    cfg = Gemma4UnifiedConfig(
        text_config=dict(vocab_size=32, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, global_head_dim=16,
                         sliding_window=8),
        vision_config=dict(mm_embed_dim=32, output_proj_dims=32),
        audio_config=dict(audio_embed_dim=640),
        boi_token_id=TOKEN_IDS[BOI_TOKEN], image_token_id=TOKEN_IDS[IMAGE_TOKEN],
        eoi_token_id=TOKEN_IDS[EOI_TOKEN], boa_token_id=TOKEN_IDS[BOA_TOKEN],
        audio_token_id=TOKEN_IDS[AUDIO_TOKEN], eoa_token_index=TOKEN_IDS[EOA_TOKEN], video_token_id=16,
    )
    model = Gemma4UnifiedModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p.dim() == 1 else 0.0))
    return model


@pytest.fixture(scope="module")
def ours(hf_model):
    d = hf_model.config.to_dict()
    vision = UnifiedVisionEmbedder(UnifiedVisionConfig.from_hf(d))
    vision.load_state_dict(hf_model.embed_vision.state_dict(), strict=True)
    audio = UnifiedAudioEmbedder(UnifiedAudioConfig.from_hf(d))
    audio.load_state_dict(hf_model.embed_audio.state_dict(), strict=True)
    return vision.eval(), audio.eval()


def _hf_unified_merge():
    """`patches_merge` and `pad_along_first_dim` from HF's unified image processor, without its torchvision import."""
    import transformers.models.gemma4_unified as pkg

    source = (Path(pkg.__file__).parent / "image_processing_gemma4_unified.py").read_text()
    wanted = [n for n in ast.parse(source).body
              if isinstance(n, ast.FunctionDef) and n.name in ("patches_merge", "pad_along_first_dim")]
    namespace = {"math": math, "torch": torch}
    exec(compile(ast.Module(body=wanted, type_ignores=[]), "image_processing_gemma4_unified.py", "exec"), namespace)
    return namespace["patches_merge"], namespace["pad_along_first_dim"]


def _hf_image_inputs(images, max_soft_tokens=280):
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    patches_merge, pad = _hf_unified_merge()
    teacher = Gemma4ImageProcessorPil()(images, max_soft_tokens=max_soft_tokens, return_tensors="pt")
    pixels, positions = [], []
    for i, n in enumerate(teacher["num_soft_tokens_per_image"]):
        patches = teacher["pixel_values"][i, : n * 9]
        pos = teacher["image_position_ids"][i, : n * 9]
        merged, merged_pos = patches_merge(patches.unsqueeze(0), pos.unsqueeze(0), n)
        merged, merged_pos = pad(merged.squeeze(0), merged_pos.squeeze(0), max_soft_tokens)
        pixels.append(merged)
        positions.append(merged_pos)
    return torch.stack(pixels), torch.stack(positions), list(teacher["num_soft_tokens_per_image"])


@pytest.mark.parametrize("max_soft_tokens", [280, 70])
def test_image_processor_matches_transformers(max_soft_tokens):
    ref_pixels, ref_pos, ref_counts = _hf_image_inputs(_images(), max_soft_tokens)
    got = preprocess_unified_images(_images(), max_soft_tokens=max_soft_tokens)
    assert got.num_soft_tokens == ref_counts
    assert len(set(ref_counts)) == 3  # three shapes, so the padding differs per image
    assert got.pixel_values.dtype == ref_pixels.dtype == torch.float32
    assert torch.equal(got.image_position_ids, ref_pos)
    torch.testing.assert_close(got.pixel_values, ref_pixels, atol=1e-6, rtol=0)


def test_audio_processor_matches_transformers():
    from transformers.models.gemma4_unified.feature_extraction_gemma4_unified import (
        Gemma4UnifiedAudioFeatureExtractor,
    )

    ref = Gemma4UnifiedAudioFeatureExtractor()(_clips(), return_tensors="pt")
    got = preprocess_unified_audio(_clips())
    assert got.num_soft_tokens == [25, 2]
    assert got.input_features_mask.dtype == ref["input_features_mask"].dtype == torch.bool
    assert torch.equal(got.input_features_mask, ref["input_features_mask"])
    assert got.input_features.dtype == ref["input_features"].dtype
    assert torch.equal(got.input_features, ref["input_features"])


def test_image_embeddings_match_transformers(hf_model, ours):
    inputs = preprocess_unified_images(_images())
    with torch.no_grad():
        ref = hf_model.get_image_features(inputs.pixel_values, inputs.image_position_ids).pooler_output
        got = unified_image_embeddings(ours[0], inputs.pixel_values, inputs.image_position_ids)
    assert [g.shape for g in got] == [(n, 64) for n in inputs.num_soft_tokens]
    for g, r in zip(got, ref, strict=True):
        assert (g - r).abs().max().item() <= 1e-4


def test_audio_embeddings_match_transformers(hf_model, ours):
    inputs = preprocess_unified_audio(_clips())
    with torch.no_grad():
        out = hf_model.get_audio_features(inputs.input_features, inputs.input_features_mask)
        got = unified_audio_embeddings(ours[1], inputs.input_features, inputs.input_features_mask)
    assert [g.shape for g in got] == [(n, 64) for n in inputs.num_soft_tokens]
    for g, r, m in zip(got, out.pooler_output, out.attention_mask, strict=True):
        assert (g - r[m]).abs().max().item() <= 1e-4


def _ids(text: str) -> list[int]:
    """Special tokens by id; any run of ordinary text as one token (the tiny vocabulary has no words)."""
    pattern = "|".join(re.escape(t) for t in TOKEN_IDS)
    ids = []
    for piece in re.split(f"({pattern})", text):
        if piece in TOKEN_IDS:
            ids.append(TOKEN_IDS[piece])
        elif piece:
            ids.append(TEXT_ID)
    return ids


def test_soft_tokens_land_where_transformers_puts_them(hf_model, ours):
    """Through HF's own forward: our expanded prompt has exactly the slots HF fills, in our per-item order."""
    prompt = prepare_unified_inputs(
        f"look\n\n{IMAGE_TOKEN}\n\nthen {AUDIO_TOKEN} and\n\n{IMAGE_TOKEN}\n\n{AUDIO_TOKEN}",
        images=_images()[1:], audio=_clips())
    input_ids = torch.tensor([_ids(prompt.text)])
    seen = {}
    hook = hf_model.language_model.register_forward_pre_hook(
        lambda _m, _a, kw: seen.update(embeds=kw["inputs_embeds"]), with_kwargs=True)
    try:
        with torch.no_grad():
            hf_model(input_ids=input_ids, pixel_values=prompt.images.pixel_values,
                     image_position_ids=prompt.images.image_position_ids,
                     input_features=prompt.audio.input_features,
                     input_features_mask=prompt.audio.input_features_mask)
            images = unified_image_embeddings(ours[0], prompt.images.pixel_values, prompt.images.image_position_ids)
            audio = unified_audio_embeddings(ours[1], prompt.audio.input_features, prompt.audio.input_features_mask)
    finally:
        hook.remove()
    embeds = seen["embeds"][0]
    for token, items in ((IMAGE_TOKEN, images), (AUDIO_TOKEN, audio)):
        rows = embeds[input_ids[0] == TOKEN_IDS[token]]
        assert (rows - torch.cat(items)).abs().max().item() <= 1e-4


def test_expanded_text_matches_transformers():
    from transformers.models.gemma4_unified.processing_gemma4_unified import Gemma4UnifiedProcessor

    # The real processor needs the 12B's tokenizer files; its expansion reads only these attributes.
    hf = object.__new__(Gemma4UnifiedProcessor)
    hf.image_token, hf.boi_token, hf.eoi_token = IMAGE_TOKEN, BOI_TOKEN, EOI_TOKEN
    hf.audio_token, hf.boa_token, hf.eoa_token = AUDIO_TOKEN, BOA_TOKEN, EOA_TOKEN
    hf.video_token = "<|video|>"
    text = f"<bos><|turn>user\n\n\n{IMAGE_TOKEN}\n\n{AUDIO_TOKEN}x{IMAGE_TOKEN}{IMAGE_TOKEN}<turn|>\n"
    images = [_images()[0], _images()[1], _images()[2]]
    prompt = prepare_unified_inputs(text, images=images, audio=_clips()[1:])
    hf_images = {"num_soft_tokens_per_image": prompt.images.num_soft_tokens}
    hf_audio = {"input_features_mask": prompt.audio.input_features_mask.numpy()}
    (expected,), _ = hf.get_text_with_replacements(
        [text],
        [hf.replace_image_token(hf_images, i) for i in range(3)],
        [],
        [hf.replace_audio_token(hf_audio, 0)],
    )
    assert prompt.text == expected
    assert prompt.text.count(IMAGE_TOKEN) == sum(prompt.images.num_soft_tokens)
    with pytest.raises(ValueError, match="one placeholder per item"):
        expand_unified_prompt(text, [3, 4])


def test_old_checkpoint_names_match_transformers_renames():
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import apply_renamings

    renamings = get_checkpoint_conversion_mapping("gemma4_unified")
    keys = [f"model.vision_embedder.{n}.{p}" for n in ("patch_ln1", "patch_ln2", "pos_norm", "patch_dense")
            for p in ("weight", "bias")]
    keys += ["model.vision_embedder.pos_embedding", "model.embed_vision.embedding_projection.weight",
             "model.embed_vision.multimodal_embedder.embedding_projection.weight",
             "model.embed_audio.embedding_projection.weight", "model.language_model.layers.0.mlp.up_proj.weight"]
    renamed = [normalise_unified_key(k) for k in keys]
    assert renamed == [apply_renamings(k, renamings) for k in keys]
    assert renamed[0] == "model.embed_vision.patch_ln1.weight"
    assert renamed[-4] == "model.embed_vision.multimodal_embedder.embedding_projection.weight"
