"""`POST /v1/embeddings` (OpenAI's shape), served when `gemmakit serve --embedding-model DIR` loads an embedder.

The request: `input` is a string, a list of strings, one list of token ids or a list of them (ids are used
as given: the client adds any special tokens); `dimensions` truncates (Matryoshka) and re-normalises;
`encoding_format` "base64" sends each vector as little-endian float32 bytes, as OpenAI does (its client
decodes that by default). gemmakit's extension `task` ("query", "document", ... : the model's
config_sentence_transformers.json prompts) puts the task's prompt before each text; without it the model's
default prompt, if any, applies, as sentence-transformers does.

Bounds before work: at most MAX_INPUTS inputs and MAX_TOKENS tokens a request, no empty input, none over the
model's length (OpenAI refuses those too; the error names the input), and each one a 400 naming the parameter.
The forward runs in a worker thread, one request at a time (a forward already uses every core; two at once
would only share them worse), so the event loop and the chat engine's streams never wait on it; at most
MAX_WAITING requests wait for their turn, further ones get a 429.
"""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from typing import Any, Literal

import numpy as np
from fastapi import Depends, FastAPI, Request
from pydantic import BaseModel, ConfigDict

from gemmakit.embeddings import Embedder, EmbeddingError
from gemmakit.serve import protocol as P
from gemmakit.serve.server import HTTPFail, ServeOptions, fail, loaded, log, require_key

MAX_INPUTS = 2048  # OpenAI's limit on inputs a request
MAX_TOKENS = 65536  # tokens a request; OpenAI allows 300k, which is minutes of CPU time for one client
MAX_WAITING = 16  # requests queued behind the one running


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    input: Any
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    task: str | None = None  # gemmakit: the model's prompt for this task ("query", "document", ...)


class EmbeddingService:
    """The loaded embedder, its name, and the turn-taking of requests."""

    def __init__(self, embedder: Embedder, name: str | None = None):
        self.embedder, self.name = embedder, name or embedder.name
        self.lock = threading.Lock()
        self.waiting = 0

    def run(self, texts: list[str] | None, rows: list[list[int]] | None, task: str | None,
            dimensions: int | None) -> tuple[np.ndarray, int]:
        """Embeddings [N, D] and the tokens they took; in a worker thread, one call at a time."""
        with self.lock:
            e = self.embedder
            try:
                if texts is not None:
                    rows = e.tokenize(texts, task=task)
                if sum(len(r) for r in rows) > MAX_TOKENS:
                    raise P.ParamError(f"this request holds {sum(len(r) for r in rows)} tokens; this server embeds at "
                                       f"most {MAX_TOKENS} a request: send fewer or shorter inputs", "input")
                vectors = e.embed_ids(rows, dimensions=dimensions)
            except EmbeddingError as err:
                where = "dimensions" if err.code == "invalid_dimensions" else "task" if err.code == "unknown_task" \
                    else "input" if err.index is None else f"input[{err.index}]"
                raise P.ParamError(str(err), where, err.code) from None
            return vectors.numpy(), sum(len(r) for r in rows)


def load_service(options: ServeOptions) -> EmbeddingService | None:
    """The embedder `--embedding-model` names (None without one), on CUDA where present, else the CPU."""
    if not options.embedding_model:
        return None
    from gemmakit.embeddings import load_embedder
    from gemmakit.runtime.device import resolve_device, resolve_dtype

    device = resolve_device("auto")
    t0 = time.perf_counter()
    embedder = load_embedder(options.embedding_model, resolve_dtype("auto", device), device)
    log.info("embedding model %s: %d dimensions, at most %d tokens an input (%.0f s)", embedder.name,
             embedder.dimension, embedder.max_length, time.perf_counter() - t0)
    return EmbeddingService(embedder)


def model_entries(app: FastAPI) -> list[dict]:
    """/v1/models' entry for the embedding model, if one is served."""
    service = getattr(app.state, "embeddings", None)
    if service is None:
        return []
    return [{"id": service.name, "object": "model", "created": int(time.time()), "owned_by": "gemmakit",
             "max_model_len": service.embedder.max_length}]


def install_embedding_routes(app: FastAPI) -> None:
    app.post("/v1/embeddings", summary="Create embeddings (OpenAI-compatible)", dependencies=[Depends(require_key)],
             responses=P.ERRORS)(create_embeddings)


def parse_input(value: Any) -> tuple[list[str] | None, list[list[int]] | None]:
    """(texts, None) or (None, token rows) from OpenAI's four input shapes; anything else is a 400."""
    def is_id(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise P.ParamError("input must be a non-empty string, list of strings, list of token ids or list of such "
                           "lists", "input")
    if len(value) > MAX_INPUTS:
        raise P.ParamError(f"input holds {len(value)} items; at most {MAX_INPUTS} a request", "input")
    if all(isinstance(v, str) for v in value):
        empty = next((i for i, v in enumerate(value) if not v), None)
        if empty is not None:
            raise P.ParamError(f"input[{empty}] is an empty string; every input needs text", f"input[{empty}]")
        return value, None
    if all(is_id(v) for v in value):
        return None, [value]
    if all(isinstance(v, list) for v in value):
        for i, row in enumerate(value):
            if not row or not all(is_id(t) for t in row):
                raise P.ParamError(f"input[{i}] must be a non-empty list of integer token ids", f"input[{i}]")
        return None, value
    raise P.ParamError("input mixes types: give strings, or token ids, not both", "input")


async def create_embeddings(body: EmbeddingRequest, request: Request) -> dict:
    loaded(request)  # 503 while loading, 500 if loading failed
    service: EmbeddingService | None = request.app.state.embeddings
    if service is None:
        raise HTTPFail(fail(404, "this server serves no embedding model; start it with --embedding-model DIR",
                            "model", "model_not_found"))
    if body.model not in (None, "", service.name):
        raise HTTPFail(fail(404, f"The model {body.model!r} does not exist on this server; its embedding model is "
                                 f"{service.name!r} (GET /v1/models)", "model", "model_not_found"))
    texts, rows = parse_input(body.input)
    if rows is not None and body.task is not None:
        raise P.ParamError("task applies to text inputs; token ids are embedded as given", "task")
    if service.waiting >= MAX_WAITING:
        raise HTTPFail(fail(429, f"the embedding model is busy: {service.waiting} requests are waiting; retry later",
                            code="rate_limit_exceeded", type="rate_limit_error", headers={"Retry-After": "1"}))
    service.waiting += 1
    try:
        vectors, tokens = await asyncio.to_thread(service.run, texts, rows, body.task, body.dimensions)
    finally:
        service.waiting -= 1
    data = [{"object": "embedding", "index": i, "embedding": encode_vector(v, body.encoding_format)}
            for i, v in enumerate(vectors)]
    return {"object": "list", "data": data, "model": service.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def encode_vector(v: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
    return v.tolist()
