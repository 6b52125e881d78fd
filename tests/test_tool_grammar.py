"""Tool calls that always parse (chat/tool_grammar.py, chat/parser.py's streamed call parts, the template's
reasoning): seeded fuzzes of tool schemas and argument values through the real Gemma vocabulary.

The embedded 270M's vocabulary is Gemma 3's; `gemma4_tokenizer` renames its reserved slots to Gemma 4's markers
at Gemma 4's ids (`<|tool_call>` 48, `<|"|>` 52, ...), so every marker is one special token as in a real Gemma 4
checkpoint, and all other text tokenizes as Gemma does.

Run: .venv/bin/python -m pytest tests/test_tool_grammar.py -q
"""

from __future__ import annotations

import json
import random

import jsonschema
import numpy as np
import pytest

from gemmakit.chat.parser import _KEY, STRING_DELIM, TOOL_CLOSE, TOOL_OPEN, StreamParser, parse, parse_tool_call
from gemmakit.chat.template import ChatFormat, render_gemma4, render_jinja
from gemmakit.chat.tool_grammar import ToolCallConstraint, string_tokens, tool_call_grammar

GEMMA4_MARKERS = {46: "<|tool>", 47: "<tool|>", 48: TOOL_OPEN, 49: TOOL_CLOSE, 50: "<|tool_response>",
                  51: "<tool_response|>", 52: STRING_DELIM, 98: "<|think|>", 100: "<|channel>", 101: "<channel|>",
                  105: "<|turn>", 106: "<turn|>"}
PIECES = ["a", "Z", "7", " ", "  ", '"', "'", "\\", "\\n", "\n", "\t", "<", ">", "|", "<|", "|>", '<|"', '"|>',
          "<tool_call|>", "<turn|>", "<eos>", "<|channel>", "<b>", "</b>", "{", "}", "[", "]", ",", ":", "日本",
          "語", "😀", "é", "\u2028", "-", "0.5", "call:", "null", "true"]
WEIRD_KEYS = ["weird key", "a:b", "日本", "with-dash.x$", "Zeta", "zeta", "q\"uote", "1st"]


def gemma4_tokenizer():
    """The embedded model's tokenizer with Gemma 4's markers at Gemma 4's ids (see the module docstring)."""
    import tokenizers

    from gemmakit.checkpoints import resolve
    from gemmakit.tokenizer import Tokenizer

    path = resolve(None)
    if not path.exists():
        pytest.skip("the default model package is not installed")
    base = Tokenizer.from_gguf(path)
    spec = base.backend.to_str()
    for i, marker in GEMMA4_MARKERS.items():  # the reserved names are unique JSON strings, here and in the vocab
        spec = spec.replace(json.dumps(base.id_to_token(i)), json.dumps(marker))
    return Tokenizer(tokenizers.Tokenizer.from_str(spec), base.bos_id, base.eos_id, base.pad_id)


@pytest.fixture(scope="module")
def vocab():
    """(tokenizer, Grammars, the tokenizer that spells special-token text out, HTML-tag text tokens)."""
    import copy

    from gemmakit.constrain import Grammars

    tokenizer = gemma4_tokenizer()
    grammars = Grammars(tokenizer, tokenizer.vocab_size, [1, 106, 50])
    literal = copy.deepcopy(tokenizer.backend)
    literal.encode_special_tokens = True  # how text that spells a marker is written inside a string
    return tokenizer, grammars, literal, string_tokens(tokenizer, grammars.tokenizer)


# --- random schemas and values ----------------------------------------------------------------------------
def random_text(r: random.Random, pieces: list[str] = PIECES) -> str:
    while True:
        text = "".join(r.choice(pieces) for _ in range(r.randint(0, 6)))
        if STRING_DELIM not in text:
            return text


def literal_text(r: random.Random) -> str:
    """Text for enum and const values: fixed text, where an HTML-tag token (`<b>`) is special to llguidance, so
    the grammar takes such text spelled out only (free strings take the token too)."""
    return random_text(r, [p for p in PIECES if p not in ("<b>", "</b>")])


def random_schema(r: random.Random, depth: int = 0) -> dict:
    kinds = ["string", "integer", "number", "boolean", "null", "enum", "const", "types", "any"]
    kinds += ["array", "object", "anyOf", "nullable"] if depth < 3 else []
    kind = r.choice(kinds)
    if kind in ("string", "integer", "number", "boolean", "null"):
        return {"type": kind, "description": random_text(r)} if r.random() < 0.2 else {"type": kind}
    if kind == "enum":
        return {"enum": r.sample([literal_text(r), r.randint(-99, 99), 2.5, True, False, None, "x<y"],
                                 r.randint(1, 4))}
    if kind == "const":
        return {"const": r.choice([literal_text(r), {"a": [1, "b"], "z": None}, [1.5, "q"], -3])}
    if kind == "types":
        return {"type": r.sample(["string", "integer", "null", "boolean"], 2)}
    if kind == "any":
        return {}
    if kind == "nullable":
        return {"type": "string", "nullable": True}
    if kind == "array":
        return {"type": "array", "items": random_schema(r, depth + 1)}
    if kind == "anyOf":
        return {"anyOf": [random_schema(r, depth + 1), random_schema(r, depth + 1)]}
    return random_object(r, depth + 1)


def random_object(r: random.Random, depth: int = 0) -> dict:
    names = r.sample(["city", "days", "unit", "opts", "tags", "q", "alpha", "Beta", "x1", "note"], r.randint(0, 4))
    names += r.sample(WEIRD_KEYS, r.randint(0, 1))
    props = {n: random_schema(r, depth) for n in names}
    return {"type": "object", "properties": props, "required": [n for n in names if r.random() < 0.5]}


def random_value(r: random.Random, schema: dict, depth: int = 0):
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return r.choice(schema["enum"])
    if "anyOf" in schema:
        return random_value(r, r.choice(schema["anyOf"]), depth)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = r.choice(kind)
    if schema.get("nullable") and r.random() < 0.3:
        return None
    if kind is None:  # any value
        kind = r.choice(["string", "integer", "number", "boolean", "null"] + (["array", "object"] if depth < 3
                                                                                else []))
        schema = {"type": kind, "items": {}, "properties": {"k": {}, "weird key": {}}, "required": []}
    if kind == "string":
        return random_text(r)
    if kind == "integer":
        return r.choice([0, -1, 7, 12345678901234567890, r.randint(-10**6, 10**6)])
    if kind == "number":
        return r.choice([0.5, -2.5e-07, 1e16, -0.0, 3, r.uniform(-1e3, 1e3), 15.0])
    if kind == "boolean":
        return r.random() < 0.5
    if kind == "null":
        return None
    if kind == "array":
        return [random_value(r, schema.get("items") or {}, depth + 1) for _ in range(r.randint(0, 3))]
    props = schema.get("properties") or {}
    required = set(schema.get("required") or [])
    return {k: random_value(r, s, depth + 1) for k, s in props.items() if k in required or r.random() < 0.5}


def gemma(value, keys_sorted: bool = True) -> str:
    """`value` in Gemma's syntax as the grammar writes it: keys sorted, non-bare keys as strings."""
    if isinstance(value, str):
        return STRING_DELIM + value + STRING_DELIM
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, list):
        return "[" + ",".join(gemma(v) for v in value) + "]"
    items = sorted(value.items(), key=lambda kv: kv[0].lower()) if keys_sorted else value.items()
    return "{" + ",".join(f"{k if _KEY.fullmatch(k) else gemma(k)}:{gemma(v)}" for k, v in items) + "}"


def in_gemma_order(value):
    """`value` with every object's keys in the order Gemma writes them."""
    if isinstance(value, dict):
        return {k: in_gemma_order(v) for k, v in sorted(value.items(), key=lambda kv: kv[0].lower())}
    return [in_gemma_order(v) for v in value] if isinstance(value, list) else value


def validate(args: dict, schema: dict) -> None:
    """jsonschema's check, with OpenAPI's `nullable` (which the template shows the model) as a null type."""
    def plain(s):
        if isinstance(s, list):
            return [plain(x) for x in s]
        if not isinstance(s, dict):
            return s
        out = {k: plain(v) for k, v in s.items() if k != "nullable"}
        if s.get("nullable") is True and "type" in out:
            out["type"] = [*(out["type"] if isinstance(out["type"], list) else [out["type"]]), "null"]
        return out
    jsonschema.validate(args, plain(schema))


def tool(name: str, schema: dict) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": schema}}


def encode_call(vocab, text: str) -> list[int]:
    """Token ids of a call body + close: markers as their tokens, string text with marker text spelled out."""
    tokenizer, _, literal, _ = vocab
    ids = []
    for i, piece in enumerate(text.removesuffix(TOOL_CLOSE).split(STRING_DELIM)):
        if i:
            ids.append(52)
        if piece:
            ids += (literal if i % 2 else tokenizer.backend).encode(piece, add_special_tokens=False).ids
    return ids + [49]


def constraint_for(vocab, tools: list[dict]) -> ToolCallConstraint:
    tokenizer, grammars, _, text_tokens = vocab
    grammar = tool_call_grammar(tools, tokenizer.token_to_id, opened=True, text_tokens=text_tokens)
    return ToolCallConstraint(48, lambda: grammars.lark(grammar), tokenizer.vocab_size)


# --- (a) what the template writes, tokenized as Gemma does, is accepted ------------------------------------
def test_fuzz_valid_arguments_are_accepted_token_by_token(vocab):
    """250 random schemas with a random valid argument object each: the call text, tokenized with the real
    vocabulary, is allowed token by token (the mask holds each token) and completes the call."""
    r, cases = random.Random(29), 0
    for case in range(250):
        schema = random_object(r)
        args = random_value(r, schema)
        other = tool("other_tool", random_object(r))
        gate = constraint_for(vocab, [other, tool("get_thing", schema)])
        gate.advance(48)  # <|tool_call>
        body = f"call:get_thing{gemma(args)}{TOOL_CLOSE}"
        ids = encode_call(vocab, body)
        check_masks = case % 5 == 0  # the mask on a fifth of the cases, the matcher's own check on all
        for i, token in enumerate(ids):
            assert gate.in_call, (body, i)
            if check_masks:
                assert gate.allowed()[token], (body, i, vocab[0].decode([token]))
            gate.advance(token)
        assert not gate.in_call and gate.allowed().all()  # free again after <tool_call|>
        assert parse_tool_call(body.removesuffix(TOOL_CLOSE)) == ("get_thing", args)
        validate(args, schema)
        cases += 1
    assert cases == 250


def test_wrong_names_keys_and_types_are_refused(vocab):
    """The grammar holds the name, the declared keys, their order and types, and required keys."""
    schema = {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}, "unit": {"enum": ["c", "f"]}}}
    good = 'call:get_weather{city:<|"|>Paris<|"|>,days:3,unit:<|"|>c<|"|>}<tool_call|>'
    bad = ["call:get_wether{}<tool_call|>", 'call:get_weather{days:3}<tool_call|>',
           'call:get_weather{city:<|"|>P<|"|>,days:3.5}<tool_call|>', 'call:get_weather{city:3}<tool_call|>',
           'call:get_weather{days:3,city:<|"|>P<|"|>}<tool_call|>', 'call:get_weather{city:<|"|>P<|"|>,zip:1}'
           '<tool_call|>', 'call:get_weather{city:<|"|>P<|"|>,unit:<|"|>k<|"|>}<tool_call|>',
           'call:get_weather{city:<|"|>P<|"|>,days:007}<tool_call|>']
    for text, ok in [(good, True)] + [(b, False) for b in bad]:
        gate = constraint_for(vocab, [tool("get_weather", schema)])
        gate.advance(48)
        accepted = 0
        for token in encode_call(vocab, text):
            if not gate.allowed()[token]:
                break
            gate.advance(token)
            accepted += 1
        assert (accepted == len(encode_call(vocab, text))) == ok, text


def test_text_that_spells_the_delimiter_cannot_end_or_enter_a_string(vocab):
    """Inside a string, ordinary tokens may spell anything but `<|"|>`: the last character is refused."""
    gate = constraint_for(vocab, [tool("f", {"type": "object", "properties": {"a": {"type": "string"}}})])
    spelled = vocab[2].encode('x <|"|', add_special_tokens=False).ids
    for token in [48, *vocab[0].encode("call:f{a:", add_bos=False), 52, *spelled]:
        gate.advance(token)
    assert not gate.allowed()[vocab[0].token_to_id(">")] and gate.allowed()[52]
    assert gate.allowed()[vocab[0].token_to_id("<b>")]  # an HTML-tag token is text


# --- (b) sampling from the masks only ever makes calls that parse and validate ------------------------------
SAMPLED_SCHEMAS = [
    {"type": "object", "required": ["city"], "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                                           "unit": {"enum": ["celsius", "fahrenheit"]}}},
    {"type": "object", "properties": {"query": {"type": "string"}, "filters": {"type": "object", "required": ["tags"],
     "properties": {"tags": {"type": "array", "items": {"type": "string"}}, "limit": {"type": ["integer", "null"]},
                    "exact": {"type": "boolean"}}}}, "required": ["filters"]},
    {"type": "object", "required": ["x", "weird key"], "properties": {"x": {"type": "number"}, "weird key": {
        "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "integer"}}]}, "c": {"const": [1, "b"]}}},
    {"type": "object", "properties": {"payload": {}, "list": {"type": "array"}, "obj": {"type": "object"}}},
    {"type": "object", "required": ["rows"], "properties": {"rows": {"type": "array", "items": {
        "type": "object", "required": ["id"], "properties": {"id": {"type": "integer"}, "name": {"type": "string",
                                                                                                "nullable": True}}}}}},
    {"type": "object", "properties": {}},
]


def sample_call(gate: ToolCallConstraint, r: np.random.Generator, prefer: np.ndarray, limit: int = 60) -> list[int]:
    """Draw tokens from the gate's masks until the call closes: uniformly among the allowed tokens, with a
    pull towards closing ones (`prefer`), certain after `limit` steps, so every draw ends."""
    tokens = []
    while gate.in_call:
        allowed = gate.allowed().numpy()
        pull = np.flatnonzero(allowed[prefer])
        if len(pull) and (len(tokens) > limit or r.random() < 0.4):
            token = int(prefer[r.choice(pull)])
        else:
            token = int(r.choice(np.flatnonzero(allowed)))
        gate.advance(token)
        tokens.append(token)
        assert len(tokens) < 1000, tokens[-50:]
    return tokens


def test_fuzz_sampled_calls_parse_and_validate(vocab):
    """6 schemas x 20 draws: sampling anywhere inside the masks gives calls that parse, validate against
    their schema and stream the same arguments the parser assembles."""
    tokenizer = vocab[0]
    prefer = np.array([52, 49, *(tokenizer.token_to_id(t) for t in ("}", "]", ",", ":", "0", "true", "null"))])
    r, made = np.random.default_rng(29), 0
    tools = [tool(f"tool_{i}", s) for i, s in enumerate(SAMPLED_SCHEMAS)]
    for i, schema in enumerate(SAMPLED_SCHEMAS):
        for _ in range(20):
            gate = constraint_for(vocab, tools)
            gate.advance(48)
            prefix = tokenizer.encode(f"call:tool_{i}", add_bos=False)
            for token in prefix:
                gate.advance(token)
            text = TOOL_OPEN + tokenizer.decode(prefix + sample_call(gate, r, prefer))
            message = parse(text)
            assert not message.warnings and len(message.tool_calls) == 1, text
            call = message.tool_calls[0]
            args = json.loads(call.arguments)
            assert call.name == f"tool_{i}" and parse_tool_call(text[len(TOOL_OPEN):-len(TOOL_CLOSE)])[1] == args
            validate(args, schema)
            made += 1
    assert made == 120


# --- (c) the streamed parts, however the text is cut ----------------------------------------------------
def test_fuzz_streamed_arguments_are_the_final_json(vocab):
    """300 random calls (two per message), each cut into random chunks 5 ways (markers and `<|"|>` split
    too): the parts are the same every time, the name comes first, and each call's fragments concatenate to
    exactly its ToolCall.arguments, JSON equal to the parsed arguments."""
    r, checked = random.Random(7), 0
    for _ in range(150):
        calls = [(f"f{j}", random_value(r, random_object(r))) for j in range(2)]
        text = "Sure." + "".join(f"{TOOL_OPEN}call:{n}{gemma(a)}{TOOL_CLOSE}" for n, a in calls) + "<|tool_response>"
        final = parse(text, make_id=lambda i: f"call_{i}")
        assert [(c.name, json.loads(c.arguments)) for c in final.tool_calls] == calls and not final.warnings
        assert [c.arguments for c in final.tool_calls] == [json.dumps(in_gemma_order(a), ensure_ascii=False)
                                                           for _, a in calls]
        seen = None
        for _ in range(5):
            cuts = sorted(r.sample(range(1, len(text)), min(len(text) - 1, r.randint(1, 40))))
            parser, parts = StreamParser(make_id=lambda i: f"call_{i}"), []
            for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True):
                parts += parser.feed(text[a:b]).call_parts
            parts += parser.finish().call_parts
            assert parser.message == final
            merged = {}
            for p in parts:
                if p.name is not None:
                    assert p.index not in merged and p.arguments == "" and p.id == f"call_{p.index}"
                    merged[p.index] = [p.name, ""]
                else:
                    merged[p.index][1] += p.arguments
            assert [tuple(v) for v in merged.values()] == [(c.name, c.arguments) for c in final.tool_calls]
            assert seen is None or merged == seen
            seen = merged
            checked += 1
    assert checked == 750


def test_streamed_parts_arrive_in_fragments_and_numbers_become_json():
    """The name is sent before any argument text, argument text as it is written; Gemma's number and
    literal spellings come out as JSON."""
    parser = StreamParser(make_id=lambda i: f"c{i}")
    assert parser.feed("<|tool_call>call:lookup").call_parts == []
    first = parser.feed("{q:<|\"|>a \"b\"").call_parts
    assert [(p.id, p.name, p.arguments) for p in first] == [("c0", "lookup", ""), (None, None, '{"q": "a \\"b\\"')]
    assert parser.feed("<|\"").call_parts == []  # a delimiter cut in two is held back
    assert parser.feed("|>,n:[007,.5,1.,-2E3,True,None]}<tool_call|>").call_parts[0].arguments == (
        '", "n": [7, 0.5, 1.0, -2e3, true, null]}')
    assert json.loads(parser.message.tool_calls[0].arguments) == {"q": 'a "b"', "n": [7, 0.5, 1.0, -2000.0, True,
                                                                                      None]}


def test_a_malformed_call_keeps_todays_final_message():
    """Unconstrained, a call that breaks its syntax has streamed its name and the arguments up to the break;
    the message keeps the text with markers as content and a warning, and the next call takes the next index."""
    text = "<|tool_call>call:g{x:yes}<tool_call|><|tool_call>call:h{}<tool_call|>"
    parser = StreamParser(make_id=lambda i: f"c{i}")
    parts = parser.feed(text).call_parts + parser.finish().call_parts
    assert [(p.index, p.name, p.arguments) for p in parts] == [(0, "g", ""), (0, None, '{"x": '), (1, "h", ""),
                                                               (1, None, "{}")]
    message = parser.message
    assert message.content == "<|tool_call>call:g{x:yes}<tool_call|>" and len(message.warnings) == 1
    assert [(c.name, c.arguments, c.id) for c in message.tool_calls] == [("h", "{}", "c0")]


# --- reasoning carried across tool calls --------------------------------------------------------------------
REASONING_CHAT = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "reasoning": "old thought"},
    {"role": "user", "content": "And in Rome?"},
    {"role": "assistant", "reasoning_content": "Need the tool.", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    {"role": "assistant", "content": "Checking more.", "reasoning": "Sunny; check wind.", "tool_calls": [
        {"id": "c2", "type": "function", "function": {"name": "get_wind", "arguments": {"city": "Rome"}}}]},
    {"role": "tool", "tool_call_id": "c2", "content": "calm"},
]


def test_reasoning_after_the_last_user_message_is_sent_back():
    """Thoughts of the turn in progress go back in the official template's form; earlier ones stay out; the
    built-in renderer and the Jinja fixture agree byte for byte."""
    from tests.test_chat_template import template

    out = render_gemma4(REASONING_CHAT, enable_thinking=True)
    assert ("<|turn>model\n<|channel>thought\nNeed the tool.\n<channel|><|tool_call>call:get_weather"
            "{city:<|\"|>Rome<|\"|>}<tool_call|><|tool_response>response:get_weather{value:<|\"|>sunny<|\"|>}"
            "<tool_response|><|channel>thought\nSunny; check wind.\n<channel|><|tool_call>call:get_wind") in out
    assert "old thought" not in out and out.count("<|channel>") == 2
    for prompt in (True, False):
        assert render_jinja(template("gemma4.jinja"), REASONING_CHAT, add_generation_prompt=prompt,
                            enable_thinking=True) == render_gemma4(REASONING_CHAT, add_generation_prompt=prompt,
                                                                   enable_thinking=True)
    assert ChatFormat("gemma4").render(REASONING_CHAT[:3]).count("old thought") == 0
