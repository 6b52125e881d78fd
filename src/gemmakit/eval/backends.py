"""The model under test, behind the three questions evaluation asks of it: how likely is this continuation
(multiple choice, perplexity), what does it write after this prompt, and what does it answer in this chat.

`LocalBackend` is any model gemmakit loads (with its quantization and adapters). Log-likelihoods follow
lm-evaluation-harness exactly, so the numbers are comparable: BOS once at the start, the context's trailing
spaces moved to the continuation, the continuation's tokens taken from the encoding of context +
continuation, and the context truncated from the left when too long. Logits are computed only where a
continuation token is predicted (the 262k head is the expensive part). Generation runs through the engine,
many prompts at once.

Questions may carry images or audio as content parts ({"type": "image", "path": ...}). Locally, a chat goes
through `LLM.prepare_chat` and the engine takes its soft tokens; a raw prompt (choices, generation without
--chat) is the items' placeholders then the text, expanded and tokenized as the chat path does, and the
scoring forward gets each row's soft tokens at that row's positions, so rows with and without media share a
batch. Continuation ids are still lm-eval's (ids of context + continuation past those of the context).

`OpenAIBackend` is any OpenAI-compatible endpoint (`gemmakit serve`, vLLM, a hosted judge), over plain HTTP:
it can write and chat, but cannot score log-likelihoods (chat APIs do not return prompt log-probs). Media
go in chat messages as OpenAI spells them: a data-URL `image_url` part, an `input_audio` part.
"""

from __future__ import annotations

import base64
import json
import mimetypes
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gemmakit.chat.dialogue import STOP_STRINGS
from gemmakit.media.soft import MediaError, PromptMedia, batch_media
from gemmakit.model import last_token_logits
from gemmakit.sampling import SamplingParams

Messages = list[dict[str, Any]]
Parts = list[dict[str, Any]]  # one question's image / audio content parts


@dataclass(frozen=True)
class GenParams:
    max_tokens: int = 256
    temperature: float = 0.0
    stop: tuple[str, ...] = ()
    seed: int | None = 0


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's `_encode_pair`: (context ids with BOS, continuation ids)."""
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    head = tokenizer.encode(context)
    return head, whole[len(head):]


class LocalBackend:
    def __init__(self, llm: Any, batch_size: int = 8):
        self.llm, self.batch_size = llm, batch_size
        self.name = llm.name
        self._engine = None

    @property
    def max_length(self) -> int:
        return self.llm.context

    # --- scoring -----------------------------------------------------------------------------
    def check_media(self, kinds: set[str], chat: bool) -> None:
        """Refuse, before any work, media this model cannot read (`chat`: media questions go through chat)."""
        from gemmakit.media.towers import check_kinds

        try:
            check_kinds(self.llm.model, kinds, self.llm.name)
        except MediaError as e:
            raise MediaError(f"the task has {' and '.join(sorted(kinds))} questions, but {e}") from e
        if chat and self.llm.is_base:
            raise MediaError("--chat with media needs an instruction-tuned model (a base model's plain dialogue "
                             "has no place for images); drop --chat or set --chat-format gemma3|gemma4")

    def media_prompt(self, text: str, parts: Parts, continuations: Sequence[str] = ()
                     ) -> tuple[list[int], PromptMedia | None, list[list[int]]]:
        """The raw prompt `text` after the parts' placeholders: its ids (BOS first), its soft tokens, and the
        ids each continuation adds (encode_pair's rule, the context's trailing spaces moved to it)."""
        from gemmakit.media.inputs import collect
        from gemmakit.media.prompt import encode_with_media, placeholder
        from gemmakit.media.towers import encode

        llm, tok, config = self.llm, self.llm.tokenizer, self.llm.model.config
        _, items = collect([{"role": "user", "content": parts}], llm.media_policy)
        self.check_media({i.kind for i in items}, chat=False)
        spaces = len(text) - len(text.rstrip(" "))
        head, tail = text[:len(text) - spaces], text[len(text) - spaces:]
        marks = "".join(placeholder(config, i.kind) for i in items)
        expanded = encode(llm.model, items, llm.max_soft_tokens)
        ids, media = encode_with_media(tok, config, marks + tok.literal(head), expanded, True)
        conts = [encode_with_media(tok, config, marks + tok.literal(head + tail + c), expanded, True)[0][len(ids):]
                 for c in continuations]
        return ids, media, conts

    def loglikelihood(self, pairs: Sequence[tuple[str, str]], media: Sequence[Parts | None] | None = None
                      ) -> list[tuple[float, bool]]:
        """(sum of log p of the continuation, whether greedy decoding would have produced it) per pair.
        One-token continuations of one context (multiple-choice letters) share a single forward pass.
        `media[i]`: the image / audio parts pair i's context is about (placeholders before its text)."""
        if media is not None and any(media):
            return self._loglikelihood_media(pairs, media)
        encoded = [encode_pair(self.llm.tokenizer, c, x) for c, x in pairs]
        shared: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, cont) in enumerate(encoded):
            if len(cont) == 1 and len(ctx) <= self.max_length:
                shared.setdefault(tuple(ctx), []).append(i)
        grouped = {i for members in shared.values() for i in members}
        rest = [i for i in range(len(encoded)) if i not in grouped]
        out: list[tuple[float, bool]] = [(0.0, False)] * len(encoded)
        for i, result in zip(rest, self.score_tokens([encoded[i] for i in rest]), strict=True):
            out[i] = result
        contexts = list(shared)
        for start in range(0, len(contexts), self.batch_size):
            chunk = contexts[start:start + self.batch_size]
            for ctx, logp in zip(chunk, self._next_token_logps([list(c) for c in chunk]), strict=True):
                best = int(logp.argmax())
                for i in shared[ctx]:
                    token = encoded[i][1][0]
                    out[i] = (float(logp[token]), token == best)
        return out

    def _loglikelihood_media(self, pairs: Sequence[tuple[str, str]], media: Sequence[Parts | None]
                             ) -> list[tuple[float, bool]]:
        encoded: list[tuple[list[int], list[int]]] = [([], [])] * len(pairs)
        soft: list[PromptMedia | None] = [None] * len(pairs)
        groups: dict[str, list[int]] = {}  # the choices of one question: its towers run once
        for i, ((context, _), parts) in enumerate(zip(pairs, media, strict=True)):
            if parts:
                groups.setdefault(json.dumps([context, parts]), []).append(i)
            else:
                encoded[i] = encode_pair(self.llm.tokenizer, *pairs[i])
        for members in groups.values():
            first = members[0]
            ids, pm, conts = self.media_prompt(pairs[first][0], media[first], [pairs[i][1] for i in members])
            for i, cont in zip(members, conts, strict=True):
                encoded[i], soft[i] = (ids, cont), pm
        return self.score_tokens(encoded, soft)

    def _next_token_logps(self, contexts: list[list[int]]) -> torch.Tensor:
        """log p of the next token after each context: [B, V]."""
        return F.log_softmax(last_token_logits(self.llm.model, contexts, self.llm.tokenizer.pad_id), dim=-1)

    def score_tokens(self, encoded: Sequence[tuple[list[int], list[int]]],
                     media: Sequence[PromptMedia | None] | None = None) -> list[tuple[float, bool]]:
        media = list(media) if media is not None else [None] * len(encoded)
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]) - len(encoded[i][1]))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(encoded)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            scored = self._score_batch([encoded[i] for i in chunk], [media[i] for i in chunk])
            for i, result in zip(chunk, scored, strict=True):
                out[i] = result
        return out

    @torch.no_grad()
    def _score_batch(self, batch: list[tuple[list[int], list[int]]],
                     media: list[PromptMedia | None] | None = None) -> list[tuple[float, bool]]:
        limit = self.max_length
        media = media or [None] * len(batch)
        for (ctx, cont), pm in zip(batch, media, strict=True):
            if pm is not None and len(ctx) + len(cont) > limit + 1:  # a left cut would cut into the image
                raise MediaError(f"a question with its image / audio is {len(ctx) + len(cont)} tokens, over the "
                                 f"{limit}-token context; raise --context")
        rows = [(ctx + cont)[-(limit + 1):] for ctx, cont in batch]  # the last id is only a target
        inputs = [r[:-1] for r in rows]
        width = max(len(r) for r in inputs)
        device = next(self.llm.model.parameters()).device
        ids = torch.full((len(rows), width), self.llm.tokenizer.pad_id, dtype=torch.long)
        keep = torch.zeros((len(rows), width), dtype=torch.bool)
        targets = []
        for b, ((_, cont), row) in enumerate(zip(batch, inputs, strict=True)):
            ids[b, :len(row)] = torch.tensor(row)
            keep[b, len(row) - len(cont):len(row)] = True
            targets += cont
        soft = None
        if any(pm is not None for pm in media):  # every row starts at position 0: pads only follow
            positions = torch.arange(width, device=device)[None].expand(len(rows), -1)
            soft = batch_media(media, positions, self.llm.model.config.bidirectional_kinds)
        logits = self.llm.model(ids.to(device), logits_to_keep=keep.to(device), media=soft)
        logp = F.log_softmax(logits.float(), dim=-1)
        target = torch.tensor(targets, device=device)
        picked = logp.gather(1, target[:, None])[:, 0]
        greedy = logp.argmax(-1) == target
        results, at = [], 0
        for _, cont in batch:
            n = len(cont)
            results.append((float(picked[at:at + n].sum()), bool(greedy[at:at + n].all())))
            at += n
        return results

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[tuple[float, int]]:
        """(log p of every token of each text, token count), in windows of the context length, each token
        predicted once and with as much preceding text as fits (lm-eval's rolling windows)."""
        out = []
        for text in texts:
            ids = self.llm.tokenizer.encode(text)  # ids[0] is BOS, which only conditions
            pieces, n, window = [], len(ids) - 1, self.max_length
            for start in range(0, n, window):
                end = min(start + window, n)
                context_start = max(0, end + 1 - (window + 1))
                pieces.append((ids[context_start:start + 1], ids[start + 1:end + 1]))
            scores = self.score_tokens(pieces)
            out.append((sum(s for s, _ in scores), n))
        return out

    # --- writing -----------------------------------------------------------------------------
    @property
    def engine(self):
        if self._engine is None:
            from gemmakit.engine import Engine

            self._engine = Engine(self.llm.model, self.llm.tokenizer, max_batch=self.batch_size,
                                  context=self.llm.context, compile=self.llm.compile)
        return self._engine

    def _run(self, prompts: list[list[int]], params: GenParams, stop_ids: list[int],
             stop: tuple[str, ...], seeds: Sequence[int] | None = None,
             media: Sequence[PromptMedia | None] | None = None) -> list[str]:
        if seeds is None:
            seeds = [None if params.seed is None else params.seed + i for i in range(len(prompts))]
        sampling = [SamplingParams(max_tokens=params.max_tokens, temperature=params.temperature, seed=seed,
                                   stop_token_ids=tuple(stop_ids), stop=stop) for seed in seeds]
        for p, s in zip(prompts, sampling, strict=True):
            self.llm.check_fits(len(p), s.max_tokens)
        return [req.text for req in self.engine.generate(prompts, sampling, media=media)]

    def generate(self, prompts: Sequence[str], params: GenParams, seeds: Sequence[int] | None = None,
                 media: Sequence[Parts | None] | None = None) -> list[str]:
        """Completions of `prompts`, generated together; prompt i samples with `seeds[i]` when given (so a
        sample's draw does not depend on the batch it lands in), else with `params.seed + i`. `media[i]`: the
        image / audio parts whose placeholders go before prompt i."""
        media = list(media) if media is not None else [None] * len(prompts)
        built = [self.media_prompt(p, parts)[:2] if parts else (self.llm.tokenizer.encode(p), None)
                 for p, parts in zip(prompts, media, strict=True)]
        return self._run([ids for ids, _ in built], params, self.llm.stop_ids(chat=False), params.stop, seeds,
                         [pm for _, pm in built])

    def chat(self, conversations: Sequence[Messages], params: GenParams) -> list[str]:
        """The answer text of each conversation (thoughts and markers removed)."""
        from gemmakit.chat.parser import parse

        llm = self.llm
        prepared = [llm.prepare_chat(m) for m in conversations]  # text-only: encode_prompt(render(m))
        stop = params.stop + (STOP_STRINGS if llm.is_base else ())
        texts = self._run([ids for ids, _ in prepared], params, llm.stop_ids(), stop, media=[m for _, m in prepared])
        if llm.is_base:
            return [t.strip() for t in texts]
        return [parse(t, llm.chat_format.family).content.strip() for t in texts]


class OpenAIBackend:
    """An OpenAI-compatible server: /v1/completions and /v1/chat/completions over HTTP."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 600):
        self.base_url, self.name, self.api_key, self.timeout = base_url.rstrip("/"), model, api_key, timeout

    def _post(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(f"{self.base_url}{route}", json.dumps(body).encode(), headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310 - user's URL
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            raise ValueError(f"{self.base_url}{route} answered {e.code}: {e.read()[:300]!r}") from None
        except urllib.error.URLError as e:
            raise ValueError(f"cannot reach {self.base_url}{route}: {e.reason}") from None

    def check_media(self, kinds: set[str], chat: bool) -> None:
        if not chat:
            raise ValueError("an endpoint takes images and audio only in chat messages: add --chat (the "
                             "completions API has no media input; choices need a local model anyway)")

    def loglikelihood(self, pairs: Sequence[tuple[str, str]], media: Any = None) -> list[tuple[float, bool]]:
        raise ValueError("log-likelihood tasks (MMLU, perplexity, choices) need a local model: an endpoint "
                         "does not return prompt log-probabilities")

    loglikelihood_rolling = loglikelihood

    def _sampling(self, params: GenParams) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.name, "max_tokens": params.max_tokens,
                                "temperature": params.temperature}
        if params.stop:
            body["stop"] = list(params.stop)[:4]  # OpenAI's limit
        if params.seed is not None:
            body["seed"] = params.seed
        return body

    def generate(self, prompts: Sequence[str], params: GenParams, seeds: Sequence[int] | None = None,
                 media: Sequence[Parts | None] | None = None) -> list[str]:
        if media is not None and any(media):
            self.check_media(set(), chat=False)
        seeds = seeds or [params.seed] * len(prompts)
        return [self._post("/completions", {**self._sampling(replace(params, seed=seed)), "prompt": p})
                ["choices"][0]["text"] for p, seed in zip(prompts, seeds, strict=True)]

    def chat(self, conversations: Sequence[Messages], params: GenParams) -> list[str]:
        return [(self._post("/chat/completions", {**self._sampling(params), "messages": wire_messages(m)})
                 ["choices"][0]["message"].get("content") or "").strip() for m in conversations]


def wire_messages(messages: Messages) -> Messages:
    """`messages` with each image / audio part given by path rewritten as OpenAI's parts carrying the file:
    {"type": "image_url", "image_url": {"url": "data:<mime>;base64,..."}} and {"type": "input_audio",
    "input_audio": {"data": "<base64>", "format": "<suffix>"}}; other parts pass unchanged."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            m = {**m, "content": [_wire_part(p) for p in content]}
        out.append(m)
    return out


def _wire_part(part: dict[str, Any]) -> dict[str, Any]:
    kind, path = part.get("type"), part.get("path")
    if kind not in ("image", "audio") or path is None:
        return part
    path = Path(path)
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    if kind == "image":
        mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}}
    return {"type": "input_audio", "input_audio": {"data": data, "format": path.suffix.lstrip(".").lower() or "wav"}}
