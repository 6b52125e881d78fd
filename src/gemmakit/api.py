"""The small Python API: `gemmakit.load(...)` gives an `LLM` with `generate` (raw completion) and `chat`.

    llm = gemmakit.load()                       # the embedded Gemma 3 270M
    llm.generate("The capital of France is", max_tokens=8)
    reply = llm.chat([{"role": "user", "content": "What is the capital of France?"}])
    reply.content, reply.reasoning, reply.tool_calls
    llm.chat([{"role": "user", "content": [{"type": "image", "path": "cat.jpg"},
                                           {"type": "text", "text": "What is this?"}]}])   # a multimodal checkpoint

`load` decides how to talk to the checkpoint (`chat_format="auto"`): a checkpoint that carries a chat template
is instruction-tuned and is prompted with it (rendered in a sandbox); one without a template is prompted with
gemmakit's built-in Gemma 3 / Gemma 4 renderer if its name says it is instruction-tuned ("-it"), and is
otherwise treated as a base model and prompted with a plain dialogue transcript (chat/dialogue.py). The
output of an instruction-tuned model goes through the streaming parser, which separates the answer from the
reasoning and the tool calls. Image and audio parts (media/inputs.py) go through the checkpoint's towers and
take the placeholders the chat template writes for them (media/prompt.py).

Speculative decoding (`draft=`): the draft checkpoint is loaded once, with the target (`load_draft`), and each
engine built on it gets a drafter of its own (`make_drafter`), because a drafter holds per-row state sized to its
engine's rows and context. A smaller Gemma of the same tokenizer drafts through `ModelDrafter`; a Gemma 4
assistant checkpoint (config model_type gemma4_assistant) through `MTPDrafter`, which reads the target's own
keys/values. The CLI (`--draft`) and the server use these two functions and nothing else, so every verb accepts
the same paths and refuses the same mistakes with the same message. A drafter verifies eagerly, so an engine
with one is never built compiled (compiled steps would be built and never run).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gemmakit.chat.dialogue import STOP_STRINGS, render_dialogue
from gemmakit.chat.parser import Delta, StreamParser, ToolCall
from gemmakit.chat.template import ChatFormat
from gemmakit.engine import Engine, StopText
from gemmakit.flags import check_chat_format, normalize_quantize
from gemmakit.media.inputs import MediaPolicy, collect
from gemmakit.media.prompt import encode_with_media
from gemmakit.media.soft import MediaError, PromptMedia
from gemmakit.media.towers import check_kinds
from gemmakit.media.towers import encode as encode_media
from gemmakit.model import Gemma
from gemmakit.runtime.device import resolve_device, resolve_dtype
from gemmakit.sampling import SamplingParams, fit_context
from gemmakit.tokenizer import Tokenizer

# The KV cache is preallocated for this many tokens unless the caller asks for more (up to the model's limit).
DEFAULT_CONTEXT = 8192
_INSTRUCTION_TUNED = re.compile(r"(^|[-_ .])(it|instruct|chat)($|[-_ .])", re.IGNORECASE)


@dataclass
class ChatResult:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str = "stop"  # "stop" (end of turn or stop string) or "length" (max_tokens reached)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    warnings: list[str] = field(default_factory=list)


class LLM:
    def __init__(self, model: Gemma, tokenizer: Tokenizer, chat_format: ChatFormat | None, name: str = "",
                 context: int | None = None, compile: bool = False, draft: Any = None, draft_tokens: int = 4,
                 prefix_cache: bool | int | None = None):
        self.model, self.tokenizer, self.chat_format, self.name = model, tokenizer, chat_format, name
        self.compile = compile
        # Speculative decoding: the draft model (load_draft) and tokens drafted per step; the prefix cache
        # (engine.py: None = GEMMAKIT_PREFIX_CACHE, default on). Engines built from this LLM use both.
        self.draft, self.draft_tokens, self.prefix_cache = draft, draft_tokens, prefix_cache
        limit = model.config.max_position_embeddings
        self.context = min(context or DEFAULT_CONTEXT, limit)
        self._engine: Engine | None = None
        # Facts about the last generation, for callers that want them (finish reason, token counts).
        self.finish_reason, self.prompt_tokens, self.completion_tokens = "stop", 0, 0
        self.warnings: list[str] = []
        # Where image / audio parts may come from, and Gemma 4's soft-token budget per image (None: 280).
        self.media_policy = MediaPolicy()
        self.max_soft_tokens: int | None = None

    @property
    def is_base(self) -> bool:
        """True when chatting goes through the plain dialogue format (no chat template)."""
        return self.chat_format is None

    def describe(self) -> str:
        if self.chat_format is None:
            return "base model (not instruction-tuned): chatting through a plain User/Assistant dialogue"
        source = "its own chat template" if self.chat_format.template else "the built-in renderer"
        return f"instruction-tuned {self.chat_format.family} model: chatting through {source}"

    # --- prompts ----------------------------------------------------------------------------
    def render(self, messages: Sequence[dict[str, Any]], tools: list[dict] | None = None,
               enable_thinking: bool = False) -> str:
        """The prompt text; what the messages and tools say is marked to stay text (`Tokenizer.literal`), so
        `encode_prompt` never reads a control token into it."""
        messages, tools = self.tokenizer.literal(list(messages)), self.tokenizer.literal(tools)
        if self.chat_format is None:
            if tools:
                raise ValueError("tools need an instruction-tuned model; this is a base model")
            return render_dialogue(messages)
        return self.chat_format.render(list(messages), tools, add_generation_prompt=True,
                                       enable_thinking=enable_thinking)

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a rendered prompt: BOS added only if the template did not write it (never two)."""
        bos = self.tokenizer.id_to_token(self.tokenizer.bos_id) or "<bos>"
        return self.tokenizer.encode(text, add_bos=not text.startswith(bos))

    def prepare_chat(self, messages: str | Sequence[dict[str, Any]], tools: list[dict] | None = None,
                     enable_thinking: bool = False, policy: MediaPolicy | None = None
                     ) -> tuple[list[int], PromptMedia | None]:
        """The prompt ids of a chat, and the soft tokens of its images / audio (None without any)."""
        messages, items = collect(_as_messages(messages), policy or self.media_policy)
        if not items:
            return self.encode_prompt(self.render(messages, tools, enable_thinking)), None
        check_kinds(self.model, {i.kind for i in items}, self.name)
        if self.chat_format is None:
            raise MediaError("this model is prompted as a base model (a plain dialogue), which has no place for "
                             "images or audio; use an instruction-tuned checkpoint or --chat-format gemma3|gemma4")
        text = self.render(messages, tools, enable_thinking)
        bos = self.tokenizer.id_to_token(self.tokenizer.bos_id) or "<bos>"
        expanded = encode_media(self.model, items, self.max_soft_tokens)
        return encode_with_media(self.tokenizer, self.model.config, text, expanded, not text.startswith(bos))

    def stop_ids(self, chat: bool = True) -> list[int]:
        """EOS ids of the config and tokenizer, plus the end-of-turn markers when chatting."""
        eos = self.model.config.eos_token_id
        ids = {self.tokenizer.eos_id, *(eos if isinstance(eos, list) else [eos])}
        if chat and self.chat_format is not None:
            # End-of-answer markers are looked up by their text, so any vocabulary works.
            ids |= {i for t in self.chat_format.stop_strings if (i := self.tokenizer.token_to_id(t)) is not None}
        return sorted(ids)

    # --- generation -------------------------------------------------------------------------
    @property
    def engine(self) -> Engine:
        """A one-row engine, allocated on first use and reused (its cache is the expensive part)."""
        if self._engine is None:
            self._engine = self.make_engine(1, self.context, self.compile)
        return self._engine

    def make_engine(self, max_batch: int, context: int, compile: bool) -> Engine:
        """An engine on this model with this LLM's drafter (one of its own) and prefix-cache choice; compiled
        only without a drafter (see the module docstring)."""
        slack = draft_slack(self.draft_tokens)
        drafter = None if self.draft is None else make_drafter(self.draft, self.model, max_batch, context, slack)
        return Engine(self.model, self.tokenizer, max_batch=max_batch, context=context,
                      compile=compile and drafter is None, slack=slack, drafter=drafter,
                      draft_tokens=self.draft_tokens, prefix_cache=self.prefix_cache)

    def params(self, stop_ids: Sequence[int], watermark: Any = None, **sampling: Any) -> SamplingParams:
        """SamplingParams from keyword arguments. `watermark` (a safety.watermark.WatermarkConfig, or the path
        of a key file from `gemmakit watermark keys`) marks sampled text: its logits processor is handed to the
        sampler after any given in `logits_processors`."""
        if watermark is not None:
            from gemmakit.safety.watermark import WatermarkConfig, WatermarkProcessor, load_config

            config = watermark if isinstance(watermark, WatermarkConfig) else load_config(watermark)
            sampling["logits_processors"] = (*sampling.get("logits_processors", ()), WatermarkProcessor(config))
        p = SamplingParams(**sampling)
        p.stop_token_ids = tuple(stop_ids)
        p.validate(self.model.config.vocab_size)
        return p

    def check_fits(self, n_prompt: int, max_tokens: int) -> None:
        """Refuse, with the numbers, a request that cannot fit the context (sampling.fit_context's rule)."""
        fit_context(n_prompt, max_tokens, self.context)

    def stream_text(self, ids: list[int], p: SamplingParams, media: PromptMedia | None = None) -> Iterator[str]:
        """Decoded text pieces of the continuation of `ids`; keeps `finish_reason` and token counts current."""
        self.check_fits(len(ids), p.max_tokens)
        decoder = self.tokenizer.decode_stream()
        # Kept up to date token by token: a caller may stop reading early (a stop string) and close us.
        self.finish_reason, self.completion_tokens = "stop", 0
        for token in self.engine.stream(ids, p, media):
            self.completion_tokens += 1
            if piece := decoder.step(token):
                yield piece
        if self.completion_tokens >= p.max_tokens:
            self.finish_reason = "length"

    def generate(self, prompt: str, stop: Sequence[str] = (), **sampling: Any) -> str:
        """Raw completion of `prompt` (BOS added); stops at EOS, a stop string, or max_tokens."""
        if not isinstance(prompt, str):
            raise TypeError(f"generate takes one prompt string, got {type(prompt).__name__}; for many prompts "
                            "at once use gemmakit.engine.Engine(model, tokenizer, max_batch=N) or the server")
        cut, text = StopText(stop), ""
        for piece in self.stream_text(self.tokenizer.encode(prompt), self.params(self.stop_ids(chat=False),
                                                                                  **sampling)):
            text += cut.feed(piece)
            if cut.stopped:  # leaving the loop closes the generator: no tokens are computed past the stop
                break
        return text + cut.finish()

    def stream_chat(self, messages: str | Sequence[dict[str, Any]], tools: list[dict] | None = None,
                    enable_thinking: bool = False, **sampling: Any) -> Iterator[Delta]:
        """The reply to `messages` as it is generated: content, reasoning and tool-call deltas. A plain string
        is one user message."""
        ids, media = self.prepare_chat(messages, tools, enable_thinking)
        self.prompt_tokens = len(ids)
        pieces = self.stream_text(ids, self.params(self.stop_ids(), **sampling), media)
        if self.chat_format is None:
            yield from _dialogue_deltas(pieces)
            return
        parser = StreamParser(self.chat_format.family)
        for piece in pieces:
            delta = parser.feed(piece)
            if delta.content or delta.reasoning or delta.tool_calls:
                yield delta
        yield parser.finish()
        self.warnings = parser.warnings

    def chat(self, messages: str | Sequence[dict[str, Any]], tools: list[dict] | None = None,
             enable_thinking: bool = False, **sampling: Any) -> ChatResult:
        """The whole reply to `messages` (OpenAI-style dicts, or one string for a single user message)."""
        self.warnings = []
        r = ChatResult()
        for d in self.stream_chat(messages, tools, enable_thinking, **sampling):
            r.content += d.content
            r.reasoning += d.reasoning
            r.tool_calls += d.tool_calls
        r.content, r.reasoning = r.content.strip(), r.reasoning.strip()
        r.finish_reason, r.prompt_tokens, r.completion_tokens = (self.finish_reason, self.prompt_tokens,
                                                                 self.completion_tokens)
        r.warnings = list(self.warnings)
        return r


def _as_messages(messages: str | Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    if not isinstance(messages, Sequence) or not all(isinstance(m, dict) for m in messages):
        raise TypeError("messages must be a list of {'role': ..., 'content': ...} dicts (OpenAI style), "
                        "or one string for a single user message")
    return list(messages)


def _dialogue_deltas(pieces: Iterator[str]) -> Iterator[Delta]:
    cut, started = StopText(STOP_STRINGS), False
    for piece in pieces:
        text = cut.feed(piece)
        if not started:  # the transcript puts a space after "Assistant:"
            text = text.lstrip()
            started = bool(text)
        if text:
            yield Delta(content=text)
        if cut.stopped:
            return
    if tail := cut.finish():
        yield Delta(content=tail if started else tail.lstrip())


def draft_slack(draft_tokens: int) -> int:
    """Spare KV slots an engine needs per sliding ring to verify `draft_tokens` at once (speculative.py)."""
    return max(8, draft_tokens)


def _is_assistant(path: Path) -> bool:
    """A Gemma 4 MTP assistant directory: config.json says model_type gemma4_assistant."""
    import json

    config = path / "config.json"
    if not (path.is_dir() and config.is_file()):
        return False
    try:
        d = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and d.get("model_type") == "gemma4_assistant"


def load_draft(path: str | Path, target: Gemma) -> torch.nn.Module:
    """The draft model at `path` for `target`, on the target's device and dtype: a Gemma (HF directory or GGUF)
    of the target's vocabulary, or a Gemma 4 assistant directory (mtp.py). Anything else, or another
    vocabulary, is a ValueError that names the path and says what a draft model must be."""
    from gemmakit.checkpoints import load_model
    from gemmakit.checkpoints.common import CheckpointError
    from gemmakit.config import ConfigError
    from gemmakit.mtp import MTPDrafter, load_assistant
    from gemmakit.runtime.plan import model_dtype_device, prepare_weights

    p = Path(path).expanduser()
    what = ("a smaller Gemma with the target's tokenizer (HF directory or .gguf), or a Gemma 4 assistant "
            "directory (model_type gemma4_assistant)")
    if not p.exists():
        raise ValueError(f"draft model {path}: no such file or directory; give {what}")
    dtype, device = model_dtype_device(target)
    try:
        if _is_assistant(p):
            assistant = load_assistant(p, dtype, device)
            MTPDrafter(target, assistant)  # its checks (Gemma 4 target, widths, vocabulary), before any engine
            return assistant
        draft = load_model(p, dtype, device)
    except (CheckpointError, ConfigError, OSError, ValueError, KeyError) as e:
        raise ValueError(f"draft model {path} cannot draft for this model: {e}; give {what}") from e
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"draft model {path} has a vocabulary of {draft.config.vocab_size} tokens, the model "
                         f"{target.config.vocab_size}: a draft model must share the model's tokenizer")
    prepare_weights(draft, None, False)
    return draft


def make_drafter(draft: torch.nn.Module, target: Gemma, rows: int, context: int, slack: int = 8) -> Any:
    """A `Drafter` (speculative.py) from a `load_draft` model for an engine of `rows` rows and `context`."""
    from gemmakit.mtp import Gemma4Assistant, MTPDrafter
    from gemmakit.speculative import ModelDrafter

    if isinstance(draft, Gemma4Assistant):
        return MTPDrafter(target, draft)
    return ModelDrafter(draft, rows, context, slack)


def pick_chat_format(name: str, family: str, tokenizer: Tokenizer, choice: str = "auto") -> ChatFormat | None:
    """How to prompt this checkpoint for chat (None = base model, dialogue transcript); see module docstring."""
    check_chat_format(choice)
    if choice == "dialogue":
        return None
    if choice == "template":
        if not tokenizer.chat_template:
            raise ValueError("this checkpoint carries no chat template; use --chat-format gemma3|gemma4|dialogue")
        return ChatFormat(family, tokenizer.chat_template)
    if choice in ("gemma3", "gemma4", "gemma4-empty-thought"):
        return ChatFormat(choice[:6], None, empty_thought_when_off=choice.endswith("thought"))
    if tokenizer.chat_template:
        return ChatFormat(family, tokenizer.chat_template)
    if _INSTRUCTION_TUNED.search(name):
        # Without a template, the 26B/31B-era convention of an empty thought when thinking is off is
        # assumed for the large Gemma 4 models, and the E2B/E4B one (nothing) otherwise.
        return ChatFormat(family, None, empty_thought_when_off=bool(re.search(r"26b|31b", name, re.I)))
    return None


def _merge_adapter(model: Gemma, adapter: str | Path, quantize: str | None, chat_format: str) -> str:
    """Fold a LoRA adapter into `model` (then quantize it if asked); returns the chat format to use."""
    import json

    from gemmakit.quantize import quantize_model
    from gemmakit.train.lora import load_adapter, merge_lora

    load_adapter(model, adapter)
    merge_lora(model)
    if quantize:
        quantize_model(model, quantize)
    info = Path(adapter) / "gemmakit.json"  # written by `gemmakit finetune` next to the PEFT files
    if chat_format == "auto" and info.is_file():
        return json.loads(info.read_text()).get("chat_format", "auto")
    return chat_format


def load(model: str | Path | None = None, dtype: str = "auto", device: str = "auto",
         chat_format: str = "auto", context: int | None = None, compile: bool = False,
         quantize: str | None = None, pack: bool | None = None, adapter: str | Path | None = None,
         mmproj: str | Path | bool | None = None, draft: str | Path | None = None, draft_tokens: int = 4,
         prefix_cache: bool | int | None = None) -> LLM:
    """Load a checkpoint (default: the embedded Gemma 3 270M) ready to generate and chat. `compile` runs
    one-row decode steps through torch.compile (compiled.py): ~3x faster on CPU after a one-off build.
    `quantize` ("int8", "int4") quantizes the weights module by module as they load (quantize.py).
    `pack` (default: on CPU without quantization) puts float weights in oneDNN's layout (packing.py): faster
    prefill and batched decode, for the memory of a second copy of the output head.
    `adapter` (a LoRA directory in PEFT's format, e.g. from `gemmakit finetune`) is merged into the weights
    before quantization or packing; the chat format it was trained with is used unless `chat_format` says
    otherwise. `mmproj`: for a GGUF, llama.cpp's image / audio tower file (default: the one `mmproj*.gguf` beside
    it, if any; False: text only). `draft`: a draft model for speculative decoding (`load_draft`), proposing
    `draft_tokens` a step; with one, decoding is eager (`compile` is ignored). `prefix_cache`: True / False, a
    byte budget, or None (GEMMAKIT_PREFIX_CACHE, default on): prompts reuse the keys/values of earlier ones."""
    from gemmakit.checkpoints import load_model_and_tokenizer, resolve
    from gemmakit.runtime.compiled import compile_supported
    from gemmakit.runtime.plan import prepare_weights

    path = resolve(model)
    if not isinstance(draft_tokens, int) or isinstance(draft_tokens, bool) or draft_tokens < 1:
        raise ValueError(f"draft_tokens must be an integer >= 1, got {draft_tokens!r}")
    if draft is not None:
        compile = False  # a drafter verifies eagerly: compiled steps would never run
    quantize = normalize_quantize(quantize)
    device = resolve_device(device)  # "auto": CUDA where present, else the CPU
    m, tok = load_model_and_tokenizer(path, resolve_dtype(dtype, device), device, None if adapter else quantize,
                                      mmproj)
    if adapter:
        chat_format = _merge_adapter(m, adapter, quantize, chat_format)
    # The weight layout is the runtime's choice (oneDNN-packed CPU float models where oneDNN packs the dtype).
    prepare_weights(m, pack, compile and compile_supported(device))
    name = m.config.name if path.suffix == ".gguf" else path.name
    fmt = pick_chat_format(f"{name} {path.stem}", m.config.family, tok, chat_format)
    drafter_model = None if draft is None else load_draft(draft, m)
    return LLM(m, tok, fmt, name, context, compile, drafter_model, draft_tokens, prefix_cache)
