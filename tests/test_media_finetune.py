"""`gemmakit finetune` on chat records with images (train/media_records.py): a tiny random Gemma 3 4B-shaped
checkpoint (tests/media_models.py) trains LoRA on its decoder from records whose image parts are paths
relative to the JSONL file; the towers stay frozen and unadapted, soft-token positions are never scored, and
the adapter loads in `peft` on transformers' Gemma3ForConditionalGeneration with gemmakit's logits. Bad
records (missing, unreadable, escaping the data folder, on a text-only model) are reported, not fatal.
Run: .venv/bin/python -m pytest tests/test_media_finetune.py
"""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from PIL import Image

from gemmakit.checkpoints import load_model
from gemmakit.cli import main
from gemmakit.model import Gemma
from gemmakit.train.lora import LoRALinear
from tests.media_models import MEDIA, save_tiny_checkpoint, word_tokenizer

peft = pytest.importorskip("peft")
SOFT = 992  # the tiny Gemma 3's <image_soft_token> id
IMAGES = ("scene.jpg", "tall.png", "transparent.png")


def _chat(image: dict | None, i: int) -> dict:
    user = [{"type": "text", "text": f"w{10 + i} w20"}]
    return {"messages": [{"role": "user", "content": ([image] if image else []) + user},
                         {"role": "assistant", "content": f"w{30 + i % 3} w40 w41"}]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The checkpoint, and a data folder: 8 image chats (7 relative paths, 1 absolute), 1 text chat, and the
    bad records, with their line numbers."""
    root = tmp_path_factory.mktemp("mmft")
    ckpt = save_tiny_checkpoint("gemma3-4b", root / "tiny-gemma3-4b-it")
    data = root / "data"
    (data / "img").mkdir(parents=True)
    for name in IMAGES:
        shutil.copy(MEDIA / name, data / "img" / name)
    shutil.copy(MEDIA / "scene.jpg", root / "outside.jpg")  # readable, but outside the data folder
    (data / "img" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    good = [_chat({"type": "image", "path": f"img/{IMAGES[i % 3]}"}, i) for i in range(7)]
    good.append(_chat({"type": "image", "path": str((MEDIA / "tall.png").resolve())}, 7))
    bad = {"no such media file": _chat({"type": "image", "path": "img/missing.jpg"}, 0),
           "not an image Pillow can read": _chat({"type": "image", "path": "img/broken.jpg"}, 0),
           "leaves the data file's directory": _chat({"type": "image", "path": "../outside.jpg"}, 0),
           "the model writes text only": {"messages": [{"role": "user", "content": "w5"}, {
               "role": "assistant", "content": [{"type": "image", "path": "img/scene.jpg"}]}]}}
    records = good + [_chat(None, 8)] + list(bad.values())
    (data / "train.jsonl").write_text("\n".join(map(json.dumps, records)) + "\n")
    lines = {why: len(good) + 2 + k for k, why in enumerate(bad)}
    return ckpt, data / "train.jsonl", lines


def _flags(ckpt, data, out, steps: int) -> list[str]:
    return ["finetune", "-q", "--model", str(ckpt), "--data", str(data), "--out", str(out), "--max-steps", str(steps),
            "--batch-size", "16", "--val-fraction", "0", "--lr", "1e-2", "--save-every", "0", "--eval-every", "0",
            "--lora-r", "4"]


def _problems(out) -> dict[int, str]:
    rows = (out / "data_problems.txt").read_text().splitlines()
    return {int(r.split(": ", 1)[0].rsplit(":", 1)[1]): r for r in rows}


def test_image_chats_train_lora_on_the_decoder_and_load_in_peft(setup, tmp_path, monkeypatch):
    ckpt, data, bad_lines = setup
    calls = []
    forward = Gemma.forward

    def spy(self, input_ids, *args, **kw):  # the training forwards, as the trainer makes them
        calls.append((self, input_ids.clone(), kw.get("logits_to_keep"), kw.get("media")))
        return forward(self, input_ids, *args, **kw)

    monkeypatch.setattr(Gemma, "forward", spy)
    out = tmp_path / "run"
    assert main(_flags(ckpt, data, out, steps=5)) == 0
    monkeypatch.undo()

    # Every step is the whole train set (9 records in one batch): its loss goes down.
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 5 and losses[-1] < 0.7 * losses[0]
    problems = _problems(out)
    assert sorted(problems) == sorted(bad_lines.values())
    for why, line in bad_lines.items():
        assert why in problems[line], problems[line]

    # Each forward got the image rows' soft tokens exactly at their placeholders; none of them was scored
    # (position t is kept when token t + 1 is: a soft token's predecessor must never be kept), and the text
    # row had none.
    assert len(calls) == 5
    for _, ids, keep, media in calls:
        assert media is not None and ids.shape[0] == 9
        assert torch.equal(media.where, ids == SOFT)
        assert sorted(media.where.sum(1).tolist()) == [0] + [4] * 8  # the text chat rides in the same batch
        assert not (keep[:, :-1] & media.where[:, 1:]).any() and keep.any()
        assert media.embeds.shape == (32, 64) and not media.embeds.requires_grad

    # The towers: unchanged, unadapted; LoRA sits on the decoder only.
    model = calls[0][0]
    fresh = load_model(ckpt)
    for name in ("vision_tower", "multi_modal_projector"):
        trained, start = getattr(model.model, name).state_dict(), getattr(fresh.model, name).state_dict()
        assert trained.keys() == start.keys()
        assert all(torch.equal(trained[k], start[k]) for k in start)
    lora = [p for p, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert len(lora) == 8 * 7 and all(p.startswith("model.layers.") for p in lora)

    # The adapter, in peft on transformers' multimodal class: PEFT's names, the same logits as gemmakit's
    # merged model for an image prompt, and something learned.
    from safetensors.torch import load_file

    keys = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert keys and all(k.startswith("base_model.model.model.language_model.layers.") for k in keys)
    _check_in_peft(ckpt, out / "adapter")


@torch.no_grad()
def _check_in_peft(ckpt, adapter):
    import transformers

    import gemmakit
    from gemmakit.media.gemma3_images import Gemma3ImageProcessorConfig, preprocess_images
    from gemmakit.media.soft import batch_media

    llm = gemmakit.load(ckpt, adapter=adapter, pack=False)
    messages = [{"role": "user", "content": [{"type": "image", "path": str(MEDIA / "scene.jpg")},
                                             {"type": "text", "text": "w12 w20"}]}]
    ids, media = llm.prepare_chat(messages)
    t = torch.tensor([ids])
    ours = llm.model(t, media=batch_media([media], torch.arange(len(ids))[None], llm.model.config.bidirectional_kinds))
    hf = transformers.Gemma3ForConditionalGeneration.from_pretrained(ckpt).eval()
    pixels, _ = preprocess_images([Image.open(MEDIA / "scene.jpg")], Gemma3ImageProcessorConfig.from_hf(
        {"image_seq_length": 4, "size": {"height": 56, "width": 56}}))
    kw = {"input_ids": t, "pixel_values": pixels, "token_type_ids": (t == SOFT).long()}
    before = hf(**kw).logits
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tuned = peft.PeftModel.from_pretrained(hf, adapter).eval()
    assert not [w for w in caught if "adapter keys" in str(w.message)]  # every tensor found its module
    assert not [n for n, m in tuned.named_modules() if "lora_A" in n and "language_model" not in n]
    theirs = tuned(**kw).logits
    assert (theirs - before).abs().max() > 0.1  # the adapter's weights were found and applied
    torch.testing.assert_close(ours[0], theirs[0], atol=1e-4, rtol=0)


def test_image_records_on_a_text_only_model_are_reported(setup, tmp_path):
    """The same file on a text-only checkpoint: every image record is reported, the text chat trains."""
    from gemmakit.checkpoints.export import export_hf

    ckpt, data, bad_lines = setup
    text_only = tmp_path / "tiny-text-it"
    export_hf(load_model(ckpt), text_only, word_tokenizer())
    out = tmp_path / "run"
    assert main(_flags(text_only, data, out, steps=1)) == 0
    problems = _problems(out)
    assert sorted(problems) == [*range(1, 9), *sorted(bad_lines.values())]  # all but the text chat (line 9)
    assert all("this model is text-only" in why for why in problems.values()), problems
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
