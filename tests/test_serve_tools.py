"""Tool calls that always parse, end to end: a scripted Gemma 4 model (a vocabulary with Gemma 4's markers as
single tokens, tests/test_tool_grammar.py) behind the real engine and server, with the official `openai` client.

Run: .venv/bin/python -m pytest tests/test_serve_tools.py -q
"""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from gemmakit.api import LLM
from gemmakit.chat.template import ChatFormat
from gemmakit.chat.tool_grammar import ToolCallConstraint, string_tokens, tool_call_grammar
from gemmakit.constrain import Grammars
from gemmakit.sampling import SamplingParams
from gemmakit.serve.app import ServeOptions, create_app
from tests.live import CONTEXT, Live
from tests.test_chat import ScriptedModel
from tests.test_tool_grammar import gemma4_tokenizer

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "required": ["city"], "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def g4():
    return gemma4_tokenizer()


@pytest.fixture(scope="module")
def config():
    """A small Gemma config with the full vocabulary: the scripted models need only its cache shapes."""
    from dataclasses import replace

    from tests.helpers import tiny

    return replace(tiny("gemma3"), vocab_size=262144, max_position_embeddings=CONTEXT)


class PreferringModel(ScriptedModel):
    """A scripted model with standing preferences: each step its logits are `prefer` plus a strong pull to
    the script's next token, so where the script is refused the best allowed token wins."""

    def __init__(self, config, script: list[int], vocab: int, prefer: dict[int, float]):
        super().__init__(config, script, vocab)
        self.prefer = torch.zeros(vocab)
        for token, logit in prefer.items():
            self.prefer[token] = logit

    def forward(self, ids, input_pos=None, logits_to_keep=0, step=None):
        logits = self.prefer.clone()
        logits[self.script[min(self.step, len(self.script) - 1)]] += 5.0
        self.step += 1
        return logits.view(1, 1, -1)


def scripted(config, g4, reply: str | list[int], prefer: dict[int, float] | None = None) -> LLM:
    script = (g4.encode(reply, add_bos=False) if isinstance(reply, str) else reply) + [g4.eos_id]
    model = PreferringModel(config, script, g4.vocab_size, prefer or {})
    return LLM(model, g4, ChatFormat("gemma4"), "scripted-gemma4", context=CONTEXT)


def test_auto_mode_forces_a_call_the_model_writes_wrong_into_a_valid_one(config, g4):
    """The model opens a call and writes `city:Paris` (a bare word: no string) and an end of turn inside the
    call. Unconstrained that is a malformed call, returned as text with a warning; through the auto-mode
    constraint the refused tokens give way to the best allowed ones and the call parses and validates."""
    reply = "<|tool_call>call:get_weather{city:Paris,days:2}<|tool_response>"
    prefer = {52: 2.0, g4.token_to_id("}"): 2.0, 49: 2.0}  # the model's next choices: close what is open
    model = scripted(config, g4, reply, prefer)
    free = model.chat(ASK, [WEATHER], max_tokens=40, temperature=0.0)
    assert free.tool_calls == [] and free.warnings and "call:get_weather{city:Paris" in free.content
    grammars = Grammars(g4, g4.vocab_size, model.stop_ids())
    grammar = tool_call_grammar([WEATHER], g4.token_to_id, opened=True,
                                text_tokens=string_tokens(g4, grammars.tokenizer))
    model.model.step = 0
    gate = ToolCallConstraint(48, lambda: grammars.lark(grammar), g4.vocab_size)
    forced = model.chat(ASK, [WEATHER], max_tokens=40, temperature=0.0, constraint=gate)
    assert not forced.warnings and [c.name for c in forced.tool_calls] == ["get_weather"], forced
    args = json.loads(forced.tool_calls[0].arguments)
    jsonschema.validate(args, WEATHER["function"]["parameters"])
    assert forced.finish_reason == "stop" and not gate.in_call


def test_the_auto_constraint_sleeps_outside_a_call(g4):
    """Until the model opens a call, auto mode masks nothing: the row stays plain greedy (the engine's greedy
    screen and mask-free sampling apply); from `<|tool_call>` to `<tool_call|>` the grammar masks each step."""
    grammars = Grammars(g4, g4.vocab_size, [g4.eos_id])
    grammar = tool_call_grammar([WEATHER], g4.token_to_id, opened=True,
                                text_tokens=string_tokens(g4, grammars.tokenizer))
    gate = ToolCallConstraint(48, lambda: grammars.lark(grammar), g4.vocab_size)
    params = SamplingParams(max_tokens=8, temperature=0.0, constraint=gate)
    assert params.plain_greedy and not params.constrained
    gate.advance(48)
    assert params.constrained and not params.plain_greedy
    for token in g4.encode("call:get_weather{city:<|\"|>Oslo<|\"|>}<tool_call|>", add_bos=False):
        gate.advance(token)
    assert params.plain_greedy and not gate.in_call


def test_streamed_tool_call_through_the_openai_client(config, g4):
    """Auto mode on the server, streamed to the official client: the name arrives first, the arguments in
    several fragments that concatenate to the non-streamed arguments, the SDK's stream helper assembles the
    same call, and no `<|"|>` leaks anywhere; a call the model writes wrong is held to the schema."""
    import copy

    spelled = copy.deepcopy(g4.backend)
    spelled.encode_special_tokens = True  # marker text inside a string is text: spelled out, as the grammar allows
    reply = (g4.encode('<|channel>thought\nThe user wants the weather.<channel|>Let me check. <|tool_call>call:'
                       'get_weather{city:<|"|>', add_bos=False)
             + spelled.encode('Paris <b>"FR"</b> \\ {x} <tool_call|>', add_special_tokens=False).ids
             + g4.encode('<|"|>,days:12}<tool_call|><|tool_response>', add_bos=False))
    model = scripted(config, g4, reply)
    live = Live(create_app(model, ServeOptions(max_batch=1, context=CONTEXT)))
    want = {"city": 'Paris <b>"FR"</b> \\ {x} <tool_call|>', "days": 12}
    try:
        client = live.client()
        ask = dict(model="scripted-gemma4", messages=ASK, tools=[WEATHER], max_tokens=80, temperature=0)
        plain = client.chat.completions.create(**ask).choices[0]
        assert plain.finish_reason == "tool_calls" and plain.message.content == "Let me check."
        call = plain.message.tool_calls[0]
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == want
        model.model.step = 0
        chunks = list(client.chat.completions.create(stream=True, **ask))
        parts = [t for c in chunks if c.choices for t in (c.choices[0].delta.tool_calls or [])]
        assert parts[0].function.name == "get_weather" and parts[0].id and parts[0].function.arguments == ""
        assert parts[0].type == "function" and all(p.index == 0 for p in parts)
        fragments = [p.function.arguments for p in parts[1:]]
        assert len(fragments) >= 3 and all(p.function.name is None and p.id is None for p in parts[1:])
        assert "".join(fragments) == call.function.arguments
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
        raw = "".join(c.model_dump_json() for c in chunks)
        assert '<|\\"|>' not in raw and '<|"|>' not in raw and "<|tool_call>" not in raw
        model.model.step = 0
        with client.chat.completions.stream(**ask) as stream:
            final = stream.get_final_completion().choices[0].message
        assert [(c.function.name, json.loads(c.function.arguments)) for c in final.tool_calls] == [
            ("get_weather", want)]
        # The server applies the auto mode itself: a call written wrong comes back valid.
        model.model.script = g4.encode("<|tool_call>call:get_weather{city:Paris}<|tool_response>", add_bos=False)
        model.model.step, model.model.prefer[[52, 49, g4.token_to_id("}")]] = 0, 2.0
        forced = client.chat.completions.create(**ask).choices[0]
        assert forced.finish_reason == "tool_calls" and forced.message.tool_calls[0].function.name == "get_weather"
        jsonschema.validate(json.loads(forced.message.tool_calls[0].function.arguments),
                            WEATHER["function"]["parameters"])
    finally:
        live.close()
