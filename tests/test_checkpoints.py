"""Checkpoint loading: HF directory layouts that real checkpoints use, GGUF files, and damaged inputs.
Run: .venv/bin/python -m pytest tests/test_checkpoints.py
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from gemmakit.checkpoints import CheckpointError, load_model
from tests.helpers import hf_model, tiny, weight_error

IDS = torch.randint(0, 1000, (1, 20), generator=torch.Generator().manual_seed(3))


def _saved(tmp_path, variant="e2b", **save_kwargs):
    ref = hf_model(tiny(variant))
    ref.save_pretrained(tmp_path, **save_kwargs)
    with torch.no_grad():
        return ref(IDS).logits


def _assert_same(model, expected):
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), expected, atol=1e-4, rtol=0)


def test_sharded_checkpoint_with_index_loads(tmp_path):
    """Many shards plus model.safetensors.index.json load into the same model."""
    expected = _saved(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    _assert_same(load_model(tmp_path), expected)


def test_multimodal_layout_and_legacy_shared_kv_tensors_load(tmp_path):
    """A real Gemma 4 release nests the text model under model.language_model., carries vision tensors and
    (in older exports) K/V weights for KV-shared layers: all of that loads, extra tensors ignored."""
    expected = _saved(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    tensors = {k.replace("model.", "model.language_model.", 1): v
               for k, v in load_file(tmp_path / "model.safetensors").items()}
    tensors["model.vision_tower.encoder.layers.0.mlp.up_proj.linear.weight"] = torch.zeros(4, 4)
    shared = tiny("e2b").first_kv_shared_layer
    tensors[f"model.language_model.layers.{shared}.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    tensors[f"model.language_model.layers.{shared}.self_attn.k_norm.weight"] = torch.zeros(16)
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma4", "text_config": cfg,
                                                      "eos_token_id": [1, 106]}))
    _assert_same(load_model(tmp_path), expected)


def test_missing_shard_is_reported(tmp_path):
    """A shard listed in the index but absent is named before anything is loaded."""
    _saved(tmp_path, max_shard_size="100KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"missing 1 shard.*{victim.name}"):
        load_model(tmp_path)


def test_truncated_safetensors_is_reported(tmp_path):
    """A file cut short gives a CheckpointError that says it may be truncated."""
    _saved(tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(tmp_path)


def test_shape_mismatch_names_the_tensor(tmp_path):
    """Weights that do not fit the config.json are refused with the tensor name and both shapes."""
    _saved(tmp_path, variant="gemma3")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"mlp\.\w+_proj\.weight has shape .* config implies"):
        load_model(tmp_path)


def test_missing_tensor_is_reported(tmp_path):
    """A checkpoint lacking a tensor (here a layer scalar, a buffer easy to forget) is refused."""
    expected = _saved(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    assert expected is not None and "model.layers.0.layer_scalar" in tensors
    del tensors["model.layers.0.layer_scalar"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="lacks 1 tensor.*layer_scalar"):
        load_model(tmp_path)


def test_unknown_model_type_and_pickles_are_refused(tmp_path):
    """Non-Gemma configs and pickle-only directories get a clear error; nothing is unpickled."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="unknown model_type 'llama'"):
        load_model(tmp_path)
    _saved(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_model(tmp_path)


def _write_gguf(path, ref, config, qtype=gguf.GGMLQuantizationType.Q8_0, arch="gemma3", wide=()):
    """A GGUF as llama.cpp's converter writes Gemma 3: GGUF names, norms stored as 1 + w, `qtype` matrices
    (Q8_0 for keys containing one of `wide`, as a mixed Q4_K_M file keeps some matrices wider)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(config.num_hidden_layers)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_context_length(config.max_position_embeddings)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_sliding_window(config.sliding_window)
    w.add_rope_freq_base(config.rope_theta)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, config.num_hidden_layers)
    for key, t in ref.state_dict().items():
        if key == "lm_head.weight":
            continue
        a = t.float().numpy()
        if "norm" in key:
            a = a + 1.0
        if a.ndim == 2 and a.shape[1] % 32 == 0:
            kind = gguf.GGMLQuantizationType.Q8_0 if any(part in key for part in wide) else qtype
            if kind == gguf.GGMLQuantizationType.Q8_1:  # gguf cannot quantize it; any bytes will do
                block, size = gguf.GGML_QUANT_SIZES[kind]
                raw = np.random.default_rng(0).integers(0, 255, (a.shape[0], a.shape[1] // block * size), np.uint8)
            else:
                raw = gguf.quants.quantize(a, kind)
            w.add_tensor(names.get_name(key, try_suffixes=(".weight",)), raw, raw_dtype=kind)
        else:
            w.add_tensor(names.get_name(key, try_suffixes=(".weight",)), a.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_loads_with_norm_offset_and_q8_0(tmp_path):
    """A Gemma 3 GGUF (1 + w norms, Q8_0 weights) loads to the logits of the same dequantized weights."""
    config = tiny("gemma3")
    ref = hf_model(config)
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, ref, config)
    model = load_model(path)
    with torch.no_grad():  # the reference gets the same Q8_0 rounding, so only the loader is under test
        for key, p in ref.state_dict().items():
            if p.ndim == 2 and p.shape[1] % 32 == 0 and key != "lm_head.weight":
                q = gguf.quants.quantize(p.float().numpy(), gguf.GGMLQuantizationType.Q8_0)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)))
        expected = ref(IDS).logits
    assert model.config.sliding_window == config.sliding_window and model.config.num_key_value_heads == 1
    _assert_same(model, expected)


def test_damaged_gguf_files_are_reported(tmp_path):
    """Truncated GGUF, a non-Gemma architecture and a missing file each give a CheckpointError."""
    config = tiny("gemma3")
    ref = hf_model(config)
    good = tmp_path / "good.gguf"
    _write_gguf(good, ref, config)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(cut)
    other = tmp_path / "llama.gguf"
    _write_gguf(other, ref, config, arch="llama")
    with pytest.raises(CheckpointError, match="architecture 'llama' is not a Gemma model"):
        load_model(other)
    with pytest.raises(CheckpointError, match="no such model path"):
        load_model(tmp_path / "nope.gguf")


def test_unsupported_gguf_quant_type_is_reported(tmp_path):
    """A GGUF quantized to a type gemmakit cannot dequantize names the tensor and the type."""
    config = tiny("gemma3")
    path = tmp_path / "q8_1.gguf"  # llama.cpp's activation type: never a weight, so gemmakit has no decoder
    _write_gguf(path, hf_model(config), config, qtype=gguf.GGMLQuantizationType.Q8_1)
    with pytest.raises(CheckpointError, match=r"tensor \S+\.weight: .*Q8_1"):
        load_model(path)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_gguf_quantized_while_loading_equals_quantized_after(tmp_path, mode):
    """`load_model(gguf, quantize=...)` reads the vocabulary in row blocks (more than one here) and quantizes
    as it goes, ending with exactly what quantizing the fully loaded model gives."""
    from gemmakit import quantize

    config = tiny("gemma3")
    rows = quantize._block_rows(config.hidden_size)
    config = config.replace(vocab_size=2 * rows + 64)  # several row blocks, a ragged last
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, hf_model(config), config)
    want = quantize.quantize_model(load_model(path), mode).state_dict()
    got = load_model(path, quantize=mode).state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_int4_keeps_the_wide_matrices_of_a_mixed_gguf_at_int8(tmp_path):
    """A 4-bit GGUF that keeps some matrices wider (Q8_0 here; Q4_K_M does it for half of attn_v and ffn_down)
    loads under int4 with those at int8, close to the file's values, and the 4-bit ones on their codes. The
    tied embedding/head stays int4 even when stored wide. An all-Q8_0 file stays all int4 (test above), but
    for v_proj, which int4 always keeps at int8."""
    from gemmakit.quantize import Int4Linear, Int8Linear

    config = tiny("gemma3").replace(vocab_size=1024)  # int4 on CPU needs whole blocks of 16 rows
    path = tmp_path / "mixed.gguf"
    _write_gguf(path, hf_model(config), config, qtype=gguf.GGMLQuantizationType.Q4_0,
                wide=("o_proj", "down_proj", "embed_tokens"))
    model, plain = load_model(path, quantize="int4"), load_model(path)
    for layer, ref in zip(model.model.layers, plain.model.layers, strict=True):
        assert isinstance(layer.self_attn.o_proj, Int8Linear) and isinstance(layer.mlp.down_proj, Int8Linear)
        assert all(isinstance(m, Int4Linear) for m in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                        layer.mlp.gate_proj, layer.mlp.up_proj))
        w = ref.self_attn.o_proj.weight
        assert weight_error(layer.self_attn.o_proj, w) < weight_error(Int4Linear.from_weight(w, 32), w) / 4
    assert isinstance(model.lm_head, Int4Linear)


def test_a_file_below_four_bits_keeps_its_wide_matrices_at_int8_and_says_what_it_decoded(tmp_path):
    """In a file of a type int4 cannot run as stored (MXFP4 here; IQ4_XS and Q3_K_M files are alike), the
    matrices its quantizer kept wide still go to int8 under int4, and the rest are decoded and re-fit to int4.
    `weights_note`, the verbose load line, says which types were kept, decoded or sent to int8."""
    from gemmakit.quantize import Int4Linear, Int8Linear

    config = tiny("gemma3").replace(vocab_size=1024)
    path = tmp_path / "mxfp4.gguf"
    _write_gguf(path, hf_model(config), config, qtype=gguf.GGMLQuantizationType.MXFP4, wide=("o_proj", "down_proj"))
    model = load_model(path, quantize="int4")
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.o_proj, Int8Linear) and isinstance(layer.mlp.gate_proj, Int4Linear)
    assert "MXFP4 x " in model.weights_note and "decoded, then int4" in model.weights_note
    assert "Q8_0 x 16 to int8" in model.weights_note
    assert "MXFP4 x 41, Q8_0 x 16 decoded to float" in load_model(path).weights_note  # 5 a layer, the table
    mixed = tmp_path / "q4_0.gguf"
    _write_gguf(mixed, hf_model(config), config, qtype=gguf.GGMLQuantizationType.Q4_0)
    assert "Q4_0 x 57 kept as int4 codes" in load_model(mixed, quantize="int4").weights_note


def test_hf_cache_snapshot_symlinks_into_blobs_load(tmp_path):
    """The Hugging Face cache keeps files in models--org--name/blobs/ and links each snapshot's names to them
    (../../blobs/<hash>): links that stay inside that repository load; shards outside it are refused
    (the corpus in tests/test_corrupt_corpus.py has the hostile cases)."""
    repo = tmp_path / "models--google--tiny"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    expected = _saved(snap)
    blobs.mkdir()
    for f in list(snap.iterdir()):
        f.rename(blobs / f.name)
        (snap / f.name).symlink_to(f"../../blobs/{f.name}")
    _assert_same(load_model(snap), expected)


def test_float_checkpoints_cast_to_the_asked_dtype_and_integers_are_refused(tmp_path):
    """A bf16 release loads in fp32 (the caller's `dtype` decides); an integer weight is never cast."""
    expected = _saved(tmp_path, variant="gemma3")
    tensors = load_file(tmp_path / "model.safetensors")
    save_file({k: v.bfloat16() for k, v in tensors.items()}, tmp_path / "model.safetensors")
    model = load_model(tmp_path, dtype=torch.float32)
    assert model.model.embed_tokens.weight.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), expected, atol=0.15, rtol=0)  # bf16 rounding of the weights
    tensors["model.norm.weight"] = tensors["model.norm.weight"].long()
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight is stored as I64.*never reinterprets"):
        load_model(tmp_path)
