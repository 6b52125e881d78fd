"""Gemma 4 vision: the tower + embed_vision against transformers' `Gemma4Model.get_image_features`, and the image
processor against transformers' PIL processor, on the real fixture images (three sizes in one batch)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from PIL import Image

from gemmakit.media.gemma4_images import (
    SUPPORTED_SOFT_TOKENS,
    ImageInputError,
    check_budget,
    prepare_gemma4_images,
    process_images,
)
from gemmakit.media.gemma4_vision import (
    Gemma4VisionConfig,
    Gemma4VisionTower,
    MultimodalEmbedder,
    gemma4_image_embeddings,
)
from tests.helpers import tiny

MEDIA = Path(__file__).parent / "fixtures" / "media"
FIXTURES = [MEDIA / "scene.jpg", MEDIA / "transparent.png", MEDIA / "tall.png"]
SMALL_BUDGET = 70
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=2, head_dim=16)
# The two tower structures the released checkpoints use.
STRUCTURES = {
    "e2b": dict(use_clipped_linears=True, standardize=False),
    "31b": dict(use_clipped_linears=False, standardize=True),
}


def hf_gemma4_model(variant: str, seed: int = 0):
    """transformers' Gemma4Model with a tiny text model of `variant` and a tiny tower of its structure, random
    weights, clip ranges that bite and standardization statistics away from identity."""
    import transformers

    text = {k: v for k, v in tiny(variant).to_hf().items() if k not in ("model_type", "architectures")}
    config = transformers.Gemma4Config(text_config=text, vision_config=dict(TINY_VISION, **STRUCTURES[variant]),
                                       audio_config=None)
    torch.manual_seed(seed)
    model = transformers.Gemma4Model(config).eval()
    with torch.no_grad():
        for name, p in [*model.vision_tower.named_parameters(), *model.embed_vision.named_parameters()]:
            if "norm" in name:
                p.copy_(1.0 + 0.5 * (torch.rand_like(p) - 0.5))
            else:
                p.normal_(0.0, 0.5 if "position_embedding_table" in name else 0.08)
        for name, b in model.vision_tower.named_buffers():
            if name.endswith(("input_min", "output_min")):
                b.copy_(-(0.5 + torch.rand(())))
            elif name.endswith(("input_max", "output_max")):
                b.copy_(0.5 + torch.rand(()))
            elif name == "std_bias":
                b.normal_(0.0, 1.0)
            elif name == "std_scale":
                b.copy_(0.5 + torch.rand_like(b))
    return model


def gemmakit_pair(hf) -> tuple[Gemma4VisionTower, MultimodalEmbedder]:
    config = Gemma4VisionConfig.from_hf(hf.config.vision_config.to_dict())
    tower = Gemma4VisionTower(config).eval()
    tower.load_state_dict({k.removeprefix("vision_tower."): v for k, v in hf.state_dict().items()
                           if k.startswith("vision_tower.")}, strict=True)
    embedder = MultimodalEmbedder(config.hidden_size, hf.config.text_config.hidden_size, config.rms_norm_eps)
    embedder.load_state_dict({k.removeprefix("embed_vision."): v for k, v in hf.state_dict().items()
                              if k.startswith("embed_vision.")}, strict=True)
    return tower, embedder


@pytest.fixture(scope="module")
def batch():
    pixel_values, position_ids, soft_tokens = process_images(FIXTURES, SMALL_BUDGET)
    assert len(set(soft_tokens)) == 3, "the fixtures should pad differently"
    return pixel_values, position_ids, soft_tokens


@pytest.mark.parametrize("variant", sorted(STRUCTURES))
def test_image_embeddings_match_transformers(variant, batch):
    pixel_values, position_ids, soft_tokens = batch
    hf = hf_gemma4_model(variant)
    tower, embedder = gemmakit_pair(hf)
    assert tower.config.use_clipped_linears == STRUCTURES[variant]["use_clipped_linears"]
    assert tower.config.standardize == STRUCTURES[variant]["standardize"]
    with torch.no_grad():
        want = hf.get_image_features(pixel_values, position_ids).pooler_output
        got = gemma4_image_embeddings(tower, embedder, pixel_values, position_ids)
    assert [t.shape for t in got] == [torch.Size([n, 64]) for n in soft_tokens]
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        assert (g - w).abs().max().item() <= 1e-4

    # The variant's feature is live in this test: without it the soft tokens move well past the bar.
    plain = copy.deepcopy(tower)
    with torch.no_grad():
        for name, b in plain.named_buffers():
            if name.endswith(("_min", "_max")):
                b.fill_(float("inf") if name.endswith("_max") else -float("inf"))
            elif name == "std_bias":
                b.zero_()
            elif name == "std_scale":
                b.fill_(1.0)
        off = gemma4_image_embeddings(plain, embedder, pixel_values, position_ids)
    assert max((o - g).abs().max().item() for o, g in zip(off, got, strict=True)) > 1e-2


def test_one_image_alone_equals_its_batch_row(batch):
    """Padding is invisible: an image's soft tokens do not depend on the other images in its batch."""
    pixel_values, position_ids, _ = batch
    tower, embedder = gemmakit_pair(hf_gemma4_model("31b"))
    with torch.no_grad():
        together = gemma4_image_embeddings(tower, embedder, pixel_values, position_ids)
        alone = gemma4_image_embeddings(tower, embedder, pixel_values[2:], position_ids[2:])
    torch.testing.assert_close(alone[0], together[2], atol=1e-5, rtol=0)


def hf_processor(budget: int):
    """transformers' Gemma4Processor on its PIL image processor, with a word-level tokenizer holding Gemma 4's
    media tokens that records the text it is asked to encode (the expanded prompt)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    class Recording(transformers.PreTrainedTokenizerFast):
        def __call__(self, text=None, *args, **kwargs):
            self.seen = list(text) if isinstance(text, list) else [text]
            return super().__call__(text, *args, **kwargs)

    class Processor(transformers.Gemma4Processor):
        # The video processor needs torchvision, which is not installed; images never touch it.
        def check_argument_for_proper_class(self, name, arg):
            return None if name == "video_processor" else super().check_argument_for_proper_class(name, arg)

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<|image>", "<|image|>", "<image|>", "<|audio>", "<|audio|>",
                "<audio|>", "<|video|>"]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = Recording(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                          unk_token="<unk>", extra_special_tokens={
                              "image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
                              "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>"})
    return Processor(feature_extractor=Gemma4AudioFeatureExtractor(),
                     image_processor=Gemma4ImageProcessorPil(max_soft_tokens=budget), tokenizer=tokenizer,
                     video_processor=None)


@pytest.mark.parametrize("budget", [SMALL_BUDGET, 280])
def test_processor_matches_transformers(budget):
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    images = [Image.open(f) for f in FIXTURES]
    prompt = ("<bos><|turn>user\n\n\n<|image|>\n\nWhat differs between these?\n\n<|image|>\n\n and"
              "<|image|><turn|>\n<|turn>model\n")
    ref = Gemma4ImageProcessorPil(max_soft_tokens=budget)(images, return_tensors="pt")
    processor = hf_processor(budget)
    processor(text=[prompt], images=[images], return_tensors="pt", max_soft_tokens=budget)

    got = prepare_gemma4_images(prompt, FIXTURES, max_soft_tokens=budget)
    assert got.soft_tokens == ref["num_soft_tokens_per_image"].tolist()
    assert got.pixel_values.dtype == ref["pixel_values"].dtype == torch.float32
    assert torch.equal(got.pixel_values, ref["pixel_values"])
    assert torch.equal(got.position_ids, ref["image_position_ids"])
    assert got.text == processor.tokenizer.seen[0]
    assert got.text.count("<|image|>") == sum(got.soft_tokens)
    assert got.text.startswith("<bos><|turn>user\n\n\n<|image><|image|>")


@pytest.mark.parametrize("bad", [0, 100, 281, 2240, "280", True, None])
def test_bad_budget_is_refused_clearly(bad):
    with pytest.raises(ImageInputError, match="max_soft_tokens must be one of 70, 140, 280, 560, 1120"):
        prepare_gemma4_images("<|image|>", FIXTURES[:1], max_soft_tokens=bad)
    assert [check_budget(b) for b in SUPPORTED_SOFT_TOKENS] == list(SUPPORTED_SOFT_TOKENS)


def test_placeholder_count_must_match_images():
    with pytest.raises(ImageInputError, match="2 <\\|image\\|> placeholders but 1 images"):
        prepare_gemma4_images("<|image|> and <|image|>", FIXTURES[:1])
