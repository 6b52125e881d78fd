"""The OpenAI wire format: request bodies (validated with pydantic), sampling parameters, response objects.

Requests are checked field by field so that every bad value gets a 400 naming the parameter, in OpenAI's
error shape (`error(...)`). Unknown fields are accepted and ignored, as OpenAI-compatible servers do: clients
send extras (`user`, `metadata`, vendor options). gemmakit's own extensions follow vLLM's names: `top_k`,
`min_p`, `repetition_penalty`, `chat_template_kwargs` (`enable_thinking`).

A request is also bounded in what it can make the server do (MAX_STOP_CHARS, MAX_BIAS_ENTRIES, MAX_DEPTH and
the sampling ranges): every value that reaches the engine stays finite in float32, no stop string makes matching
slow, and nothing is nested deeper than the recursive code after it (rendering, JSON parsing, grammar
compilation) handles. Message content is a string or OpenAI's content parts: `text`, `image_url` and
`input_audio` (at most MAX_MEDIA_PARTS media parts a request; where their bytes may come from is the server's
MediaPolicy). Logprobs JSON cannot carry (-inf for a banned token) are sent as OpenAI's -9999.0.

Defaults when a request leaves sampling unset: temperature 1.0, top_p 0.95, top_k 64, Gemma's published
generation config (OpenAI's own default temperature is also 1.0).
"""

from __future__ import annotations

import math
import re
import time
import uuid
from itertools import accumulate
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gemmakit.sampling import MAX_BIAS, MAX_LOGPROBS, SamplingParams, TokenLogprobs

GEMMA_DEFAULTS = {"temperature": 1.0, "top_p": 0.95, "top_k": 64}
MAX_N = 16
ROLES = ("system", "developer", "user", "assistant", "tool")
# Bounds on what one request can make the server do (OpenAI's where it has them: 4 stop strings, 300 biased
# tokens of at most +-100). Stop strings are short markers in practice; 256 characters leaves room and keeps the
# text the engine holds back per request small. Nesting: 32 levels is deeper than any real tool schema or
# argument object, and far below what recursive rendering, JSON parsing and grammar compilation survive.
MAX_STOPS, MAX_STOP_CHARS = 4, 256
MAX_BIAS_ENTRIES = 300
MAX_DEPTH = 32
NO_LOGPROB = -9999.0  # what OpenAI reports for a token the model gives no chance (JSON has no -Infinity)
_TOKEN_ID = re.compile(r"-?[0-9]{1,10}")


def error(message: str, param: str | None = None, code: str | None = None,
          type: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: dict[str, Any] | None = None

    def sampling(self, max_tokens: int, logprobs: int | None, vocab_size: int) -> SamplingParams:
        given = {k: v for k in GEMMA_DEFAULTS if (v := getattr(self, k)) is not None}
        s = {**GEMMA_DEFAULTS, **given}
        bias, stop = self._bias(), self._stops()
        params = SamplingParams(
            max_tokens=max_tokens, temperature=s["temperature"], top_k=None if s["top_k"] in (0, -1) else s["top_k"],
            top_p=s["top_p"], min_p=self.min_p, repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty, logit_bias=bias or None,
            seed=self.seed, stop=tuple(stop), logprobs=logprobs)
        try:
            params.validate(vocab_size)
        except ValueError as e:  # its messages start with the field's name, or name logit_bias / stop ids
            first = str(e).split(" ")[0]
            raise ParamError(str(e), first if hasattr(params, first) else "logit_bias") from None
        return params

    def _bias(self) -> dict[int, float]:
        """OpenAI's rules: at most 300 entries, token-id keys, values in [-100, 100]."""
        given = self.logit_bias or {}
        if len(given) > MAX_BIAS_ENTRIES:
            raise ParamError(f"logit_bias takes at most {MAX_BIAS_ENTRIES} entries, got {len(given)}", "logit_bias")
        bias = {}
        for key, value in given.items():
            if not _TOKEN_ID.fullmatch(key):  # ASCII digits only: "²".isdigit() is True, int("²") is not
                raise ParamError(f"logit_bias keys must be token ids, got {key[:20]!r}", "logit_bias")
            if not -MAX_BIAS <= value <= MAX_BIAS:  # NaN fails too
                raise ParamError(f"logit_bias values must be in [-{MAX_BIAS:g}, {MAX_BIAS:g}], got {value} for "
                                 f"token {key}", "logit_bias")
            bias[int(key)] = value
        return bias

    def _stops(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > MAX_STOPS or any(not x or len(x) > MAX_STOP_CHARS for x in stop):
            raise ParamError(f"stop takes up to {MAX_STOPS} non-empty strings of at most {MAX_STOP_CHARS} "
                             "characters each", "stop")
        return stop

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class ChatRequest(_Request):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None

    @field_validator("messages")
    @classmethod
    def _shallow_messages(cls, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for i, m in enumerate(messages):
            check_depth(m, f"messages[{i}]")
            calls = m.get("tool_calls") if isinstance(m.get("tool_calls"), list) else []
            texts = [c["function"].get("arguments") for c in calls
                     if isinstance(c, dict) and isinstance(c.get("function"), dict)]
            for text in [*texts, m.get("content")]:
                if isinstance(text, str) and json_depth(text) > MAX_DEPTH:  # parsed as JSON when rendered
                    raise ValueError(f"messages[{i}] holds JSON nested deeper than {MAX_DEPTH} levels")
        return messages

    @field_validator("tools")
    @classmethod
    def _check_tools(cls, tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        for i, tool in enumerate(tools or []):
            fn = tool.get("function")
            if tool.get("type", "function") != "function" or not isinstance(fn, dict):
                raise ValueError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}")
            if not isinstance(fn.get("name"), str) or not fn["name"]:
                raise ValueError(f"tools[{i}].function.name must be a non-empty string")
            if not isinstance(fn.get("parameters") or {}, dict):
                raise ValueError(f"tools[{i}].function.parameters must be a JSON-schema object")
            check_depth(tool, f"tools[{i}]")
        return tools

    @field_validator("tool_choice")
    @classmethod
    def _check_tool_choice(cls, choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        named = isinstance(choice, dict) and choice.get("type") == "function" and isinstance(
            choice.get("function"), dict) and isinstance(choice["function"].get("name"), str)
        if choice is not None and choice not in ("none", "auto", "required") and not named:
            raise ValueError("tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': "
                             "{'name': ...}}")
        return choice

    @field_validator("response_format")
    @classmethod
    def _shallow_format(cls, fmt: dict[str, Any] | None) -> dict[str, Any] | None:
        return check_depth(fmt, "response_format")

    @property
    def thinking(self) -> bool:
        kwargs = self.chat_template_kwargs or {}
        if "enable_thinking" in kwargs:
            return bool(kwargs["enable_thinking"])
        return self.reasoning_effort not in (None, "none", "minimal")


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None


class ParamError(ValueError):
    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


def check_depth(value: Any, what: str, limit: int = MAX_DEPTH) -> Any:
    """`value`, if its lists and objects nest at most `limit` deep; else a ValueError naming `what`. Walked
    without recursion: the point is to refuse what recursive code further on could not handle."""
    stack = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            if depth >= limit:
                raise ValueError(f"{what} is nested deeper than {limit} levels")
            stack += [(x, depth + 1) for x in (v.values() if isinstance(v, dict) else v)]
    return value


def json_depth(text: str) -> int:
    """How deep the brackets of a JSON text nest (strings skipped), in linear time, without parsing it."""
    if "[" not in text and "{" not in text:
        return 0
    bare = _JSON_STRING.sub("", text)
    steps = (1 if c in "[{" else -1 for c in bare if c in "[]{}")
    return max(accumulate(steps, initial=0))


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def check_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Roles known, content a string or a list of text, image_url and input_audio parts; returns them with
    text-only part lists joined into one string, and media parts reduced to what the media reader needs."""
    out, media = [], 0
    for i, m in enumerate(messages):
        role = m.get("role")
        if role not in ROLES:
            raise ParamError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}",
                             f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):
            content = _content_parts(content, f"messages[{i}].content")
            media += sum(p["type"] in MEDIA_PARTS for p in content) if isinstance(content, list) else 0
        elif content is not None and not isinstance(content, str):
            raise ParamError(f"messages[{i}].content must be a string or a list of content parts",
                             f"messages[{i}].content")
        if content is None and not m.get("tool_calls"):
            raise ParamError(f"messages[{i}] has no content", f"messages[{i}].content")
        out.append({**m, "role": "system" if role == "developer" else role, "content": content})
    if media > MAX_MEDIA_PARTS:
        raise ParamError(f"this request carries {media} images and audio clips; this server takes at most "
                         f"{MAX_MEDIA_PARTS} per request", "messages")
    return out


# OpenAI's media content parts, and the kind of input each is.
MEDIA_PARTS = {"image_url": "image", "input_audio": "audio"}
# Images and clips per request: more than fit any context once each is its soft tokens, and a bound on the
# decoded pixels one request can make the server hold.
MAX_MEDIA_PARTS = 16


def _content_parts(parts: list[Any], where: str) -> str | list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for j, p in enumerate(parts):
        kind = p.get("type") if isinstance(p, dict) else None
        if kind == "text":
            out.append({"type": "text", "text": str(p.get("text", ""))})
        elif kind == "image_url":
            url = p.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url:
                raise ParamError(f'{where}[{j}]: an image_url part needs {{"image_url": {{"url": '
                                 '"data:image/png;base64,..."}}', where)
            out.append({"type": "image_url", "image_url": {"url": url}})
        elif kind == "input_audio":
            audio = p.get("input_audio")
            if not isinstance(audio, dict) or not isinstance(audio.get("data"), str):
                raise ParamError(f'{where}[{j}]: an input_audio part needs {{"input_audio": {{"data": '
                                 '"<base64 of a WAV, FLAC, OGG or MP3 file>", "format": "wav"}}', where)
            out.append({"type": "input_audio", "input_audio": {"data": audio["data"], "format": audio.get("format")}})
        else:
            raise ParamError(f"{where}[{j}]: content parts must be text, image_url or input_audio, got "
                             f"{str(kind)[:40]!r}", where)
    if all(p["type"] == "text" for p in out):
        return "".join(p["text"] for p in out)
    return out


def media_kinds(messages: list[dict[str, Any]]) -> set[str]:
    """The kinds of media ("image", "audio") in messages `check_messages` returned."""
    return {MEDIA_PARTS[p["type"]] for m in messages if isinstance(m["content"], list) for p in m["content"]
            if p["type"] in MEDIA_PARTS}


# --- responses ------------------------------------------------------------------------------------------
# Their schemas, for /openapi.json only: handlers return plain dicts, so nothing is filtered on the way out.
class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(0, description="prompt tokens whose keys/values came from the prefix cache")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class ToolCallFunction(BaseModel):
    name: str
    arguments: str = Field(description="a JSON object, as a string")


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"]
    function: ToolCallFunction


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    reasoning_content: str | None = Field(None, description="the thinking, apart from content (also `reasoning`)")
    reasoning: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length", "tool_calls", "content_filter"] | None
    logprobs: dict[str, Any] | None


class ChatCompletion(BaseModel):
    """With `stream`, the body is instead text/event-stream: `data: {chat.completion.chunk}` events (choices
    carry `delta`), a usage chunk with `stream_options.include_usage`, then `data: [DONE]`."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str


class TextChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length", "content_filter"] | None
    logprobs: dict[str, Any] | None


class TextCompletion(BaseModel):
    """With `stream`, the body is instead text/event-stream of `text_completion` chunks, then `data: [DONE]`."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage
    system_fingerprint: str


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorBody


ERRORS = {status: {"model": ErrorResponse, "description": what} for status, what in {
    400: "invalid request (the message names the parameter)", 401: "missing or wrong API key",
    404: "unknown model", 429: "queue full; retry after Retry-After seconds", 503: "model still loading"}.items()}


def new_id(prefix: str, sep: str = "-") -> str:
    """A random id as each API spells its own: "chatcmpl-…" (OpenAI chat), "resp_…", "msg_…", "toolu_…"."""
    return f"{prefix}{sep}{uuid.uuid4().hex[:24]}"


def envelope(kind: str, rid: str, model: str, choices: list[dict], usage: dict | None = None) -> dict:
    out = {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": choices,
           "system_fingerprint": "gemmakit"}
    if usage is not None or kind.endswith("chunk"):
        out["usage"] = usage
    return out


def usage(prompt: int, completion: int, cached: int = 0) -> dict:
    """OpenAI's usage object; `cached`: prompt tokens served from the prefix cache (prompt_tokens_details)."""
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def finish_reason(engine_reason: str | None, tool_calls: bool) -> str | None:
    if engine_reason is None:
        return None
    if tool_calls:
        return "tool_calls"
    return {"length": "length", "content_filter": "content_filter"}.get(engine_reason, "stop")


def logprob(value: float) -> float:
    """A logprob JSON can carry: -inf (a banned token) and NaN become OpenAI's -9999.0."""
    return value if math.isfinite(value) else NO_LOGPROB


def chat_logprobs(items: list[TokenLogprobs], piece: Any) -> list[dict]:
    """OpenAI's chat `logprobs.content` entries; `piece(id)` is a token's text."""
    def entry(token: int, lp: float) -> dict:
        text = piece(token)
        return {"token": text, "logprob": logprob(lp), "bytes": list(text.encode())}
    return [{**entry(x.token, x.logprob), "top_logprobs": [entry(t, lp) for t, lp in x.top]} for x in items]


def completion_logprobs(items: list[TokenLogprobs], piece: Any, offset: int) -> dict:
    tokens = [piece(x.token) for x in items]
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": [logprob(x.logprob) for x in items],
            "top_logprobs": [{piece(t): logprob(lp) for t, lp in x.top} for x in items], "text_offset": offsets}


def tool_call_json(call: Any, index: int) -> dict:
    return {"index": index, "id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}
