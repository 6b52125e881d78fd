"""Constrained decoding: output that is valid JSON (for a schema, or any object), or any Lark grammar.

The grammar engine is llguidance (the library vLLM and SGLang use for the same job): it compiles a JSON
schema or a Lark grammar into a matcher that, at each step, gives the set of tokens that keep the output
inside the language (a bitmask over the vocabulary) and accepts the token that was chosen. The engine asks a
request's `Constraint` for that mask before sampling (sampling.py never sees a banned token) and tells it
every token it keeps; once the grammar is complete and nothing may follow, the request stops.

Choices: JSON is compact (`whitespace_flexible` off), so a small model cannot wander off into endless
whitespace; an unsupported schema is refused when the request arrives (a ValueError with llguidance's
reason), never half-way through a generation. Building the tokenizer view costs ~3 s for a 262k vocabulary,
so `Grammars` keeps one per tokenizer.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from torch import Tensor

_JSON_OPTIONS = {"whitespace_flexible": False}


class Grammars:
    """Makes constraints for one tokenizer; `stop_ids` are the tokens that may end a complete output."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: list[int]):
        import llguidance

        self._llg = llguidance
        self.vocab_size = vocab_size
        self.tokenizer = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size,
                                                eos_token=list(stop_ids), slices=None)

    def json_schema(self, schema: dict | None) -> Constraint:
        """Output that is one JSON value valid against `schema`; None means any JSON object."""
        schema = {"type": "object"} if schema is None else schema
        if not isinstance(schema, dict):
            raise ValueError("a JSON schema must be an object")
        grammar = self._llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=_JSON_OPTIONS)
        return self._constraint(grammar, "the JSON schema")

    def lark(self, grammar: str) -> Constraint:
        return self._constraint(self._llg.LLMatcher.grammar_from_lark(grammar), "the grammar")

    def _constraint(self, grammar: str, what: str) -> Constraint:
        is_error, messages = self._llg.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error:
            raise ValueError(f"{what} is not supported: {'; '.join(messages)}")
        matcher = self._llg.LLMatcher(self.tokenizer, grammar)
        if matcher.is_error():
            raise ValueError(f"{what} is not supported: {matcher.get_error()}")
        return Constraint(matcher, self.vocab_size)


class Constraint:
    """One request's grammar state: which tokens may come next, and whether the output is complete."""

    def __init__(self, matcher: Any, vocab_size: int):
        self.matcher, self.vocab_size = matcher, vocab_size

    def allowed(self) -> Tensor:
        """[V] bool: the tokens that keep the output inside the grammar."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        return torch.from_numpy(np.unpackbits(bits, bitorder="little")[: self.vocab_size].astype(bool))

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            # The client sees this: llguidance's first line says what failed, the rest is its parser state.
            reason = (self.matcher.get_error() or "").strip().splitlines()[:1]
            raise RuntimeError(f"token {token} was outside the grammar{': ' + reason[0][:300] if reason else ''}")

    @property
    def done(self) -> bool:
        """Nothing more may be generated (the grammar is complete and admits no continuation)."""
        return self.matcher.is_stopped()
