"""`gemmakit eval custom` with image (and audio) questions: a tiny random Gemma 3 4B-structured checkpoint
(tests/media_models.py) answers multiple-choice and reference-answer records from tests/fixtures/eval/media
through the real command, the soft tokens reach the scoring forward and the engine, bad media references and
a text-only model are refused before any work, and an endpoint gets the image as a data URL.
Run: .venv/bin/python -m pytest tests/test_media_eval.py
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from gemmakit.cli import main
from tests.media_models import MEDIA, save_tiny_checkpoint

FIX = Path(__file__).parent / "fixtures" / "eval" / "media"
RUN = ["--context", "512", "--compile", "off", "--batch-size", "4"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_checkpoint("gemma3-4b", tmp_path_factory.mktemp("m") / "tiny-gemma3-4b-it")


@pytest.fixture(scope="module")
def llm(checkpoint):
    import gemmakit

    return gemmakit.load(checkpoint, context=512)


def _eval(data: Path, out: Path, *extra: str) -> tuple[dict, dict[str, dict]]:
    assert main(["eval", "custom", "--data", str(data), "--out", str(out), *extra]) == 0
    result = json.loads((out / "results.json").read_text())
    samples = [json.loads(line) for line in (out / "samples" / "custom.jsonl").read_text().splitlines()]
    return result, {s["id"]: s for s in samples}


def _swapped(tmp_path: Path, source: Path) -> Path:
    """The same questions with scene.jpg and tall.png exchanged."""
    text = source.read_text().replace("scene.jpg", "@").replace("tall.png", "scene.jpg").replace("@", "tall.png")
    path = tmp_path / source.name
    path.write_text(text)
    return path


def test_image_choices_run_through_eval_custom(checkpoint, tmp_path):
    model = ["--model", str(checkpoint), "--media-dir", str(MEDIA), *RUN]
    result, samples = _eval(FIX / "choices.jsonl", tmp_path / "a", *model)
    metrics = result["metrics"]
    assert metrics["n"] == 3 and metrics["questions_with_images"] == 2 and isinstance(metrics["acc"], float)
    assert result["config"]["media_dir"] == str(MEDIA)
    assert samples["two"]["images"] == ["tall.png", "scene.jpg"] and "images" not in samples["text"]
    assert [len(samples[k]["loglikelihoods"]) for k in ("scene", "text", "two")] == [3, 3, 2]
    assert "| questions_with_images | 2 |" in (tmp_path / "a" / "report" / "report.md").read_text()
    # Another image in the same place changes every image question's scores, and only those.
    _, other = _eval(_swapped(tmp_path, FIX / "choices.jsonl"), tmp_path / "b", *model)
    for sid in ("scene", "two"):
        assert max(abs(x - y) for x, y in zip(samples[sid]["loglikelihoods"], other[sid]["loglikelihoods"],
                                              strict=True)) > 1e-3
    assert samples["text"]["loglikelihoods"] == pytest.approx(other["text"]["loglikelihoods"], abs=1e-5)


def test_image_answers_are_chat_messages_through_the_engine(checkpoint, llm, tmp_path):
    result, samples = _eval(FIX / "answers.jsonl", tmp_path / "run", "--model", str(checkpoint), "--media-dir",
                            str(MEDIA), "--chat", *RUN)
    assert result["metrics"]["questions_with_images"] == 1 and samples["scene"]["kind"] == "generation"
    ask = lambda name: llm.chat([{"role": "user", "content": [  # noqa: E731
        {"type": "image", "path": str(MEDIA / name)}, {"type": "text", "text": "w11 w12 w13"}]}],
        max_tokens=6, temperature=0.0).content
    scene, tall = ask("scene.jpg"), ask("tall.png")
    assert scene != tall, "the fixture's images must lead the tiny model to different answers"
    assert samples["scene"]["output"] == scene
    assert samples["text"]["output"] == llm.chat("w11 w12 w13", max_tokens=6, temperature=0.0).content


def test_choice_scores_with_images_equal_a_full_forward(llm):
    """Rows with and without images, of different lengths, in one padded batch score as each alone does in
    a plain forward with its soft tokens; the context is the placeholders, then the prompt, BOS once."""
    from gemmakit.eval.backends import LocalBackend
    from gemmakit.media.soft import batch_media

    backend = LocalBackend(llm, batch_size=4)
    scene, tall = ({"type": "image", "path": str(MEDIA / n)} for n in ("scene.jpg", "tall.png"))
    pairs = [("w11 w12 w13", " w20"), ("w11 w12 w13", " w21 w22"), ("w11 w12 w13 w14 w15 w16 w17", " w23"),
             ("w30 w31 ", "w42 w43")]
    media = [[scene], [scene], None, [tall, scene]]
    got = backend.loglikelihood(pairs, media)
    ids, _, conts = backend.media_prompt("w11 w12 w13", [scene], [" w20"])
    assert ids == [2, 990, *[992] * 4, 991, 11, 12, 13] and conts == [[20]]
    for (context, continuation), parts, (ll, greedy) in zip(pairs, media, got, strict=True):
        if parts:
            ctx, pm, (cont,) = backend.media_prompt(context, parts, [continuation])
        else:
            ctx, pm, cont = llm.tokenizer.encode(context), None, llm.tokenizer.encode(continuation, add_bos=False)
        row = ctx + cont
        positions = torch.arange(len(row) - 1)[None]
        soft = batch_media([pm], positions, llm.model.config.bidirectional_kinds) if pm is not None else None
        with torch.no_grad():
            logp = torch.log_softmax(llm.model(torch.tensor([row[:-1]]), media=soft).float()[0, len(ctx) - 1:], -1)
        assert ll == pytest.approx(float(logp.gather(1, torch.tensor(cont)[:, None]).sum()), abs=1e-4)
        assert greedy == bool((logp.argmax(-1) == torch.tensor(cont)).all())
    assert got[3][0] != pytest.approx(backend.loglikelihood(pairs[3:])[0][0], abs=1e-3)  # the images count


def test_bad_media_references_are_reported_before_any_work(tmp_path, capsys):
    from PIL import Image

    task = tmp_path / "task"
    task.mkdir()
    Image.new("RGB", (8, 8), "red").save(task / "ok.png")
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "secret.png")
    (task / "link.png").symlink_to(tmp_path / "secret.png")
    names = ["ok.png", "../secret.png", str(tmp_path / "secret.png"), "nope.jpg", "link.png"]
    (task / "data.jsonl").write_text("".join(json.dumps({"id": f"q{i}", "image": n, "prompt": "w1",
                                                         "reference": "w2"}) + "\n" for i, n in enumerate(names)))
    out = tmp_path / "out"
    # An endpoint nobody listens on: the media directory (the data file's, by default) is checked first.
    code = main(["eval", "custom", "--data", str(task / "data.jsonl"), "--out", str(out), "--endpoint",
                 "http://127.0.0.1:9/v1", "--chat"])
    err = capsys.readouterr().err
    assert code == 2 and "4 media reference(s)" in err and "record 1 " not in err
    assert "record 2 (id q1): image '../secret.png' leads outside" in err
    assert "record 3 (id q2)" in err and "absolute path" in err
    assert "record 4 (id q3): image 'nope.jpg' is not a file" in err
    assert "record 5 (id q4): image 'link.png' leads outside" in err
    assert not (out / "samples").exists()


def test_a_model_that_cannot_read_the_media_refuses_before_any_work(checkpoint, tmp_path, capsys):
    from gemmakit.checkpoints.export import export_hf
    from gemmakit.model import Gemma
    from tests.helpers import tiny
    from tests.media_models import word_tokenizer

    text_only = export_hf(Gemma(tiny("gemma3")), tmp_path / "tiny-text-it", word_tokenizer())
    args = ["--media-dir", str(MEDIA), *RUN]
    assert main(["eval", "custom", "--data", str(FIX / "choices.jsonl"), "--out", str(tmp_path / "a"), "--model",
                 str(text_only), *args]) == 2
    assert "is a text-only model; load a multimodal checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "a" / "samples").exists()
    (tmp_path / "audio.jsonl").write_text(json.dumps({"audio": "tone.flac", "prompt": "w1", "reference": "w2"}))
    assert main(["eval", "custom", "--data", str(tmp_path / "audio.jsonl"), "--out", str(tmp_path / "b"), "--model",
                 str(checkpoint), *args]) == 2
    err = capsys.readouterr().err
    assert "the task has audio questions, but" in err and "reads image only" in err
    assert not (tmp_path / "b" / "samples").exists()


class _Recorder(BaseHTTPRequestHandler):
    bodies: list[dict] = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Recorder.bodies.append({"path": self.path, **body})
        reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": "w20"}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


def test_an_endpoint_gets_images_as_data_urls(tmp_path, capsys):
    data = tmp_path / "ask.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in (
        {"id": "img", "image": "scene.jpg", "prompt": "What is this?", "reference": "w20"},
        {"id": "clip", "audio": "tone.flac", "prompt": "What is this sound?", "reference": "bird"},
        {"id": "plain", "prompt": "Hello", "reference": "w20"})))
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        common = ["eval", "custom", "--data", str(data), "--media-dir", str(MEDIA), "--endpoint", url]
        assert main([*common, "--out", str(tmp_path / "raw")]) == 2  # no --chat: refused, nothing sent
        assert "add --chat" in capsys.readouterr().err and _Recorder.bodies == []
        result, samples = _eval(data, tmp_path / "run", *common[4:], "--chat")
    finally:
        server.shutdown()
    image, audio, plain = (b["messages"][0]["content"] for b in _Recorder.bodies)
    assert all(b["path"] == "/v1/chat/completions" for b in _Recorder.bodies)
    assert image[0]["type"] == "image_url" and image[1] == {"type": "text", "text": "What is this?"}
    head, payload = image[0]["image_url"]["url"].split(",", 1)
    assert head == "data:image/jpeg;base64" and base64.b64decode(payload) == (MEDIA / "scene.jpg").read_bytes()
    assert audio[0]["type"] == "input_audio" and audio[0]["input_audio"]["format"] == "flac"
    assert base64.b64decode(audio[0]["input_audio"]["data"]) == (MEDIA / "tone.flac").read_bytes()
    assert plain == "Hello"
    assert result["metrics"]["questions_with_images"] == 1
    assert result["metrics"]["questions_with_audio"] == 1 and samples["img"]["correct"]
