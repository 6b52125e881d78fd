"""`gemmakit embed MODEL_DIR [TEXT ...]`: embeddings of the texts given, or of stdin's lines (one text a line,
empty lines included, so output row i is input line i).

Output is JSON (one object: model, dimensions, token count, the vectors), JSON lines (one {"index",
"embedding"} a text, for streaming into other tools) or .npy (a float32 [N, D] array, binary, so only to a
file or a pipe). With `-o FILE` the file is written beside itself and renamed into place: an interrupted run
never leaves half a file. A progress bar on stderr counts texts when there are more than one batch of them.

Also here: `serve_embedding_model`, the check of `gemmakit serve --embedding-model DIR` before anything loads.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

FORMATS = ("json", "jsonl", "npy")


def cmd_embed(args: argparse.Namespace) -> None:
    import torch
    from tqdm import tqdm

    from gemmakit.cli_common import spinner
    from gemmakit.embeddings import load_embedder
    from gemmakit.runtime.device import resolve_device, resolve_dtype

    if args.format == "npy" and args.output is None and sys.stdout.isatty():
        raise ValueError("--format npy is binary: write it to a file with -o FILE (or pipe it)")
    texts = args.texts or read_stdin()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    with spinner("loading model"):
        embedder = load_embedder(args.model, resolve_dtype(args.dtype, device), device)
    rows = embedder.tokenize(texts, prompt=args.prompt, task=args.task, truncate=args.truncate)
    embedder.check_dimensions(args.dimensions)  # before the forward, not after it
    with tqdm(total=len(rows), unit="text", file=sys.stderr, disable=len(rows) <= args.batch_size) as bar:
        vectors = embedder.embed_ids(rows, dimensions=args.dimensions, batch_size=args.batch_size,
                                     progress=bar.update).numpy()
    payload = render(vectors, args.format, embedder.name, sum(len(r) for r in rows))
    if args.output is None:
        if isinstance(payload, bytes):
            sys.stdout.buffer.write(payload)
        else:
            sys.stdout.write(payload)
        return
    from gemmakit.files import write_atomic

    write_atomic(Path(args.output), lambda tmp: tmp.write_bytes(payload if isinstance(payload, bytes)
                                                                 else payload.encode()))
    print(f"wrote {len(rows)} embeddings of {vectors.shape[1]} dimensions to {args.output}", file=sys.stderr)


def read_stdin() -> list[str]:
    if sys.stdin.isatty():
        raise ValueError("no texts: give them as arguments, or pipe them in, one per line")
    texts = sys.stdin.read().splitlines()
    if not texts:
        raise ValueError("no texts on stdin")
    return texts


def render(vectors: np.ndarray, fmt: str, model: str, tokens: int) -> str | bytes:
    """The embeddings [N, D] in `fmt`: json, jsonl (text) or npy (bytes)."""
    if fmt == "npy":
        buf = io.BytesIO()
        np.save(buf, vectors.astype(np.float32))
        return buf.getvalue()
    if fmt == "jsonl":
        return "".join(json.dumps({"index": i, "embedding": v.tolist()}) + "\n" for i, v in enumerate(vectors))
    return json.dumps({"model": model, "dimensions": int(vectors.shape[1]), "prompt_tokens": tokens,
                       "embeddings": vectors.tolist()}) + "\n"


def serve_embedding_model(args: argparse.Namespace) -> tuple[str | None, bool]:
    """`gemmakit serve`'s embedding model, checked before anything loads, and whether a chat model is served
    too: `--embedding-model DIR` serves DIR beside the chat model; `--model DIR` naming an embedding model serves
    it alone (it has no head to chat with)."""
    from gemmakit.embeddings import is_embedding_model

    if args.model and os.path.isdir(args.model) and is_embedding_model(args.model):
        if getattr(args, "embedding_model", None) is not None:
            raise ValueError(f"--model {args.model} is an embedding model: give a chat model as --model, or drop "
                             "--embedding-model to serve the embedding model alone")
        if args.adapters or args.draft or getattr(args, "replicas", 1) > 1:
            raise ValueError("--adapter, --draft and --replicas need a chat model; this server would serve only "
                             f"the embedding model {args.model}")
        return args.model, False
    path = getattr(args, "embedding_model", None)
    if path is None:
        return None, True
    if not os.path.isdir(path):
        raise ValueError(f"--embedding-model {path}: no such directory")
    if not is_embedding_model(path):
        raise ValueError(f"--embedding-model {path} is not an embedding model (no modules.json, not a bidirectional "
                         "Gemma 3 text model nor EmbeddingGemma 2)")
    if getattr(args, "replicas", 1) > 1:
        raise ValueError("--embedding-model is not passed to Ray replicas yet; serve with --replicas 1 to use it")
    return path, True


def add_embed_parser(sub: Any) -> None:
    from gemmakit.runtime.device import DTYPES

    e = sub.add_parser("embed", help="sentence embeddings with an embedding model (EmbeddingGemma)")
    e.add_argument("model", help="embedding model directory (sentence-transformers layout, e.g. embeddinggemma-300m)")
    e.add_argument("texts", nargs="*", help="texts to embed (default: stdin, one per line)")
    e.add_argument("--task", default=None, help="use the model's prompt for this task (EmbeddingGemma: query, "
                                                "document, Classification, Clustering, ...)")
    e.add_argument("--prompt", default=None, help="put this text before each input instead of a task's prompt")
    e.add_argument("--dimensions", type=int, default=None, help="keep the first N dimensions and re-normalise "
                                                               "(Matryoshka: 512, 256 or 128 for EmbeddingGemma)")
    e.add_argument("--format", choices=FORMATS, default="json", help="json (default), jsonl or npy (float32 array)")
    e.add_argument("-o", "--output", default=None, metavar="FILE", help="write to FILE (atomically) instead of stdout")
    e.add_argument("--batch-size", type=int, default=32, help="texts per forward (default 32)")
    e.add_argument("--truncate", action="store_true", help="cut inputs longer than the model takes (default: refuse "
                                                           "them, naming the input)")
    e.add_argument("--dtype", choices=DTYPES, default="auto", help="auto = float32 on CPU, bfloat16 on CUDA")
    e.add_argument("--device", default="auto", help="auto (CUDA where present, else CPU), cpu or cuda[:N]")
    e.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    e.set_defaults(func=cmd_embed)
