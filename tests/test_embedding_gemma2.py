"""EmbeddingGemma 2's text encoder (embeddings/gemma2.py) against transformers 5.23's EmbeddingGemma2Model.

The reference is a tiny model with the release's structure: sliding and full layers, full layers with wider
heads and fewer KV heads, projection-only PLE, `embedding_projection` to a width of its own, and a sliding
radius (3) far below the sequence length (12), so the window's edges matter. Weights are random, norms and
layer scalars pushed away from their init. The reference's sentence embedding is what sentence-transformers
computes from it before Normalize: the masked mean of `last_hidden_state`.

Run: .venv/bin/python -m pytest tests/test_embedding_gemma2.py -s   (-s prints the measured differences)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gemmakit.checkpoints.common import CheckpointError
from gemmakit.config import FULL, SLIDING
from gemmakit.embeddings.gemma2 import Encoder, from_config, load

transformers = pytest.importorskip("transformers")

VOCAB, T, RADIUS = 128, 12, 3
IMAGE, VIDEO, AUDIO = 100, 101, 102  # media placeholders inside the tiny vocabulary
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=5, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, global_head_dim=16, num_global_key_value_heads=1,
            sliding_window=RADIUS, hidden_size_per_layer_input=8, embedding_dim=24,
            layer_types=[SLIDING, SLIDING, FULL, SLIDING, FULL])
PROPORTIONAL = {SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
                FULL: {"rope_type": "proportional", "rope_theta": 1_000_000.0, "partial_rotary_factor": 0.25}}


def reference(text: dict | None = None, seed: int = 0):
    """The composite transformers model (eager attention) with random weights away from init."""
    config = transformers.EmbeddingGemma2Config(text_config=dict(TEXT, **(text or {})), image_token_id=IMAGE,
                                                video_token_id=VIDEO, audio_token_id=AUDIO)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.EmbeddingGemma2Model(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.5 * (torch.rand_like(p) - 0.5) if "norm" in name else 0.08 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(0.5 + torch.rand_like(b))
    return model


def sentence_embedding(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' Pooling(mean) over the reference's per-token output."""
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    w = mask[..., None].float()
    return (out * w).sum(1) / w.sum(1).clamp(min=1e-9)


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Three right-padded rows of 12, 7 and 4 tokens; a media placeholder in the first."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 99, (3, T), generator=g)
    ids[0, 2] = IMAGE
    mask = torch.ones(3, T, dtype=torch.long)
    mask[1, 7:], mask[2, 4:] = 0, 0
    ids[mask == 0] = 0
    return ids, mask


def ours(model) -> Encoder:
    """Our encoder with the reference's weights, loaded by name (strict: every name must match)."""
    encoder = from_config(model.config.to_dict())
    prefix = "language_model."
    encoder.load_state_dict({k[len(prefix):]: v for k, v in model.state_dict().items()}, strict=True)
    return encoder


@pytest.mark.parametrize("rope", [None, PROPORTIONAL], ids=["default-rope", "proportional-rope"])
def test_matches_transformers(rope) -> None:
    """The pooled embedding of a padded batch matches the reference within 1e-5 (fp32)."""
    model = reference({"rope_parameters": rope} if rope else None)
    ids, mask = batch()
    want, got = sentence_embedding(model, ids, mask), ours(model).encode(ids, mask)
    diff = (got - want).abs().max().item()
    print(f"\nEmbeddingGemma 2 pooled embedding, {rope and 'proportional' or 'default'} RoPE: max |diff| {diff:.2e}")
    assert got.shape == (3, TEXT["embedding_dim"]) and diff <= 1e-5


def test_padded_rows_equal_rows_alone() -> None:
    """Right padding changes nothing: each row of a padded batch equals that row encoded alone."""
    encoder = ours(reference())
    ids, mask = batch()
    together = encoder.encode(ids, mask)
    for row in range(ids.shape[0]):
        n = int(mask[row].sum())
        alone = encoder.encode(ids[row:row + 1, :n], mask[row:row + 1, :n])
        torch.testing.assert_close(together[row:row + 1], alone, atol=1e-5, rtol=0)


def test_window_is_a_symmetric_radius(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sliding layers see |i - j| <= radius on both sides; a one-sided (causal) window breaks parity."""
    encoder = ours(reference())
    pos = torch.arange(T)
    sliding = encoder.masks(torch.ones(1, T, dtype=torch.bool))[SLIDING][0, 0]
    assert torch.equal(sliding, (pos[:, None] - pos[None, :]).abs() <= RADIUS)
    assert int(sliding[T // 2].sum()) == 2 * RADIUS + 1

    def one_sided(self, keep):
        causal = (pos[:, None] >= pos[None, :]) & (pos[:, None] - pos[None, :] <= RADIUS)
        return {FULL: keep[:, None, None, :], SLIDING: keep[:, None, None, :] & causal}

    ids, mask = batch()
    monkeypatch.setattr(Encoder, "masks", one_sided)
    assert (encoder.encode(ids, mask) - sentence_embedding(reference(), ids, mask)).abs().max() > 1e-3


@pytest.mark.parametrize("text_only", [False, True], ids=["composite", "text-only"])
def test_load_round_trip(tmp_path: Path, text_only: bool) -> None:
    """A directory written by save_pretrained loads by name and encodes as the reference does."""
    model = reference()
    saved = model.language_model if text_only else model
    saved.save_pretrained(tmp_path)
    encoder = load(tmp_path)
    ids, mask = batch()
    want = sentence_embedding(model, ids, mask)
    if text_only:  # the text model has no media placeholders: compare on plain text
        ids = torch.where(ids == IMAGE, 0, ids)
        want = sentence_embedding(model, ids, mask)
    assert (encoder.encode(ids, mask) - want).abs().max() <= 1e-5
    assert encoder.max_length == 262_144 and encoder.config.embedding_dim == TEXT["embedding_dim"]


def saved(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    reference().save_pretrained(tmp_path)
    return tmp_path / "model.safetensors", load_file(tmp_path / "model.safetensors")


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    file, tensors = saved(tmp_path)
    del tensors["language_model.layers.2.self_attn.k_proj.weight"]
    save_file(tensors, file)
    name = r"language_model\.layers\.2\.self_attn\.k_proj\.weight"
    with pytest.raises(CheckpointError, match=rf"absent.*{name}.*re-download"):
        load(tmp_path)


def test_wrong_shape_is_named(tmp_path: Path) -> None:
    """A full layer's k_proj with two KV heads where the config gives it one is refused by name."""
    file, tensors = saved(tmp_path)
    tensors["language_model.layers.4.self_attn.k_proj.weight"] = torch.zeros(2 * 16, 32)
    save_file(tensors, file)
    with pytest.raises(CheckpointError, match=r"layers\.4\.self_attn\.k_proj\.weight.*\(32, 32\).*\(16, 32\)"):
        load(tmp_path)


def test_unexpected_and_corrupt_files_are_refused(tmp_path: Path) -> None:
    file, tensors = saved(tmp_path)
    save_file({**tensors, "language_model.embed_tokens_per_layer.weight": torch.zeros(4, 4)}, file)
    with pytest.raises(CheckpointError, match="embed_tokens_per_layer.*no place"):
        load(tmp_path)
    file.write_bytes(file.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="unreadable"):
        load(tmp_path)
    file.unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(CheckpointError, match="never unpickles"):
        load(tmp_path)


def test_towers_are_skipped_and_pipelines_checked(tmp_path: Path) -> None:
    """Vision/audio tower tensors are skipped; a sentence-transformers Dense after pooling is refused."""
    model = reference()
    file, tensors = saved(tmp_path)
    save_file({**tensors, "vision_tower.encoder.weight": torch.ones(3, 3)}, file)
    ids, mask = batch()
    assert (load(tmp_path).encode(ids, mask) - sentence_embedding(model, ids, mask)).abs().max() <= 1e-5
    (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 2048}))
    assert load(tmp_path).max_length == 2048
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(CheckpointError, match="Dense"):
        load(tmp_path)
    (tmp_path / "modules.json").write_text(json.dumps(modules[:2]))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "cls"}))
    with pytest.raises(CheckpointError, match="cls"):
        load(tmp_path)


def test_bad_input_is_refused() -> None:
    encoder = ours(reference())
    ids, mask = batch()
    with pytest.raises(ValueError, match="token ids"):
        encoder.encode(ids + VOCAB, mask)
    with pytest.raises(ValueError, match="attention_mask"):
        encoder.encode(ids, mask * 2)
    with pytest.raises(ValueError, match=r"\[batch, tokens\]"):
        encoder.encode(ids[0], mask[0])
