"""Images and audio on the command line: `gemmakit generate --chat --image/--audio`, `gemmakit chat --image` and
the chat's /image, /audio, /save and /load, on tiny multimodal checkpoints (tests/media_models.py). Each answer
is checked against `llm.chat` on the same content parts, and against the text-only answer, so a file that is
accepted but not sent to the model fails.
Run: .venv/bin/python -m pytest tests/test_media_cli.py
"""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

import gemmakit
from gemmakit.cli import main
from gemmakit.repl import ChatSession, run
from tests.media_models import MEDIA, save_tiny_checkpoint

SCENE, TALL, TONE = str(MEDIA / "scene.jpg"), str(MEDIA / "tall.png"), str(MEDIA / "tone.flac")
GREEDY = {"max_tokens": 4, "temperature": 0.0}


@pytest.fixture(scope="module")
def g3_dir(tmp_path_factory):
    return save_tiny_checkpoint("gemma3-4b", tmp_path_factory.mktemp("m") / "tiny-gemma3-4b-it")


@pytest.fixture(scope="module")
def g3(g3_dir):
    return gemmakit.load(g3_dir)


def _user(text, *parts):
    if not parts:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [*({"type": k, "path": p} for k, p in parts), {"type": "text", "text": text}]}


def _session(llm, **kw):
    out = io.StringIO()
    return ChatSession(llm, dict(GREEDY), llm.context, out=out, **kw), out


def test_piped_chat_with_an_image_answers_and_survives_a_bad_file(g3, g3_dir, tmp_path):
    """A real `gemmakit chat --image` over a pipe: the first message carries the image, `/image missing.jpg`
    is one error line and the chat goes on, the next /image goes with the next message, /save keeps paths."""
    saved = tmp_path / "c.json"
    script = f"w5 w6\n/image {tmp_path / 'missing.jpg'}\n/image {TALL}\nw7\n/save {saved}\n"
    out = subprocess.run([sys.executable, "-m", "gemmakit.cli", "chat", "--model", str(g3_dir), "--image", SCENE,
                          "--max-tokens", "4"], input=script, capture_output=True, text=True, timeout=300,
                         check=False)
    assert out.returncode == 0, out.stderr
    first = [_user("w5 w6", ("image", SCENE))]
    answer1 = g3.chat(first, **GREEDY).content
    assert answer1 != g3.chat([_user("w5 w6")], **GREEDY).content  # the image changes the answer
    second = [*first, {"role": "assistant", "content": answer1}, _user("w7", ("image", TALL))]
    answer2 = g3.chat(second, **GREEDY).content
    lines = out.stdout.splitlines()
    assert lines[1] == "(scene.jpg attached to your first message)" and lines[2] == answer1
    assert lines[3].startswith("(error: no such media file") and str(tmp_path / "missing.jpg") in lines[3]
    assert lines[4] == "(image tall.png attached to your next message)" and lines[5] == answer2
    assert json.loads(saved.read_text())["messages"] == [*second, {"role": "assistant", "content": answer2}]


def test_generate_chat_with_image_and_audio(tmp_path_factory, capsys):
    """`generate --chat "w5" --image --audio --image-tokens 70 -v` on Gemma 4 E2B prints the answer the API
    gives for those parts, and says how many soft tokens each item became (70 is the budget, not 280)."""
    path = save_tiny_checkpoint("e2b", tmp_path_factory.mktemp("m") / "tiny-gemma4-e2b-it")
    code = main(["generate", "--chat", "w5", "--model", str(path), "--image", SCENE, "--audio", TONE,
                 "--image-tokens", "70", "--max-tokens", "4", "-v"])
    out, err = capsys.readouterr()
    assert code == 0, err
    llm = gemmakit.load(path)
    llm.max_soft_tokens = 70
    parts = (("image", SCENE), ("audio", TONE))
    assert out.strip() == llm.chat([_user("w5", *parts)], **GREEDY).content
    assert out.strip() != llm.chat([_user("w5", parts[1])], **GREEDY).content
    counts = [int(llm.prepare_chat([_user("", p)])[1].embeds.shape[0]) for p in parts]
    assert f"image scene.jpg: {counts[0]} soft tokens" in err and f"audio tone.flac: {counts[1]} soft tokens" in err
    llm.max_soft_tokens = None
    assert counts[0] <= 70 < int(llm.prepare_chat([_user("", parts[0])])[1].embeds.shape[0])


@pytest.mark.parametrize("argv,message", [
    (["generate", "--chat", "hi", "--image", SCENE], "text-only model; load a multimodal checkpoint"),
    (["chat", "--audio", TONE], "text-only model; load a multimodal checkpoint"),
    (["generate", "hi", "--image", SCENE], "go with --chat"),
    (["generate", "--chat", "hi", "--image", "/no/such.jpg"], "no such image file: /no/such.jpg"),
])
def test_media_the_model_cannot_take_is_one_error_line(llm, monkeypatch, capsys, argv, message):
    """The embedded text-only 270M (or a wrong flag or path) with --image / --audio: status 2, one line. The
    270M is the session's (conftest `llm`): loading it again here would cost more than the rest of the file."""
    import gemmakit.cli

    monkeypatch.setattr(gemmakit.cli, "load_llm", lambda args, warm_up=True: llm)
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: ") and message in err


def test_repl_commands_and_a_saved_chat_with_an_image_reload(g3, tmp_path):
    """/audio on a vision-only model and a file gone before its turn are errors that end only that turn; a
    chat saved with an image loads back (paths, not bytes) and goes on as the API would; /load refuses a
    transcript whose image is gone and keeps the conversation."""
    gone = tmp_path / "gone.png"
    gone.write_bytes((MEDIA / "tall.png").read_bytes())
    saved = tmp_path / "c.json"
    session, out = _session(g3)
    script = (f"/audio {TONE}\n/image '{SCENE}'\nw5 w6\n/image {gone}\n")
    run(session, io.StringIO(script), False)
    assert "(error: tiny-gemma3-4b-it cannot read audio: it reads image only)" in out.getvalue()
    gone.unlink()
    run(session, io.StringIO(f"w8\nw9\n/save {saved}\n"), False)
    assert "(error: no such media file" in out.getvalue() and "the message was not sent" in out.getvalue()
    history = json.loads(saved.read_text())["messages"]
    assert [m["content"] for m in history if m["role"] == "user"] == [_user("w5 w6", ("image", SCENE))["content"],
                                                                        "w9"]
    fresh, fresh_out = _session(g3)
    run(fresh, io.StringIO(f"/load {saved}\nw7\n"), False)
    assert f"(loaded 4 messages from {saved})" in fresh_out.getvalue()
    expected = g3.chat([*history, _user("w7")], **GREEDY).content
    assert fresh_out.getvalue().splitlines()[-1] == expected
    assert fresh.history[:4] == history and fresh.history[4] == _user("w7")  # the image part read back, a path
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"messages": [_user("w1", ("image", str(gone)))]}))
    fresh.command(f"/load {broken}")
    assert "(could not load" in fresh_out.getvalue() and len(fresh.history) == 6


def test_soft_tokens_that_overflow_the_context_drop_the_oldest_exchange(g3, monkeypatch):
    """Text alone fits, text plus the image's soft tokens does not: the oldest exchange is dropped, the
    question is asked again and answered."""
    session, out = _session(g3)
    session.ask("w5")
    with_image = [*session.messages(), _user("w6", ("image", SCENE))]
    n_text = len(g3.encode_prompt(g3.render(with_image)))
    n_full = len(g3.prepare_chat(with_image)[0])
    assert n_full > n_text
    monkeypatch.setattr(g3, "context", n_text + 4)
    session.context = n_text + 4
    session.command(f"/image {SCENE}")
    session.ask("w6")
    assert "(context full: dropped the oldest exchange)" in out.getvalue()
    assert session.history == [_user("w6", ("image", SCENE)), {"role": "assistant", "content":
                                                               g3.chat([_user("w6", ("image", SCENE))],
                                                                       **GREEDY).content}]
