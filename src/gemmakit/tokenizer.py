"""Gemma's tokenizer: text <-> token ids, on top of HF's Rust `tokenizers`.

What it does
------------
`Tokenizer.from_gguf` builds the tokenizer a GGUF file describes. A GGUF carries no tokenizer.json,
only llama.cpp's description of the vocabulary: the pieces (`tokenizer.ggml.tokens`), their scores
and types, and the special token ids. From those we build a `tokenizers.Tokenizer` that encodes id
for id like `transformers.AutoTokenizer.from_pretrained(dir, gguf_file=name)` does for the same file:

- model: BPE with byte fallback (a character missing from the vocabulary becomes `<0xNN>` pieces);
- normalizer: every space becomes "▁"; no prefix space is added (Gemma does not add one);
- decoder: "▁" -> " ", byte pieces -> UTF-8, then fuse;
- control tokens (type 3: `<bos>`, `<start_of_turn>`, `<unusedN>`, ...) become special added tokens
  and user-defined ones (type 4: runs of newlines or tabs, `<start_of_image>`, ...) plain added
  tokens, so both are matched whole in the raw text instead of being cut into pieces.

The GGUF lists no merges, so we rebuild them. Every way to cut a piece into two halves that are both
pieces is a merge; merges rank by the piece's position in the file (Gemma's scores do not follow the
merge order, its positions do), the longer left half first. That is the list transformers derives.
Runs of spaces are stored with real spaces ("   "), but the normalizer turns spaces into "▁", so
those pieces are respelled ("▁▁▁") and become ordinary BPE pieces, again as transformers does.

`Tokenizer.from_file` loads an HF tokenizer.json instead (e.g. from a safetensors checkpoint).
`Tokenizer.decode_stream` decodes ids one at a time for streaming, never splitting a character.

Text that stays text
--------------------
`encode` turns control-token text ("<start_of_turn>", "<eos>") into the control tokens, which is what a
rendered chat template needs for its own markup, and exactly wrong for what users wrote inside it.
`Tokenizer.literal` brackets message text that holds such strings (two Unicode noncharacters around it);
`encode` spells everything inside the brackets out as ordinary text. Text without control strings is left
as it was, so ordinary prompts encode to the same ids as before.

What it does not do
-------------------
- Other GGUF vocabularies (llama-3 byte-level BPE, T5 unigram): rejected with an error that says to
  use the model's tokenizer.json instead.
- Chat templates: the file's template string is kept in `chat_template`, but not rendered here.
- Truncation, padding and attention masks: callers do that with the ids.

Gemma 4 GGUFs
-------------
Gemma 4's vocabulary is stored differently (`tokenizer.ggml.model == "gemma4"`): the file carries the BPE
merges, and llama.cpp tokenizes it as "SentencePiece-style BPE" (llama-vocab.cpp, pre-type GEMMA4): spaces
become "▁", the text is cut into runs of newlines and runs of everything else, and each run is merged with the
file's merges over whole characters, falling back to <0xNN> byte pieces. `build_gemma4_backend` builds exactly
that, so `encode` gives llama.cpp's ids (tests/test_gguf_gemma4.py checks them against llama.cpp itself).
Control tokens (<bos>, <|turn>, ...) are special; the tool-call, channel and <|"|> markers, which Gemma 4's
converter marks user-defined so a chat parser can read them, are plain added tokens, matched whole.

Why the cache
-------------
Converting Gemma's 262k pieces (deriving ~515k merges, building the BPE) takes ~2.5 s on a small
machine; reloading the result takes ~1.2 s, nearly all of it `tokenizers` parsing its own JSON (the
floor: the same tokenizer.json saved by transformers loads no faster). So the converted tokenizer.json
is cached in ~/.cache/gemmakit/tokenizers/, named by a hash of the file's tokenizer metadata: a copied
or renamed GGUF still hits, a changed vocabulary misses, and nothing depends on mtimes. It is written
to a temporary file and moved into place, so a crash or two processes converting at once never leave
a half-written cache behind; a cache that does not load is rebuilt rather than trusted.
"""

import contextlib
import copy
import hashlib
import json
import re
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from tokenizers import AddedToken, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from gemmakit.files import cache_dir as cache_folder
from gemmakit.files import write_text_atomic

# Bump when the conversion changes, so caches written by older code are not reused.
CACHE_VERSION = 1

# Text between these two (Unicode noncharacters, never meant as text) is encoded with special tokens spelled
# out: see Tokenizer.literal.
LITERAL_OPEN, LITERAL_CLOSE = "\ufdd0", "\ufdd1"
_LITERAL = re.compile("\ufdd0([^\ufdd0\ufdd1]*)\ufdd1")

# Gemma 1-3 GGUFs all describe their vocabulary the same way (`tokenizer.ggml.model == "llama"`).
GEMMA_ARCHITECTURES = ("gemma", "gemma2", "gemma3")
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's token types


def read_gguf_metadata(path: Path) -> tuple[dict[str, Any], str]:
    """`(metadata, digest)`: every key/value of a GGUF, and a hash of the raw bytes the tokenizer uses."""
    from gguf import GGUFValueType

    from gemmakit.checkpoints.gguf_reader import number_array, open_gguf, string_array

    reader = open_gguf(path)
    values: dict[str, Any] = {}
    digest = hashlib.sha256(f"gemmakit-tokenizer-v{CACHE_VERSION}".encode())
    for key, field in reader.fields.items():
        if field.types and field.types[0] == GGUFValueType.ARRAY:
            strings = field.types[-1] == GGUFValueType.STRING
            values[key] = string_array(field) if strings else number_array(field)
        else:
            values[key] = field.contents()
        if key.startswith("tokenizer.") or key == "general.architecture":
            digest.update(key.encode())
            for i in field.data:
                digest.update(np.asarray(field.parts[i]).tobytes())
    return values, digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# GGUF vocabulary -> tokenizers.Tokenizer, the way transformers' GGUF loader does it for Gemma.


def gemma_pieces(tokens: Sequence[str]) -> list[str]:
    """The pieces as BPE sees them: whitespace-only tokens containing a space respelled with "▁"."""
    # transformers' exact rule (any whitespace-only token with a space, all chars -> "▁"); matching it
    # keeps the vocabularies identical even for odd tokens like " \t".
    return ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]


def derive_merges(pieces: Sequence[str], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """SentencePiece merges recovered from the pieces, best first.

    Each piece contributes every split into two known pieces; pieces rank by position (earlier is
    better) and, within a piece, the longer left half comes first.
    """
    merges = []
    for index, piece in enumerate(pieces):
        if vocab[piece] != index:  # a duplicated piece: only its last copy is in the vocab
            continue
        for cut in range(len(piece) - 1, 0, -1):
            left = piece[:cut]
            if left in vocab and (right := piece[cut:]) in vocab:
                merges.append((left, right))
    return merges


def _special_template(
    bos: tuple[str, int] | None, eos: tuple[str, int] | None
) -> processors.TemplateProcessing | None:
    """The post-processor transformers attaches, so the cached tokenizer.json is a faithful drop-in."""
    if bos is None and eos is None:
        return None
    b, e = bos and bos[0], eos and eos[0]
    single = " ".join(part for part in (b and f"{b}:0", "$A:0", e and f"{e}:0") if part)
    pair = " ".join(part for part in (single, b and f"{b}:1", "$B:1", e and f"{e}:1") if part)
    special = [t for t in (bos, eos) if t is not None]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def build_gemma_backend(meta: dict[str, Any]) -> tokenizers.Tokenizer:
    """A `tokenizers.Tokenizer` for a Gemma GGUF's vocabulary, equal to transformers' conversion."""
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type")
    types = types.tolist() if types is not None else [0] * len(tokens)
    pieces = gemma_pieces(tokens)
    vocab = {piece: index for index, piece in enumerate(pieces)}
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    model = BPE(
        vocab=vocab,
        merges=derive_merges(pieces, vocab),
        unk_token=_token_at(tokens, unk_id) or "<unk>",
        fuse_unk=True,
        byte_fallback=True,  # every character encodes: as a piece, or as its UTF-8 bytes
        dropout=None,
    )
    backend = tokenizers.Tokenizer(model)
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    # After the normalizer no " " is left, so this split is a no-op; it is kept so the JSON equals
    # what transformers' GemmaTokenizer produces.
    backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    # Added tokens are matched whole in the raw text, before normalization; without this
    # "<start_of_turn>" would be cut into "<", "start", ... Listed by their GGUF spelling, like
    # transformers: the respelled space runs are then not in the vocab and stay ordinary pieces.
    kinds = list(zip(tokens, types, strict=True))
    control = [t for t, k in kinds if k == _CONTROL]
    user_defined = [t for t, k in kinds if k == _USER_DEFINED and t in vocab]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user_defined])
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))  # llama.cpp's default for SPM vocabs
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    bos_id, eos_id = meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]
    template = _special_template((tokens[bos_id], bos_id) if add_bos else None,
                                 (tokens[eos_id], eos_id) if add_eos else None)
    if template is not None:
        backend.post_processor = template
    return backend


def build_gemma4_backend(meta: dict[str, Any]) -> tokenizers.Tokenizer:
    """A `tokenizers.Tokenizer` for a Gemma 4 GGUF vocabulary (`tokenizer.ggml.model == "gemma4"`), encoding
    as llama.cpp's tokenizer does for it (llama-vocab.cpp, pre-type GEMMA4): spaces become "▁", the text is
    cut into runs of newlines and runs of anything else, and each run is merged with the file's own BPE merges
    over whole characters, a character no piece covers falling back to its UTF-8 bytes as <0xNN> pieces."""
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type")
    types = types.tolist() if types is not None else [0] * len(tokens)
    vocab = {piece: index for index, piece in enumerate(tokens)}
    merges = [_split_merge(m) for m in meta["tokenizer.ggml.merges"]]
    model = BPE(vocab=vocab, merges=[m for m in merges if m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab],
                unk_token=_token_at(tokens, meta.get("tokenizer.ggml.unknown_token_id")) or "<unk>",
                byte_fallback=True, dropout=None)
    backend = tokenizers.Tokenizer(model)
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    backend.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex("\n+"), behavior="isolated")
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    # llama.cpp matches control tokens (with special parsing, as a chat prompt needs) and user-defined ones
    # (always) whole in the raw text before anything else.
    kinds = list(zip(tokens, types, strict=True))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in kinds if k == _CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in kinds if k == _USER_DEFINED])
    bos_id = meta["tokenizer.ggml.bos_token_id"]
    # llama.cpp always adds BOS for Gemma 4, whatever add_bos_token says
    backend.post_processor = _special_template((tokens[bos_id], bos_id), None)
    return backend


def _split_merge(merge: str) -> tuple[str, str]:
    """"a b" -> ("a", "b"), split at the first space after the first character, as llama.cpp reads merges."""
    cut = merge.find(" ", 1)
    if cut < 0:
        raise ValueError(f"tokenizer.ggml.merges holds {merge!r}, which is not two pieces separated by a space")
    return merge[:cut], merge[cut + 1:]


def _token_at(tokens: Sequence[str], index: int | None) -> str | None:
    return tokens[index] if index is not None and 0 <= index < len(tokens) else None


def _check_gemma_gguf(meta: dict[str, Any], path: Path) -> None:
    """Refuse vocabularies this converter would get wrong, before doing any work."""
    arch, model = meta.get("general.architecture"), meta.get("tokenizer.ggml.model")
    if "tokenizer.ggml.tokens" not in meta:
        raise ValueError(f"{path}: this GGUF has no vocabulary; load a tokenizer.json with from_file.")
    if model == "gemma4" and arch == "gemma4":
        if "tokenizer.ggml.merges" not in meta:
            raise ValueError(f"{path}: this Gemma 4 GGUF has no tokenizer.ggml.merges; re-convert it.")
    elif model != "llama" or arch not in GEMMA_ARCHITECTURES:
        raise ValueError(
            f"{path}: a {arch!r} GGUF with a {model!r} vocabulary is not supported; only Gemma 1-3 "
            f"(architectures {GEMMA_ARCHITECTURES}, tokenizer 'llama') and Gemma 4 (architecture and tokenizer "
            "'gemma4'). Use Tokenizer.from_file with "
            "the model's tokenizer.json instead."
        )
    tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type")
    if types is not None and len(types) != len(tokens):
        raise ValueError(f"{path}: {len(tokens)} tokens but {len(types)} token types; the file is corrupt.")
    for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        if _token_at(tokens, meta.get(key)) is None:
            raise ValueError(f"{path}: {key} is missing or out of range; the file is corrupt.")


# ---------------------------------------------------------------------------------------------
# The cache of converted tokenizers.


def _load_cached(cache_file: Path) -> tokenizers.Tokenizer | None:
    if not cache_file.is_file():
        return None
    try:
        return tokenizers.Tokenizer.from_file(str(cache_file))
    except Exception:  # tokenizers raises a bare Exception; any unreadable cache is simply rebuilt
        return None


def _write_cache(backend: tokenizers.Tokenizer, cache_file: Path) -> None:
    """Write atomically (temp file + rename) so readers never see half a file; failure only warns."""
    try:
        write_text_atomic(cache_file, backend.to_str())
    except OSError as e:
        warnings.warn(f"could not cache the tokenizer at {cache_file} ({e}); the next load converts again.",
                      stacklevel=3)


# ---------------------------------------------------------------------------------------------
# tokenizer.json directories: which tokens are BOS/EOS/PAD.


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); fix or remove it.") from e


def _special_id(backend: tokenizers.Tokenizer, config: dict[str, Any], name: str,
                fallbacks: Sequence[str]) -> int | None:
    """The id of the token `config[name]` names (a string or {"content": ...}), else of a usual name."""
    value = config.get(name)
    if isinstance(value, dict):
        value = value.get("content")
    candidates = ([value] if isinstance(value, str) else []) + list(fallbacks)
    for token in candidates:
        if (token_id := backend.token_to_id(token)) is not None:
            return token_id
    return None


# ---------------------------------------------------------------------------------------------
# The public API.


class Tokenizer:
    """Text <-> ids for Gemma. `backend` is the underlying `tokenizers.Tokenizer`, for anything else."""

    def __init__(self, backend: tokenizers.Tokenizer, bos_id: int, eos_id: int, pad_id: int,
                 chat_template: str | None = None):
        self.backend = backend
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.chat_template = chat_template
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        # (path, digest) of the GGUF this came from, so export_gguf can copy its exact vocabulary arrays.
        self.gguf_source: tuple[Path, str] | None = None
        self._control_pattern: Any = None
        self._literal: tokenizers.Tokenizer | None = None
        self._literal_lock = threading.Lock()

    @classmethod
    def from_gguf(cls, path: str | Path, cache_dir: Path | None = None) -> "Tokenizer":
        """The tokenizer a Gemma GGUF describes; the conversion is cached in `cache_dir` (by default gemmakit's
        tokenizer cache, files.cache_dir)."""
        path = Path(path).expanduser()
        meta, digest = read_gguf_metadata(path)
        _check_gemma_gguf(meta, path)
        cache_file = Path(cache_dir or cache_folder("tokenizers")).expanduser() / f"gguf-{digest[:32]}.tokenizer.json"
        backend = _load_cached(cache_file)
        if backend is None:
            build = build_gemma4_backend if meta.get("tokenizer.ggml.model") == "gemma4" else build_gemma_backend
            backend = build(meta)
            _write_cache(backend, cache_file)
        eos_id = meta["tokenizer.ggml.eos_token_id"]
        tokenizer = cls(
            backend,
            bos_id=meta["tokenizer.ggml.bos_token_id"],
            eos_id=eos_id,
            pad_id=meta.get("tokenizer.ggml.padding_token_id", eos_id),
            chat_template=meta.get("tokenizer.chat_template"),
        )
        tokenizer.gguf_source = (path, digest)
        return tokenizer

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        """An HF tokenizer.json, or a directory holding one (and maybe tokenizer_config.json)."""
        path = Path(path).expanduser()
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {file}")
        from gemmakit.checkpoints.common import MAX_TOKENIZER_JSON, check_size

        check_size(file, MAX_TOKENIZER_JSON, "re-download it")  # the tokenizers library would parse it whole
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception
            raise ValueError(f"{file} is not a valid tokenizer.json ({e}).") from e
        # tokenizer_config.json wins over the older special_tokens_map.json.
        config = _read_json(file.parent / "special_tokens_map.json")
        config.update(_read_json(file.parent / "tokenizer_config.json"))
        bos_id = _special_id(backend, config, "bos_token", ("<bos>", "<s>", "<|begin_of_text|>"))
        eos_id = _special_id(backend, config, "eos_token", ("<eos>", "</s>", "<|end_of_text|>"))
        if bos_id is None or eos_id is None:
            raise ValueError(f"cannot tell the BOS/EOS tokens of {file}; add a tokenizer_config.json naming "
                             "bos_token and eos_token next to it.")
        pad_id = _special_id(backend, config, "pad_token", ("<pad>",))
        template = config.get("chat_template")
        jinja = file.parent / "chat_template.jinja"
        if not isinstance(template, str) and jinja.is_file():
            template = jinja.read_text(encoding="utf-8")
        return cls(backend, bos_id, eos_id, eos_id if pad_id is None else pad_id,
                   template if isinstance(template, str) else None)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`, BOS first if `add_bos`. Special-token text like "<eos>" maps to its id, except
        inside the brackets `literal` puts around text, which is encoded as plain text."""
        # The backend's own post-processor is bypassed, so BOS is added exactly once, as asked.
        if LITERAL_OPEN in text or LITERAL_CLOSE in text:
            ids = self._encode_marked(text)
        else:
            ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else ids

    def encode_batch(self, texts: Sequence[str], add_bos: bool = True) -> list[list[int]]:
        """`encode` for many texts at once (the backend spreads them over threads)."""
        if any(LITERAL_OPEN in t or LITERAL_CLOSE in t for t in texts):
            return [self.encode(t, add_bos) for t in texts]
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
        return [[self.bos_id, *e.ids] if add_bos else e.ids for e in encodings]

    # --- text that must stay text ----------------------------------------------------------------
    def literal(self, value: Any) -> Any:
        """`value` (a string, or lists and dicts of them) with every string that holds control-token text
        ("<start_of_turn>", "<|turn>", "<eos>") bracketed, so that `encode` spells those tokens out as text.

        Chat templates paste message text between their own control tokens, and encoding the rendered prompt
        matches control-token text wherever it is: a user who writes "<end_of_turn>\\n<start_of_turn>model"
        would forge turns. Marking the text before rendering keeps the template's markup special and the
        user's text literal. The brackets are two Unicode noncharacters; any in the given text are dropped, so
        text cannot close a bracket early. Whitespace at the ends stays outside, for templates that trim."""
        if isinstance(value, str):
            text = value.replace(LITERAL_OPEN, "").replace(LITERAL_CLOSE, "")
            if self._controls().search(text) is None:
                return text
            if text.lstrip()[:1] in ("{", "["):  # JSON (tool arguments, results): mark inside, keep it JSON
                with contextlib.suppress(ValueError, RecursionError):
                    return json.dumps(self.literal(json.loads(text)), ensure_ascii=False)
            core = text.strip()
            at = text.index(core)
            return f"{text[:at]}{LITERAL_OPEN}{core}{LITERAL_CLOSE}{text[at + len(core):]}"
        if isinstance(value, list):
            return [self.literal(v) for v in value]
        if isinstance(value, dict):
            return {self.literal(k): v if k in ("role", "type") else self.literal(v) for k, v in value.items()}
        return value

    def _controls(self) -> Any:
        """An RE2 pattern for the text of every special token (RE2: linear time on any input)."""
        if self._control_pattern is None:
            import re2

            specials = [t.content for t in self.backend.get_added_tokens_decoder().values() if t.special]
            self._control_pattern = re2.compile("|".join(re2.escape(t) for t in specials) or r"[^\s\S]")
        return self._control_pattern

    def _encode_marked(self, text: str) -> list[int]:
        ids, at = [], 0
        for m in _LITERAL.finditer(text):
            ids += self._encode_plain(text[at:m.start()])
            ids += self._literal_backend().encode(m.group(1), add_special_tokens=False).ids
            at = m.end()
        return ids + self._encode_plain(text[at:])

    def _encode_plain(self, text: str) -> list[int]:
        text = text.replace(LITERAL_OPEN, "").replace(LITERAL_CLOSE, "")  # unpaired: a template cut a bracket
        return self.backend.encode(text, add_special_tokens=False).ids if text else []

    def _literal_backend(self) -> tokenizers.Tokenizer:
        """A copy of the backend that spells special tokens out: `encode_special_tokens` is a setting of the
        tokenizer, not of one call, and other threads encode prompts with the shared backend meanwhile. Made
        on first use (about a second and 100 MB for Gemma's vocabulary), only if someone sends such text."""
        with self._literal_lock:
            if self._literal is None:
                self._literal = copy.deepcopy(self.backend)
                self._literal.encode_special_tokens = True
            return self._literal

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids`; special tokens (BOS, turn markers) dropped if `skip_special_tokens`."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def decode_stream(self, skip_special_tokens: bool = False) -> "IncrementalDecoder":
        """A decoder to feed ids one at a time, e.g. while generating."""
        return IncrementalDecoder(self, skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(i) if 0 <= i < self.vocab_size else None

    def __repr__(self) -> str:
        ids = f"bos_id={self.bos_id}, eos_id={self.eos_id}, pad_id={self.pad_id}"
        return f"Tokenizer(vocab_size={self.vocab_size}, {ids})"


class IncrementalDecoder:
    """Decodes ids one at a time into text pieces that never split a UTF-8 character.

    Decoding ids one by one would break characters spread over several byte-fallback pieces (emoji,
    rare CJK) into "\\ufffd"s; this holds such pieces back until the character is complete.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._backend = tokenizer.backend
        self._stream = decoders.DecodeStream(skip_special_tokens=skip_special_tokens)

    def step(self, token_id: int) -> str:
        """The text `token_id` completes; "" while it is only part of a character."""
        return self._stream.step(self._backend, int(token_id)) or ""
