"""llama.cpp's mmproj files (checkpoints/mmproj.py): Gemma 3's towers written as the converter writes them and read
back exactly, the names and types checked against the converter's own route through the gguf package's tables,
the file run by llama.cpp's mtmd against transformers, Gemma 4's names checked the same way, and bad files refused.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gemmakit.checkpoints.common import CheckpointError
from gemmakit.checkpoints.mmproj import read_mmproj, write_mmproj
from tests.mtmd import mtmd_session

MEDIA = Path(__file__).parent / "fixtures" / "media"
TEXT_HIDDEN = 64
Q = gguf.GGMLQuantizationType


def gemma3(mm_tokens_per_image: int, seed: int = 0):
    """A tiny random Gemma 3 with the real structure (SigLIP without head, 4x4 patches), every weight away from
    its init and representable in f16, so an f16 file must hold it exactly."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    config = Gemma3Config(
        text_config=dict(vocab_size=1000, hidden_size=TEXT_HIDDEN, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=56, patch_size=14, vision_use_head=False),
        mm_tokens_per_image=mm_tokens_per_image)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((torch.randn_like(p) * 0.1).half().float())
    return model


def released(key: str) -> str:
    """transformers 5.x's in-memory key -> the released checkpoint's (no `model.`, SigLIP's `vision_model.`)."""
    k = key.removeprefix("model.")
    return k.replace("vision_tower.", "vision_tower.vision_model.", 1) if k.startswith("vision_tower.") else k


def towers(model) -> dict[str, torch.Tensor]:
    return {released(k): v for k, v in model.state_dict().items()
            if k.startswith(("model.vision_tower.", "model.multi_modal_projector."))}


@pytest.fixture(scope="module")
def g3():
    return gemma3(4)


@pytest.mark.parametrize(("dtype", "tokens"), [("f32", 4), ("f16", 1)])
def test_gemma3_towers_come_back_exactly_with_their_config(dtype, tokens, tmp_path):
    model = gemma3(tokens)
    vc = model.config.vision_config.to_dict()
    path = write_mmproj(tmp_path / "mmproj.gguf", vc, model.state_dict(), mm_tokens_per_image=tokens, dtype=dtype)
    got = read_mmproj(path)
    assert got.projectors == {"vision": "gemma3"} and got.text_hidden_size == TEXT_HIDDEN
    assert got.mm_tokens_per_image == tokens and got.image_mean == got.image_std == [0.5, 0.5, 0.5]
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                  "patch_size", "hidden_act", "vision_use_head"):
        assert got.vision_config[field] == vc[field], field
    assert got.vision_config["layer_norm_eps"] == pytest.approx(vc["layer_norm_eps"])
    assert got.hf_config() == {"text_config": {"hidden_size": TEXT_HIDDEN}, "vision_config": got.vision_config,
                               "mm_tokens_per_image": tokens}
    expected = towers(model)
    state = got.state_dict()
    assert sorted(state) == sorted(expected)
    for key, value in state.items():
        assert value.dtype == torch.float32 and torch.equal(value, expected[key]), key


def test_what_it_reads_loads_strictly_into_gemmakits_gemma3_towers(g3, tmp_path):
    """The contract with gemmakit.media: read_mmproj's names and hf_config() build and fill the SigLIP tower and
    projector modules one to one."""
    from gemmakit.media.siglip import (
        Gemma3MultiModalProjector,
        Gemma3ProjectorConfig,
        SiglipVisionConfig,
        SiglipVisionTower,
    )

    got = read_mmproj(write_mmproj(tmp_path / "m.gguf", g3.config.vision_config.to_dict(), g3.state_dict(),
                                   mm_tokens_per_image=4))
    state = got.state_dict()
    for module, prefix in ((SiglipVisionTower(SiglipVisionConfig.from_hf(got.vision_config)), "vision_tower."),
                           (Gemma3MultiModalProjector(Gemma3ProjectorConfig.from_hf(got.hf_config())),
                            "multi_modal_projector.")):
        module.load_state_dict({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})


def converter_layout(state: dict[str, torch.Tensor], n_layers: int, dtype: str) -> dict[str, tuple[Q, tuple]]:
    """What `convert_hf_to_gguf.py --mmproj` makes of a released Gemma 3 checkpoint, by its own route: its
    Gemma3VisionModel filter and renames, then gguf's TensorNameMap for the clip arch, then its type rules."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, n_layers)
    out = {}
    for key, t in state.items():
        if "vision_model.head." in key or not key.startswith(("multi_modal_projector.", "vision_tower.")):
            continue
        name = key.replace("_weight", ".weight")
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert new is not None, key
        qtype = Q.F16 if "input_projection" in name else Q.F32 if ".embeddings." in name else None
        if t.ndim <= 1 or new.endswith("_norm.weight"):
            qtype = Q.F32
        if qtype is None:  # no override: the file's type (F32 is 0, so not `or`)
            qtype = Q.F16 if dtype == "f16" else Q.F32
        out[new] = (qtype, tuple(reversed(t.shape)))
    return out


@pytest.mark.parametrize("dtype", ["f16", "f32"])
def test_names_types_and_keys_are_what_llama_cpps_converter_writes(g3, dtype, tmp_path):
    vc = g3.config.vision_config.to_dict()
    path = write_mmproj(tmp_path / "m.gguf", vc, g3.state_dict(), mm_tokens_per_image=4, dtype=dtype)
    reader = gguf.GGUFReader(path)
    got = {t.name: (t.tensor_type, tuple(int(n) for n in t.shape)) for t in reader.tensors}
    assert got == converter_layout(towers(g3), 2, dtype)
    K, V = gguf.Keys, gguf.Keys.ClipVision
    expected = {K.General.ARCHITECTURE: gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ],
                K.General.TYPE: gguf.GGUFType.MMPROJ,
                K.General.FILE_TYPE: (gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32),
                K.Clip.HAS_VISION_ENCODER: True, V.PROJECTION_DIM: TEXT_HIDDEN, V.IMAGE_SIZE: 56, V.PATCH_SIZE: 14,
                V.EMBEDDING_LENGTH: 32, V.FEED_FORWARD_LENGTH: 64, V.BLOCK_COUNT: 2, V.Attention.HEAD_COUNT: 2,
                V.IMAGE_MEAN: [0.5] * 3, V.IMAGE_STD: [0.5] * 3, K.Clip.PROJECTOR_TYPE: gguf.VisionProjectorType.GEMMA3,
                V.Attention.LAYERNORM_EPS: pytest.approx(1e-6), V.USE_GELU: True,
                V.Projector.SCALE_FACTOR: 2,  # 4x4 patches pooled to 2x2 tokens; the converter omits the default 4
                K.General.QUANTIZATION_VERSION: gguf.GGML_QUANT_VERSION, K.General.NAME: "gemma3-mmproj"}
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields == expected


def test_llama_cpp_mtmd_embeds_an_image_as_transformers_does(g3, tmp_path):
    """The pair (text GGUF from gemmakit's exporter + this mmproj) loaded by llama.cpp's mtmd: the soft tokens it
    computes for a real image match transformers' get_image_features on the same weights and pixels."""
    from PIL import Image

    from gemmakit.checkpoints.export_gguf import export_gguf
    from gemmakit.model import Gemma
    from tests.helpers import tiny

    mmproj = write_mmproj(tmp_path / "mmproj.gguf", g3.config.vision_config.to_dict(), g3.state_dict(),
                          mm_tokens_per_image=4, dtype="f32")
    text = export_gguf(Gemma(tiny("gemma3")).eval(), tmp_path / "text.gguf", byte_tokenizer(), "f32")
    # Already at the tower's 56x56, so llama.cpp's resize and HF's are both the identity and only the towers differ.
    image = np.asarray(Image.open(MEDIA / "scene.jpg").convert("RGB").resize((56, 56), Image.BICUBIC)).copy()
    with mtmd_session(text, mmproj, n_ctx=128) as s:
        chunks = s.tokenize(b"look: " + s.mtmd.mtmd_default_marker(), s.image(image))
        chunk = next(c for c in chunks if s.mtmd.mtmd_input_chunk_get_type(c) == s.mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE)
        ours = s.encode(chunk, TEXT_HIDDEN)
    n = ours.shape[0]
    assert n == 4
    pixels = (torch.from_numpy(image).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        ref = g3.get_image_features(pixel_values=pixels[None])
    ref = getattr(ref, "pooler_output", ref).reshape(n, TEXT_HIDDEN).numpy()
    diff = float(np.abs(ours - ref).max())
    print(f"llama.cpp mtmd vs transformers soft tokens: max abs diff {diff:.2e} (values up to {np.abs(ref).max():.2f})")
    assert diff < 2e-3  # llama.cpp's GELU is a table lookup; a wrong name or a missing +1 is off by O(1)


def byte_tokenizer():
    """A byte-fallback BPE of three specials and the 256 bytes: enough vocabulary for llama.cpp to load a text
    GGUF beside the mmproj."""
    from tokenizers import AddedToken, normalizers
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import BPE

    from gemmakit.tokenizer import Tokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    backend = Backend(BPE(vocab=vocab, merges=[], byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<pad>", "<eos>", "<bos>")])
    return Tokenizer(backend, bos_id=2, eos_id=1, pad_id=0)


# -----------------------------------------------------------------------------
# Gemma 4: a file made by the converter's own route (Gemma4VisionAudioModel.modify_tensors, gguf's TensorNameMap)

G4_TOWERS = ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.")


def gemma4():
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    config = Gemma4Config(
        text_config=dict(vocab_size=300, hidden_size=TEXT_HIDDEN, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, global_head_dim=32),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=2, head_dim=16, patch_size=4, position_embedding_size=64,
                           use_clipped_linears=True, standardize=True),
        # llama.cpp's gemma4v/gemma4a graphs assume as many key/value heads as heads and the released [128, 32]
        # subsampling channels (as every Gemma 4 has); other values abort its run, not its load.
        audio_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          subsampling_conv_channels=[128, 32], output_proj_dims=48))
    torch.manual_seed(1)
    model = Gemma4ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return model


def converter_gemma4_file(model, path: Path, extra: dict[str, np.ndarray] | None = None, matrices: Q = Q.F32) -> Path:
    """`model`'s towers as `convert_hf_to_gguf.py --mmproj` writes them, its 2-D weights in `matrices` where their
    rows are whole blocks (as the converter's Q8_0 / BF16 outputs)."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, 128)  # 128: the converter's block count for two towers
    suffixes = (".weight", ".bias", ".input_max", ".input_min", ".output_max", ".output_min")
    vc, ac = model.config.vision_config, model.config.audio_config
    w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ])
    w.add_type(gguf.GGUFType.MMPROJ)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_clip_has_vision_encoder(True)
    w.add_vision_projection_dim(TEXT_HIDDEN)
    w.add_vision_image_size(224)
    w.add_vision_patch_size(vc.patch_size)
    w.add_vision_embedding_length(vc.hidden_size)
    w.add_vision_feed_forward_length(vc.intermediate_size)
    w.add_vision_block_count(vc.num_hidden_layers)
    w.add_vision_head_count(vc.num_attention_heads)
    w.add_vision_image_mean([0.0] * 3)
    w.add_vision_image_std([1.0] * 3)
    w.add_clip_has_audio_encoder(True)
    w.add_audio_projection_dim(TEXT_HIDDEN)
    w.add_audio_embedding_length(ac.hidden_size)
    w.add_audio_feed_forward_length(ac.hidden_size * 4)
    w.add_audio_block_count(ac.num_hidden_layers)
    w.add_audio_head_count(ac.num_attention_heads)
    w.add_clip_vision_projector_type(gguf.VisionProjectorType.GEMMA4V)
    w.add_vision_attention_layernorm_eps(1e-6)
    w.add_clip_audio_projector_type(gguf.VisionProjectorType.GEMMA4A)
    w.add_audio_num_mel_bins(128)
    w.add_audio_attention_layernorm_eps(1e-6)
    for key, t in model.state_dict().items():
        if not key.startswith(G4_TOWERS):
            continue
        name, t = key, t.float()
        t = t.unsqueeze(0) if t.ndim == 0 else t
        if "audio_tower" in name or "embed_audio" in name:
            name = name.replace("model.audio_tower.", "conformer.").replace(".linear.", ".")
            if name.endswith(("per_dim_key_scale", "per_dim_scale")):
                name, t = name + ".weight", F.softplus(t)
            if "lconv1d.depthwise_conv1d" in name and name.endswith(".weight"):
                t = t.reshape(t.shape[0], t.shape[2])
        else:
            name = name.replace("model.vision_tower.encoder.", "vision_model.model.")
            name = name.replace(".linear.weight", ".weight")
            if name.endswith(("layer_scalar", "position_embedding_table")):
                name += ".weight"
            if name.endswith("patch_embedder.input_proj.weight"):
                p = int((t.shape[1] // 3) ** 0.5)
                t = t.reshape(t.shape[0], p, p, 3).permute(0, 3, 1, 2).contiguous()
        new = names.get_name(name, try_suffixes=suffixes)
        assert new is not None, key
        if matrices != Q.F32 and t.ndim == 2 and t.shape[1] % gguf.GGML_QUANT_SIZES[matrices][0] == 0:
            w.add_tensor(new, gguf.quants.quantize(t.numpy(), matrices), raw_dtype=matrices)
        else:
            w.add_tensor(new, t.numpy())
    for name, value in (extra or {}).items():
        w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def g4():
    return gemma4()


def test_gemma4_vision_and_audio_read_back_under_hf_names_with_their_configs(g4, tmp_path):
    got = read_mmproj(converter_gemma4_file(g4, tmp_path / "g4.gguf"))
    assert got.projectors == {"vision": "gemma4v", "audio": "gemma4a"} and got.text_hidden_size == TEXT_HIDDEN
    vc, ac = g4.config.vision_config.to_dict(), g4.config.audio_config.to_dict()
    for f in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "patch_size", "position_embedding_size", "use_clipped_linears", "standardize",
              "pooling_kernel_size"):
        assert got.vision_config[f] == vc[f], f
    for f in ("hidden_size", "num_hidden_layers", "num_attention_heads", "subsampling_conv_channels",
              "conv_kernel_size", "output_proj_dims", "use_clipped_linears"):
        assert got.audio_config[f] == ac[f], f
    expected = {k.removeprefix("model."): v for k, v in g4.state_dict().items()
                if k.startswith(G4_TOWERS)}
    state = got.state_dict()
    assert sorted(state) == sorted(expected)
    for key, value in state.items():
        if key.endswith("per_dim_scale"):  # stored after softplus; its inverse is exact only to rounding
            torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6)
        else:
            assert value.shape == expected[key].shape and torch.equal(value, expected[key]), key


def test_llama_cpp_mtmd_runs_the_gemma4_file_both_towers_read_back_from(g4, tmp_path):
    """The converter-route file of the test above is one llama.cpp's mtmd loads and runs through its real gemma4v /
    gemma4a graphs, so the names read_mmproj maps are the ones llama.cpp uses; the image's soft tokens match
    transformers' on the same pixels, which holds only if the patch-kernel layout is the one llama.cpp reads."""
    from PIL import Image

    from gemmakit.checkpoints.export_gguf import export_gguf
    from gemmakit.model import Gemma
    from tests.helpers import tiny
    from tests.test_export_gguf4 import bpe_tokenizer  # llama.cpp's gemma4 vocabulary needs BPE merges

    mmproj = converter_gemma4_file(g4, tmp_path / "g4.gguf")
    text = export_gguf(Gemma(tiny("31b")).eval(), tmp_path / "text.gguf", bpe_tokenizer(), "f32")
    # 120 x 96 is a size llama.cpp's gemma4v preprocessing keeps as it is (whole 3x3 pools of 4-pixel patches).
    width, height = 120, 96
    image = np.asarray(Image.open(MEDIA / "scene.jpg").convert("RGB").resize((width, height), Image.BICUBIC)).copy()
    audio = (0.3 * np.sin(np.arange(16000) * 0.05)).astype(np.float32)
    outputs = []
    with mtmd_session(text, mmproj) as s:
        m = s.mtmd
        assert m.mtmd_support_vision(s.ctx) and m.mtmd_support_audio(s.ctx)
        for bitmap, kind in ((s.image(image), m.MTMD_INPUT_CHUNK_TYPE_IMAGE),
                             (s.audio(audio), m.MTMD_INPUT_CHUNK_TYPE_AUDIO)):
            chunks = s.tokenize(b"x " + m.mtmd_default_marker(), bitmap)
            outputs.append(s.encode(next(c for c in chunks if m.mtmd_input_chunk_get_type(c) == kind), TEXT_HIDDEN))
    assert np.isfinite(outputs[1]).all() and np.abs(outputs[1]).max() > 0  # audio: runs (its features differ)
    p = g4.config.vision_config.patch_size  # HF's patches: raster order, each flattened (row, col, channel)
    rows, cols = height // p, width // p
    pixels = torch.from_numpy(image).float().div(255).reshape(rows, p, cols, p, 3).permute(0, 2, 1, 3, 4)
    ys, xs = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    positions = torch.stack([xs.reshape(-1), ys.reshape(-1)], -1)
    with torch.no_grad():
        ref = g4.model.get_image_features(pixels.reshape(1, rows * cols, -1), positions[None]).pooler_output[0]
    diff = float(np.abs(outputs[0] - ref.numpy()).max())
    print(f"llama.cpp gemma4v vs transformers soft tokens: max abs diff {diff:.2e} (up to {ref.abs().max():.2f})")
    assert outputs[0].shape == tuple(ref.shape) and diff < 1e-2  # a wrong patch layout is off by O(1)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.BF16], ids=["q8_0", "bf16"])
def test_quantized_towers_read_back_as_gguf_decodes_them(g4, qtype, tmp_path):
    got = read_mmproj(converter_gemma4_file(g4, tmp_path / "q.gguf", matrices=qtype))
    reader = gguf.GGUFReader(got.path)
    stored = {t.name: t for t in reader.tensors}
    decoded = 0
    for key, value in got.items():
        t = stored[got.gguf_names[key]]
        if t.tensor_type == qtype:
            ref = torch.from_numpy(gguf.quants.dequantize(t.data, qtype).copy())
            assert torch.equal(value, ref.reshape(value.shape)), key
            decoded += 1
    assert decoded > 20


def renamed_copy(src: Path, dst: Path, rename: dict[str, str]) -> Path:
    """`src` with some tensors renamed, every key and byte of data as it was."""
    reader = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
    for key, f in reader.fields.items():
        if not key.startswith("GGUF.") and key != gguf.Keys.General.ARCHITECTURE:
            w.add_key_value(key, f.contents(), f.types[0], f.types[-1] if len(f.types) > 1 else None)
    for t in reader.tensors:
        w.add_tensor(rename.get(t.name, t.name), np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_early_files_with_siglips_mlp_names_swapped_read_back_right(g3, tmp_path):
    """Gemma 3 mmproj files from llama.cpp's first conversion script called fc1 ffn_down and fc2 ffn_up (its
    loader swaps them back by shape); the reader does the same."""
    good = write_mmproj(tmp_path / "good.gguf", g3.config.vision_config.to_dict(), g3.state_dict(),
                        mm_tokens_per_image=4, dtype="f32")
    swap = {f"v.blk.{i}.ffn_{a}.{s}": f"v.blk.{i}.ffn_{b}.{s}"
            for i in range(2) for a, b in (("up", "down"), ("down", "up")) for s in ("weight", "bias")}
    state = read_mmproj(renamed_copy(good, tmp_path / "early.gguf", swap)).state_dict()
    expected = towers(g3)
    assert all(torch.equal(state[k], expected[k]) for k in expected)


# -----------------------------------------------------------------------------
# refusals

def test_a_text_gguf_is_not_an_mmproj(tmp_path):
    w = gguf.GGUFWriter(tmp_path / "text.gguf", "gemma3")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="'gemma3' GGUF, not an mmproj"):
        read_mmproj(tmp_path / "text.gguf")


def patched(path: Path, old: bytes, new: bytes) -> Path:
    """The file with one same-length string changed in place (a key value or a tensor name)."""
    data = path.read_bytes()
    assert data.count(old) == 1 and len(old) == len(new)
    out = path.with_name("patched-" + path.name)
    out.write_bytes(data.replace(old, new))
    return out


@pytest.fixture()
def good(g3, tmp_path) -> Path:
    return write_mmproj(tmp_path / "good.gguf", g3.config.vision_config.to_dict(), g3.state_dict(),
                        mm_tokens_per_image=4, dtype="f16", name="tiny")


def test_an_unknown_projector_type_names_the_supported_ones(good):
    with pytest.raises(CheckpointError, match="'llama4'.*gemma3, gemma4v, gemma4a"):
        read_mmproj(patched(good, b"gemma3", b"llama4"))


def test_a_missing_tower_tensor_is_named(good):
    with pytest.raises(CheckpointError, match=r"lacks 1 tensor.*v\.blk\.1\.attn_q\.weight"):
        read_mmproj(patched(good, b"v.blk.1.attn_q.weight", b"v.blk.1.attn_z.weight"))


def test_an_unknown_tensor_is_named(g4, tmp_path):
    path = converter_gemma4_file(g4, tmp_path / "extra.gguf", {"v.blk.0.new_thing.weight": np.zeros(4, np.float32)})
    with pytest.raises(CheckpointError, match=r"does not know.*v\.blk\.0\.new_thing\.weight"):
        read_mmproj(path)


def test_a_truncated_file_says_so(good):
    cut = good.with_name("cut.gguf")
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        read_mmproj(cut)


def test_writing_refuses_an_existing_file_and_an_incomplete_tower(g3, good):
    vc = g3.config.vision_config.to_dict()
    with pytest.raises(FileExistsError):
        write_mmproj(good, vc, g3.state_dict(), mm_tokens_per_image=4)
    state = {k: v for k, v in g3.state_dict().items() if "layers.1.mlp.fc2" not in k}
    with pytest.raises(ValueError, match="lacks 2 tower tensor"):
        write_mmproj(good.with_name("new.gguf"), vc, state, mm_tokens_per_image=4)
