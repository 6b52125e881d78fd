"""What every `gemmakit` verb that runs a model shares: the loading flags (`add_load_args`), loading the model
they describe (`load_llm`) and a spinner for slow steps.

It sits below cli.py and the verb modules that cli.py gathers (eval/command.py, safety/command.py), so those
import it rather than cli.py: the arrows run from the command line down, never back up.

Images and audio given on the command line (`--image`, `--audio`, the chat's `/image`, `/audio`) become content
parts that name the file by its absolute path, never its bytes: that is what `llm.chat` decodes, and what a
saved conversation keeps, so a transcript stays small and still reads back from another directory.
`check_media` refuses a file or a model that cannot work before it costs a turn; `soft_token_counts` (for
--verbose) runs the towers once more to say what each item became, which the chat API does not report.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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
    p.add_argument("--mmproj", default=None, help="for a .gguf model: llama.cpp's image / audio tower file "
                                                  "(default: the one mmproj*.gguf beside the model, if any)")
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


def add_decoding_args(p: argparse.ArgumentParser, prefix_cache: bool = True) -> None:
    """--draft / --draft-tokens (speculative decoding, api.load_draft) and, where prompts repeat, --prefix-cache."""
    p.add_argument("--draft", default=None, metavar="PATH",
                   help="speculative decoding with this draft model: a smaller Gemma with the same tokenizer (HF "
                        "directory or .gguf), or a Gemma 4 assistant directory (MTP); output is unchanged, decoding "
                        "is eager (no --compile)")
    p.add_argument("--draft-tokens", type=int, default=4, metavar="N",
                   help="tokens the draft model proposes per step (default 4)")
    if prefix_cache:
        p.add_argument("--prefix-cache", choices=("on", "off"), default=None,
                       help="reuse the keys/values of earlier prompts that share a beginning with a new one "
                            "(default on; also: GEMMAKIT_PREFIX_CACHE)")


def decoding_options(args: argparse.Namespace) -> dict[str, Any]:
    """`gemmakit.load`'s draft / draft_tokens / prefix_cache from `add_decoding_args`'s flags (absent: defaults);
    a bad --draft-tokens is refused before anything loads."""
    tokens = getattr(args, "draft_tokens", 4)
    if tokens < 1:
        raise ValueError(f"--draft-tokens must be at least 1, got {tokens}")
    switch = getattr(args, "prefix_cache", None)
    return {"draft": getattr(args, "draft", None), "draft_tokens": tokens,
            "prefix_cache": None if switch is None else parse_switch("--prefix-cache", switch)}


IMAGE_TOKENS = (70, 140, 280, 560, 1120)  # Gemma 4's image budgets (its processor's max_soft_tokens)


def add_media_args(p: argparse.ArgumentParser) -> None:
    """--image / --audio (repeatable, kept in command-line order in `args.media`) and --image-tokens."""
    p.add_argument("--image", dest="media", action="append", type=lambda f: ("image", f), default=[],
                   metavar="FILE", help="an image for the (first) user message; repeatable (multimodal models)")
    p.add_argument("--audio", dest="media", action="append", type=lambda f: ("audio", f), default=[],
                   metavar="FILE", help="an audio clip (WAV, FLAC, ...; at most 30 s) for the (first) user message; "
                                        "repeatable (Gemma 4 E2B / E4B)")
    p.add_argument("--image-tokens", type=int, choices=IMAGE_TOKENS, default=None,
                   help="Gemma 4: soft tokens per image (more = finer detail, longer prompt; default 280)")


def media_part(kind: str, path: str) -> dict[str, str]:
    """The content part for a media file: its absolute path (a saved chat must not depend on the directory)."""
    return {"type": kind, "path": str(Path(path).expanduser().absolute())}


def media_parts(given: list[tuple[str, str]]) -> list[dict[str, str]]:
    """--image / --audio as content parts; a path that names no file is refused before a model loads."""
    from gemmakit.media.soft import MediaError

    parts = [media_part(kind, path) for kind, path in given]
    for part, (kind, path) in zip(parts, given, strict=True):
        if not Path(part["path"]).is_file():
            raise MediaError(f"no such {kind} file: {path}; check the --{kind} path")
    return parts


def user_message(text: str, parts: list[dict[str, Any]]) -> dict[str, Any]:
    """A user message: plain text, or the media parts followed by the text."""
    if not parts:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def check_media(llm: Any, part: dict[str, Any]) -> None:
    """Raise MediaError (saying what to do) unless `llm` can take `part` (a media_part): the file decodes and
    the model has the tower for its kind and a chat format with a place for it."""
    from gemmakit.media.inputs import open_audio, open_image
    from gemmakit.media.soft import MediaError
    from gemmakit.media.towers import check_kinds

    kind = part["type"]
    check_kinds(llm.model, {kind}, llm.name)
    if llm.is_base:
        raise MediaError("this model is prompted as a base model (a plain dialogue), which has no place for images "
                         "or audio; use an instruction-tuned checkpoint or --chat-format gemma3|gemma4")
    (open_image if kind == "image" else open_audio)(part["path"], llm.media_policy)


def soft_token_counts(llm: Any, parts: list[dict[str, Any]]) -> list[int]:
    """How many soft tokens each media part becomes in `llm`'s prompt (runs the towers: for --verbose)."""
    counts = []
    for part in parts:
        media = llm.prepare_chat([user_message("", [part])])[1]
        counts.append(0 if media is None else int(media.embeds.shape[0]))
    return counts


def describe_media(llm: Any, parts: list[dict[str, Any]]) -> str:
    """One line per part: `image scene.jpg: 256 soft tokens` (for --verbose)."""
    return "\n".join(f"{p['type']} {Path(p['path']).name}: {n} soft tokens"
                      for p, n in zip(parts, soft_token_counts(llm, parts), strict=True))


def set_image_tokens(llm: Any, image_tokens: int | None) -> None:
    """--image-tokens onto the model (Gemma 4's budget; Gemma 3's images are a fixed size, said once)."""
    if image_tokens is None:
        return
    if llm.model.config.media_type == "gemma3":
        print("note: --image-tokens applies to Gemma 4; Gemma 3 gives every image the same number of soft tokens",
              file=sys.stderr)
    llm.max_soft_tokens = image_tokens


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
                   adapter=getattr(args, "adapter", None), mmproj=getattr(args, "mmproj", None),
                   **decoding_options(args))
    if args.compiled and warm_up:
        with spinner("compiling the decode step (a minute the first time; --compile off skips it)"):
            llm.engine.warmup()
    return llm
