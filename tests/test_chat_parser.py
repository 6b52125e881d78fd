"""Tests for gemmakit.chat.parser: one-shot parsing, chunk-split invariance, the tool value syntax.

Run: .venv/bin/python -m pytest tests/test_chat_parser.py -q
"""

import json

import pytest

from gemmakit.chat.parser import (
    MARKERS,
    TOOL_CLOSE,
    TOOL_OPEN,
    ParsedMessage,
    StreamParser,
    parse,
    parse_tool_call,
    parse_value,
)
from gemmakit.chat.tool_grammar import tool_call_grammar

Q = '<|"|>'  # Gemma's string delimiter

WEATHER = f"<|tool_call>call:get_weather{{city:{Q}Paris{Q},unit:{Q}celsius{Q}}}<tool_call|>"
NESTED = (
    f"<|tool_call>call:search{{filters:{{limit:10,tags:[{Q}a,b{Q},{Q}{{x}}{Q}]}},"
    f'query:{Q}say "hi" {{now}}: ok,\nline2 \\path{Q}}}<tool_call|>'
)
NESTED_ARGS = {"filters": {"limit": 10, "tags": ["a,b", "{x}"]}, "query": 'say "hi" {now}: ok,\nline2 \\path'}
WEATHER_ARGS = {"city": "Paris", "unit": "celsius"}

# (id, family, text, content, reasoning, [(tool name, args)], number of warnings)
CASES = [
    ("plain", "gemma4", "Hello, world! a < b, x<y and <b>bold</b> <|almost", None, "", [], 0),
    ("thought", "gemma4", "<|channel>thought\nLet me think.\nOK.<channel|>The answer is 4.<turn|>",
     "The answer is 4.", "Let me think.\nOK.", [], 0),
    ("empty_thought", "gemma4", "<|channel>thought\n<channel|>Hi!<turn|>", "Hi!", "", [], 0),
    ("name_without_newline", "gemma4", "<|channel>thought<channel|>Hi", "Hi", "", [], 0),
    ("nested_tool_call", "gemma4", NESTED, "", "", [("search", NESTED_ARGS)], 0),
    ("two_tool_calls", "gemma4",
     f"First.{WEATHER} and {NESTED}<|tool_response>",
     "First. and ", "", [("get_weather", WEATHER_ARGS), ("search", NESTED_ARGS)], 0),
    ("content_tool_call", "gemma4", f"Let me check.{WEATHER}<|tool_response>", "Let me check.", "",
     [("get_weather", WEATHER_ARGS)], 0),
    ("thought_tool_call", "gemma4", f"<|channel>thought\nNeed weather.<channel|>{WEATHER}<|tool_response>",
     "", "Need weather.", [("get_weather", WEATHER_ARGS)], 0),
    ("malformed_string", "gemma4", f"<|tool_call>call:f{{a:{Q}x}}<tool_call|>after",
     f"<|tool_call>call:f{{a:{Q}x}}<tool_call|>after", "", [], 1),
    ("malformed_braces", "gemma4", "A<|tool_call>call:f{a:{b:1}<tool_call|>B",
     "A<|tool_call>call:f{a:{b:1}<tool_call|>B", "", [], 1),
    ("malformed_between_good", "gemma4", f"{WEATHER}<|tool_call>call:g{{x:yes}}<tool_call|>{WEATHER}",
     "<|tool_call>call:g{x:yes}<tool_call|>", "", [("get_weather", WEATHER_ARGS)] * 2, 1),
    ("unclosed_thought", "gemma4", "<|channel>thought\nstill thinking <|cha", "", "still thinking <|cha", [], 0),
    ("unclosed_tool_call", "gemma4", "Sure.<|tool_call>call:f{a:1", "Sure.<|tool_call>call:f{a:1", "", [], 1),
    ("tool_call_cut_by_end", "gemma4", "<|tool_call>call:f{<turn|>more", "<|tool_call>call:f{", "", [], 1),
    ("after_end_ignored", "gemma4", "Done.<turn|>\n<|turn>user\nmore<|channel>", "Done.", "", [], 0),
    ("eos_ends", "gemma4", "Done.<eos>junk", "Done.", "", [], 0),
    ("dropped_markers", "gemma4", "<bos>Hi<|turn> there<|think|>!<channel|><tool_call|>", "Hi there!", "", [], 0),
    ("gemma3", "gemma3", "<bos>Hi <|channel>there<end_of_turn>\n<start_of_turn>user", "Hi <|channel>there", "",
     [], 0),
    ("gemma3_plain", "gemma3", "a < b <end_of_tur", None, "", [], 0),
]  # fmt: skip
IDS = [case[0] for case in CASES]


def _ids(index: int) -> str:
    return f"call_{index}"


def _stream(text: str, chunks: list[str], family: str) -> ParsedMessage:
    """Feed `chunks`; check the deltas add up and never run ahead of the one-shot answer."""
    final = parse(text, family, make_id=_ids)
    parser = StreamParser(family, make_id=_ids)
    content = reasoning = ""
    calls = []
    for chunk in chunks:
        delta = parser.feed(chunk)
        content, reasoning = content + delta.content, reasoning + delta.reasoning
        calls += delta.tool_calls
        # What was emitted is never taken back: a held-back partial marker cannot leak.
        assert final.content.startswith(content) and final.reasoning.startswith(reasoning)
    delta = parser.finish()
    assert (content + delta.content, reasoning + delta.reasoning) == (final.content, final.reasoning)
    assert calls + delta.tool_calls == final.tool_calls
    return parser.message


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_one_shot(case):
    """parse() splits each table text into the expected content, reasoning, calls and warnings."""
    _, family, text, content, reasoning, calls, n_warnings = case
    message = parse(text, family, make_id=_ids)
    assert message.content == (text if content is None else content)
    assert message.reasoning == reasoning
    assert [(c.name, json.loads(c.arguments)) for c in message.tool_calls] == calls
    assert [c.id for c in message.tool_calls] == [_ids(i) for i in range(len(calls))]
    assert len(message.warnings) == n_warnings


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_every_two_chunk_split(case):
    """Cutting the text in two at any point gives the one-shot result."""
    _, family, text, *_ = case
    final = parse(text, family, make_id=_ids)
    for cut in range(len(text) + 1):
        assert _stream(text, [text[:cut], text[cut:]], family) == final, f"cut at {cut}"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_one_character_at_a_time(case):
    """Feeding one character at a time gives the one-shot result."""
    _, family, text, *_ = case
    assert _stream(text, list(text), family) == parse(text, family, make_id=_ids)


def test_partial_marker_is_held_back():
    """A chunk ending inside a marker emits only the text before it."""
    parser = StreamParser()
    assert parser.feed("Hi <|tool_").content == "Hi "
    assert parser.feed("call>call:f{").content == ""
    assert parser.feed('x:<|"').tool_calls == []
    assert parser.feed('|>a<|"|>}<tool_call|>').tool_calls[0].name == "f"


def test_tool_call_emitted_when_closed():
    """A call comes out with the chunk that completes `<tool_call|>`, not later."""
    parser = StreamParser()
    deltas = [parser.feed(ch) for ch in f"ok{WEATHER}more"]
    emitted_at = [i for i, d in enumerate(deltas) if d.tool_calls]
    assert emitted_at == [len("ok" + WEATHER) - 1]


def test_in_thought_prompt():
    """With the thought channel opened by the prompt, text up to `<channel|>` is reasoning."""
    parser = StreamParser(in_thought=True)
    parser.feed("pondering<channel|>answer<turn|>")
    parser.finish()
    assert (parser.message.reasoning, parser.message.content) == ("pondering", "answer")


def test_default_ids_unique():
    """Without make_id, calls get distinct "call_" ids."""
    calls = parse(WEATHER + WEATHER).tool_calls
    assert all(c.id.startswith("call_") for c in calls) and calls[0].id != calls[1].id


def test_bad_family_and_feed_after_finish():
    """An unknown family and feeding a finished parser are errors, said clearly."""
    with pytest.raises(ValueError, match="unknown family"):
        StreamParser("gemma2")
    parser = StreamParser()
    parser.finish()
    with pytest.raises(RuntimeError):
        parser.feed("x")


def test_markers_start_with_single_angle():
    """Hold-back relies on every marker having one "<", at its start."""
    for markers in MARKERS.values():
        assert all(m.startswith("<") and m.count("<") == 1 for m in markers)


@pytest.mark.parametrize(
    "text, value",
    [
        ("0", 0), ("42", 42), ("-7", -7), ("3.25", 3.25), ("-0.5", -0.5), ("1e3", 1000.0), ("2.5E-2", 0.025),
        ("-1.5e+2", -150.0), ("true", True), ("false", False), ("null", None), ("None", None),
        (f"{Q}{Q}", ""), (f"{Q}a, b: {{c}}\n[d]{Q}", "a, b: {c}\n[d]"), ("[]", []), ("{}", {}),
        (f" [ 1 , {Q}x{Q} , [true, null] , {{a: {{b: []}}}} ] ", [1, "x", [True, None], {"a": {"b": []}}]),
        (f"{{{Q}quoted key{Q}:1,bare_key.v-2:{Q}v{Q}}}", {"quoted key": 1, "bare_key.v-2": "v"}),
    ],
)  # fmt: skip
def test_parse_value(text, value):
    """Gemma's value syntax maps to the expected Python value and type."""
    parsed = parse_value(text)
    assert parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize(
    "text",
    ["", "{", "}", "[1,]", "[1 2]", "{a}", "{a:}", "{a:1,}", "yes", "truex", f"{Q}open", "1 2", "-", "{:1}",
     "[" * 5000 + "]" * 5000],
)  # fmt: skip
def test_parse_value_rejects(text):
    """Malformed values raise ValueError, nothing else."""
    with pytest.raises(ValueError):
        parse_value(text)


def test_parse_tool_call():
    """A call body gives its name and arguments; the arguments round-trip through JSON."""
    name, args = parse_tool_call(NESTED[len("<|tool_call>") : -len("<tool_call|>")])
    assert name == "search" and args == NESTED_ARGS
    assert json.loads(json.dumps(args)) == NESTED_ARGS
    assert parse_tool_call("call:noop{}") == ("noop", {})


@pytest.mark.parametrize("body", ["", "noop{}", "call:{}", "call:f", "call:f[1]", "call:f{}x", "call:f g{}"])
def test_parse_tool_call_rejects(body):
    """Bodies that are not `call:NAME{...}` raise ValueError."""
    with pytest.raises(ValueError):
        parse_tool_call(body)


def _vocabulary(extra_special: list[str]):
    """The real 270M vocabulary, plus `extra_special` as single special tokens (the way a Gemma 4 vocabulary
    holds its markers), as a `tokenizers` backend and its llguidance view."""
    import llguidance
    import tokenizers

    from gemmakit.checkpoints import resolve
    from gemmakit.tokenizer import Tokenizer

    path = resolve(None)
    if not path.exists():
        pytest.skip("the default model package is not installed")
    backend = tokenizers.Tokenizer.from_str(Tokenizer.from_gguf(path).backend.to_str())
    backend.add_special_tokens(extra_special)
    vocab = backend.get_vocab_size(with_added_tokens=True)
    return backend, llguidance.LLTokenizer(backend.to_str(), n_vocab=vocab, eos_token=[1], slices=[])


@pytest.mark.parametrize("special", [False, True])
def test_tool_call_grammar_accepts_what_the_parser_reads(special):
    """The grammar behind tool_choice accepts a call written in Gemma 4's syntax (markers spelled out, or
    single special tokens), and that same text parses back to the call; another tool's name is refused."""
    import llguidance

    backend, lt = _vocabulary([TOOL_OPEN, TOOL_CLOSE, Q] if special else [])
    text = (f"{TOOL_OPEN}call:get_weather{{city:{Q}Paris, FR{Q},days:2,opts:{{metric:true,tags:[1,-2.5e3]}}}}"
            f"{TOOL_CLOSE}")
    grammar = llguidance.LLMatcher.grammar_from_lark(tool_call_grammar(
        ["get_weather", "get_time"], backend.token_to_id if special else lambda t: None))
    ids = backend.encode(text, add_special_tokens=False).ids
    assert (len(ids) == 37) == special  # 48 when the markers are spelled out, 37 as single tokens
    m = llguidance.LLMatcher(lt, grammar)
    assert m.try_consume_tokens(ids) == len(ids) and m.is_accepting()
    assert parse_tool_call(text[len(TOOL_OPEN):-len(TOOL_CLOSE)]) == (
        "get_weather", {"city": "Paris, FR", "days": 2, "opts": {"metric": True, "tags": [1, -2500.0]}})
    bad = backend.encode(text.replace("get_weather", "rm_rf"), add_special_tokens=False).ids
    assert llguidance.LLMatcher(lt, grammar).try_consume_tokens(bad) < len(bad)
