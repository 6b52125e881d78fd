"""The `gemmakit` command: `gemmakit <verb> [args]`, one small function per verb.

Verbs: `models` (the registry with parameter counts), `generate` (raw completion, or one chat message with
--chat, optionally as JSON, with --image / --audio files), `chat` (an interactive terminal chat, which takes
files too), `bench` (speed and memory), `serve` (the
OpenAI-compatible server, serve/), `finetune` (SFT / DPO with LoRA, QLoRA or full, train/) and `export` /
`merge` (an HF directory, a LoRA adapter folded in). The
embedded Gemma 3 270M is the default model everywhere. Every error a user can cause (a bad path, a damaged
checkpoint, a prompt that does not fit, a bad sampling value) is printed as one `error:` line with what to
do, and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict
from typing import Any

from gemmakit.cli_common import (
    DTYPES,
    add_decoding_args,
    add_load_args,
    add_media_args,
    check_media,
    decoding_options,
    describe_media,
    load_llm,
    media_parts,
    set_image_tokens,
    spinner,
    user_message,
)
from gemmakit.flags import parse_switch


def cmd_models(args: argparse.Namespace) -> None:
    from gemmakit.config import param_counts
    from gemmakit.registry import REGISTRY, config_for

    rows = [("model", "family", "layers", "hidden", "params", "notes")]
    for name in REGISTRY:
        c = config_for(name)
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


def sampling_of(args: argparse.Namespace) -> dict:
    from gemmakit.sampling import SamplingParams

    fields = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                  min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                  loop_guard=args.loop_guard)
    if getattr(args, "watermark", None):  # the sampler is handed the watermark as one of its logits processors
        from gemmakit.safety.watermark import WatermarkProcessor, load_config

        fields["logits_processors"] = (WatermarkProcessor(load_config(args.watermark)),)
    SamplingParams(**fields).validate()  # before the model loads, so a typo costs nothing
    return fields


# A compiled step costs a one-off build (seconds from a warm cache, most of a minute cold) and saves time on
# every token after it: it pays from about this many tokens on.
COMPILE_PAYS_FROM = 256


def wants_compile(args: argparse.Namespace) -> bool:
    """--compile on|off|auto, else GEMMAKIT_COMPILE, else auto: compiled decode for `bench` and `serve`, and
    for `generate` when it may produce COMPILE_PAYS_FROM tokens or more; eager for `chat`, whose prompt must
    be ready in seconds rather than after a build."""
    if args.compile:
        wanted = parse_switch("--compile", args.compile, allow_auto=True)
    else:
        wanted = parse_switch("--compile / GEMMAKIT_COMPILE", os.environ.get("GEMMAKIT_COMPILE") or "auto",
                              allow_auto=True)
    if getattr(args, "draft", None):  # a drafter verifies eagerly (api.py): compiled steps would never run
        if wanted:
            print("note: --compile is off: speculative decoding (--draft) runs eager decode steps", file=sys.stderr)
        return False
    if wanted is not None:
        return wanted
    return args.func in (cmd_bench, cmd_serve) or (args.func is cmd_generate and args.max_tokens >= COMPILE_PAYS_FROM)


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn
    from uvicorn.logging import DefaultFormatter

    from gemmakit.adapters import parse_specs
    from gemmakit.checkpoints import resolve
    from gemmakit.embeddings.command import serve_embedding_model
    from gemmakit.serve.app import ServeOptions, create_app, log

    console = logging.StreamHandler()
    console.setFormatter(DefaultFormatter("%(levelprefix)s %(message)s"))  # lines like uvicorn's own
    log.addHandler(console)
    log.setLevel(args.log_level.upper())
    adapters = parse_specs(args.adapters)  # a bad spec or directory fails now, not in the loading thread
    embedding_model, chat = serve_embedding_model(args)  # checked now; beside the chat model, or alone
    if args.replicas > 1 and (args.allow_media_dir or args.allow_remote_media or args.image_tokens
                              or args.max_media_mb != 20 or adapters or args.draft
                              or args.prefix_cache is not None):
        raise ValueError("--allow-media-dir, --allow-remote-media, --max-media-mb, --image-tokens, --adapter, --draft "
                         "and --prefix-cache are not passed to Ray replicas yet; serve with --replicas 1 to use them")
    if adapters and args.compiled:  # per-row adapters decode eagerly (adapters.py); no plain weight copy either
        if args.compile:
            print("note: --compile is off: LoRA adapters served per request (--adapter) run eager decode steps",
                  file=sys.stderr)
        args.compiled = False
    if args.replicas > 1:  # replicas load on their Ray nodes, which may see paths this one does not
        from gemmakit.serve.ray_serve import run_replicas

        return run_replicas(args)
    if chat:
        resolve(args.model)  # a wrong path fails here, as for every other verb, not later in the loading thread
    if args.draft and not os.path.exists(args.draft):
        raise ValueError(f"--draft {args.draft}: no such file or directory")
    decoding_options(args)  # a bad --draft-tokens too
    for d in args.allow_media_dir:
        if not os.path.isdir(d):
            raise ValueError(f"--allow-media-dir {d}: no such directory")
    options = ServeOptions(max_batch=args.max_batch, max_queue=args.max_queue, context=args.context,
                           compile=args.compiled, api_key=args.api_key or os.environ.get("GEMMAKIT_API_KEY"),
                           cors_origins=tuple(args.cors_origin), model_name=args.served_model_name,
                           guard=args.guard, max_body_bytes=None if args.max_body_mb is None else
                           int(args.max_body_mb * 2**20), media_dirs=tuple(args.allow_media_dir),
                           remote_media=args.allow_remote_media, max_media_bytes=int(args.max_media_mb * 2**20),
                           image_tokens=args.image_tokens, adapters={k: str(v) for k, v in adapters.items()},
                           responses_store=args.responses_store)
    options.embedding_model = embedding_model
    app = create_app((lambda: load_llm(args, warm_up=False)) if chat else None, options)  # it builds its engine
    print(f"serving on http://{args.host}:{args.port} (OpenAI API under /v1, chat page at /); "
          "/health is 503 until the model is loaded", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


def add_serve_parser(sub: Any) -> None:
    # conflict_handler: serve's --adapter (NAME=DIR, per request) replaces the load flags' merged --adapter DIR.
    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching",
                       conflict_handler="resolve")
    add_load_args(s)
    s.add_argument("--adapter", action="append", default=[], dest="adapters", metavar="NAME=DIR",
                   help="serve the LoRA adapter in DIR (PEFT format) beside the base model, under NAME: requests pick "
                        "it with \"model\": NAME, and rows on different adapters share each batch (repeatable; "
                        "compile is off with adapters)")
    add_decoding_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (also: GEMMAKIT_API_KEY)")
    s.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (default 8)")
    s.add_argument("--max-queue", type=int, default=64, help="sequences that may wait for a row before 429s")
    s.add_argument("--max-body-mb", type=float, default=None, help="largest request body taken, in MiB (default 8, "
                   "or room for one --max-media-mb file as base64 if that is more)")
    s.add_argument("--max-media-mb", type=float, default=20, help="largest image or audio file taken, in MiB "
                                                                  "(default 20)")
    s.add_argument("--allow-media-dir", action="append", default=[], metavar="DIR",
                   help="let clients name image / audio files (file:// URLs) under DIR (repeatable; off by default: "
                        "clients send data URLs)")
    s.add_argument("--allow-remote-media", action="store_true",
                   help="let the server fetch http(s) image URLs that clients send (off by default)")
    s.add_argument("--image-tokens", type=int, choices=(70, 140, 280, 560, 1120), default=None,
                   help="Gemma 4: soft tokens per image (more = finer detail, longer prompt; default 280)")
    s.add_argument("--cors-origin", action="append", default=[], help="allow this browser origin (repeatable; "
                                                                      "CORS is off by default)")
    s.add_argument("--served-model-name", default=None, help="the model id clients use (default: the model's)")
    s.add_argument("--embedding-model", default=None, metavar="DIR",
                   help="also serve this embedding model (EmbeddingGemma, sentence-transformers layout) at "
                        "/v1/embeddings, beside the chat model")
    s.add_argument("--responses-store", type=int, default=256, metavar="N",
                   help="Responses API: keep the last N responses (store: true) in memory for previous_response_id "
                        "and GET /v1/responses/{id} (default 256; 0 keeps none)")
    s.add_argument("--replicas", type=int, default=1, help="engine replicas behind one endpoint, on Ray Serve "
                                                          "(a local Ray cluster, or RAY_ADDRESS's)")
    s.add_argument("--cpus-per-replica", type=int, default=1, help="Ray CPUs (and torch threads) per replica")
    s.add_argument("--gpus-per-replica", type=float, default=0, help="Ray GPUs per replica")
    s.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    s.add_argument("--guard", default=None, help="a guard YAML: PII redaction, pattern and policy rules on chat "
                                                 "inputs and outputs (see gemmakit.safety.guard)")
    s.set_defaults(func=cmd_serve)


def cmd_export(args: argparse.Namespace) -> None:
    """`export` (and `merge`, which needs --adapter): an HF directory, with any adapter folded in."""
    from gemmakit.checkpoints import load_model, load_model_and_tokenizer
    from gemmakit.checkpoints.export import export_hf
    from gemmakit.runtime.device import resolve_dtype
    from gemmakit.train.lora import load_adapter, merge_lora

    dtype = resolve_dtype(args.dtype, "cpu")
    with spinner("loading model"):
        try:
            model, tokenizer = load_model_and_tokenizer(args.model, dtype)
        except FileNotFoundError as e:  # a weights-only directory: export the weights, say so
            print(f"note: {e}; writing the model without a tokenizer", file=sys.stderr)
            model, tokenizer = load_model(args.model, dtype), None
    if args.adapter:
        load_adapter(model, args.adapter)
        merge_lora(model)
    if args.format == "gguf":
        from gemmakit.checkpoints.export_gguf import export_gguf

        with spinner(f"writing {args.out}"):
            export_gguf(model, args.out, tokenizer, args.gguf_type)
        print(f"wrote {args.out}: one {args.gguf_type} GGUF file (loads with llama.cpp and gemmakit)")
        return
    with spinner(f"writing {args.out}"):
        export_hf(model, args.out, tokenizer)
    print(f"wrote {args.out}: config.json, safetensors weights, tokenizer (loads with transformers and gemmakit)")


def cmd_finetune(args: argparse.Namespace) -> None:
    from gemmakit.train.recipe import load_config
    from gemmakit.train.trainer import finetune

    config = load_config(args.config, vars(args))
    result = finetune(config, progress=not args.quiet)
    if result.final is not None and int(os.environ.get("RANK", "0")) == 0:
        val = "" if result.val_loss is None else f", validation loss {result.val_loss:.4f}"
        print(f"done: {result.steps} steps{val}; wrote {result.final} (metrics.jsonl, loss.png in {result.out})")


def add_finetune_parser(sub: Any) -> None:
    from gemmakit.train.recipe import add_arguments

    f = sub.add_parser("finetune", help="SFT or DPO fine-tuning (LoRA, QLoRA or full); runs under torchrun "
                                        "with FSDP2 too")
    f.add_argument("--config", default=None, help="a YAML recipe (recipes/*.yaml); flags given override it")
    f.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_arguments(f)
    f.set_defaults(func=cmd_finetune)


def add_export_parsers(sub: Any) -> None:
    for verb, text in (("export", "write the model (with --adapter folded in) as an HF directory"),
                       ("merge", "fold a LoRA adapter (PEFT format) into the base and write an HF directory")):
        e = sub.add_parser(verb, help=text)
        e.add_argument("--model", default=None, help="HF directory or .gguf (default: the embedded 270M)")
        e.add_argument("--adapter", required=verb == "merge", help="a LoRA adapter directory (PEFT format)")
        e.add_argument("--out", required=True, help="the directory to create (never overwritten)")
        e.add_argument("--dtype", choices=DTYPES, default="auto", help="weights' dtype (auto = float32)")
        e.add_argument("--format", choices=("hf", "gguf"), default="hf",
                       help="hf: an HF directory; gguf: one llama.cpp GGUF file at --out")
        e.add_argument("--gguf-type", choices=("f32", "f16", "bf16", "q8_0", "q4_0"), default="f16",
                       help="matrices' type in a GGUF file (norms stay f32)")
        e.set_defaults(func=cmd_export)


def cmd_generate(args: argparse.Namespace) -> None:
    if (args.media or args.image_tokens) and not args.chat:
        raise ValueError("--image, --audio and --image-tokens go with --chat (media are parts of a chat message)")
    parts = media_parts(args.media)
    sampling = sampling_of(args)
    llm = load_llm(args)
    if args.chat:
        set_image_tokens(llm, args.image_tokens)
        for part in parts:
            check_media(llm, part)
        if args.verbose and parts:
            print(describe_media(llm, parts), file=sys.stderr)
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append(user_message(args.prompt, parts))
        if args.json:
            print(json.dumps(asdict(llm.chat(messages, enable_thinking=args.think, **sampling)), ensure_ascii=False))
            return
        for delta in llm.stream_chat(messages, enable_thinking=args.think, **sampling):
            sys.stdout.write(delta.reasoning + delta.content)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return
    if args.json:
        text = llm.generate(args.prompt, **sampling)
        print(json.dumps({"prompt": args.prompt, "text": text, "finish_reason": llm.finish_reason,
                          "completion_tokens": llm.completion_tokens}, ensure_ascii=False))
        return
    stream_completion(llm, args.prompt, sampling, args.verbose)


def print_plan(llm) -> None:
    """--verbose: what loading made of the stored weights (GGUF files: per type, kept quantized or decoded to
    float), then the runtime plan, one line each on stderr."""
    if getattr(llm.model, "weights_note", None):
        print(f"weights: {llm.model.weights_note}", file=sys.stderr)
    print(llm.engine.plan.describe(), file=sys.stderr)


def stream_completion(llm, prompt: str, sampling: dict, verbose: bool) -> None:
    t0 = time.perf_counter()
    ids = llm.tokenizer.encode(prompt)
    llm.check_fits(len(ids), sampling["max_tokens"])  # before anything is printed
    sys.stdout.write(prompt)
    for piece in llm.stream_text(ids, llm.params(llm.stop_ids(chat=False), **sampling)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if verbose:
        print_plan(llm)
        print(f"[{len(ids)} prompt tokens, {llm.completion_tokens} generated, {time.perf_counter() - t0:.1f}s]",
              file=sys.stderr)
        print_speculation(llm)


def print_speculation(llm) -> None:
    """--verbose with --draft: the drafter's acceptance over everything this process generated."""
    stats = llm.engine.drafter_stats
    if stats is not None:
        print(f"[speculative decoding: {stats.accepted} of {stats.drafted} drafted tokens accepted "
              f"({stats.acceptance:.0%}) over {stats.rounds} steps]", file=sys.stderr)


def cmd_chat(args: argparse.Namespace) -> None:
    from gemmakit.repl import ChatSession, run

    sampling = sampling_of(args)
    parts = media_parts(args.media)
    llm = load_llm(args)
    context = llm.context
    if context <= sampling["max_tokens"]:
        raise ValueError(f"--context ({context}) must exceed --max-tokens ({sampling['max_tokens']})")
    if args.verbose:
        print_plan(llm)
    interactive = sys.stdin.isatty()
    guard = None
    if args.guard:
        from gemmakit.safety.guard import load_guard

        guard = load_guard(args.guard, llm)
    session = ChatSession(llm, sampling, context, system=args.system, thinking=args.think,
                          color=sys.stdout.isatty(), guard=guard, verbose=args.verbose)
    set_image_tokens(llm, args.image_tokens)
    for part in parts:  # a file or a model that cannot work ends the command before the chat starts
        session.attach(part)
    if args.think:
        session.set_thinking("on")
    try:
        run(session, sys.stdin, interactive)
    finally:
        if args.verbose:
            print_speculation(llm)


def cmd_bench(args: argparse.Namespace) -> None:
    from gemmakit.api import draft_slack, make_drafter
    from gemmakit.bench import MiB, current_rss_bytes, format_table, measure_bandwidth, run_engine_bench
    from gemmakit.runtime.plan import model_bytes

    llm = load_llm(args, warm_up=False)  # each measured engine is built (and compiled) below
    runtime = max(current_rss_bytes() - model_bytes(llm.model), 0)  # Python, torch, the tokenizer: not weights
    bandwidth = measure_bandwidth(device=args.device)
    results, accepted, drafted = [], 0.0, 0.0
    slack = draft_slack(args.draft_tokens)
    for batch in args.batch:
        for prompt_len in args.prompt_len:
            ctx = args.context or prompt_len + args.new_tokens + 8  # what run_engine_bench gives its engine
            drafter = None if llm.draft is None else make_drafter(llm.draft, llm.model, batch, ctx, slack)
            r = run_engine_bench(llm.model, batch, prompt_len, args.new_tokens, ctx, args.compiled, drafter,
                                 args.draft_tokens, slack)
            results.append(r)
            if r.acceptance is not None:
                accepted, drafted = accepted + r.acceptance, drafted + 1
    # The plan of the largest engine measured, as that engine made it (a second plan would time a quantized
    # head's screen again): what it chose on this machine, and why.
    largest = max(results, key=lambda r: (r.batch, r.prompt_len))
    print(f"{llm.name} on {args.device}; measured memory bandwidth {bandwidth:.1f} GB/s "
          "(roofline = fraction of it the decode uses, one weight read per step)")
    if getattr(llm.model, "weights_note", None):
        print(f"weights: {llm.model.weights_note}")
    print(largest.plan)
    print(format_table([{"dtype": args.dtype, "quantize": args.quantize, **r.with_roofline(bandwidth).row()}
                        for r in results]))
    if drafted:
        print(f"speculative decoding with {args.draft} ({args.draft_tokens} draft tokens a step): mean acceptance "
              f"{accepted / drafted:.0%}")
    if args.context:
        context = llm.context  # --context as loading capped it at the model's own, as the engines cap it
        capped = f" (capped at the model's {context})" if context < args.context else ""
        need = largest.forecast
        print(f"memory estimate at --context {context}{capped}, batch {max(args.batch)}: " + ", ".join(
            f"{k} {v / MiB:.0f} MiB" for k, v in need.items()) + f" (+ {runtime / MiB:.0f} MiB runtime); "
            "peak/est compares the measured peak with this forecast")


def add_model_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    add_load_args(p)
    p.add_argument("--watermark", default=None, help="watermark sampled text with the keys in this JSON file "
                                                     "(gemmakit watermark keys; needs --temperature > 0)")
    p.add_argument("--max-tokens", type=int, default=max_tokens, help=f"most tokens to generate ({max_tokens})")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample only from the top-p probability mass")
    p.add_argument("--min-p", type=float, default=None, help="drop tokens less likely than min-p x the top one")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeating tokens")
    p.add_argument("--loop-guard", choices=("off", "stop", "penalize"), default="off",
                   help="detect a repeating tail (Gemma 4's long-generation collapse) and stop or break it")
    p.add_argument("--seed", type=int, default=None, help="make sampling reproducible")
    p.add_argument("--system", default=None, help="a system message")
    p.add_argument("--think", action="store_true", help="thinking mode (Gemma 4 instruction-tuned models)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gemmakit", description="Gemma 3 and Gemma 4 in plain PyTorch.")
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    m = sub.add_parser("models", help="list the released Gemma 3 / Gemma 4 text backbones and their sizes")
    m.set_defaults(func=cmd_models)
    g = sub.add_parser("generate", help="raw completion of a prompt, or one chat reply with --chat")
    g.add_argument("prompt", help="the text to continue (with --chat: the user message)")
    g.add_argument("--chat", action="store_true", help="treat the prompt as a chat message and print the reply")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    g.add_argument("-v", "--verbose", action="store_true", help="print token counts and timing (and the "
                   "soft tokens each image or clip became) to stderr")
    add_model_args(g, max_tokens=64)
    add_decoding_args(g)
    add_media_args(g)
    g.set_defaults(func=cmd_generate)
    c = sub.add_parser("chat", help="chat in the terminal (reads a pipe too)")
    add_model_args(c, max_tokens=256)
    add_decoding_args(c)
    add_media_args(c)
    c.add_argument("-v", "--verbose", action="store_true", help="print the runtime plan (kernels chosen for this "
                                                                "machine, and why) and the soft tokens each image "
                                                                "or clip became to stderr")
    c.add_argument("--guard", default=None, help="a guard YAML: PII redaction, pattern and policy rules on what "
                                                 "is typed and answered (see gemmakit.safety.guard)")
    c.set_defaults(func=cmd_chat)
    b = sub.add_parser("bench", help="prefill / decode tokens per second, time to first token, peak memory")
    b.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes (default 1)")
    b.add_argument("--prompt-len", type=int, nargs="+", default=[128], help="prompt lengths (default 128)")
    b.add_argument("--new-tokens", type=int, default=128, help="tokens generated per sequence (default 128)")
    add_model_args(b, max_tokens=128)
    add_decoding_args(b, prefix_cache=False)
    b.set_defaults(func=cmd_bench)
    add_serve_parser(sub)
    add_export_parsers(sub)
    add_finetune_parser(sub)
    from gemmakit.embeddings.command import add_embed_parser
    from gemmakit.eval.command import add_eval_parsers
    from gemmakit.safety.command import add_safety_parsers

    add_embed_parser(sub)
    add_eval_parsers(sub)
    add_safety_parsers(sub)
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
        if hasattr(args, "compile"):  # the verbs that run a model
            args.compiled = wants_compile(args)
        args.func(args)
    except (CheckpointError, ConfigError, ValueError, FileNotFoundError, FileExistsError, MemoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
