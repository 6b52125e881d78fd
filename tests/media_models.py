"""Tiny multimodal checkpoints of the real structures, saved by transformers, for the end-to-end media tests.

Each builds transformers' `*ForConditionalGeneration` from a tiny text config of the variant (tests/helpers.py)
plus tiny towers of the released structure, gives every weight a random value (norms and clip ranges away from
their init so each one matters) and saves it with `save_pretrained`, so gemmakit loads it through its public
loader exactly as it would load a downloaded checkpoint. A word-level tokenizer over the same 1000 ids spells
the media tokens, so prompts go through gemmakit's real prompt expansion.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.helpers import tiny

MEDIA = Path(__file__).parent / "fixtures" / "media"
# Placeholder ids inside the tiny 1000-entry vocabulary.
G3_IDS = {"boi_token_index": 990, "eoi_token_index": 991, "image_token_index": 992}
G4_IDS = {"boi_token_id": 980, "eoi_token_id": 981, "image_token_id": 982, "audio_token_id": 983,
          "boa_token_id": 984, "eoa_token_index": 985, "video_token_id": 986}
SPECIALS = {"<start_of_image>": 990, "<end_of_image>": 991, "<image_soft_token>": 992, "<|image>": 980,
            "<image|>": 981, "<|image|>": 982, "<|audio|>": 983, "<|audio>": 984, "<audio|>": 985,
            "<pad>": 0, "<eos>": 1, "<bos>": 2, "<start_of_turn>": 105, "<end_of_turn>": 106, "<|turn>": 107,
            "<turn|>": 108}
G4_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2, head_dim=16)
G4_AUDIO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, subsampling_conv_channels=[128, 8],
                output_proj_dims=48)
VARIANTS = ("gemma3-4b", "e2b", "31b", "12b")


def _text(variant: str, **extra) -> dict:
    return {**{k: v for k, v in tiny(variant).to_hf().items() if k not in ("model_type", "architectures")},
            **extra}


def hf_multimodal(variant: str, seed: int = 0, ids: dict | None = None):
    """transformers' model for `variant` ("gemma3-4b", "e2b" with vision + audio, "31b", "12b" unified);
    `ids` overrides placeholder ids (Gemma 3 names)."""
    import transformers

    if variant == "gemma3-4b":
        config = transformers.Gemma3Config(
            text_config=_text("gemma3"), mm_tokens_per_image=4, **(ids or G3_IDS),
            vision_config={"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 48,
                           "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 56, "patch_size": 14,
                           "vision_use_head": False})
        cls = transformers.Gemma3ForConditionalGeneration
    elif variant == "12b":
        from transformers.models.gemma4_unified import configuration_gemma4_unified as cu
        from transformers.models.gemma4_unified import modeling_gemma4_unified as mu

        config = cu.Gemma4UnifiedConfig(text_config=_text("12b", use_bidirectional_attention="vision"),
                                        vision_config=dict(mm_embed_dim=32, output_proj_dims=32),
                                        audio_config=dict(audio_embed_dim=640), **G4_IDS)
        cls = mu.Gemma4UnifiedForConditionalGeneration
    else:
        vision = dict(G4_VISION, use_clipped_linears=variant == "e2b", standardize=variant == "31b")
        text = _text(variant, **({"use_bidirectional_attention": "vision"} if variant == "31b" else {}))
        config = transformers.Gemma4Config(text_config=text, vision_config=vision,
                                           audio_config=G4_AUDIO if variant == "e2b" else None, **G4_IDS)
        cls = transformers.Gemma4ForConditionalGeneration
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.5 * (torch.rand_like(p) - 0.5))  # norms, biases, scales: around their neutral init
            else:
                p.normal_(0.0, 0.5 if "position_embedding_table" in name else 0.08)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(0.5 + torch.rand_like(b))
            elif name.endswith(("_min", "_max")):
                b.fill_((-1.0 if name.endswith("_min") else 1.0) * (0.6 + torch.rand(()).item()))
            elif name.endswith("std_scale"):
                b.copy_(0.5 + torch.rand_like(b))
            elif name.endswith("std_bias"):
                b.normal_(0.0, 0.3)
    return model


def word_tokenizer():
    """gemmakit's Tokenizer over a word-level vocabulary of 1000 ids: "w17" is id 17, media tokens special."""
    import tokenizers
    from tokenizers import AddedToken, models, pre_tokenizers

    from gemmakit.tokenizer import Tokenizer

    taken = set(SPECIALS.values())
    vocab = {f"w{i}": i for i in range(1000) if i not in taken}
    vocab.update(SPECIALS)
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return Tokenizer(backend, bos_id=2, eos_id=1, pad_id=0)


def words(start: int, n: int) -> str:
    return " ".join(f"w{i}" for i in range(start, start + n))


def save_tiny_checkpoint(variant: str, path: Path) -> Path:
    """A loadable instruction-tuned-looking checkpoint directory ("...-it": the built-in chat format) of the
    tiny `variant`, with the word-level tokenizer: what `gemmakit.load`, the CLI and the server take."""
    import json

    path.mkdir(parents=True, exist_ok=True)
    hf_multimodal(variant).save_pretrained(path)
    word_tokenizer().backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>", "eos_token": "<eos>",
                                                            "pad_token": "<pad>"}))
    return path
