"""Guards through the real server and the official client: a blocked input never reaches the model, a blocked
output is cut with finish_reason "content_filter", personal data is redacted in both directions (what the
model is given, and what the client receives, streamed or not); plus the rule logic on its own.
Run: .venv/bin/python -m pytest tests/test_guard.py
"""

from __future__ import annotations

import pytest

from gemmakit.chat.parser import Delta, ToolCall
from gemmakit.safety.guard import HOLD, Guard, MessageWatch, OutputWatch, Rule
from gemmakit.serve.app import create_app
from gemmakit.serve.server import ServeOptions
from tests.live import CAPITAL, CONTEXT, Live
from tests.test_serve import _scripted_llm

GUARD = """
rules:
  - {name: pii, kind: pii, action: redact}
  - {name: weapons, kind: pattern, keywords: [bomb, grenade], action: block, where: input,
     message: "Sorry, I can't help with weapons."}
  - {name: capital, kind: pattern, patterns: ['\\bParis\\b'], action: block, where: output, message: "[removed]"}
"""


def test_rules_and_the_output_watch():
    guard = Guard([Rule("pii", "pii", "redact"), Rule("words", "pattern", "warn", keywords=["secret"])])
    v = guard.check("mail a@b.co about the secret", "input")
    assert v.text == "mail [EMAIL] about the secret" and v.refusal is None
    assert [e["rule"] for e in v.events] == ["pii", "words"]
    text = "Contact: jane.doe@example.com, thanks! " + "x" * 100
    watch, sent = OutputWatch(guard), ""
    for end in range(1, len(text) + 1):  # one character per update, as a stream
        sent += watch.update(text[:end], end == len(text))
    assert sent == "Contact: [EMAIL], thanks! " + "x" * 100 and "@" not in sent
    with pytest.raises(ValueError, match="only pii rules can redact"):
        Rule("x", "pattern", "redact")
    with pytest.raises(ValueError, match="policy rules need a classifier"):
        Guard([Rule("p", "policy", policy="dangerous")])
    assert HOLD >= 42  # the longest IBAN with spaces fits in what is held back


def test_the_text_around_an_image_is_checked_and_the_image_passes_untouched():
    guard = Guard([Rule("pii", "pii", "redact"), Rule("x", "pattern", "block", where="input", keywords=["bomb"])])
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    parts = [{"role": "user", "content": [{"type": "text", "text": "mail me at a@b.com"}, image]}]
    out, verdict = guard.check_messages(parts)
    assert verdict.refusal is None and out[0]["content"][1] == image
    assert "a@b.com" not in out[0]["content"][0]["text"]
    blocked = [{"role": "user", "content": [image, {"type": "text", "text": "how to build a bomb"}]}]
    assert guard.check_messages(blocked)[1].refusal is not None


def test_the_output_watch_checks_each_update_in_bounded_time():
    """Each update checks the unsent text and a bounded window before it, not the whole message again: a 108k
    character stream in 4-character updates takes seconds (rescanning everything took 3.8 s for just 20k), and
    findings far into it are still redacted, and a block far into it still blocks."""
    import time

    guard = Guard([Rule("pii", "pii", "redact"), Rule("x", "pattern", "block", where="output", keywords=["bomb"])])
    filler = "lorem ipsum dolor sit amet " * 4000
    text = filler + "write to jane.doe@example.com today " + "x" * 100
    watch, sent, t0 = OutputWatch(guard), "", time.perf_counter()
    for end in range(4, len(text) + 4, 4):
        sent += watch.update(text[:end], end >= len(text))
    assert time.perf_counter() - t0 < 20
    assert sent == filler + "write to [EMAIL] today " + "x" * 100
    watch, sent = OutputWatch(guard), ""
    for end in range(4, len(filler) + 4, 4):
        sent += watch.update((filler + "a bomb")[:end], False)
    assert watch.update(filler + "a bomb", True) == "" and watch.refusal and "bomb" not in sent


def test_the_message_watch_guards_every_channel():
    """Reasoning is redacted like content, tool-call arguments are checked whole, a block anywhere stops the
    whole message, and what was held back comes out with the final update."""
    guard = Guard([Rule("pii", "pii", "redact"), Rule("x", "pattern", "block", where="output", keywords=["bomb"],
                                                      message="no")])
    watch, seen = MessageWatch(guard), Delta()
    parts = [Delta(reasoning="Ask bob@example.com"), Delta(reasoning=" first."), Delta(content="Sending."),
             Delta(tool_calls=[ToolCall("send", '{"to": "jane@corp.example.org"}', "c1")]), Delta()]
    for i, delta in enumerate(parts):
        assert watch.update(delta, final=i == len(parts) - 1) is None
        seen.content, seen.reasoning = seen.content + delta.content, seen.reasoning + delta.reasoning
        seen.tool_calls += delta.tool_calls
    assert seen.reasoning == "Ask [EMAIL] first." and seen.content == "Sending."
    assert [c.arguments for c in seen.tool_calls] == ['{"to": "[EMAIL]"}']

    watch = MessageWatch(guard)
    blocked = Delta(reasoning="a bomb", content="fine", tool_calls=[ToolCall("f", "{}", "c2")])
    assert watch.update(blocked, final=False) == "no"
    assert (blocked.content, blocked.reasoning, blocked.tool_calls) == ("", "", [])
    later = Delta(content="more")
    assert watch.update(later, final=True) == "no" and later.content == ""


@pytest.mark.slow
def test_the_terminal_chat_guards_the_thought_channel(llm, tmp_path):
    """`gemmakit chat --guard` streams reasoning through the same watch as the server: redacted, and a block in
    the thought channel ends the answer with the guard's message."""
    import io

    from gemmakit.repl import ChatSession
    from tests.test_serve import _scripted_llm

    guard = Guard([Rule("pii", "pii", "redact"), Rule("cap", "pattern", "block", where="output",
                                                      patterns=[r"\bParis\b"], message="[removed]")])
    for reply, shown, hidden in (
            ("<|channel>thought\nAsk bob@example.com first.<channel|>Done.<turn|>", "Ask [EMAIL] first.",
             "bob@"),
            ("<|channel>thought\nThe answer is Paris.<channel|>It is a secret.<turn|>", "(guard: [removed])",
             "Paris")):
        out = io.StringIO()
        session = ChatSession(_scripted_llm(llm, reply), {"max_tokens": 60, "temperature": 0}, CONTEXT, out=out,
                              thinking=True, guard=guard)
        session.ask("Go")
        assert shown in out.getvalue() and hidden not in out.getvalue()


@pytest.fixture()
def guard_file(tmp_path):
    path = tmp_path / "guard.yaml"
    path.write_text(GUARD)
    return str(path)


@pytest.mark.slow
def test_a_blocked_input_never_reaches_the_model(llm, guard_file):
    live = Live(create_app(llm, ServeOptions(context=CONTEXT, guard=guard_file)))
    try:
        server = live.app.state.server
        before = server.metrics.generated_tokens._value.get()
        for stream in (False, True):
            r = live.client().chat.completions.create(model=server.name, stream=stream, max_tokens=8, messages=[
                {"role": "user", "content": "How do I build a bomb?"}])
            if stream:
                chunks = [c for c in r if c.choices]
                content = "".join(c.choices[0].delta.content or "" for c in chunks)
                finish = chunks[-1].choices[0].finish_reason
            else:
                content, finish = r.choices[0].message.content, r.choices[0].finish_reason
            assert (content, finish) == ("Sorry, I can't help with weapons.", "content_filter")
        assert server.metrics.generated_tokens._value.get() == before
    finally:
        live.close()


@pytest.mark.slow
def test_a_blocked_output_is_cut_with_content_filter(llm, guard_file):
    live = Live(create_app(llm, ServeOptions(context=CONTEXT, guard=guard_file)))
    try:
        name = live.app.state.server.name
        r = live.client().chat.completions.create(model=name, messages=CAPITAL, max_tokens=24, temperature=0)
        assert r.choices[0].finish_reason == "content_filter" and r.choices[0].message.content == "[removed]"
        chunks = [c for c in live.client().chat.completions.create(model=name, messages=CAPITAL, max_tokens=24,
                                                                    temperature=0, stream=True) if c.choices]
        assert chunks[-1].choices[0].finish_reason == "content_filter"
        assert "Paris" not in "".join(c.choices[0].delta.content or "" for c in chunks)
    finally:
        live.close()


@pytest.mark.slow
def test_personal_data_is_redacted_both_ways(llm, guard_file):
    reply = "Sure: write to bob@example.com or call +1 202 555 0143 today, and pay to DE89 3704 0044 0532 0130 00."
    scripted = _scripted_llm(llm, reply + "<turn|>")
    seen = []
    render = scripted.render
    scripted.render = lambda messages, *a, **k: (seen.append(messages), render(messages, *a, **k))[1]
    live = Live(create_app(scripted, ServeOptions(max_batch=1, context=CONTEXT, guard=guard_file)))
    want = "Sure: write to [EMAIL] or call [PHONE] today, and pay to [IBAN]."
    try:
        ask = dict(model="scripted-gemma4", max_tokens=80, temperature=0, messages=[
            {"role": "user", "content": "My card is 4111 1111 1111 1111 and my mail jane@corp.example.org."}])
        r = live.client().chat.completions.create(**ask)
        assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
        assert seen[-1][-1]["content"] == "My card is [CARD] and my mail [EMAIL]."  # what the model was given
        scripted.model.step = 0  # the script plays again
        chunks = [c for c in live.client().chat.completions.create(stream=True, **ask) if c.choices]
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert streamed.strip() == want and "@" not in streamed
    finally:
        live.close()


@pytest.mark.slow
def test_the_terminal_chat_is_guarded_too(default_model, guard_file, tmp_path):
    import json
    import subprocess
    import sys

    saved = tmp_path / "chat.json"
    typed = ("My mail is jane@example.com. Hello!\nHow do I build a bomb?\nWhat is the capital of France?\n"
             f"/save {saved}\n")
    done = subprocess.run([sys.executable, "-m", "gemmakit.cli", "chat", "--guard", guard_file, "--max-tokens", "24",
                           "--temperature", "0"], input=typed, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "(guard: Sorry, I can't help with weapons.)" in done.stdout
    users = [m["content"] for m in json.loads(saved.read_text())["messages"] if m["role"] == "user"]
    assert users[0] == "My mail is [EMAIL]. Hello!"  # redacted before the model saw it
    assert not any("bomb" in u for u in users)  # the blocked message never entered the conversation
    assert "Paris" not in done.stdout and "jane@example.com" not in done.stdout


@pytest.mark.slow
def test_text_completions_are_guarded_too(llm, guard_file):
    live = Live(create_app(llm, ServeOptions(context=CONTEXT, guard=guard_file)))
    try:
        server, client = live.app.state.server, live.client()
        ask = dict(model=server.name, max_tokens=8, temperature=0)
        before = server.metrics.generated_tokens._value.get()
        for stream in (False, True):
            r = client.completions.create(prompt=["Tea is", "How to build a bomb:"], stream=stream, **ask)
            choices = [c.choices[0] for c in r] if stream else r.choices
            assert choices[-1].finish_reason == "content_filter"
            assert "".join(c.text for c in choices).endswith("Sorry, I can't help with weapons.")
        assert server.metrics.generated_tokens._value.get() == before  # neither prompt reached the model
        capital = "The capital of France is the city of"  # the 270M continues " Paris."
        r = client.completions.create(prompt=capital, **ask)
        assert (r.choices[0].text, r.choices[0].finish_reason) == ("[removed]", "content_filter")
        chunks = [c.choices[0] for c in client.completions.create(prompt=capital, stream=True, **ask)]
        assert chunks[-1].finish_reason == "content_filter" and "Paris" not in "".join(c.text for c in chunks)
        r = client.completions.create(prompt="Mail jane@corp.example.org and", echo=True, **ask)
        assert r.choices[0].text.startswith("Mail [EMAIL] and")  # echo shows what the model was given
    finally:
        live.close()


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True])
def test_reasoning_and_tool_call_arguments_are_guarded(llm, guard_file, stream):
    import json

    redacted = ('<|channel>thought\nAsk bob@example.com first.<channel|>Sending. '
                '<|tool_call>call:send{to:<|"|>jane@corp.example.org<|"|>}<tool_call|><turn|>')
    blocked = '<|channel>thought\nThe answer is Paris.<channel|>It is a secret.<turn|>'
    for reply in (redacted, blocked):
        live = Live(create_app(_scripted_llm(llm, reply), ServeOptions(max_batch=1, context=CONTEXT,
                                                                      guard=guard_file)))
        try:
            ask = dict(model="scripted-gemma4", messages=[{"role": "user", "content": "Go"}], max_tokens=80,
                       tools=[{"type": "function", "function": {"name": "send", "parameters": {"type": "object"}}}],
                       extra_body={"chat_template_kwargs": {"enable_thinking": True}}, temperature=0)
            if stream:
                deltas = [c.choices[0] for c in live.client().chat.completions.create(stream=True, **ask) if c.choices]
                reasoning = "".join(getattr(d.delta, "reasoning_content", None) or "" for d in deltas)
                calls = [t for d in deltas for t in (d.delta.tool_calls or [])]
                finish = deltas[-1].finish_reason
            else:
                choice = live.client().chat.completions.create(**ask).choices[0]
                reasoning = getattr(choice.message, "reasoning_content", None) or ""
                calls = choice.message.tool_calls or []
                finish = choice.finish_reason
        finally:
            live.close()
        if reply is redacted:
            assert reasoning.strip() == "Ask [EMAIL] first." and finish == "tool_calls"
            assert [json.loads(c.function.arguments) for c in calls] == [{"to": "[EMAIL]"}]
        else:
            assert finish == "content_filter" and "Paris" not in reasoning
