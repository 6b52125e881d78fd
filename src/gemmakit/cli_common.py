"""What every `gemmakit` verb that runs a model shares: the loading flags (`add_load_args`), loading the model
they describe (`load_llm`) and a spinner for slow steps.

It sits below cli.py and the verb modules that cli.py gathers (eval/command.py, safety/command.py), so those
import it rather than cli.py: the arrows run from the command line down, never back up.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from gemmakit.flags import CHAT_FORMATS, QUANTIZATIONS, SWITCH_CHOICES, normalize_quantize, parse_switch
from gemmakit.runtime.device import DTYPES, resolve_device


@contextmanager
def spinner(label: str) -> Iterator[None]:
    """A spinner on stderr while something slow runs (only when stderr is a terminal)."""
    if not sys.stderr.isatty():
        yield
        return
    done = threading.Event()

    def spin() -> None:
        frames, i, t0 = "|/-\\", 0, time.perf_counter()
        while not done.wait(0.1):
            sys.stderr.write(f"\r{label} {frames[i % 4]} {time.perf_counter() - t0:.1f}s")
            sys.stderr.flush()
            i += 1
        sys.stderr.write("\r" + " " * (len(label) + 12) + "\r")

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def add_load_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF model directory or .gguf file (default: the embedded "
                                                 "Gemma 3 270M)")
    p.add_argument("--adapter", default=None, help="a LoRA adapter directory (PEFT format, e.g. from gemmakit "
                                                   "finetune) merged into the weights as they load")
    p.add_argument("--chat-format", default="auto", choices=CHAT_FORMATS,
                   help="how to prompt for chat: auto (the checkpoint's template; a plain dialogue for base "
                        "models), or force one")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="auto = float32 on CPU, bfloat16 on CUDA "
                   "(float16 is refused: Gemma overflows it)")
    p.add_argument("--quantize", choices=QUANTIZATIONS, default="none",
                   help="weight-only quantization of the loaded model")
    p.add_argument("--context", type=int, default=None,
                   help="tokens of context to allocate the KV cache for (default 8192, at most the model's)")
    p.add_argument("--device", default="auto", help="auto (CUDA where present, else CPU), cpu or cuda[:N]")
    p.add_argument("--compile", choices=SWITCH_CHOICES, default=None,
                   help="torch.compile the decode step: faster decode on CPU after a one-off build (cached "
                        "afterwards); auto (default) = on for bench and for generate of 256+ tokens, off for chat "
                        "(also: GEMMAKIT_COMPILE)")
    p.add_argument("--pack", choices=SWITCH_CHOICES, default="auto",
                   help="hold float weights in oneDNN's blocked layout: faster prefill and batched decode on CPU, "
                        "for a second copy of the output head in memory; auto (default) = on for CPU float models")


def load_llm(args: argparse.Namespace, warm_up: bool = True):
    """The model `add_load_args`'s flags describe, as a `gemmakit.api.LLM`. `args.compiled` (set by cli.main
    from --compile) asks for compiled decode steps; with `warm_up` they are built now, behind a spinner, so
    the first answer is not the one that waits. Verbs that build engines of their own (bench, serve) pass
    warm_up=False."""
    from gemmakit.api import load

    args.device = resolve_device(args.device)  # "auto" once, so every later use names the same device
    quantize = normalize_quantize(args.quantize)
    label = "loading model" + (f" and quantizing it to {quantize}" if quantize else "")
    with spinner(label):
        llm = load(args.model, args.dtype, args.device, args.chat_format, args.context, compile=args.compiled,
                   quantize=quantize, pack=parse_switch("--pack", args.pack, allow_auto=True),
                   adapter=getattr(args, "adapter", None))
    if args.compiled and warm_up:
        with spinner("compiling the decode step (a minute the first time; --compile off skips it)"):
            llm.engine.warmup()
    return llm
