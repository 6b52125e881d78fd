"""`POST /v1/responses` (serve/responses.py) through the official `openai` SDK and the OpenAI Agents SDK.

The transport runs on `gemmakit serve` itself (a subprocess on the embedded 270M, started once for the module):
plain, instructions, streaming, previous_response_id, structured output, errors. Exact tool-call and thinking
behaviour runs in-process on a scripted Gemma 4 model that answers each prompt from a script picked by what the
prompt holds, and remembers every prompt it was given, so a test can read what a turn really sent the model.
Run: .venv/bin/python -m pytest tests/test_serve_responses.py
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
import torch

from gemmakit.serve.app import ServeOptions, create_app
from tests.helpers import running_server
from tests.live import CAPITAL, CONTEXT, Live

pytestmark = pytest.mark.slow

QUESTION = CAPITAL[0]["content"]


# --- the real server, on the 270M -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(default_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("responses") / "serve.log"
    with running_server(["--context", str(CONTEXT), "--max-batch", "2", "--responses-store", "2",
                         "--log-level", "warning"], log) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        yield url, client, client.models.list().data[0].id


def test_create_answers_as_chat_completions_do(served):
    """The same prompt and sampling as a chat completion: the same answer and token counts, in Responses shape."""
    _, client, name = served
    r = client.responses.create(model=name, input=QUESTION, max_output_tokens=12, temperature=0)
    chat = client.chat.completions.create(model=name, messages=CAPITAL, max_tokens=12, temperature=0)
    assert r.object == "response" and r.id.startswith("resp_") and r.status == "completed" and r.model == name
    assert r.output_text == chat.choices[0].message.content and "Paris" in r.output_text
    [message] = r.output
    assert message.type == "message" and message.role == "assistant" and message.status == "completed"
    assert message.content[0].type == "output_text" and message.content[0].annotations == []
    assert (r.usage.input_tokens, r.usage.output_tokens) == (chat.usage.prompt_tokens, chat.usage.completion_tokens)
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.usage.output_tokens_details.reasoning_tokens == 0


def test_instructions_are_the_system_message_and_a_cut_is_incomplete(served):
    _, client, name = served
    system = "Answer with one word."
    told = client.responses.create(model=name, instructions=system, input=QUESTION, max_output_tokens=12,
                                   temperature=0)
    chat = client.chat.completions.create(model=name, messages=[{"role": "system", "content": system}, *CAPITAL],
                                          max_tokens=12, temperature=0)
    assert told.instructions == system and told.output_text == chat.choices[0].message.content
    assert told.usage.input_tokens == chat.usage.prompt_tokens
    cut = client.responses.create(model=name, input=QUESTION, max_output_tokens=3, temperature=0)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    assert cut.usage.output_tokens == 3 and cut.output[0].status == "incomplete"


def test_stream_sends_the_events_in_order(served):
    url, client, name = served
    plain = client.responses.create(model=name, input=QUESTION, max_output_tokens=12, temperature=0)
    with client.responses.stream(model=name, input=QUESTION, max_output_tokens=12, temperature=0) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * len(deltas),
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    item_id = events[2].item.id
    assert all((e.item_id, e.output_index, e.content_index) == (item_id, 0, 0) for e in deltas)
    assert "".join(e.delta for e in deltas) == final.output_text == plain.output_text
    assert events[-1].response.id == events[0].response.id == final.id and final.status == "completed"
    assert final.usage.output_tokens == plain.usage.output_tokens
    assert client.responses.retrieve(final.id).output_text == final.output_text  # kept as a plain one is
    # On the wire: each event is named on an `event:` line as well as in its data, as OpenAI sends them.
    with httpx.stream("POST", url + "/v1/responses", json={"input": QUESTION, "max_output_tokens": 4,
                                                           "stream": True, "temperature": 0},  # greedy: it
                      timeout=60) as raw:  # runs to max_output_tokens, where a sampled answer may end first
        lines = [x for x in raw.iter_lines() if x]
    assert raw.headers["content-type"].startswith("text/event-stream")
    pairs = zip(lines[::2], lines[1::2], strict=True)
    named = [(a[len("event: "):], json.loads(b[len("data: "):])["type"]) for a, b in pairs]
    assert all(a == b for a, b in named) and named[-1][0] == "response.incomplete"


def test_previous_response_id_continues_the_conversation(served):
    """The second turn's prompt is the first turn and its answer, then the new input: the same prompt (token
    count and answer) as sending the whole conversation statelessly. Kept responses can be read and deleted."""
    _, client, name = served
    first = client.responses.create(model=name, input=QUESTION, max_output_tokens=6, temperature=0)
    follow = "And the capital of Italy?"
    second = client.responses.create(model=name, previous_response_id=first.id, input=follow,
                                     max_output_tokens=6, temperature=0)
    whole = client.responses.create(model=name, store=False, max_output_tokens=6, temperature=0, input=[
        {"role": "user", "content": QUESTION}, {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": follow}])
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens == whole.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    assert second.output_text == whole.output_text
    assert client.responses.retrieve(first.id).output_text == first.output_text
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(whole.id)  # store: false
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError) as gone:
        client.responses.create(model=name, previous_response_id=first.id, input=follow, max_output_tokens=4)
    assert gone.value.body["param"] == "previous_response_id"


def test_store_is_bounded(served):
    """--responses-store 2: the third kept response pushes out the first."""
    _, client, name = served
    ids = [client.responses.create(model=name, input=f"Count to {i}.", max_output_tokens=1).id for i in range(3)]
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(ids[0])
    assert [client.responses.retrieve(i).id for i in ids[1:]] == ids[1:]


def test_json_schema_format_gives_valid_json(served):
    _, client, name = served
    schema = {"type": "object", "properties": {"country": {"enum": ["France", "Germany", "Italy"]}},
              "required": ["country"], "additionalProperties": False}
    r = client.responses.create(model=name, input="Which country is Paris in? Answer as JSON.", max_output_tokens=30,
                                temperature=0, text={"format": {"type": "json_schema", "name": "city",
                                                                "schema": schema, "strict": True}})
    value = json.loads(r.output_text)
    assert set(value) == {"country"} and value["country"] in ("France", "Germany", "Italy")
    assert r.status == "completed" and r.text.format.type == "json_schema"
    with pytest.raises(openai.BadRequestError) as bad:
        client.responses.create(model=name, input=QUESTION, text={"format": {"type": "json_schema", "name": "x",
                                                                             "schema": {"type": "no-such-type"}}})
    assert bad.value.body["param"].startswith("text.format")


@pytest.mark.parametrize("ask,param", [
    ({"input": [{"type": "web_search_call", "id": "ws_1"}]}, "input[0].type"),
    ({"input": [{"role": "wizard", "content": "hi"}]}, "input[0].role"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input[0].content[0]"),
    ({"input": [{"role": "user", "content": "hi"}, {"type": "function_call_output", "call_id": "call_x",
                                                    "output": "1"}]}, "input[1].call_id"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "not json"}]},
     "input[0].arguments"),
    ({"input": QUESTION, "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": QUESTION, "tool_choice": {"type": "file_search"}}, "tool_choice"),
    ({"input": QUESTION, "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": QUESTION, "reasoning": {"effort": "enormous"}}, "reasoning.effort"),
    ({"input": []}, "input"),
])
def test_bad_requests_name_the_item(served, ask, param):
    _, client, name = served
    with pytest.raises(openai.BadRequestError) as bad:
        client.responses.create(model=name, **ask)
    assert bad.value.body["param"] == param and bad.value.body["message"]


def test_unknown_previous_response_is_not_found(served):
    _, client, name = served
    with pytest.raises(openai.NotFoundError) as missing:
        client.responses.create(model=name, previous_response_id="resp_nope", input=QUESTION, max_output_tokens=4)
    assert "resp_nope" in missing.value.body["message"]


# --- a scripted Gemma 4 model, in-process ---------------------------------------------------------------
class PromptScripted(torch.nn.Module):
    """Stands in for the network only: answers each prompt with the script of the last (marker, reply) pair whose
    marker is in the prompt ("" matches any), one token per step; `prompts` holds every prompt it was given. A
    prompt holding `fail_on` makes the third decode step raise, as a broken forward would."""

    def __init__(self, llm, replies: list[tuple[str, str]], fail_on: str | None = None):
        super().__init__()
        self.config, self.tokenizer, self.vocab = llm.model.config, llm.tokenizer, llm.tokenizer.vocab_size
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Embedding(1, 1)
        eos = [llm.tokenizer.eos_id]
        self.replies = [(marker, llm.tokenizer.encode(reply, add_bos=False) + eos) for marker, reply in replies]
        self.prompts: list[str] = []
        self.ids: list[int] = []
        self.script, self.step, self.fail_on, self.failing = eos, 0, fail_on, False

    def forward(self, ids, input_pos=None, logits_to_keep=0, step=None, **_):
        from gemmakit.cache import Append, Extend

        if not isinstance(step, Append):  # a chunk of a prompt: the first (Prefill) or a later one (Extend)
            self.ids = (self.ids if isinstance(step, Extend) else []) + ids[0].tolist()
            text = self.tokenizer.decode(self.ids)
            if isinstance(step, Extend):
                self.prompts[-1] = text
            else:
                self.prompts.append(text)
            self.script = [s for marker, s in self.replies if marker in text][-1]
            self.step, self.failing = 0, self.fail_on is not None and self.fail_on in text
        elif self.failing and self.step == 3:
            raise RuntimeError("the forward broke")
        logits = torch.zeros(ids.shape[0], 1, self.vocab)
        logits[:, 0, self.script[min(self.step, len(self.script) - 1)]] = 100.0  # certain at any temperature
        self.step += 1
        return logits


THOUGHT = "The user wants the weather in Paris."
CALL_REPLY = (f'<|channel>thought\n{THOUGHT}<channel|>Let me check. '
              '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:2}<tool_call|><turn|>')
ANSWER = "It is 21 degrees and sunny in Paris."
TOOLS = [{"type": "function", "name": "get_weather", "description": "The weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                         "required": ["city"]}}]


def _scripted(llm, replies: list[tuple[str, str]], fail_on: str | None = None, **options
              ) -> tuple[Live, PromptScripted]:
    from gemmakit.api import LLM
    from gemmakit.chat.template import ChatFormat

    model = PromptScripted(llm, replies, fail_on)
    scripted = LLM(model, llm.tokenizer, ChatFormat("gemma4"), "scripted-gemma4", context=CONTEXT,
                   prefix_cache=False)
    return Live(create_app(scripted, ServeOptions(max_batch=1, context=CONTEXT, **options))), model


@pytest.fixture(scope="module")
def tool_server(llm):
    live, model = _scripted(llm, [("", CALL_REPLY), ("<|tool_response>", ANSWER), ("BOOM", "One two three four.")],
                            fail_on="BOOM")
    yield live, model
    live.close()


def _ask(**extra) -> dict:
    return {"model": "scripted-gemma4", "input": "Weather in Paris?", "tools": TOOLS, "reasoning": {"effort": "high"},
            **extra}


def test_reasoning_message_and_function_call_items(tool_server, llm):
    live, model = tool_server
    r = live.client().responses.create(**_ask())
    assert [i.type for i in r.output] == ["reasoning", "message", "function_call"]
    reasoning, message, call = r.output
    assert reasoning.content[0].type == "reasoning_text" and reasoning.content[0].text == THOUGHT
    assert reasoning.summary == [] and reasoning.id.startswith("rs_")
    assert r.output_text == "Let me check." and message.status == "completed"
    assert (call.name, json.loads(call.arguments), call.status) == ("get_weather", {"city": "Paris", "days": 2},
                                                                    "completed")
    assert call.call_id.startswith("call_") and call.id.startswith("fc_") and r.status == "completed"
    assert "<|think|>" in model.prompts[-1] and "declaration:get_weather" in model.prompts[-1]
    # Reasoning tokens: those spent in the thought channel; the 270M's tokenizer spells the markers out, so
    # a marker's first pieces (held back until the marker is whole) may fall outside the count.
    thought = len(llm.tokenizer.encode(f"<|channel>thought\n{THOUGHT}<channel|>", add_bos=False))
    assert thought - 6 <= r.usage.output_tokens_details.reasoning_tokens <= thought
    off = live.client().responses.create(**_ask(reasoning={"effort": "none"}))
    assert "<|think|>" not in model.prompts[-1] and off.output[0].type == "reasoning"  # the script thinks anyway


def test_streamed_function_call_and_reasoning_events(tool_server):
    live, _ = tool_server
    with live.client().responses.stream(**_ask()) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert [e.sequence_number for e in events] == list(range(len(events)))
    by_item: dict[int, list[str]] = {}
    for e in events:
        if hasattr(e, "output_index"):
            by_item.setdefault(e.output_index, []).append(e.type)
    assert by_item[0][0] == "response.output_item.added" and by_item[0][-1] == "response.output_item.done"
    assert "response.reasoning_text.delta" in by_item[0] and "response.reasoning_text.done" in by_item[0]
    assert "response.output_text.delta" in by_item[1]
    added = next(e for e in events if e.type == "response.output_item.added" and e.output_index == 2)
    assert added.item.type == "function_call" and added.item.name == "get_weather" and added.item.call_id
    args = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert args and "".join(args) == done.arguments == final.output[2].arguments
    assert json.loads(done.arguments) == {"city": "Paris", "days": 2}
    reasoning = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert reasoning == THOUGHT == final.output[0].content[0].text
    assert [i.type for i in final.output] == ["reasoning", "message", "function_call"]
    assert events[-1].type == "response.completed" and final.output[2].call_id == added.item.call_id


def test_a_tool_loop_sends_back_the_result_and_the_reasoning(tool_server):
    """Step two sends the function_call_output back (statelessly, the whole conversation; or after
    previous_response_id, only the output): the prompt holds the call, its result and step one's thinking,
    the same prompt both ways, and the model answers from the result."""
    live, model = tool_server
    client = live.client()
    first = client.responses.create(**_ask())
    call = first.output[2]
    result = {"type": "function_call_output", "call_id": call.call_id, "output": json.dumps({"temp_c": 21})}
    items = [{"role": "user", "content": "Weather in Paris?"}, *(i.model_dump(exclude_none=True)
                                                                 for i in first.output), result]
    second = client.responses.create(**_ask(input=items))
    prompt = model.prompts[-1]
    assert second.output_text == ANSWER and second.status == "completed"
    assert "<|tool_response>" in prompt and "21" in prompt and 'call:get_weather{city:<|"|>Paris<|"|>' in prompt
    assert THOUGHT in prompt  # Gemma 4 keeps the reasoning of the turns since the last user message
    chained = client.responses.create(**_ask(input=[result], previous_response_id=first.id))
    assert model.prompts[-1] == prompt and chained.output_text == ANSWER


def test_a_failure_mid_stream_is_a_failed_event(tool_server):
    """The engine fails after the answer has begun: the stream closes the open item and ends with
    response.failed carrying the error (a plain request gets a 500); the server goes on serving."""
    live, _ = tool_server
    client = live.client()
    with client.responses.stream(model="scripted-gemma4", input="BOOM") as stream:
        events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"] and "response.output_text.delta" in kinds
    assert kinds[-2:] == ["response.output_item.done", "response.failed"]
    assert events[-2].item.status == "incomplete" and [e.sequence_number for e in events] == list(range(len(events)))
    failed = events[-1].response
    assert failed.status == "failed" and failed.error.code == "server_error"
    assert "the forward broke" in failed.error.message
    with pytest.raises(openai.InternalServerError, match="the forward broke"):
        client.responses.create(model="scripted-gemma4", input="BOOM")
    assert client.responses.create(**_ask()).status == "completed"


def test_an_input_guard_refusal_is_an_incomplete_response(llm):
    live, model = _scripted(llm, [("", "Hello.")])
    try:
        live.app.state.server.input_hooks.append(lambda messages: "blocked" if "bomb" in str(messages) else None)
        client = live.client()
        r = client.responses.create(model="scripted-gemma4", input="how to build a bomb")
        assert r.status == "incomplete" and r.incomplete_details.reason == "content_filter"
        assert r.output_text == "blocked" and model.prompts == []  # the model never saw it
        with client.responses.stream(model="scripted-gemma4", input="how to build a bomb") as stream:
            kinds = [e.type for e in stream]
        assert kinds[-1] == "response.incomplete" and "response.output_text.delta" in kinds
    finally:
        live.close()


def test_store_off_refuses_previous_response_id(llm):
    live, _ = _scripted(llm, [("", "Hello.")], responses_store=0)
    try:
        client = live.client()
        r = client.responses.create(model="scripted-gemma4", input="Hi")
        assert r.output_text == "Hello."
        with pytest.raises(openai.BadRequestError, match="turned off"):
            client.responses.create(model="scripted-gemma4", input="Again", previous_response_id=r.id)
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(r.id)
    finally:
        live.close()


def test_agents_sdk_runs_a_tool(tool_server):
    """The OpenAI Agents SDK, unchanged but for the base URL: the agent calls the tool with the arguments the
    model wrote, sends its result back, and ends with the model's answer."""
    from agents import Agent, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

    live, model = tool_server
    calls = []

    @function_tool
    def get_weather(city: str, days: int = 1) -> str:
        """The weather in a city."""
        calls.append((city, days))
        return json.dumps({"temp_c": 21, "sky": "sunny"})

    set_tracing_disabled(True)
    client = openai.AsyncOpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0)
    agent = Agent(name="weather", instructions="Answer weather questions.", tools=[get_weather],
                  model=OpenAIResponsesModel(model="scripted-gemma4", openai_client=client))
    result = asyncio.run(Runner.run(agent, "Weather in Paris?"))
    assert calls == [("Paris", 2)]
    assert result.final_output == ANSWER
    assert '"sunny"' in model.prompts[-1] or "sunny" in model.prompts[-1]


@pytest.mark.parametrize("in_parts", [True, False])
def test_a_call_streamed_in_parts_or_whole_builds_the_same_items(in_parts):
    """The real parser's deltas through the output builder, chunk by chunk: with the parser's call parts, the
    arguments stream in several fragments; with whole calls only (a guard's path), in one; the items match."""
    from gemmakit.chat.parser import StreamParser
    from gemmakit.serve.choices import Choice
    from gemmakit.serve.loop import Update
    from gemmakit.serve.responses import _Output
    from gemmakit.serve.responses_input import ResponsesRequest

    choice, out = Choice(0, StreamParser("gemma4")), _Output("resp_x", "m", ResponsesRequest(), 0)
    chunks = [CALL_REPLY[i:i + 3] for i in range(0, len(CALL_REPLY), 3)]
    for i, chunk in enumerate(chunks):
        delta = choice.feed(Update(chunk, [0], finish_reason="stop" if i == len(chunks) - 1 else None))
        if not in_parts:
            delta.call_parts = []
        out.feed(choice, delta)
    out.close("completed")
    kinds = [k for k, _ in out.events]
    fragments = [f["delta"] for k, f in out.events if k == "response.function_call_arguments.delta"]
    assert [i["type"] for i in out.items] == ["reasoning", "message", "function_call"]
    call = out.items[2]
    assert (call["name"], json.loads(call["arguments"]), call["status"]) == ("get_weather", {"city": "Paris",
                                                                                            "days": 2}, "completed")
    assert "".join(fragments) == call["arguments"] and (len(fragments) > 1) == in_parts
    assert kinds.count("response.output_item.added") == kinds.count("response.output_item.done") == 3
    # Reasoning tokens (a chunk stands for a token here): from the one that completes <|channel> to the one
    # that completes <channel|>.
    opened, closed = (len("<|channel>") - 1) // 3, (CALL_REPLY.index("<channel|>") + len("<channel|>") - 1) // 3
    assert out.reasoning_tokens == closed - opened + 1
