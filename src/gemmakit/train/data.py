"""Training data: JSON-lines records become token ids with a loss mask, in length-bucketed batches.

Record formats (one JSON object per line; the format is taken from the first good record, or given):
- `chat`: {"messages": [...]} with system/user/assistant/tool turns (tool calls, reasoning): rendered with the
  model's chat format, and the loss is on what the assistant writes only: its text and the end-of-turn marker,
  never the prompt, the user, the tool results or the template's headers.
- `completion`: {"prompt": ..., "completion": ...}: the loss is on the completion and the eos that ends it.
- `text`: {"text": ...} lines, or a plain .txt file, for continued pretraining: every token counts, and text
  longer than `max_length` is cut into consecutive windows.
- `preference`: {"prompt", "chosen", "rejected"} for DPO: the prompt is a string or a message list, each answer
  a string or an assistant message; each becomes two examples scored on the answer only.

Which tokens an assistant wrote is found from the text, not from token patterns: the conversation is rendered
up to each assistant turn with the generation prompt and again with that turn, and the difference is the
turn's span; token offsets map spans to tokens. When a template rewrites earlier turns (Gemma 4 drops old
thoughts), the running render is not a prefix of the whole one, and each assistant turn becomes an example
of its own with the history as the model sees it at inference.

Reasoning (`reasoning` / `reasoning_content` on an assistant message, or a thought block in its content) is
trained as Gemma 4 writes it: the prompt is rendered with thinking on, and the turn being learned starts with
its thought channel. Templates drop earlier thoughts, so a chat with reasoning becomes one example per
assistant turn. A format without a thinking mode (Gemma 3, the dialogue) reports such a record as bad.

Chat (and preference) records may hold image and audio parts for a multimodal model: train/media_records.py
reads them, runs the frozen towers once and carries the soft tokens on each Example; their positions are
never scored. On a text-only model such a record is reported, never trained with an empty placeholder.

A bad record (invalid JSON, a missing field, a render error, too long, an unreadable image) is reported with
its line number and skipped; the run goes on. Batches are deterministic in (seed, epoch), which is what makes
`--resume` exact.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

IGNORE = -100  # label of a token that is not scored
FORMATS = ("chat", "completion", "text", "preference")
# (messages, add_generation_prompt, enable_thinking) -> prompt text
Render = Callable[[list[dict[str, Any]], bool, bool], str]
Thought = Callable[[str], str]  # reasoning -> the thought channel the model writes before its answer
_THOUGHT = re.compile(r"<\|channel>thought\n?(.*?)<channel\|>", re.S)
MEDIA_TYPES = ("image", "image_url", "audio", "input_audio")  # content parts media/inputs.py reads


@dataclass
class Example:
    ids: list[int]
    labels: list[int]  # ids where scored, IGNORE elsewhere; aligned with ids (the shift is the loss's)
    reference: float | None = None  # DPO: the reference model's log-likelihood of the scored tokens
    media: Any = None  # media.soft.PromptMedia: soft tokens at fixed positions (records with images / audio)

    @property
    def scored(self) -> int:
        return sum(label != IGNORE for label in self.labels[1:])


@dataclass
class Dataset:
    examples: list[Example] = field(default_factory=list)  # for DPO: chosen, rejected, chosen, rejected, ...
    problems: list[str] = field(default_factory=list)  # "file:line: why", one per skipped record
    format: str = ""

    @property
    def pairs(self) -> bool:
        return self.format == "preference"


def detect_format(record: dict[str, Any]) -> str:
    if "messages" in record:
        return "chat"
    if {"chosen", "rejected"} <= record.keys():
        return "preference"
    if {"prompt", "completion"} <= record.keys():
        return "completion"
    if "text" in record:
        return "text"
    raise ValueError(f"cannot tell the record's format from its keys {sorted(record)}: use messages, "
                     "prompt+completion, text, or prompt+chosen+rejected")


class Tokenize:
    """Text -> Example, with the loss on given character spans."""

    def __init__(self, tokenizer: Any, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length
        self.bos = tokenizer.id_to_token(tokenizer.bos_id)

    def spans(self, text: str, spans: Sequence[tuple[int, int]], eos: bool = False) -> Example:
        add_bos = not text.startswith(self.bos)
        enc = self.tokenizer.backend.encode(text, add_special_tokens=False)
        ids, offsets = list(enc.ids), list(enc.offsets)
        if add_bos:
            ids, offsets = [self.tokenizer.bos_id, *ids], [(0, 0), *offsets]
        inside = [any(a <= start < b for a, b in spans) for start, _ in offsets]
        labels = [i if scored else IGNORE for i, scored in zip(ids, inside, strict=True)]
        return self.checked(ids, labels, eos)

    def checked(self, ids: list[int], labels: list[int], eos: bool = False, media: Any = None) -> Example:
        """The Example, with the eos appended if asked; refused when too long or with nothing to learn."""
        if eos:
            ids.append(self.tokenizer.eos_id)
            labels.append(self.tokenizer.eos_id)
        if len(ids) > self.max_length:
            raise ValueError(f"{len(ids)} tokens, more than max_length {self.max_length}")
        if not any(label != IGNORE for label in labels[1:]):
            raise ValueError("nothing to learn: the record has no scored tokens")
        return Example(ids, labels, media=media)

    def windows(self, text: str) -> list[Example]:
        ids = self.tokenizer.encode(text)
        n = self.max_length
        return [Example(ids[i:i + n], ids[i:i + n]) for i in range(0, len(ids), n) if len(ids[i:i + n]) > 1]


def reasoning_of(message: dict[str, Any]) -> str:
    text = message.get("reasoning") or message.get("reasoning_content") or ""
    if not text and isinstance(message.get("content"), str):
        found = _THOUGHT.search(message["content"])
        text = found.group(1) if found else ""
    return str(text).strip()


def chat_examples(messages: list[dict[str, Any]], render: Render, tok: Tokenize,
                  thought: Thought | None = None) -> list[Example]:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    turns = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"]
    if not turns:
        raise ValueError("no assistant message to learn from")
    thinking = any(reasoning_of(messages[i]) for i in turns)
    if thinking and thought is None:
        raise ValueError("the record has assistant reasoning, but this chat format has no thinking mode "
                         "(use a Gemma 4 format, or drop the reasoning)")
    whole = render(messages, False, thinking)
    turn_texts, running = [], not thinking
    for i in turns:
        before, after = render(messages[:i], True, thinking), render(messages[:i + 1], False, thinking)
        if not after.startswith(before):
            raise ValueError(f"the chat format's prompt for message {i} is not a prefix of its rendered turn")
        if reasoning_of(messages[i]):
            after = before + thought(reasoning_of(messages[i])) + after[len(before):]
        turn_texts.append((after, (len(before), len(after))))
        running = running and whole.startswith(after)
    if running:
        return [tok.spans(whole, [span for _, span in turn_texts])]
    return [tok.spans(text, [span]) for text, span in turn_texts]


def _as_messages(prompt: Any) -> list[dict[str, Any]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        return list(prompt)
    raise ValueError("prompt must be a string or a list of messages")


def _as_answer(answer: Any) -> dict[str, Any]:
    if isinstance(answer, str):
        return {"role": "assistant", "content": answer}
    if isinstance(answer, list) and len(answer) == 1:
        answer = answer[0]
    if isinstance(answer, dict) and answer.get("role", "assistant") == "assistant":
        return {**answer, "role": "assistant"}
    raise ValueError("chosen/rejected must be a string or one assistant message")


def record_examples(record: Any, fmt: str, render: Render, tok: Tokenize,
                    thought: Thought | None = None) -> list[Example]:
    if not isinstance(record, dict):
        raise ValueError("a record must be a JSON object")
    if fmt == "chat":
        return chat_examples(record["messages"], render, tok, thought)
    if fmt == "completion":
        prompt, completion = record["prompt"], record["completion"]
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise ValueError("prompt and completion must be strings")
        return [tok.spans(prompt + completion, [(len(prompt), len(prompt) + len(completion))], eos=True)]
    if fmt == "text":
        if not isinstance(record["text"], str):
            raise ValueError("text must be a string")
        return tok.windows(record["text"])
    prompt = _as_messages(record["prompt"])
    chosen, rejected = (chat_examples(prompt + [_as_answer(record[k])], render, tok, thought)
                        for k in ("chosen", "rejected"))
    if len(chosen) != 1 or len(rejected) != 1:
        raise ValueError("a preference pair must end in one assistant answer")
    return [chosen[-1], rejected[-1]]


def _records(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as e:
                    yield number, e


def media_parts(messages: Any) -> list[dict[str, Any]]:
    """The image / audio parts of a message list (any spelling media/inputs.py takes)."""
    if not isinstance(messages, list):
        return []
    return [part for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list)
            for part in m["content"] if isinstance(part, dict) and part.get("type") in MEDIA_TYPES]


def _with_media(record: Any, fmt: str, tok: Tokenize, media: Any, root: Path) -> tuple[Any, Tokenize]:
    """A chat / preference record with its media read and encoded, and the Tokenize that expands them."""
    if fmt not in ("chat", "preference") or not isinstance(record, dict):
        return record, tok
    key = "messages" if fmt == "chat" else "prompt"
    if not media_parts(record.get(key)):
        if any(media_parts(record.get(k)) for k in ("chosen", "rejected")):
            raise ValueError("an answer has an image or audio part: the model writes text only")
        return record, tok
    if media is None:
        raise ValueError("the record has image or audio parts, but this model is text-only: fine-tune a "
                         "multimodal checkpoint (with its vision / audio tower), or drop the parts")
    messages, items = media.read(record[key], root)
    return {**record, key: messages}, media.tokenize(tok, items)


def load_dataset(path: str | Path, tokenizer: Any, render: Render, max_length: int = 1024,
                 fmt: str = "auto", thought: Thought | None = None, media: Any = None) -> Dataset:
    """Read a .jsonl file (or a .txt file as one text) into examples; bad records land in `problems`.
    `media`: a train.media_records.RecordMedia for a model that reads images / audio (paths in records are
    relative to the file's directory)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training data {path} does not exist")
    tok = Tokenize(tokenizer, max_length)
    if path.suffix == ".txt":
        return Dataset(tok.windows(path.read_text(encoding="utf-8")), [], "text")
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}: choose auto or one of {', '.join(FORMATS)}")
    data = Dataset(format="" if fmt == "auto" else fmt)
    for number, record in _records(path):
        try:
            if isinstance(record, Exception):
                raise ValueError(f"not valid JSON ({record.msg})")
            data.format = data.format or detect_format(record)
            record, record_tok = _with_media(record, data.format, tok, media, path.resolve().parent)
            data.examples += record_examples(record, data.format, render, record_tok, thought)
        except (ValueError, KeyError, TypeError) as e:
            why = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            data.problems.append(f"{path}:{number}: {why}")
    if not data.examples:
        raise ValueError(f"{path}: no usable records" + (f" (first problem: {data.problems[0]})"
                                                         if data.problems else " (the file is empty)"))
    return data


def split(data: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """A held-out share of the records (pairs stay together), the same for the same seed."""
    unit = 2 if data.pairs else 1
    groups = [data.examples[i:i + unit] for i in range(0, len(data.examples), unit)]
    n_val = int(round(len(groups) * fraction)) if fraction > 0 else 0
    if fraction > 0 and len(groups) > 1:
        n_val = min(max(n_val, 1), len(groups) - 1)
    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    pick = lambda idx: [e for i in idx for e in groups[i]]  # noqa: E731
    return (Dataset(pick(train), data.problems, data.format), Dataset(pick(val), [], data.format))


def step_batches(data: Dataset, per_step: int, seed: int, epoch: int) -> list[list[Example]]:
    """One epoch as a list of optimizer steps, each `per_step` examples (pairs kept whole). Records are
    shuffled by (seed, epoch), then sorted by length within windows of 8 steps, so that a step's sequences
    have similar lengths (little padding) while the order stays random across the epoch."""
    unit = 2 if data.pairs else 1
    groups = [data.examples[i:i + unit] for i in range(0, len(data.examples), unit)]
    per_step_groups = max(1, per_step // unit)
    order = list(range(len(groups)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    window = per_step_groups * 8
    for start in range(0, len(order), window):
        order[start:start + window] = sorted(order[start:start + window], key=lambda i: len(groups[i][0].ids))
    steps = [order[i:i + per_step_groups] for i in range(0, len(order), per_step_groups)]
    random.Random(seed * 1_000_003 + epoch + 1).shuffle(steps)
    return [[e for i in step for e in groups[i]] for step in steps]


def collate(examples: Sequence[Example], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded ids and labels [B, T]: with causal attention, padding after a sequence cannot change it."""
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, :len(e.ids)] = torch.tensor(e.ids)
        labels[row, :len(e.labels)] = torch.tensor(e.labels)
    return ids, labels
