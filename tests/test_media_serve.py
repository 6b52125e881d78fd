"""Images and audio through the OpenAI-compatible server, for real: uvicorn on a local port, the official
`openai` client, tiny multimodal checkpoints (tests/media_models.py) served as `gemmakit serve` serves them.
Two servers: a Gemma 3 4B-shaped one with a media directory, a 1 MiB media limit and a guard, and a Gemma 4
E2B-shaped one (vision + audio) on the default media policy.
Run: .venv/bin/python -m pytest tests/test_media_serve.py
"""

from __future__ import annotations

import base64
import io
import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

import gemmakit
from gemmakit.serve.app import ServeOptions, create_app
from tests.live import Live
from tests.media_models import MEDIA, save_tiny_checkpoint

SCENE = "data:image/jpeg;base64," + base64.b64encode((MEDIA / "scene.jpg").read_bytes()).decode()


def ask(*parts: dict, text: str = "w5 w6") -> list[dict]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def audio(path) -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(path.read_bytes()).decode(),
                                                   "format": path.suffix[1:]}}


@pytest.fixture(scope="module")
def g3(tmp_path_factory):
    """(server, llm, allowed dir, outside dir)."""
    tmp = tmp_path_factory.mktemp("g3")
    llm = gemmakit.load(save_tiny_checkpoint("gemma3-4b", tmp / "tiny-gemma3-4b-it"), context=512)
    allowed, outside = tmp / "allowed", tmp / "outside"
    allowed.mkdir(), outside.mkdir()
    shutil.copy(MEDIA / "scene.jpg", allowed / "scene.jpg")
    shutil.copy(MEDIA / "scene.jpg", outside / "scene.jpg")
    (allowed / "link.jpg").symlink_to(outside / "scene.jpg")
    guard = tmp / "guard.yaml"
    guard.write_text("rules:\n  - {name: words, kind: pattern, action: block, keywords: [w777], where: input}\n")
    server = Live(create_app(llm, ServeOptions(max_batch=4, context=512, media_dirs=(str(allowed),),
                                               max_media_bytes=1 << 20, guard=str(guard))))
    yield server, llm, allowed, outside
    server.close()


@pytest.fixture(scope="module")
def e2b(tmp_path_factory):
    """(server, llm): the default media policy; Gemma 4's image budget set to 70 by the server option."""
    llm = gemmakit.load(save_tiny_checkpoint("e2b", tmp_path_factory.mktemp("e2b") / "tiny-gemma4-e2b-it"),
                        context=1024)
    server = Live(create_app(llm, ServeOptions(max_batch=4, context=1024, image_tokens=70)))
    yield server, llm
    server.close()


def refused(live: Live, messages: list[dict]) -> str:
    """The message of the 400 the server answers `messages` with (through the official client)."""
    with pytest.raises(openai.BadRequestError) as e:
        live.client().chat.completions.create(model="", messages=messages, max_tokens=2)
    assert e.value.status_code == 400 and e.value.body["type"] == "invalid_request_error"
    return e.value.body["message"]


# --- answers --------------------------------------------------------------------------------------------
def test_an_image_data_url_is_answered_streamed_and_not_with_its_soft_tokens_counted(g3):
    live, llm, _, _ = g3
    client, messages = live.client(), ask(image(SCENE))
    r = client.chat.completions.create(model="", messages=messages, max_tokens=8, temperature=0)
    want = llm.chat(ask({"type": "image", "path": str(MEDIA / "scene.jpg")}), max_tokens=8, temperature=0.0)
    assert r.choices[0].message.content == want.content and want.content
    ids, media = llm.prepare_chat(messages, policy=live.app.state.server.media_policy)
    assert ids.count(llm.model.config.media_token("image")) == 4 and media.embeds.shape[0] == 4
    text_only = llm.prepare_chat(ask())[0]
    assert r.usage.prompt_tokens == len(ids) >= len(text_only) + 4
    chunks = list(client.chat.completions.create(model="", messages=messages, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.content
    assert chunks[-1].usage.prompt_tokens == len(ids)


def test_image_and_text_requests_share_a_batch(g3):
    live, llm, _, _ = g3
    client = live.client()
    asks = [ask(image(SCENE), text="w9 w10"), [{"role": "user", "content": "w11 w12 w13"}]]
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda m: client.chat.completions.create(model="", messages=m, max_tokens=24,
                                                                     temperature=0), asks))
    alone = [llm.chat(ask({"type": "image", "path": str(MEDIA / "scene.jpg")}, text="w9 w10"), max_tokens=24,
                      temperature=0.0), llm.chat(asks[1], max_tokens=24, temperature=0.0)]
    assert [g.choices[0].message.content for g in got] == [a.content for a in alone]
    assert [g.usage.prompt_tokens for g in got] == [a.prompt_tokens for a in alone]


def test_input_audio_and_the_image_budget_on_gemma4(e2b):
    live, llm = e2b
    client = live.client()
    r = client.chat.completions.create(model="", messages=ask(audio(MEDIA / "chirp.wav")), max_tokens=5,
                                       temperature=0)
    ids = llm.prepare_chat(ask({"type": "audio", "path": str(MEDIA / "chirp.wav")}))[0]
    assert r.usage.prompt_tokens == len(ids) and ids.count(llm.model.config.media_token("audio")) > 0
    assert r.usage.completion_tokens == 5 and r.choices[0].message.content
    # --image-tokens 70: the image takes at most 70 soft tokens (280 by default).
    r = client.chat.completions.create(model="", messages=ask(image(SCENE)), max_tokens=2, temperature=0)
    assert len(llm.prepare_chat(ask())[0]) + 4 < r.usage.prompt_tokens <= len(llm.prepare_chat(ask())[0]) + 75


# --- refusals -------------------------------------------------------------------------------------------
def _noise_png(side: int) -> str:
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


@pytest.mark.parametrize("part,says", [
    (image("https://example.com/cat.png"), "--allow-remote-media"),
    (image(f"file://{MEDIA / 'scene.jpg'}"), "--allow-media-dir"),
    (image(str(MEDIA / "scene.jpg")), "--allow-media-dir"),
    (image("data:image/png;base64,not*base64!"), "not valid base64"),
    (image("data:image/png;base64," + base64.b64encode(b"these bytes are no picture").decode()),
     "not an image Pillow can read"),
    ({"type": "input_audio", "input_audio": {"data": base64.b64encode(b"no sound here").decode()}},
     "not a readable audio file"),
    ({"type": "image_url"}, "an image_url part needs"),
    ({"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}, "text, image_url or input_audio"),
])
def test_media_the_default_policy_refuses_is_a_400_saying_what_to_do(e2b, part, says):
    live, _ = e2b
    assert says in refused(live, ask(part))
    r = live.client().chat.completions.create(model="", messages=ask(image(SCENE)), max_tokens=2)
    assert r.choices[0].finish_reason == "length"  # the next request is served


def test_limits_kinds_and_media_dirs(g3):
    live, _, allowed, outside = g3
    client = live.client()
    big = _noise_png(700)  # ~1.4 MiB of PNG: over this server's 1 MiB media limit, under its body limit
    assert "over the 1 MiB" in refused(live, ask(image(big)))
    assert "reads image only" in refused(live, ask(audio(MEDIA / "tone.flac")))
    assert "at most 16" in refused(live, ask(*[image(SCENE)] * 17))
    ok = client.chat.completions.create(model="", messages=ask(image(f"file://{allowed / 'scene.jpg'}")),
                                        max_tokens=2)
    assert ok.usage.prompt_tokens > 4 and ok.choices[0].finish_reason == "length"
    for url in (f"file://{outside / 'scene.jpg'}", f"file://{allowed}/../outside/scene.jpg",
                f"file://{allowed / 'link.jpg'}"):
        assert "outside the directories" in refused(live, ask(image(url)))
    assert client.chat.completions.create(model="", messages=ask(image(SCENE)), max_tokens=2).choices


def test_the_guard_reads_the_text_beside_an_image(g3):
    live, _, _, _ = g3
    r = live.client().chat.completions.create(model="", messages=ask(image(SCENE), text="w5 w777"), max_tokens=4)
    assert r.choices[0].finish_reason == "content_filter"
    r = live.client().chat.completions.create(model="", messages=ask(image(SCENE), text="w5 w778"), max_tokens=4)
    assert r.choices[0].finish_reason == "length"


def test_a_text_only_model_refuses_images_before_decoding_them(llm):
    from gemmakit.serve.protocol import ParamError
    from gemmakit.serve.routes import check_media_kinds

    with pytest.raises(ParamError, match="text-only model") as e:
        check_media_kinds(llm, "gemma-3-270m", {"image"})
    assert e.value.param == "messages"
    check_media_kinds(llm, "gemma-3-270m", set())


def test_the_chat_page_attaches_files_as_content_parts(g3):
    page = httpx.get(g3[0].url + "/").text
    assert 'type="file"' in page and 'accept="image/*,audio/*"' in page
    assert 'type: "image_url"' in page and 'type: "input_audio"' in page
