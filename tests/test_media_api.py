"""Images and audio through the Python API: `llm.chat` with transformers-style content parts, on tiny
multimodal checkpoints loaded with `gemmakit.load` (tests/media_models.py), with the checks a hostile or
mistaken caller meets.
Run: .venv/bin/python -m pytest tests/test_media_api.py
"""

from __future__ import annotations

import base64

import pytest
import torch
from PIL import Image

import gemmakit
from gemmakit.media.inputs import MediaPolicy, collect
from gemmakit.media.soft import MediaError
from tests.media_models import MEDIA, save_tiny_checkpoint


@pytest.fixture(scope="module")
def g3(tmp_path_factory):
    return gemmakit.load(save_tiny_checkpoint("gemma3-4b", tmp_path_factory.mktemp("m") / "tiny-gemma3-4b-it"),
                         context=512)


@pytest.fixture(scope="module")
def e2b(tmp_path_factory):
    llm = gemmakit.load(save_tiny_checkpoint("e2b", tmp_path_factory.mktemp("m") / "tiny-gemma4-e2b-it"),
                        context=1024)
    llm.max_soft_tokens = 70
    return llm


def _ask(*parts):
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "w5 w6"}]}]


def test_an_image_part_becomes_soft_tokens_in_the_prompt(g3):
    ids, media = g3.prepare_chat(_ask({"type": "image", "path": str(MEDIA / "scene.jpg")}))
    soft = g3.model.config.media_token("image")
    assert ids.count(soft) == 4 and media.embeds.shape == (4, g3.model.config.hidden_size)
    assert [ids[int(p)] for p in media.positions] == [soft] * 4 and media.spans == [(int(media.positions[0]),
                                                                                     int(media.positions[0]) + 4)]
    # Every way of giving the same image gives the same soft tokens.
    data = (MEDIA / "scene.jpg").read_bytes()
    for part in ({"type": "image", "image": Image.open(MEDIA / "scene.jpg")}, {"type": "image", "image": data},
                 {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,"
                                                    + base64.b64encode(data).decode()}}):
        again_ids, again = g3.prepare_chat(_ask(part))
        assert again_ids == ids and torch.equal(again.embeds, media.embeds)
    other = g3.prepare_chat(_ask({"type": "image", "path": str(MEDIA / "tall.png")}))[1]
    assert not torch.equal(other.embeds, media.embeds)


def test_chat_answers_with_images_and_audio(e2b):
    parts = [{"type": "image", "path": str(MEDIA / "scene.jpg")}, {"type": "audio", "path": str(MEDIA / "tone.flac")}]
    r = e2b.chat(_ask(*parts), max_tokens=5, temperature=0.0)
    assert r.completion_tokens == 5 and r.prompt_tokens > 70
    streamed = "".join(d.content for d in e2b.stream_chat(_ask(*parts), max_tokens=5, temperature=0.0))
    assert streamed.strip() == r.content


def test_typed_placeholder_text_is_not_an_image_slot(g3):
    """A user who types the image marker gets those characters, not a slot the model fills; a prompt whose
    placeholders do not match its images is refused, never silently misaligned."""
    from gemmakit.media.prompt import encode_with_media
    from gemmakit.media.towers import MediaInput, encode

    ids, media = g3.prepare_chat([{"role": "user", "content": "<start_of_image> w5"}])
    assert media is None and g3.model.config.media_token("image") not in ids
    items = encode(g3.model, [MediaInput("image", Image.open(MEDIA / "scene.jpg"))])
    with pytest.raises(MediaError, match="placeholder"):
        encode_with_media(g3.tokenizer, g3.model.config, "w1 w2", items, True)
    literal = g3.tokenizer.literal("<start_of_image>")
    with pytest.raises(MediaError, match="placeholder"):
        encode_with_media(g3.tokenizer, g3.model.config, f"w1 {literal} w2", items, True)


def test_bad_media_is_refused_with_what_to_do(g3, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    cases = [({"type": "image", "path": str(bad)}, "Pillow"),
             ({"type": "image", "path": str(tmp_path / "missing.jpg")}, "no such media file"),
             ({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}, "base64"),
             ({"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}, "remote media URLs are off"),
             ({"type": "image"}, "needs"),
             ({"type": "audio", "path": str(MEDIA / "tone.flac")}, "cannot read audio")]
    for part, message in cases:
        with pytest.raises(MediaError, match=message):
            g3.prepare_chat(_ask(part))
    server_like = MediaPolicy(local_paths=False)
    with pytest.raises(MediaError, match="local file paths are off"):
        collect(_ask({"type": "image_url", "image_url": {"url": f"file://{MEDIA / 'scene.jpg'}"}}), server_like)
    with pytest.raises(MediaError, match="pixel limit"):
        collect(_ask({"type": "image", "path": str(MEDIA / "scene.jpg")}), MediaPolicy(max_pixels=1000))
    with pytest.raises(MediaError, match="more than 1 images"):
        collect(_ask(*[{"type": "image", "path": str(MEDIA / "scene.jpg")}] * 2), MediaPolicy(max_items=1))
    with pytest.raises(MediaError, match="outside"):
        collect(_ask({"type": "image", "path": str(MEDIA / "scene.jpg")}), MediaPolicy(allowed_dirs=(tmp_path,)))


def test_a_text_only_model_refuses_images(llm):
    with pytest.raises(MediaError, match="text-only"):
        llm.prepare_chat(_ask({"type": "image", "path": str(MEDIA / "scene.jpg")}))


def test_the_memory_forecast_counts_the_towers(g3, llm):
    """The towers' weights are in the model's bytes, and one request's tower pass has its own line."""
    from gemmakit.media.towers import towers
    from gemmakit.runtime.plan import model_bytes

    forecast = g3.engine.plan.forecast
    tower_bytes = sum(p.numel() * p.element_size() for t in towers(g3.model).values() for p in t.parameters())
    assert forecast["towers"] > 0 and forecast["weights"] == model_bytes(g3.model) > tower_bytes > 0
    assert "towers" not in llm.engine.plan.forecast


def test_the_checkpoints_processor_settings_are_used(tmp_path):
    """preprocessor_config.json's pan-and-scan (Gemma 3) and processor_config.json's budget (Gemma 4) apply."""
    import json

    g3_dir = save_tiny_checkpoint("gemma3-4b", tmp_path / "a" / "tiny-gemma3-4b-it")
    (g3_dir / "preprocessor_config.json").write_text(json.dumps({
        "do_pan_and_scan": True, "pan_and_scan_min_crop_size": 64, "pan_and_scan_max_num_crops": 4,
        "pan_and_scan_min_ratio_to_activate": 1.2, "size": {"height": 896, "width": 896}}))
    llm = gemmakit.load(g3_dir, context=512)
    ids, media = llm.prepare_chat(_ask({"type": "image", "path": str(MEDIA / "tall.png")}))
    crops = len(media.spans) - 1
    assert crops >= 2 and ids.count(llm.model.config.media_token("image")) == 4 * (1 + crops)
    e2b_dir = save_tiny_checkpoint("e2b", tmp_path / "b" / "tiny-gemma4-e2b-it")
    (e2b_dir / "processor_config.json").write_text(json.dumps({"image_processor": {"max_soft_tokens": 70}}))
    ids, media = gemmakit.load(e2b_dir, context=1024).prepare_chat(_ask({"type": "image",
                                                                         "path": str(MEDIA / "scene.jpg")}))
    assert 0 < media.embeds.shape[0] <= 70


def test_quantizing_a_multimodal_model_leaves_its_towers_in_float(tmp_path):
    """Loaded quantized or quantized after loading (as --adapter with --quantize does), the decoder's linears
    become int8 / int4 and the towers, whose linears have biases, stay as they were."""
    from gemmakit.checkpoints import load_model
    from gemmakit.media.towers import towers
    from gemmakit.quantize import quantize_model

    path = save_tiny_checkpoint("e2b", tmp_path / "tiny-gemma4-e2b-it")
    plain = {k: v.clone() for k, v in load_model(path).state_dict().items() if ".vision_tower." in k}
    for model in (load_model(path, quantize="int8"), quantize_model(load_model(path), "int4")):
        assert type(model.model.layers[0].mlp.gate_proj).__name__ in ("Int8Linear", "Int4Linear")
        kinds = {type(m).__name__ for t in towers(model).values() for m in t.modules()}
        assert not any(k.startswith(("Int8", "Int4", "Quantized")) for k in kinds)
        got = {k: v for k, v in model.state_dict().items() if ".vision_tower." in k}
        assert got.keys() == plain.keys() and all(torch.equal(got[k], plain[k]) for k in plain)
