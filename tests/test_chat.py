"""Chat plumbing: the base-model dialogue format, stop strings, nucleus sampling, chat-format choice, the API.
Run: .venv/bin/python -m pytest tests/test_chat.py
"""

from __future__ import annotations

import json

import pytest
import torch

from gemmakit.api import LLM, pick_chat_format
from gemmakit.chat.dialogue import DEFAULT_SYSTEM, STOP_STRINGS, render_dialogue
from gemmakit.engine import StopText


def test_dialogue_transcript_shape():
    """A base-model prompt is preamble, examples, the turns as User/Assistant lines, then 'Assistant:'."""
    text = render_dialogue([{"role": "user", "content": "Hi there"},
                            {"role": "assistant", "content": "Hello!"},
                            {"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]}])
    assert text.startswith(DEFAULT_SYSTEM + "\n\nUser: Hello! Who are you?\n")
    assert text.endswith("User: Hi there\nAssistant: Hello!\nUser: What is 2+2?\nAssistant:")


def test_dialogue_system_message_replaces_the_preamble_line():
    """A system message takes the place of the default first line."""
    text = render_dialogue([{"role": "system", "content": "You are a pirate."},
                            {"role": "user", "content": "Hi"}])
    assert text.startswith("You are a pirate.\n\n") and DEFAULT_SYSTEM not in text


def test_dialogue_rejects_unknown_roles_and_empty_input():
    """Bad conversations get a ValueError that says what to fix."""
    with pytest.raises(ValueError, match="unknown role 'robot'"):
        render_dialogue([{"role": "robot", "content": "beep"}])
    with pytest.raises(ValueError, match="messages is empty"):
        render_dialogue([])


@pytest.mark.parametrize("text", ["The capital is Paris.\nUser: and Rome?", "Paris.\nAssistant: more",
                                  "no stop here at all\nUse"])
def test_stop_text_cuts_at_every_split_point(text):
    """Stop strings spanning chunk boundaries are found, and nothing past them is ever released."""
    expected = min((text[: i] for s in STOP_STRINGS if (i := text.find(s)) >= 0), key=len, default=text)
    for cut in range(len(text) + 1):
        stop = StopText(STOP_STRINGS)
        out = stop.feed(text[:cut]) + stop.feed(text[cut:]) + stop.finish()
        assert out == expected, cut
        one = StopText(STOP_STRINGS)
        pieces = [one.feed(ch) for ch in text]
        assert "".join(pieces) + one.finish() == expected


class _Tok:
    """The only tokenizer facts pick_chat_format reads."""

    def __init__(self, template):
        self.chat_template = template


def test_chat_format_choice():
    """A template wins; an '-it' name without one uses the built-in renderer; otherwise base (dialogue)."""
    assert pick_chat_format("gemma-3-270m", "gemma3", _Tok(None)) is None
    assert pick_chat_format("gemma-3-270m", "gemma3", _Tok("{{ x }}")).template == "{{ x }}"
    it = pick_chat_format("gemma-4-31B-it", "gemma4", _Tok(None))
    assert it.template is None and it.family == "gemma4" and it.empty_thought_when_off
    e2b = pick_chat_format("gemma-4-E2B-it", "gemma4", _Tok(None))
    assert not e2b.empty_thought_when_off
    assert pick_chat_format("x-it", "gemma4", _Tok("t"), "dialogue") is None
    with pytest.raises(ValueError, match="unknown chat format"):
        pick_chat_format("x", "gemma3", _Tok(None), "chatml")


@pytest.fixture(scope="module")
def llm(default_model):
    import gemmakit

    return gemmakit.load(default_model)


def test_default_model_is_recognised_as_base(llm: LLM):
    """The embedded pretrained 270M has no template, so it chats through the dialogue format."""
    assert llm.is_base and "base model" in llm.describe()


def test_api_chat_answers_a_factual_question(llm: LLM):
    """gemmakit.load().chat(...) on the real 270M answers the capital of France with Paris."""
    reply = llm.chat([{"role": "user", "content": "What is the capital of France?"}], max_tokens=24)
    assert "Paris" in reply.content and "User:" not in reply.content
    assert reply.finish_reason == "stop" and reply.prompt_tokens > 20 and reply.completion_tokens > 0


def test_api_chat_takes_one_string_and_says_what_it_takes(llm: LLM):
    """A plain string is one user message (the same reply as the list form); other shapes are a TypeError that
    says what to pass, not an AttributeError from deep inside; so is a list of prompts given to generate."""
    question = "What is the capital of France?"
    assert llm.chat(question, max_tokens=16).content == llm.chat([{"role": "user", "content": question}],
                                                                  max_tokens=16).content
    for bad in ({"role": "user", "content": "hi"}, ["hi"], 42):
        with pytest.raises(TypeError, match="list of .*dicts"):
            llm.chat(bad, max_tokens=4)
    with pytest.raises(TypeError, match="one prompt string.*Engine"):
        llm.generate(["a", "b"], max_tokens=4)


def test_api_generate_and_no_double_bos(llm: LLM):
    """Raw generate continues text; a rendered prompt that starts with <bos> gets no second BOS."""
    assert llm.generate("The capital of France is", max_tokens=8)
    assert llm.encode_prompt("<bos>Hi")[:2] != [2, 2] and llm.encode_prompt("<bos>Hi").count(2) == 1
    assert llm.encode_prompt("Hi")[0] == 2


class ScriptedModel(torch.nn.Module):
    """Stands in for the network only: its logits spell out a fixed token script, one token per step."""

    def __init__(self, config, script: list[int], vocab: int):
        super().__init__()
        self.config, self.script, self.vocab, self.step = config, script, vocab, 0
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Embedding(1, 1)

    def forward(self, ids, input_pos=None, logits_to_keep=0, step=None):
        logits = torch.zeros(1, 1, self.vocab)
        logits[0, 0, self.script[min(self.step, len(self.script) - 1)]] = 1.0
        self.step += 1
        return logits


def test_instruction_tuned_chat_separates_reasoning_and_tool_calls(llm: LLM):
    """Through the real tokenizer, decoder and parser, a Gemma 4 reply yields reasoning, content and a tool
    call with JSON arguments, and nothing after the end of turn leaks into the answer."""
    from gemmakit.api import LLM as Api
    from gemmakit.chat.template import ChatFormat

    reply = ('<|channel>thought\nThe user wants the weather.<channel|>Let me check. '
             '<|tool_call>call:get_weather{city:<|"|>Paris, {FR}<|"|>,days:2}<tool_call|><turn|>junk after')
    script = llm.tokenizer.encode(reply, add_bos=False) + [llm.tokenizer.eos_id]
    scripted = Api(ScriptedModel(llm.model.config, script, llm.tokenizer.vocab_size), llm.tokenizer,
                   ChatFormat("gemma4"), "scripted")
    r = scripted.chat([{"role": "user", "content": "Weather in Paris?"}], max_tokens=len(script) + 5)
    assert r.reasoning == "The user wants the weather." and r.content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in r.tool_calls] == [
        ("get_weather", {"city": "Paris, {FR}", "days": 2})]
    assert "junk" not in r.content and r.finish_reason == "stop"
