"""Tests for gemmakit.chat.template: byte-exact Gemma 4 examples, Jinja parity with transformers, the sandbox.

Run: .venv/bin/python -m pytest tests/test_chat_template.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from gemmakit.chat.template import ChatFormat, format_value, render_gemma3, render_gemma4, render_jinja

TEMPLATES = Path(__file__).parent / "fixtures" / "templates"
Q = '<|"|>'

# The reference note's worked examples (§5.2): one tool, a system prompt and a question.
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a city.",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "description": "City name"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Temperature unit"}}}}}
ASK = [{"role": "system", "content": "You are a helpful assistant."},
       {"role": "user", "content": "What's the weather in Paris?"}]
CALL = {"id": "call_0", "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}

DECLARATION = (
    "<|tool>declaration:get_weather{description:<|\"|>Get the current weather for a city.<|\"|>,parameters:{properties:"
    "{city:{description:<|\"|>City name<|\"|>,type:<|\"|>STRING<|\"|>},unit:{description:<|\"|>Temperature unit<|\"|>,"
    "enum:[<|\"|>celsius<|\"|>,<|\"|>fahrenheit<|\"|>],type:<|\"|>STRING<|\"|>}},required:[<|\"|>city<|\"|>],"
    "type:<|\"|>OBJECT<|\"|>}}<tool|>"
)
EXAMPLE_A = (
    "<bos><|turn>system\n<|think|>You are a helpful assistant." + DECLARATION + "<turn|>\n"
    "<|turn>user\nWhat's the weather in Paris?<turn|>\n<|turn>model\n"
)
EXAMPLE_B = (
    "<bos><|turn>system\nYou are a helpful assistant." + DECLARATION + "<turn|>\n"
    "<|turn>user\nWhat's the weather in Paris?<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
)
# (C): the note shows only the tail after "…". Assumed head: (B) without its generation prompt, i.e. the same system
# turn (thinking off) and user turn, then "<|turn>model\n" opening the model turn that holds the call and the result.
EXAMPLE_C = (
    "<bos><|turn>system\nYou are a helpful assistant." + DECLARATION + "<turn|>\n"
    "<|turn>user\nWhat's the weather in Paris?<turn|>\n<|turn>model\n"
    "<|tool_call>call:get_weather{city:<|\"|>Paris<|\"|>,unit:<|\"|>celsius<|\"|>}<tool_call|>"
    "<|tool_response>response:get_weather{temperature:15,weather:<|\"|>sunny<|\"|>}<tool_response|>"
    "<|channel>thought\n<channel|>"
)
EXAMPLE_D_SMALL = "<bos><|turn>user\nHello<turn|>\n<|turn>model\n"
EXAMPLE_D_LARGE = EXAMPLE_D_SMALL + "<|channel>thought\n<channel|>"
EXAMPLE_E = "<bos><|turn>system\n<|think|><turn|>\n<|turn>user\n\n\n<|image|>\n\nDescribe this.<turn|>\n<|turn>model\n"

HF_STYLE_C = [*ASK, {"role": "assistant", "content": "", "tool_calls": [CALL],
                     "tool_responses": [{"name": "get_weather", "response": {"temperature": 15, "weather": "sunny"}}]}]
OPENAI_STYLE_C = [*ASK, {"role": "assistant", "content": None, "tool_calls": [CALL]},
                  {"role": "tool", "tool_call_id": "call_0", "content": '{"weather": "sunny", "temperature": 15}'}]
IMAGE_TURN = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this."}]}]


def template(name: str) -> str:
    return (TEMPLATES / name).read_text()


@pytest.fixture(scope="module")
def hf_tokenizer() -> PreTrainedTokenizerFast:
    """A tiny tokenizer whose only special tokens are <bos> and <eos>: apply_chat_template without the hub."""
    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": 2}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                   bos_token="<bos>", eos_token="<eos>", unk_token=None)


# ------------------------------------------------------------------------------------------ worked examples


def test_example_a_thinking_on_with_tools():
    """(A): thinking on, a system prompt and a tool declaration, generation prompt."""
    assert render_gemma4(ASK, [WEATHER_TOOL], enable_thinking=True) == EXAMPLE_A


def test_example_b_thinking_off_large_style():
    """(B): thinking off in the 26B/31B style ends the prompt with an empty thought channel."""
    assert render_gemma4(ASK, [WEATHER_TOOL], empty_thought_when_off=True) == EXAMPLE_B


def test_example_c_tool_result_continues_the_model_turn():
    """(C): HF-style tool_calls + tool_responses and the OpenAI tool-message form give the same bytes."""
    assert render_gemma4(HF_STYLE_C, [WEATHER_TOOL], empty_thought_when_off=True) == EXAMPLE_C
    assert render_gemma4(OPENAI_STYLE_C, [WEATHER_TOOL], empty_thought_when_off=True) == EXAMPLE_C


def test_example_d_plain_user_turn_both_styles():
    """(D): no system turn without a system message, tools or thinking; the two thinking-off styles."""
    hello = [{"role": "user", "content": "Hello"}]
    assert render_gemma4(hello) == EXAMPLE_D_SMALL
    assert render_gemma4(hello, empty_thought_when_off=True) == EXAMPLE_D_LARGE


def test_example_e_image_with_thinking():
    """(E): thinking on opens a system turn by itself; an image part becomes a padded placeholder."""
    assert render_gemma4(IMAGE_TURN, enable_thinking=True) == EXAMPLE_E


def test_thinking_off_styles_through_chat_format():
    """ChatFormat selects E2B-style (nothing) or 31B-style (empty thought) prompts; thinking on ignores the flag."""
    hello = [{"role": "user", "content": "Hello"}]
    assert ChatFormat("gemma4").render(hello) == EXAMPLE_D_SMALL
    assert ChatFormat("gemma4", empty_thought_when_off=True).render(hello) == EXAMPLE_D_LARGE
    thinking = ChatFormat("gemma4", empty_thought_when_off=True).render(hello, enable_thinking=True)
    assert thinking == "<bos><|turn>system\n<|think|><turn|>\n" + EXAMPLE_D_SMALL.removeprefix("<bos>")


def test_earlier_thoughts_stripped_and_text_trimmed():
    """Earlier model thoughts are cut (reasoning fields too) and every text is trimmed."""
    chat = [{"role": "user", "content": "  Hi \n"},
            {"role": "assistant", "content": "<|channel>thought\nhmm<channel|>  Hello!  ", "reasoning": "secret"},
            {"role": "user", "content": [{"type": "text", "text": " Listen "}, {"type": "audio"}]}]
    expected = ("<bos><|turn>user\nHi<turn|>\n<|turn>model\nHello!<turn|>\n"
                "<|turn>user\nListen<|audio|><turn|>\n<|turn>model\n")
    assert render_gemma4(chat) == expected
    assert render_gemma4(chat, add_generation_prompt=False) == expected.removesuffix("<|turn>model\n")


def test_tool_round_trip_then_answer_stays_in_one_turn():
    """Calls, results and the final answer share one model turn, closed once by <turn|>."""
    chat = [*OPENAI_STYLE_C, {"role": "assistant", "content": "It is 15 °C and sunny."},
            {"role": "user", "content": "Thanks"}]
    out = render_gemma4(chat, [WEATHER_TOOL])
    assert out.endswith("<tool_response|>It is 15 °C and sunny.<turn|>\n<|turn>user\nThanks<turn|>\n<|turn>model\n")
    assert out.count("<|turn>model") == 2


def test_format_value_grammar():
    """format_value: quoted strings, bare numbers/booleans/null, sorted bare keys, arrays, no spaces."""
    value = {"b": [1, 2.5, True, None], "A": {"z": "x y", "c": False}, "n": -3}
    assert format_value(value) == f"{{A:{{c:false,z:{Q}x y{Q}}},b:[1,2.5,true,null],n:-3}}"
    assert format_value("") == Q + Q
    assert format_value([]) == "[]"


def test_tool_schema_nested_objects_and_arrays():
    """Nested objects, arrays of objects and nullable types are declared with sorted, upper-cased fields."""
    tool = {"type": "function", "function": {"name": "f", "description": "d", "parameters": {
        "type": "object", "properties": {
            "tags": {"type": "array", "items": {"type": "string"}},
            "where": {"type": "object", "description": "place", "required": ["x"],
                      "properties": {"x": {"type": ["number", "null"], "nullable": True}}}}}}}
    expected = (f"declaration:f{{description:{Q}d{Q},parameters:{{properties:{{"
                f"tags:{{items:{{type:{Q}STRING{Q}}},type:{Q}ARRAY{Q}}},"
                f"where:{{description:{Q}place{Q},properties:{{x:{{nullable:true,type:{Q}NUMBER{Q}}}}},"
                f"required:[{Q}x{Q}],type:{Q}OBJECT{Q}}}}},type:{Q}OBJECT{Q}}}}}")
    assert f"<|tool>{expected}<tool|>" in render_gemma4([{"role": "user", "content": "x"}], [tool])


def test_gemma3_folds_system_into_first_user_turn():
    """Gemma 3: the system text and a blank line open the first user turn; assistant becomes model."""
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi "},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": [{"type": "image"}]}]
    assert render_gemma3(chat) == ("<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
                                   "<start_of_turn>model\nHello<end_of_turn>\n"
                                   "<start_of_turn>user\n<start_of_image><end_of_turn>\n<start_of_turn>model\n")


# ------------------------------------------------------------------------------------------ Jinja parity

GEMMA4_CASES = [
    (ASK, [WEATHER_TOOL], {"enable_thinking": True}),
    (ASK, [WEATHER_TOOL], {"enable_thinking": False, "empty_thought_when_off": True}),
    (HF_STYLE_C, [WEATHER_TOOL], {"empty_thought_when_off": True}),
    ([*ASK, {"role": "assistant", "tool_calls": [CALL]},
      {"role": "tool", "name": "get_weather", "content": {"temperature": 15.5, "weather": "sunny"}},
      {"role": "assistant", "content": "<|channel>thought\nok<channel|>Sunny, 15.5 °C."},
      {"role": "user", "content": "And tomorrow?"}], [WEATHER_TOOL], {"enable_thinking": True}),
    ([*ASK, {"role": "assistant", "tool_calls": [CALL, {**CALL, "id": "call_1"}]},
      {"role": "tool", "tool_call_id": "call_1", "content": "rain"},
      {"role": "tool", "content": {"Zeta": [1, {"k": None}], "alpha": -2.5e-07}}], None, {}),
    (IMAGE_TURN, None, {"enable_thinking": True}),
    ([{"role": "developer", "content": " Be terse. "}, {"role": "user", "content": "Hi"},
      {"role": "assistant", "content": "Hey", "reasoning": "r"}, {"role": "user", "content": "Bye"}], None, {}),
]
GEMMA3_CASES = [
    ([{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "Hi"}], None, {}),
    ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " What is it? "}]},
      {"role": "assistant", "content": "A cat."}, {"role": "user", "content": "Sure?"}], None, {}),
]
FEATURE_CASES = [
    (ASK, [WEATHER_TOOL], {}),
    ([{"role": "user", "content": "a"}, {"role": "skip", "content": "b"},
      {"role": "assistant", "content": "c \"q\"", "reasoning_content": "t"}, {"role": "stop", "content": "d"},
      {"role": "user", "content": "never shown"}], None, {"mood": "calm"}),
    ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}], None, {}),
]
CASES = ([("gemma4.jinja", *case) for case in GEMMA4_CASES] + [("gemma3.jinja", *case) for case in GEMMA3_CASES]
         + [("features.jinja", *case) for case in FEATURE_CASES])


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize(("name", "messages", "tools", "kwargs"), CASES)
def test_render_jinja_matches_transformers(hf_tokenizer, name, messages, tools, kwargs, add_generation_prompt):
    """render_jinja gives exactly what transformers' apply_chat_template(tokenize=False) gives."""
    expected = hf_tokenizer.apply_chat_template(messages, tools=tools, chat_template=template(name), tokenize=False,
                                                add_generation_prompt=add_generation_prompt, **kwargs)
    rendered = render_jinja(template(name), messages, tools, add_generation_prompt=add_generation_prompt, **kwargs)
    assert rendered == expected


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize(("messages", "tools", "kwargs"), GEMMA4_CASES)
def test_own_gemma4_template_matches_builtin(messages, tools, kwargs, add_generation_prompt):
    """The Gemma 4 fixture template through render_jinja and the built-in renderer agree byte for byte."""
    rendered = render_jinja(template("gemma4.jinja"), messages, tools, add_generation_prompt=add_generation_prompt,
                            **kwargs)
    assert rendered == render_gemma4(messages, tools, add_generation_prompt=add_generation_prompt, **kwargs)


@pytest.mark.parametrize("messages", [messages for messages, _, _ in GEMMA3_CASES])
def test_own_gemma3_template_matches_builtin(messages):
    """The Gemma 3 fixture template and the built-in Gemma 3 renderer agree."""
    assert render_jinja(template("gemma3.jinja"), messages) == render_gemma3(messages)


def test_chat_format_prefers_the_checkpoint_template():
    """ChatFormat renders with the checkpoint's template when it has one, passing enable_thinking through."""
    fmt = ChatFormat("gemma4", template=template("gemma4.jinja"))
    assert fmt.render(ASK, [WEATHER_TOOL], enable_thinking=True) == EXAMPLE_A
    assert fmt.stop_strings == ("<turn|>", "<|tool_response>", "<eos>")


def test_strftime_now_and_reasoning_alias():
    """strftime_now gives today's date; `reasoning` reaches templates as reasoning_content, as in transformers."""
    out = render_jinja("{{ strftime_now('%Y') }}|{{ messages[0].reasoning_content }}",
                       [{"role": "assistant", "content": "", "reasoning": "why"}])
    year, reasoning = out.split("|")
    assert int(year) >= 2024 and reasoning == "why"


# ------------------------------------------------------------------------------------------ BOS

def all_renderings() -> list[str]:
    hello = [{"role": "user", "content": "Hello"}]
    out = [render_gemma4(m, t, **k) for m, t, k in GEMMA4_CASES] + [render_gemma3(m) for m, _, _ in GEMMA3_CASES]
    out += [render_jinja(template(name), m, t, **k) for name, m, t, k in CASES]
    out += [ChatFormat(f).render(hello) for f in ("gemma3", "gemma4")]
    return out


def test_exactly_one_bos():
    """Every renderer starts with exactly one <bos> and never writes a second."""
    for rendered in all_renderings():
        assert rendered.startswith("<bos>") and rendered.count("<bos>") == 1, rendered


# ------------------------------------------------------------------------------------------ sandbox

@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ messages[0]['__class__'] }}",
    "{{ messages.append(1) }}",
    "{% set ns = namespace() %}{% set ns._secret = 1 %}",
    "{{ namespace(__dict__=1) }}",
])
def test_sandbox_blocks_escapes(source):
    """Dunder access, mutation and underscore namespace names fail as ValueError (a SecurityError inside)."""
    with pytest.raises(ValueError, match="SecurityError"):
        render_jinja(source, [{"role": "user", "content": "x"}])


def test_template_errors_become_value_errors():
    """raise_exception, syntax errors and runtime errors in a template all surface as ValueError."""
    hi = [{"role": "user", "content": "Hi"}]
    with pytest.raises(ValueError, match="turns must alternate"):
        render_jinja(template("gemma3.jinja"), [*hi, *hi])
    with pytest.raises(ValueError, match="TemplateSyntaxError"):
        render_jinja("{% if %}", hi)
    with pytest.raises(ValueError, match="TypeError"):
        render_jinja("{{ 1 + 'a' }}", hi)


# ------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize(("messages", "match"), [
    ([], "messages is empty"),
    ([{"role": "robot", "content": "x"}], "unknown role 'robot'"),
    ([{"content": "x"}], "unknown role None"),
    ([{"role": "user", "content": "x"}, {"role": "system", "content": "y"}], "must be the first message"),
    ([{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}], "must follow an assistant message"),
    ([{"role": "user", "content": 3}], "content must be a str or a list"),
    ([{"role": "user", "content": [{"type": "pdf"}]}], "unsupported content part"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}], "not valid JSON"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}], "JSON object"),
    ([{"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]}], "needs"),
    ([{"role": "assistant", "tool_calls": [CALL]}, {"role": "tool", "content": "a"},
      {"role": "tool", "content": "b"}], "matches no tool call"),
])
def test_gemma4_bad_input(messages, match):
    """The built-in Gemma 4 renderer says what to fix for malformed conversations."""
    with pytest.raises(ValueError, match=match):
        render_gemma4(messages)


def test_other_bad_input():
    """Gemma 3 limits, bad tools, unknown families and unwritable values are ValueErrors."""
    hi = [{"role": "user", "content": "Hi"}]
    cases = [
        (lambda: render_gemma3(hi, [WEATHER_TOOL]), "no tool-calling format"),
        (lambda: render_gemma3([*hi, *hi]), "must alternate"),
        (lambda: render_gemma3([{"role": "system", "content": "s"}]), "add a user message"),
        (lambda: render_gemma3([*hi, {"role": "tool", "content": "x"}]), "must alternate"),
        (lambda: ChatFormat("gemma3").render(hi, enable_thinking=True), "no thinking mode"),
        (lambda: ChatFormat("gemma5"), "unknown chat family"),
        (lambda: render_gemma4(hi, [{"type": "function", "function": {"description": "x"}}]), "has no name"),
        (lambda: render_jinja("{{ 1 }}", []), "messages is empty"),
        (lambda: render_jinja("{{ 1 }}", hi, [print]), "tools must be"),
        (lambda: format_value(float("nan")), "finite"),
        (lambda: format_value({1, 2}), "cannot write a set"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()


def test_json_string_arguments_equal_dict_arguments():
    """Tool-call arguments given as a JSON string render like the same dict."""
    as_text = {**CALL, "function": {**CALL["function"], "arguments": json.dumps(CALL["function"]["arguments"])}}
    chat = [*ASK, {"role": "assistant", "tool_calls": [as_text]}]
    assert render_gemma4(chat) == render_gemma4([*ASK, {"role": "assistant", "tool_calls": [CALL]}])
