"""What the HTTP handlers share: the loaded model and its engine loop (`Server`), and the checks and
conversions every endpoint needs (model name, context room, submission with queue limits, grammars).

Hooks for guards (the safety issue plugs in here): `server.input_hooks` see the messages before anything is
generated and may refuse; `server.output_hooks` see each choice's accumulated content after every update
and may cut it (finish_reason "content_filter"). Both return None to let it pass or a message to stop.

LoRA adapters (`--adapter NAME=DIR`, adapters.py): attached beside the base weights as the server starts, each
served under its own name; a request's `model` picks one (the base model's name: none), `/v1/models` lists them
all, and rows on different adapters share each decode step. Compiled steps are turned off when adapters are
served (adapters.py says why), with a line on the console.

Speculative decoding (`--draft`, api.load_draft) and the prefix cache (`--prefix-cache`) are the loaded LLM's
choices: the server's engine is built by `LLM.make_engine`, with a drafter for its own rows. A drafter verifies
eagerly, so compiled steps are off with it too (a console line says so). What the prefix cache saved is each
response's `usage.prompt_tokens_details.cached_tokens`, as in OpenAI's API; /metrics counts the saved tokens and
the drafter's proposals and acceptances.

Images and audio (`MediaPolicy`): a client may always send them inline (data URLs, `input_audio`), which the
body limit already bounds; anything that makes the server itself read bytes is the operator's choice and off
by default: `file://` only under `--allow-media-dir` directories, http(s) only with `--allow-remote-media`.
The default body limit grows to fit one largest allowed file as base64, so `--max-media-mb` is the limit a
client meets. Decoding and the tower forward run in a worker thread, at most `MEDIA_AT_ONCE` requests at a
time: a decoded image can be hundreds of MB, and each tower forward already uses every core.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from gemmakit.adapters import adapter_names, attach_adapters
from gemmakit.api import LLM
from gemmakit.chat.parser import TOOL_OPEN
from gemmakit.chat.tool_grammar import ToolCallConstraint, string_tokens, tool_call_grammar
from gemmakit.media.inputs import MediaPolicy
from gemmakit.media.soft import PromptMedia
from gemmakit.sampling import ContextOverflow, fit_context
from gemmakit.serve import protocol as P
from gemmakit.serve.loop import EngineLoop, QueueFull, Ticket
from gemmakit.serve.metrics import Metrics

Hook = Callable[[Any], "str | None"]
# Loading, compiling, ready or failed: what someone watching the console needs while /health says 503.
log = logging.getLogger("gemmakit.serve")


@dataclass
class ServeOptions:
    max_batch: int = 8
    max_queue: int = 64
    context: int | None = None
    compile: bool = False
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    model_name: str | None = None
    guard: str | None = None  # a guard YAML (safety/guard.py): input and output rules for both completions
    max_body_bytes: int | None = None  # None: body_limit(); an oversized body is a 413
    media_dirs: tuple[str, ...] = ()  # file:// media may be read from under these (none: file:// is refused)
    remote_media: bool = False  # the server fetches http(s) media URLs itself
    max_media_bytes: int = 20 << 20  # one image or audio file, decoded from base64 or read
    image_tokens: int | None = None  # Gemma 4's soft tokens per image (70/140/280/560/1120; None: 280)
    adapters: dict[str, str] = field(default_factory=dict)  # LoRA adapters served per request: {name: PEFT dir}
    embedding_model: str | None = None  # an embedding model directory served at /v1/embeddings (serve/embeddings.py)
    responses_store: int = 256  # Responses API: responses kept for previous_response_id (0: none; responses.py)

    def body_limit(self) -> int:
        """The request-body limit: as given, else 8 MiB (far above a full context of text) or, if more, room
        for one largest allowed media file as base64 plus the rest of the request."""
        if self.max_body_bytes is not None:
            return self.max_body_bytes
        return max(8 << 20, -(-self.max_media_bytes * 4 // 3) + (1 << 20))

    def media_policy(self) -> MediaPolicy:
        dirs = tuple(Path(d) for d in self.media_dirs)
        return MediaPolicy(local_paths=bool(dirs), allowed_dirs=dirs, remote=self.remote_media,
                           max_bytes=self.max_media_bytes, max_items=P.MAX_MEDIA_PARTS)  # counted before decoding


MEDIA_AT_ONCE = 2  # requests whose images / audio are decoded and encoded at the same time


class Server:
    """The loaded model, its engine loop and everything the handlers share."""

    def __init__(self, llm: LLM, options: ServeOptions, metrics: Metrics):
        self.llm, self.options, self.metrics = llm, options, metrics
        self.name = options.model_name or llm.name or "gemma"
        if options.image_tokens is not None:
            llm.max_soft_tokens = options.image_tokens
        self.media_policy = options.media_policy()
        self.media_slots = asyncio.Semaphore(MEDIA_AT_ONCE)
        self.adapters = self._attach(options.adapters)
        compile = options.compile and not self.adapters and llm.draft is None
        if options.compile and not compile:
            why = "LoRA adapters served per request" if self.adapters else "speculative decoding (--draft)"
            log.warning("compiled decode steps are off: %s need eager decode steps", why)
        engine = llm.make_engine(options.max_batch, options.context or llm.context, compile)
        if llm.draft is not None:
            log.info("speculative decoding: %d draft tokens a step", engine.draft_tokens)
        if engine.compiled:
            log.info("compiling the decode steps: minutes the first time on this machine, seconds once cached "
                     "(--compile off skips it)")
        engine.warmup()
        self.context = engine.context
        self.loop = EngineLoop(engine, options.max_queue, metrics).start()
        self.guard = None
        if options.guard:
            from gemmakit.safety.guard import load_guard

            self.guard = load_guard(options.guard, llm)
        self.input_hooks: list[Hook] = []
        self.output_hooks: list[Hook] = []
        self._grammars: Any = None
        self._text_tokens: list[int] | None = None
        self._grammar_lock = threading.Lock()

    def _attach(self, adapters: dict[str, str]) -> list[str]:
        """Attach the adapters (before the engine, whose memory forecast then counts them); the names of all the
        model carries, those attached through the Python API (adapters.attach_adapters) included."""
        if self.name in [*adapter_names(self.llm.model), *adapters]:
            raise ValueError(f"adapter name {self.name!r} is the base model's own name; requests could not tell "
                             "them apart: name the adapter otherwise (or the model, with --served-model-name)")
        if adapters:
            attach_adapters(self.llm.model, adapters)
        names = adapter_names(self.llm.model)
        if names:
            log.info("LoRA adapters served beside %s: %s", self.name, ", ".join(names))
        return names

    def model_ids(self) -> list[str]:
        """What `model` may name: the base model, then each adapter."""
        return [self.name, *self.adapters]

    def grammars(self) -> Any:
        with self._grammar_lock:  # ~3 s to build for a 262k vocabulary: once, on first use
            if self._grammars is None:
                from gemmakit.constrain import Grammars

                self._grammars = Grammars(self.llm.tokenizer, self.llm.model.config.vocab_size, self.llm.stop_ids())
        return self._grammars

    def text_tokens(self) -> list[int]:
        """The tokens tool-call strings may hold besides text (chat/tool_grammar.string_tokens): they depend on
        the tokenizer only, so they are found once, not for every request with tools."""
        grammars = self.grammars()
        if self._text_tokens is None:
            self._text_tokens = string_tokens(self.llm.tokenizer, grammars.tokenizer)
        return self._text_tokens

    def piece(self, token: int) -> str:
        return self.llm.tokenizer.decode([token])

    def check_input(self, messages: Any) -> str | None:
        return next((r for hook in self.input_hooks if (r := hook(messages))), None)

    def check_output(self, text: str) -> str | None:
        return next((r for hook in self.output_hooks if (r := hook(text))), None)


def fail(status: int, message: str, param: str | None = None, code: str | None = None,
         type: str = "invalid_request_error", headers: dict | None = None) -> JSONResponse:
    return JSONResponse(P.error(message, param, code, type), status_code=status, headers=headers)


class HTTPFail(Exception):
    def __init__(self, response: JSONResponse):
        self.response = response


def require_key(request: Request) -> None:
    """The API-key check, a dependency of every guarded route (so it holds under any mount prefix); the key is
    compared in constant time, so response timing says nothing about how much of a guess was right."""
    key = request.app.state.options.api_key
    if key and not key_matches(request, key):
        raise HTTPFail(fail(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                            code="invalid_api_key"))


def key_matches(request: Request, key: str) -> bool:
    bearer = request.headers.get("authorization", "")
    given = bearer[7:] if bearer[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
    return hmac.compare_digest(given.encode(), key.encode())


def loaded(request: Request) -> None:
    """Nothing unless the models are still loading (503) or failed to (500)."""
    state = request.app.state
    if state.load_error:
        raise HTTPFail(fail(500, f"the model failed to load: {state.load_error}", type="server_error"))
    if not state.loaded:
        raise HTTPFail(fail(503, "the model is still loading; retry shortly", type="server_error",
                            headers={"Retry-After": "5"}))


def ready(request: Request) -> Server:
    """The chat server, once loaded; an embeddings-only server answers its chat routes with a 404."""
    app = request.app
    loaded(request)
    if app.state.server is None:
        raise HTTPFail(fail(404, "this server serves only an embedding model (POST /v1/embeddings); start it with "
                                 "--model CHAT_MODEL --embedding-model DIR to serve both", "model", "model_not_found"))
    if failure := engine_failure(app.state.server):
        raise HTTPFail(fail(500, f"{failure}; restart the server", type="server_error"))
    return app.state.server


def engine_failure(server: Server) -> str | None:
    """Why the engine loop no longer serves (its thread died, or was never running), or None."""
    loop = server.loop
    return loop.failure or (None if loop.alive else "the engine thread is not running")


def check_model(server: Server, model: str | None) -> str | None:
    """The adapter a request's `model` names (None: the base model, also when no model is given); any other
    name is a 404 as OpenAI answers it, listing what is served."""
    if model in (None, "", server.name):
        return None
    if model in server.adapters:
        return model
    served = ", ".join(repr(m) for m in server.model_ids())
    raise HTTPFail(fail(404, f"The model {model!r} does not exist on this server; it serves {served} "
                             "(GET /v1/models)", "model", "model_not_found"))


def check_room(server: Server, sequences: int, param: str = "n") -> None:
    """Refuse a request's `sequences` (prompts x n) before any work is built for them: a 400 when they could
    never all queue here, a 429 when the queue has no room for them now."""
    loop = server.loop
    if sequences > loop.max_queue:
        raise P.ParamError(f"this request asks for {sequences} sequences (prompts x n); this server queues at most "
                           f"{loop.max_queue} at once (--max-queue): send fewer prompts or a lower n", param)
    if loop.waiting + sequences > loop.max_queue:
        raise HTTPFail(fail(429, f"the server is busy: {loop.waiting} sequences are waiting for a slot "
                                 f"(--max-queue {loop.max_queue}); retry later", code="rate_limit_exceeded",
                            type="rate_limit_error", headers={"Retry-After": "1"}))


def check_fits(server: Server, n_prompt: int, max_tokens: int | None, param: str) -> int:
    """The max_tokens to use (all the room the prompt leaves when the client gave none), by the engine's own
    rule (sampling.fit_context); a request that does not fit is a 400 naming `param`."""
    try:
        return fit_context(n_prompt, max_tokens, server.context)
    except ContextOverflow as e:
        raise P.ParamError(str(e), param, "context_length_exceeded") from None


def submit_all(server: Server, prompts: list[list[int]], params: list[Any],
               media: list[PromptMedia | None] | None = None, adapter: str | None = None
               ) -> tuple[list[Ticket], asyncio.Queue]:
    events: asyncio.Queue = asyncio.Queue()
    tickets: list[Ticket] = []
    media = media or [None] * len(prompts)
    try:
        for i, (ids, p, m) in enumerate(zip(prompts, params, media, strict=True)):
            tickets.append(server.loop.submit(ids, p, events, i, m, adapter))
    except QueueFull as e:
        for t in tickets:
            server.loop.cancel(t)
        raise HTTPFail(fail(429, f"the server is busy: {e}; retry later", code="rate_limit_exceeded",
                            type="rate_limit_error", headers={"Retry-After": "1"})) from None
    if server.metrics is not None:
        server.metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
    return tickets, events


def per_choice(params: Any, n: int, constraint: Callable[[], Any] | None) -> list[Any]:
    """n copies of the parameters: seeds offset so choices differ yet stay reproducible; a grammar each."""
    return [replace(params, seed=None if params.seed is None else params.seed + i,
                    constraint=constraint() if constraint else None) for i in range(n)]


def response_constraint(server: Server, fmt: dict | None) -> Callable[[], Any] | None:
    if not fmt or fmt.get("type") in (None, "text"):
        return None
    kind = fmt.get("type")
    if kind == "json_object":
        schema = None
    elif kind == "json_schema":
        spec = fmt.get("json_schema") or {}
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise P.ParamError("response_format.json_schema.schema must be a JSON schema object",
                               "response_format.json_schema.schema")
    else:
        raise P.ParamError(f"response_format.type must be text, json_object or json_schema, got {kind!r}",
                           "response_format.type")
    try:
        server.grammars().json_schema(schema)  # refuse an unsupported schema now, not mid-generation
    except ValueError as e:
        raise P.ParamError(str(e), "response_format", "unsupported_schema") from None
    return lambda: server.grammars().json_schema(schema)


def tool_constraint(server: Server, choice: Any, tools: list[dict] | None) -> Callable[[], Any] | None:
    """The tool-call constraint for `choice` (a factory: one per generated choice), or None.

    "auto" (or None): on a Gemma 4 chat model given tools, generation is free until the model opens a call
    (`<|tool_call>`), then the call is held to the tools' names and argument schemas (chat/tool_grammar.py);
    None for any other model, without tools, or where the vocabulary has no such token. "required" (one or
    more calls to any of the tools) or {"type": "function", "function": {"name": N}} (one call to N): the whole
    output is such calls. "none": None."""
    llm = server.llm
    gemma4 = not llm.is_base and llm.chat_format.family == "gemma4"
    if choice in (None, "auto", "none"):
        trigger = llm.tokenizer.token_to_id(TOOL_OPEN)
        if choice == "none" or not gemma4 or not tools or trigger is None:
            return None
        return _constraint(server, tools, opened=True, trigger=trigger)
    if not gemma4:
        raise P.ParamError("tool_choice 'required' or a named function needs a Gemma 4 chat model; this one has "
                           "no tool-call syntax", "tool_choice", "unsupported_value")
    names = [(t.get("function") or {}).get("name") for t in tools or [] if isinstance(t, dict)]
    named = (choice.get("function") or {}).get("name") if isinstance(choice, dict) else None
    if choice == "required" and names:
        return _constraint(server, tools, repeat=True)
    if isinstance(choice, dict) and choice.get("type") == "function" and named in names:
        return _constraint(server, [t for t in tools if (t.get("function") or {}).get("name") == named])
    raise P.ParamError("tool_choice must be 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": "
                       "{\"name\": ...}} naming one of `tools`", "tool_choice")


def _constraint(server: Server, tools: list[dict], repeat: bool = False, opened: bool = False,
                trigger: int | None = None) -> Callable[[], Any]:
    llm, grammars = server.llm, server.grammars()
    grammar = tool_call_grammar(tools, llm.tokenizer.token_to_id, repeat, opened=opened,
                                text_tokens=server.text_tokens())
    try:
        grammars.lark(grammar)  # a grammar llguidance refuses is a 400 now, not an error mid-generation
    except ValueError as e:
        raise P.ParamError(f"tools: {e}", "tools", "unsupported_schema") from None
    if trigger is None:
        return lambda: server.grammars().lark(grammar)
    vocab = llm.model.config.vocab_size
    return lambda: ToolCallConstraint(trigger, lambda: server.grammars().lark(grammar), vocab)


async def next_update(events: asyncio.Queue, request: Request) -> tuple[int, Any] | None:
    """The next update, or None once the client has gone away. Asked at every update, not only in silences:
    tokens may flow for minutes to a client that left, and each one costs the other rows a step."""
    while True:
        if await request.is_disconnected():
            return None
        try:
            return await asyncio.wait_for(events.get(), timeout=0.5)
        except asyncio.TimeoutError:
            continue


def sse(obj: dict | str, event: str | None = None) -> str:
    """One server-sent event; `event` adds the `event:` line the Responses and Messages APIs send."""
    data = f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"
    return data if event is None else f"event: {event}\n{data}"
