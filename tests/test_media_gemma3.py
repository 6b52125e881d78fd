"""Gemma 3 vision: SigLIP tower + projector against transformers 5.23 with the same weights, and the image
processor / prompt expansion against transformers' PIL Gemma3ImageProcessor and Gemma3Processor."""

import string
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gemmakit.config import ConfigError
from gemmakit.media.gemma3_images import (
    BOI_TOKEN,
    EOI_TOKEN,
    IMAGE_TOKEN,
    Gemma3ImageProcessorConfig,
    process_gemma3_images,
)
from gemmakit.media.siglip import (
    Gemma3MultiModalProjector,
    Gemma3ProjectorConfig,
    SiglipVisionTower,
    gemma3_image_embeddings,
)

MEDIA = Path(__file__).parent / "fixtures" / "media"

# The tiny model keeps the 4B's structure: a square patch grid average-pooled by a kernel that divides it
# (4B: 896 / 14 = 64 patches a side, 256 tokens -> kernel 4; here 56 / 14 = 4 a side, 4 tokens -> kernel 2).
TINY = {
    "model_type": "gemma3",
    "mm_tokens_per_image": 4,
    "boi_token_index": 290, "eoi_token_index": 291, "image_token_index": 292,
    "text_config": {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 4,
                    "num_key_value_heads": 1, "head_dim": 16, "vocab_size": 300, "max_position_embeddings": 64},
    "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 48,
                      "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 56, "patch_size": 14,
                      "vision_use_head": False},
}
# google/gemma-3-4b-it's preprocessor_config.json (nulls are filled in by Gemma3Processor).
PREPROCESSOR_4B = {
    "do_convert_rgb": None, "do_normalize": True, "do_pan_and_scan": None, "do_rescale": True, "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "Gemma3ImageProcessor", "image_seq_length": 256,
    "image_std": [0.5, 0.5, 0.5], "pan_and_scan_max_num_crops": None, "pan_and_scan_min_crop_size": None,
    "pan_and_scan_min_ratio_to_activate": None, "processor_class": "Gemma3Processor", "resample": 2,
    "rescale_factor": 0.00392156862745098, "size": {"height": 896, "width": 896},
}
PAN_AND_SCAN = {"pan_and_scan_min_crop_size": 256, "pan_and_scan_max_num_crops": 4,
                "pan_and_scan_min_ratio_to_activate": 1.2}


@pytest.fixture(scope="module")
def hf_model():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(Gemma3Config(**TINY)).eval()
    with torch.no_grad():  # HF initialises norms to 1/0 and the projector to 0; make every weight matter
        for p in [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters()]:
            p.add_(0.2 * torch.randn_like(p))
    return model


def ours(hf_model) -> tuple[SiglipVisionTower, Gemma3MultiModalProjector]:
    c = Gemma3ProjectorConfig.from_hf(TINY)
    tower, projector = SiglipVisionTower(c.vision), Gemma3MultiModalProjector(c)
    sd = hf_model.state_dict()
    for module, prefix in ((tower, "model.vision_tower."), (projector, "model.multi_modal_projector.")):
        module.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, strict=True)
    return tower.eval(), projector.eval()


def test_soft_tokens_match_transformers(hf_model):
    tower, projector = ours(hf_model)
    pixel_values = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        want = hf_model.model.get_image_features(pixel_values).pooler_output
        got = gemma3_image_embeddings(tower, projector, pixel_values)
    assert len(got) == 3 and all(t.shape == (4, 64) and t.dtype == torch.float32 for t in got)
    assert (torch.stack(got) - want).abs().max().item() <= 1e-4
    # The image order is kept: each image's tokens come from that image alone.
    with torch.no_grad():
        alone = gemma3_image_embeddings(tower, projector, pixel_values[1:2])[0]
    assert (alone - got[1]).abs().max().item() <= 1e-5


def test_state_dict_uses_checkpoint_names(hf_model):
    tower, projector = ours(hf_model)
    keys = set(tower.state_dict())
    assert "vision_model.encoder.layers.1.self_attn.q_proj.weight" in keys
    assert "vision_model.embeddings.patch_embedding.weight" in keys and "vision_model.post_layernorm.bias" in keys
    assert all(k.startswith("vision_model.") for k in keys)
    assert set(projector.state_dict()) == {"mm_input_projection_weight", "mm_soft_emb_norm.weight"}
    # Released checkpoints spell the tower with `vision_model.`; that layout round-trips strictly too.
    again = SiglipVisionTower(tower.config)
    again.load_state_dict(tower.state_dict(), strict=True)
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(again(x), tower(x))


def test_model_dtype_and_input_checks(hf_model):
    tower, projector = ours(hf_model)
    tower, projector = tower.to(torch.bfloat16), projector.to(torch.bfloat16)
    with torch.no_grad():
        got = gemma3_image_embeddings(tower, projector, torch.randn(2, 3, 56, 56))
    assert [t.dtype for t in got] == [torch.bfloat16] * 2
    assert gemma3_image_embeddings(tower, projector, torch.empty(0, 3, 56, 56)) == []
    with pytest.raises(ValueError, match="gemma3_images"):
        tower(torch.randn(1, 3, 64, 64))


def test_released_4b_geometry_and_bad_configs():
    four_b = {"mm_tokens_per_image": 256, "text_config": {"hidden_size": 2560},
              "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                                "model_type": "siglip_vision_model", "num_attention_heads": 16,
                                "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": False}}
    c = Gemma3ProjectorConfig.from_hf(four_b)
    assert c.pool_kernel == 4 and c.vision.patches_per_side == 64
    with torch.device("meta"):
        tower, projector = SiglipVisionTower(c.vision), Gemma3MultiModalProjector(c)
    assert tower.vision_model.embeddings.position_embedding.weight.shape == (4096, 1152)
    assert len(tower.vision_model.encoder.layers) == 27
    assert projector.mm_input_projection_weight.shape == (1152, 2560)
    no_flag = {k: v for k, v in four_b["vision_config"].items() if k != "vision_use_head"}  # SigLIP's default: on
    with pytest.raises(ConfigError, match="vision_use_head"):
        SiglipVisionTower(Gemma3ProjectorConfig.from_hf({**four_b, "vision_config": no_flag}).vision)
    with pytest.raises(ConfigError, match="mm_tokens_per_image"):
        Gemma3ProjectorConfig.from_hf({**four_b, "mm_tokens_per_image": 100})


def fixture_images() -> list[Image.Image]:
    images = [Image.open(MEDIA / name) for name in ("scene.jpg", "transparent.png", "tall.png")]
    for im in images:
        im.load()
    # Palette-with-transparency and greyscale modes take the other RGB-conversion branches.
    return [*images, images[1].convert("P"), images[2].convert("L")]


@pytest.mark.parametrize(("options", "which"), [
    ({"do_pan_and_scan": False}, [0, 1, 2, 3, 4]),
    ({"do_pan_and_scan": True, **PAN_AND_SCAN}, [0, 1, 2, 3, 4]),  # only the scene is cropped
    ({"do_pan_and_scan": True, **PAN_AND_SCAN, "pan_and_scan_min_crop_size": 96}, [2]),  # a portrait in 4 crops
], ids=["plain", "pan_and_scan", "pan_and_scan_small_crops"])
def test_pixel_values_equal_transformers(options, which):
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    images = fixture_images()
    images[3].info["transparency"] = 0  # palette entry 0 becomes transparent
    images = [images[i] for i in which]
    settings = {k: v for k, v in PREPROCESSOR_4B.items() if v is not None and k not in (
        "image_processor_type", "processor_class", "image_seq_length")}
    want = Gemma3ImageProcessorPil(**settings)(images, return_tensors="pt", **options)
    got = process_gemma3_images(BOI_TOKEN * len(images), images,
                                Gemma3ImageProcessorConfig.from_hf({**PREPROCESSOR_4B, **options}))
    assert got.num_crops == want["num_crops"].tolist()
    assert got.pixel_values.dtype == want["pixel_values"].dtype == torch.float32
    assert torch.equal(got.pixel_values, want["pixel_values"])
    if options["do_pan_and_scan"]:
        assert sum(got.num_crops) > 0


def char_tokenizer():
    """A character-level tokenizer with Gemma 3's image tokens, so decode(encode(text)) == text, offline."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{ch: i + 1 for i, ch in enumerate(sorted(set(string.printable)))}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", extra_special_tokens={
        "boi_token": BOI_TOKEN, "eoi_token": EOI_TOKEN, "image_token": IMAGE_TOKEN})


@pytest.mark.parametrize("pan_and_scan", [False, True])
def test_prompt_expansion_equals_gemma3processor(pan_and_scan):
    from transformers import Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tokenizer = char_tokenizer()
    settings = {k: v for k, v in PREPROCESSOR_4B.items() if v is not None and k not in (
        "image_processor_type", "processor_class", "image_seq_length")}
    processor = Gemma3Processor(Gemma3ImageProcessorPil(**settings), tokenizer, image_seq_length=256)
    images = fixture_images()[:3]
    prompt = (f"<start_of_turn>user\nCompare {BOI_TOKEN} with{BOI_TOKEN}\nand {BOI_TOKEN}.<end_of_turn>\n"
              "<start_of_turn>model\n")
    want = processor(text=prompt, images=[images], do_pan_and_scan=pan_and_scan, return_tensors="pt")
    got = process_gemma3_images(prompt, images, Gemma3ImageProcessorConfig.from_hf(
        {**PREPROCESSOR_4B, "do_pan_and_scan": pan_and_scan}))
    assert got.text == tokenizer.decode(want["input_ids"][0])
    assert got.text.count(IMAGE_TOKEN) == 256 * len(got.pixel_values)
    assert torch.equal(got.pixel_values, want["pixel_values"])
    assert (sum(got.num_crops) > 0) == pan_and_scan


def test_placeholder_count_must_match_images():
    image = Image.fromarray(np.zeros((20, 30, 3), np.uint8))
    with pytest.raises(ValueError, match="1 <start_of_image> placeholders but 2 images"):
        process_gemma3_images(f"a {BOI_TOKEN}", [image, image])
