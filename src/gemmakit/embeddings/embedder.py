"""`Embedder`: texts (or token ids) in, L2-normalised sentence embeddings out, for any `Encoder`.

What an encoder leaves to this class, so both model families get it once: tokenisation with the directory's
own tokenizer.json (its special tokens, as transformers adds them), the task prompts of
`config_sentence_transformers.json` ("query" -> "task: search result | query: "), batching, Matryoshka
truncation and the final normalisation. Sentence-transformers truncates after its Normalize module and then
normalises again, which gives the same direction as normalise(truncate(x)); that is what `embed` computes.

Batching: rows are sorted by length (longest first) and cut into batches of at most `batch_size` rows and
`MAX_BATCH_TOKENS` padded tokens, so a batch pads little and no batch of long texts builds an attention
mask of gigabytes. Results are put back in input order.

Too-long inputs are an error, never silently cut: `InputTooLong` names the input's index, its length and the
limit (the model's `max_length`, 2048 tokens for EmbeddingGemma), as OpenAI's API refuses them. A caller that
wants sentence-transformers' behaviour (keep the first tokens) asks for it with `truncate=True`.

Token-id inputs (`embed_ids`, the HTTP API's `input: [[...]]`) are used exactly as given: the caller adds the
special tokens it wants; no prompt is applied.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import tokenizers
import torch
import torch.nn.functional as F
from torch import Tensor

from gemmakit.checkpoints.common import MAX_TOKENIZER_JSON, CheckpointError, check_size
from gemmakit.embeddings.model import Encoder, load_gemma_encoder, load_json_if_present, model_type, read_modules

MAX_BATCH_TOKENS = 16384  # padded tokens per forward: bounds the attention masks and activations of one batch
GEMMA2_TYPES = ("embedding_gemma2", "embedding_gemma2_text")


class EmbeddingError(ValueError):
    """A bad input or option; `index` is the input it concerns, when one does."""

    def __init__(self, message: str, index: int | None = None, code: str | None = None):
        super().__init__(message)
        self.index, self.code = index, code


class InputTooLong(EmbeddingError):
    def __init__(self, index: int, length: int, limit: int):
        super().__init__(f"input {index} is {length} tokens long; this model embeds at most {limit} tokens. "
                         "Shorten or split it", index, "context_length_exceeded")
        self.length, self.limit = length, limit


class Embedder:
    """An encoder with its tokenizer and prompts. Not thread-safe: one `embed` at a time (the server holds a
    lock around it)."""

    def __init__(self, encoder: Encoder, tokenizer: tokenizers.Tokenizer, name: str, prompts: dict[str, str],
                 default_prompt: str | None = None, pad_id: int = 0, device: str | torch.device = "cpu"):
        self.encoder, self.tokenizer, self.name = encoder, tokenizer, name
        self.prompts, self.default_prompt, self.pad_id = prompts, default_prompt, pad_id
        self.device = torch.device(device)
        self.max_length: int = int(encoder.max_length)
        self.vocab_size: int = int(getattr(encoder, "vocab_size", None) or getattr(getattr(encoder, "config", None),
                                   "vocab_size", None) or tokenizer.get_vocab_size(with_added_tokens=True))
        self.dimension: int = self._encode([[pad_id]]).shape[-1]  # also a warm-up of the first forward

    # --- text -> ids ---------------------------------------------------------------------------------------
    def prompt_for(self, prompt: str | None = None, task: str | None = None) -> str:
        """The text put before every input: `prompt` as given, the prompt of `task`, or the model's default."""
        if prompt is not None and task is not None:
            raise EmbeddingError("give a task or a prompt, not both")
        if task is not None:
            if task not in self.prompts:
                known = ", ".join(sorted(self.prompts)) or "none"
                raise EmbeddingError(f"unknown task {task!r}; this model's tasks are: {known}", code="unknown_task")
            return self.prompts[task]
        return prompt if prompt is not None else self.default_prompt or ""

    def tokenize(self, texts: Sequence[str], *, prompt: str | None = None, task: str | None = None,
                 truncate: bool = False) -> list[list[int]]:
        """Token ids of prompt + text for each text, special tokens included; too long is an `InputTooLong`
        unless `truncate`, which keeps the first tokens and the closing special tokens, as transformers does."""
        prefix = self.prompt_for(prompt, task)
        encodings = self.tokenizer.encode_batch([prefix + t for t in texts], add_special_tokens=True)
        rows = [e.ids for e in encodings]
        if truncate:
            rows = [self._truncated(e) if len(e.ids) > self.max_length else e.ids for e in encodings]
        self.check(rows)
        return rows

    def _truncated(self, encoding: Any) -> list[int]:
        """The first max_length tokens, ending with the encoding's closing special tokens (<eos>) if it has any."""
        ids, special = encoding.ids, encoding.special_tokens_mask
        last_text = next((i for i in range(len(ids) - 1, -1, -1) if not special[i]), -1)
        tail = len(ids) - 1 - last_text  # special tokens after the last text token
        return ids[:self.max_length - tail] + ids[len(ids) - tail:] if tail else ids[:self.max_length]

    def check(self, rows: Sequence[Sequence[int]]) -> None:
        """Refuse an empty row, one over `max_length`, or an id outside the vocabulary, naming its index."""
        for i, row in enumerate(rows):
            if not row:
                raise EmbeddingError(f"input {i} has no tokens", i)
            if len(row) > self.max_length:
                raise InputTooLong(i, len(row), self.max_length)
            bad = next((t for t in row if isinstance(t, bool) or not isinstance(t, int)
                        or not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise EmbeddingError(f"input {i} holds token id {bad!r}; ids run from 0 to {self.vocab_size - 1}",
                                     i, "invalid_token_id")

    # --- ids -> embeddings ---------------------------------------------------------------------------------
    def embed(self, texts: Sequence[str], *, prompt: str | None = None, task: str | None = None,
              dimensions: int | None = None, batch_size: int = 32, truncate: bool = False,
              progress: Callable[[int], None] | None = None) -> Tensor:
        """L2-normalised embeddings [N, dimensions or D] (float32, CPU) of `texts`, each after the prompt."""
        rows = self.tokenize(texts, prompt=prompt, task=task, truncate=truncate)
        return self.embed_ids(rows, dimensions=dimensions, batch_size=batch_size, progress=progress)

    def embed_ids(self, rows: Sequence[Sequence[int]], *, dimensions: int | None = None, batch_size: int = 32,
                  progress: Callable[[int], None] | None = None) -> Tensor:
        """`embed` for token-id rows used as given (no prompt, no special tokens added)."""
        self.check(rows)
        dims = self.check_dimensions(dimensions)
        if batch_size < 1:
            raise EmbeddingError(f"batch_size must be at least 1, got {batch_size}")
        out = torch.empty(len(rows), self.dimension)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        start = 0
        while start < len(order):
            width = len(rows[order[start]])
            n = max(1, min(batch_size, MAX_BATCH_TOKENS // width, len(order) - start))
            picked = order[start:start + n]
            out[picked] = self._encode([rows[i] for i in picked])
            start += n
            if progress is not None:
                progress(n)
        return F.normalize(out[:, :dims], dim=-1)

    def check_dimensions(self, dimensions: int | None) -> int:
        if dimensions is None:
            return self.dimension
        if isinstance(dimensions, bool) or not isinstance(dimensions, int) or not 1 <= dimensions <= self.dimension:
            raise EmbeddingError(f"dimensions must be an integer from 1 to {self.dimension} (Matryoshka sizes for "
                                 f"EmbeddingGemma: 768, 512, 256, 128), got {dimensions!r}", code="invalid_dimensions")
        return dimensions

    def _encode(self, rows: list[Sequence[int]]) -> Tensor:
        """Right-padded forward of rows; the encoder's unnormalised embeddings [B, D] in float32 on the CPU."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[b, :len(r)] = 1
        with torch.inference_mode():
            return self.encoder.encode(ids.to(self.device), mask.to(self.device)).float().cpu()


# ---------------------------------------------------------------------------------------------------------
# Loading.


def read_tokenizer(folder: Path) -> tuple[tokenizers.Tokenizer, int]:
    """The folder's tokenizer.json and its pad id. Its own post-processor adds the special tokens: transformers
    (5.x) drops tokenizer_config.json's add_bos_token / add_eos_token whenever a tokenizer.json is present."""
    file = folder / "tokenizer.json"
    if not file.is_file():
        raise CheckpointError(f"{folder} has no tokenizer.json; an embedding model directory needs its tokenizer")
    check_size(file, MAX_TOKENIZER_JSON, "re-download it")
    try:
        tok = tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception
        raise CheckpointError(f"{file} is not a valid tokenizer.json ({e})") from e
    tok.no_padding()
    tok.no_truncation()
    pad = load_json_if_present(folder / "tokenizer_config.json").get("pad_token", "<pad>")
    pad_id = tok.token_to_id(str(pad.get("content") if isinstance(pad, dict) else pad))
    return tok, 0 if pad_id is None else pad_id


def display_name(path: Path) -> str:
    """The directory's name, or for a Hugging Face cache snapshot (models--org--name/snapshots/rev) org/name."""
    real = path.resolve()
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--"):
        return real.parent.parent.name[len("models--"):].replace("--", "/")
    return real.name or "embeddings"


def is_embedding_model(path: str | Path) -> bool:
    """Whether `path` is an embedding model directory (sentence-transformers layout, a bidirectional Gemma 3
    text model, or EmbeddingGemma 2) rather than a generative checkpoint."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return False
    if (p / "modules.json").is_file():
        return True
    config = load_json_if_present(p / "config.json")
    return config.get("model_type") in GEMMA2_TYPES or config.get("use_bidirectional_attention") is True


def _load_gemma2(path: Path, dtype: torch.dtype, device: str) -> Encoder:
    try:
        from gemmakit.embeddings import gemma2
    except ModuleNotFoundError as e:
        if e.name != "gemmakit.embeddings.gemma2":
            raise
        raise CheckpointError(f"{path} is an EmbeddingGemma 2 model, and this gemmakit has no EmbeddingGemma 2 "
                              "encoder (gemmakit.embeddings.gemma2); update gemmakit") from None
    return gemma2.load(path, dtype, device)


def load_embedder(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Embedder:
    """An `Embedder` for a sentence-transformers directory or a bare HF directory: EmbeddingGemma (a Gemma 3
    text model, model_type gemma3_text) or EmbeddingGemma 2 (embedding_gemma2 / embedding_gemma2_text)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory; give an embedding model directory (sentence-transformers "
                              "layout, e.g. google/embeddinggemma-300m)")
    modules = read_modules(path)
    kind = model_type(path, modules)
    if kind in GEMMA2_TYPES:
        encoder, token_dir = _load_gemma2(path, dtype, device), path
    elif kind == "gemma3_text":
        encoder = load_gemma_encoder(path, modules, dtype, device)
        token_dir = path / str(modules[0].get("path", ""))
    else:
        raise CheckpointError(f"{path}: model_type {kind!r} is not an embedding model gemmakit runs (EmbeddingGemma: "
                              f"gemma3_text; EmbeddingGemma 2: {', '.join(GEMMA2_TYPES)})")
    tokenizer, pad_id = read_tokenizer(token_dir if (token_dir / "tokenizer.json").is_file() else path)
    st = load_json_if_present(path / "config_sentence_transformers.json")
    prompts = st.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
        raise CheckpointError(f"{path}/config_sentence_transformers.json: prompts must map task names to strings")
    default = st.get("default_prompt_name")
    return Embedder(encoder, tokenizer, display_name(path), prompts, prompts.get(default) if default else None,
                    pad_id, device)
