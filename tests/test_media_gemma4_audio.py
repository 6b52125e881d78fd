"""Gemma 4 audio: the reader, the log-mel features, the token counts and prompt text, and the conformer tower,
each checked against transformers 5.23 on the shared fixtures and a tiny tower of the released structure."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile
import torch
from torch import nn

from gemmakit.media.audio_features import (
    AUDIO_TOKEN,
    AudioFileError,
    audio_placeholder,
    expand_audio_prompt,
    extract_features,
    mel_filterbank,
    read_audio,
    soft_tokens_for_samples,
)
from gemmakit.media.gemma4_audio import Gemma4AudioConfig, Gemma4AudioTower, gemma4_audio_embeddings
from gemmakit.media.gemma4_vision import MultimodalEmbedder

MEDIA = Path(__file__).parent / "fixtures" / "media"


def hf_extractor():
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

    return Gemma4AudioFeatureExtractor()


def fixture_clips() -> list[np.ndarray]:
    return [read_audio(MEDIA / "chirp.wav"), read_audio(MEDIA / "tone.flac")]


def test_reader_downmixes_and_resamples():
    chirp, tone = fixture_clips()
    assert chirp.dtype == np.float32 and chirp.shape == (40_000,)  # 2.5 s of 22.05 kHz stereo
    # the fixture is L = chirp, R = chirp / 2 + noise (sd 0.02): its mono mix at 16 kHz is 0.75 * chirp plus
    # noise of sd ~0.01; taking one channel or skipping the resampling puts the error far above that
    t = np.arange(40_000) / 16_000
    expected = 0.75 * 0.4 * np.sin(2 * np.pi * (200 + 600 * t) * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    assert np.sqrt(np.mean((chirp - expected)[200:-200] ** 2)) < 0.015
    raw, rate = soundfile.read(MEDIA / "tone.flac", dtype="float32")
    assert rate == 16_000 and np.array_equal(tone, raw)  # already 16 kHz mono: untouched


@pytest.mark.parametrize("fmt,subtype", [("OGG", "VORBIS"), ("MP3", "MPEG_LAYER_III")])
def test_reader_reads_compressed_formats(tmp_path, fmt, subtype):
    t = np.arange(24_000) / 48_000
    path = tmp_path / f"clip.{fmt.lower()}"
    soundfile.write(path, (0.3 * np.sin(2 * np.pi * 500 * t)).astype(np.float32), 48_000, format=fmt,
                    subtype=subtype)
    samples = read_audio(path)
    assert samples.dtype == np.float32 and abs(samples.size - 8_000) <= 1_200  # codecs add a little padding
    spectrum = np.abs(np.fft.rfft(samples))
    assert abs(np.argmax(spectrum) * 16_000 / samples.size - 500) < 20


def test_reader_errors_say_what_to_do(tmp_path):
    with pytest.raises(AudioFileError, match="no such audio file"):
        read_audio(tmp_path / "missing.wav")
    (tmp_path / "text.wav").write_text("not audio at all")
    with pytest.raises(AudioFileError, match="not a readable audio file.*convert it"):
        read_audio(tmp_path / "text.wav")
    soundfile.write(tmp_path / "empty.wav", np.zeros((0, 1), np.float32), 16_000)
    with pytest.raises(AudioFileError, match="no audio samples"):
        read_audio(tmp_path / "empty.wav")
    soundfile.write(tmp_path / "long.wav", np.zeros(8_000 * 31, np.int16), 8_000)
    with pytest.raises(AudioFileError, match=r"31.0 s of audio.*cut it into clips of at most 30 s"):
        read_audio(tmp_path / "long.wav")
    assert read_audio(tmp_path / "long.wav", max_seconds=31).shape == (16_000 * 31,)
    with pytest.raises(ValueError, match="too short"):
        extract_features([np.zeros(160, np.float32)])


def test_features_match_transformers():
    ref = hf_extractor()
    np.testing.assert_allclose(mel_filterbank(), ref.mel_filters, rtol=0, atol=1e-12)
    clips = fixture_clips()
    for batch in (clips, clips[:1], clips[1:]):  # padding to the longest changes the frame count, not values
        ours = extract_features(batch)
        theirs = ref(batch, return_tensors="np")
        assert ours.input_features.shape == theirs["input_features"].shape
        assert ours.input_features.dtype == np.float32
        np.testing.assert_allclose(ours.input_features, theirs["input_features"], rtol=0, atol=1e-5)
        assert np.array_equal(ours.input_features_mask, theirs["input_features_mask"])


def test_token_counts_and_prompt_match_processor():
    """Counts and text equal Gemma4Processor.replace_audio_token on the extractor's own masks, at the frame
    boundaries and past the 30 s cap."""
    from transformers.models.gemma4.processing_gemma4 import Gemma4Processor
    from transformers.processing_utils import ProcessorMixin

    lengths = [161, 320, 321, 480, 481, 641, 1_000, 16_000, 40_000, 479_999, 480_000, 500_000]
    rng = np.random.default_rng(0)
    clips = [0.1 * rng.standard_normal(n).astype(np.float32) for n in lengths]
    stub = SimpleNamespace(boa_token="<|audio>", audio_token=AUDIO_TOKEN, eoa_token="<audio|>",
                           image_token="<|image|>", video_token="<|video|>",
                           all_special_multimodal_tokens=["<|image|>", "<|video|>", AUDIO_TOKEN])
    theirs = hf_extractor()(clips, return_tensors="np")
    ours = extract_features(clips)
    np.testing.assert_allclose(ours.input_features, theirs["input_features"], rtol=0, atol=1e-5)
    expected = [Gemma4Processor.replace_audio_token(stub, theirs, i) for i in range(len(clips))]
    assert [audio_placeholder(n) for n in ours.num_soft_tokens] == expected
    assert [soft_tokens_for_samples(n) for n in lengths] == ours.num_soft_tokens
    assert ours.num_soft_tokens[-1] == 750 and ours.num_soft_tokens[0] == 1
    text = f"<|turn>user\nCompare{AUDIO_TOKEN}and{AUDIO_TOKEN}<turn|>\n"
    (hf_text,), _ = ProcessorMixin.get_text_with_replacements(stub, [text], audio_replacements=expected[7:9])
    assert expand_audio_prompt(text, ours.num_soft_tokens[7:9]) == hf_text
    with pytest.raises(ValueError, match="2 <\\|audio\\|> placeholders but 1 clips"):
        expand_audio_prompt(text, [3])


def tiny_hf_model(**geometry):
    """A Gemma4Model with a 2-layer conformer of the released structure (128-channel first subsampling over
    128 mel bins, clipped linears; the released 12-frame chunks unless `geometry` says otherwise) and random
    weights, norms, scales and clip bounds that bind on some values."""
    from transformers.models.gemma4 import configuration_gemma4 as hfc
    from transformers.models.gemma4.modeling_gemma4 import Gemma4Model

    audio = hfc.Gemma4AudioConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  subsampling_conv_channels=[128, 8], output_proj_dims=48, **geometry)
    text = hfc.Gemma4TextConfig(vocab_size=300, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=1, head_dim=16, intermediate_size=64,
                                hidden_size_per_layer_input=8, vocab_size_per_layer_input=300,
                                layer_types=["full_attention"])
    config = hfc.Gemma4Config(text_config=text.to_dict(), audio_config=audio.to_dict(), vision_config=None)
    torch.manual_seed(0)
    model = Gemma4Model(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.5 * (torch.rand_like(p) - 0.5))
            else:
                p.normal_(0.0, 0.15)
        for name, b in model.audio_tower.named_buffers():
            if name.endswith(("_min", "_max")):
                b.fill_((-1.0 if name.endswith("_min") else 1.0) * (0.6 + torch.rand(()).item()))
    return model, config


def _load(module: nn.Module, state: dict, prefix: str) -> nn.Module:
    module.load_state_dict({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)},
                           strict=True)
    return module.eval()


# The released geometry, and one with look-ahead (attention_context_right) where a padded key would be read
# if the key mask were wrong; released clips only look back, so there padding cannot reach a query anyway.
@pytest.mark.parametrize("geometry", [{}, dict(attention_chunk_size=4, attention_context_left=5,
                                                attention_context_right=2)], ids=["released", "look-ahead"])
def test_tower_matches_transformers(geometry):
    model, hf_config = tiny_hf_model(**geometry)
    config = Gemma4AudioConfig.from_hf(hf_config.audio_config.to_dict())
    tower = _load(Gemma4AudioTower(config), model.state_dict(), "audio_tower.")
    embedder = _load(MultimodalEmbedder(config.output_proj_dims, 64), model.state_dict(), "embed_audio.")

    chirp, tone = fixture_clips()
    # 98 real mel frames (2 mod 4): the last real token's window reaches the first padded subsampled frame,
    # which holds real audio unless the subsampling masks it; 2.5 s and ~1 s make the second clip mostly padding
    clips = [chirp, tone[:15_700]]
    feats = extract_features(clips)
    features, mask = torch.from_numpy(feats.input_features), torch.from_numpy(feats.input_features_mask)
    with torch.no_grad():
        out = model.get_audio_features(features, mask, return_dict=True)
        expected = out.pooler_output[out.attention_mask]  # Gemma4Model's padding strip
        ours = gemma4_audio_embeddings(tower, embedder, features, mask)
        solo = extract_features(clips[1:])
        alone = gemma4_audio_embeddings(tower, embedder, torch.from_numpy(solo.input_features),
                                        torch.from_numpy(solo.input_features_mask))
    assert [o.shape for o in ours] == [(n, 64) for n in feats.num_soft_tokens] == [(63, 64), (25, 64)]
    assert (torch.cat(ours) - expected).abs().max().item() <= 1e-4
    # a padded clip gets what it gets alone
    assert (alone[0] - ours[1]).abs().max().item() <= 1e-5


def test_config_defaults_are_transformers():
    from transformers.models.gemma4.configuration_gemma4 import Gemma4AudioConfig as HFAudioConfig

    hf = HFAudioConfig().to_dict()
    ours = Gemma4AudioConfig.from_hf(hf)
    assert ours == Gemma4AudioConfig()
    assert {k: v for k, v in vars(ours).items()} == {
        k: tuple(hf[k]) if isinstance(hf[k], list) else hf[k] for k in vars(ours)}
    with pytest.raises(ValueError, match="not a multiple of num_attention_heads"):
        Gemma4AudioConfig.from_hf({"hidden_size": 30, "num_attention_heads": 4})
