"""Embedding throughput: gemmakit against sentence-transformers and transformers, on the same texts in one run.

The model is EmbeddingGemma-300m's shape with random weights (no download): Gemma3TextModel with hidden 768,
24 layers (five sliding, one full), 3 query heads sharing 1 KV head of width 256, intermediate 1152, vocabulary
262144, sliding window 512, bidirectional attention, then mean pooling, Dense 768 -> 3072 -> 768 and Normalize;
the tokenizer is Gemma 3's real one (from the embedded 270M GGUF), so texts have realistic token counts. It is
built once into --workdir (about 1.2 GB) and reused.

Four ways to embed the same texts (random English words, 5-60 words each), at batch sizes 1 and 32:
  (a) gemmakit's Embedder in process;
  (b) POST /v1/embeddings of a real `gemmakit serve --embedding-model DIR` (one request per batch, in turn);
  (c) sentence-transformers' SentenceTransformer.encode;
  (d) transformers' AutoModel, mean pooling and the dense head written by hand (rows sorted by length, as (a)
      and (c) sort them, so all four pad alike).
Each is warmed up first; texts/s is texts over wall time, with the ratio to sentence-transformers'. The run also
checks that (a) and (c) agree.

Run: .venv/bin/python benchmarks/embed_throughput.py [--texts 64] [--batch 1 32] [--repeat 1] [--threads 2]
     [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

from gemmakit.bench import format_table

_WORDS = ("the of and to in is you that it he was for on are as with his they at be this from have or by one had "
         "not but what all were when we there can an your which their said if do will each about how up out them "
         "then she many some so these would other into has more her two like him see time could no make than first "
         "been its who now people my made over did down only way find use may water long little very after words "
         "called just where most know get through back much before go good new write our used me man too any day "
         "same right look think also around another came come work three word must because does part even place "
         "well such here take why things help put years different away again off went old number great tell men say "
         "small every found still between name should home big give air line set own under read last never us left "
         "end along while might next sound below saw something thought both few those always looked show large often "
         "together asked house world going want school important until form food keep children feet land side "
         "without boy once animals life enough took sometimes four head above kind began almost live page got earth "
         "need far hand high year mother light parts country father let night following picture being study second "
         "eyes soon times story boys since white days ever paper hard near sentence better best across during today "
         "others however sure means knew try told young miles sun ways thing whole hear example heard several change "
         "answer room sea against top turned learn point city play toward five using himself usually")
WORDS = _WORDS.split()
CONFIG = dict(vocab_size=262144, hidden_size=768, intermediate_size=1152, num_hidden_layers=24, num_attention_heads=3,
              num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
              max_position_embeddings=2048, use_bidirectional_attention=True, rope_theta=1_000_000.0,
              rope_local_base_freq=10_000.0, rms_norm_eps=1e-6)
PROMPTS = {"query": "task: search result | query: ", "document": "title: none | text: "}


def build_model(workdir: Path) -> Path:
    """The EmbeddingGemma-300m-shaped sentence-transformers directory (random weights), built once."""
    st = workdir / "embeddinggemma-300m-shaped"
    if (st / "modules.json").is_file():
        return st
    import transformers
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer
    from tokenizers import processors

    from gemmakit.checkpoints import default_model_path
    from gemmakit.tokenizer import Tokenizer

    print("building the random EmbeddingGemma-300m-shaped model (once) ...", file=sys.stderr)
    torch.manual_seed(0)
    model = transformers.Gemma3TextModel(transformers.Gemma3TextConfig(**CONFIG))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(0.5 * (torch.rand_like(p) - 0.5) if "norm" in name else torch.randn_like(p) * 0.02)
    backbone = workdir / "backbone"
    model.save_pretrained(backbone)
    del model
    backend = Tokenizer.from_gguf(default_model_path()).backend
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>",
                                                           special_tokens=[("<bos>", 2), ("<eos>", 1)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                         pad_token="<pad>", unk_token="<unk>").save_pretrained(backbone)
    modules = [Transformer(str(backbone), max_seq_length=2048), Pooling(768, "mean"),
               Dense(768, 3072, bias=False, activation_function=torch.nn.Identity()),
               Dense(3072, 768, bias=False, activation_function=torch.nn.Identity()), Normalize()]
    SentenceTransformer(modules=modules, prompts=PROMPTS).save(str(st))
    shutil.rmtree(backbone)
    return st


def make_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))) for _ in range(n)]


def timed(fn, texts: list[str], batch: int, repeat: int) -> float:
    """The fastest of `repeat` runs over `texts`, after a warm-up batch (other processes share this machine).
    Every system is handed the texts `batch` at a time, as a client sending requests of `batch` texts would, so
    all four sort and pad the same groups (handed all texts at once, a library sorts them all by length and pads
    less than any server that answers one request at a time)."""
    fn(texts[:batch])
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for start in range(0, len(texts), batch):
            fn(texts[start:start + batch])
        best = min(best, time.perf_counter() - t0)
    return best


def gemmakit_inprocess(st: Path):
    from gemmakit.embeddings import load_embedder

    embedder = load_embedder(st)
    return lambda batch: (lambda texts: embedder.embed(texts, batch_size=batch))


def sentence_transformers_encode(st: Path):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(st), device="cpu")
    return lambda batch: (lambda texts: model.encode(texts, batch_size=batch, normalize_embeddings=True,
                                                     convert_to_tensor=True))


def transformers_by_hand(st: Path):
    """AutoModel + AutoTokenizer, mean pooling and the two Dense layers as a user would write them."""
    import transformers
    from safetensors.torch import load_file

    tok = transformers.AutoTokenizer.from_pretrained(str(st))
    model = transformers.AutoModel.from_pretrained(str(st)).eval()
    dense = [load_file(str(st / d / "model.safetensors"))["linear.weight"] for d in ("2_Dense", "3_Dense")]

    @torch.inference_mode()
    def run(texts: list[str], batch: int) -> torch.Tensor:
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = torch.empty(len(texts), 768)
        for s in range(0, len(texts), batch):
            idx = order[s:s + batch]
            enc = tok([texts[i] for i in idx], padding=True, return_tensors="pt")
            h = model(**enc).last_hidden_state
            m = enc["attention_mask"][..., None].float()
            x = (h * m).sum(1) / m.sum(1)
            for w in dense:
                x = x @ w.T
            out[idx] = torch.nn.functional.normalize(x, dim=-1)
        return out
    return lambda batch: (lambda texts: run(texts, batch))


def http_server(st: Path, threads: int | None):
    """A real `gemmakit serve --embedding-model` (the embedded 270M as its chat model, idle)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "GEMMAKIT_COMPILE": "0", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    proc = subprocess.Popen([sys.executable, "-m", "gemmakit.cli", "serve", "--port", str(port), "--embedding-model",
                             str(st), "--context", "256", "--max-batch", "1", "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(url + "/health").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    client = httpx.Client(base_url=url, timeout=600)

    def run(texts: list[str], batch: int) -> None:
        for s in range(0, len(texts), batch):
            r = client.post("/v1/embeddings", json={"input": texts[s:s + batch], "encoding_format": "base64"})
            r.raise_for_status()
    return proc, (lambda batch: (lambda texts: run(texts, batch)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--texts", type=int, default=64, help="texts per batch-32 measurement (batch 1 uses a quarter)")
    ap.add_argument("--repeat", type=int, default=1, help="time each measurement this often and keep the fastest")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--workdir", default="/tmp/gemmakit-embed-bench", help="where the random model is built")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    st = build_model(workdir)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(st))
    texts = make_texts(args.texts)
    systems = {"gemmakit Embedder": gemmakit_inprocess(st), "sentence-transformers": sentence_transformers_encode(st),
               "transformers by hand": transformers_by_hand(st)}
    server, systems["gemmakit /v1/embeddings (HTTP)"] = http_server(st, args.threads)
    rows, load = [], [os.getloadavg()[0]]
    try:
        for batch in args.batch:
            sample = texts if batch > 1 else texts[:max(8, args.texts // 4)]
            tokens = sum(len(ids) for ids in tok(sample)["input_ids"])
            base = None
            for name, make in [("sentence-transformers", systems["sentence-transformers"]),
                               *((k, v) for k, v in systems.items() if k != "sentence-transformers")]:
                seconds = timed(make(batch), sample, batch, args.repeat)
                base = base or seconds
                rows.append({"system": name, "batch": batch, "texts": len(sample), "tokens": tokens,
                             "texts/s": len(sample) / seconds, "tokens/s": tokens / seconds,
                             "vs sentence-transformers": base / seconds})
                print(f"{name:32s} batch {batch:3d}: {len(sample) / seconds:7.2f} texts/s", file=sys.stderr)
        a = systems["gemmakit Embedder"](32)(texts[:16])
        c = systems["sentence-transformers"](32)(texts[:16])
        agreement = float((a - c).abs().max())
        load.append(os.getloadavg()[0])
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(format_table(rows))
    print(f"\nmax |gemmakit - sentence-transformers| over 16 texts: {agreement:.2e}; torch threads "
          f"{torch.get_num_threads()}; {sum(r['texts'] for r in rows)} texts timed; load average {load[0]:.1f} before, "
          f"{load[1]:.1f} after on {os.cpu_count()} cores")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "max_abs_diff_vs_st": agreement,
                                               "threads": torch.get_num_threads(), "load_average": load,
                                               "config": CONFIG}, indent=2))


if __name__ == "__main__":
    main()
