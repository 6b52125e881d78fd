"""The `gemmakit` command: `gemmakit <verb> [args]`, one small function per verb.

Verbs so far: `models` (the registry with parameter counts) and `generate` (raw completion on a checkpoint,
the embedded Gemma 3 270M by default). Every error a user can cause (a bad path, a damaged checkpoint, a prompt
that does not fit) is printed as one `error:` line with what to do, and exits with status 2: no tracebacks.
"""

from __future__ import annotations

import argparse
import sys
import time

DTYPES = ("auto", "float32", "bfloat16", "float16")


def cmd_models(args: argparse.Namespace) -> None:
    from gemmakit.config import Config, param_counts
    from gemmakit.registry import REGISTRY

    rows = [("model", "family", "layers", "hidden", "params", "notes")]
    for name in REGISTRY:
        c = Config.from_name(name)
        p = param_counts(c)
        notes = []
        if p["ple"]:
            notes.append(f"{p['effective'] / 1e9:.2f}B effective + {p['ple'] / 1e9:.2f}B PLE table")
        if p["experts"]:
            notes.append(f"{p['active'] / 1e9:.2f}B active ({c.top_k_experts}/{c.num_experts} experts)")
        rows.append((name, c.family, str(c.num_hidden_layers), str(c.hidden_size), _billions(p["total"]),
                     "; ".join(notes)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())


def _billions(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 0.95e9 else f"{n / 1e6:.0f}M"


def resolve_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def cmd_generate(args: argparse.Namespace) -> None:
    from gemmakit.generate import Sampling, check_fits, generate

    s = Sampling(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    s.validate()  # before the model loads, so a typo costs nothing
    t0 = time.perf_counter()
    from gemmakit.checkpoints import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(args.model, resolve_dtype(args.dtype, args.device), args.device)
    prompt = tok.encode(args.prompt, add_bos=True)
    check_fits(model, len(prompt), s.max_tokens)
    stops = {tok.eos_id} | set(_as_list(model.config.eos_token_id))
    out: list[int] = []
    printed = ""
    sys.stdout.write(args.prompt)
    for token in generate(model, prompt, s, stop_ids=sorted(stops)):
        out.append(token)
        text = tok.decode(out)
        if not text.endswith("\ufffd"):  # hold back a partial multi-byte character
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text
    sys.stdout.write(tok.decode(out)[len(printed):] + "\n")
    if args.verbose:
        dt = time.perf_counter() - t0
        print(f"[{len(prompt)} prompt tokens, {len(out)} generated, {dt:.1f}s total]", file=sys.stderr)


def _as_list(x: int | list[int]) -> list[int]:
    return list(x) if isinstance(x, list | tuple) else [x]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gemmakit", description="Gemma 3 and Gemma 4 in plain PyTorch.")
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    m = sub.add_parser("models", help="list the released Gemma 3 / Gemma 4 text backbones and their sizes")
    m.set_defaults(func=cmd_models)
    g = sub.add_parser("generate", help="raw completion of a prompt (greedy unless --temperature is given)")
    g.add_argument("prompt", help="the text to continue")
    g.add_argument("--model", default=None,
                   help="HF model directory or .gguf file (default: the embedded Gemma 3 270M)")
    g.add_argument("--max-tokens", type=int, default=64, help="most tokens to generate (default 64)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely tokens")
    g.add_argument("--seed", type=int, default=None, help="make sampling reproducible")
    g.add_argument("--dtype", choices=DTYPES, default="auto", help="auto = float32 on CPU, bfloat16 on CUDA")
    g.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    g.add_argument("-v", "--verbose", action="store_true", help="print token counts and timing to stderr")
    g.set_defaults(func=cmd_generate)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from gemmakit.checkpoints.common import CheckpointError
    from gemmakit.config import ConfigError

    try:
        args.func(args)
    except (CheckpointError, ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

