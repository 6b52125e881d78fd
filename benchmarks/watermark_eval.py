"""Does the watermark work, and what does it cost? N texts generated with the watermark and N without (same
prompts, seeds and sampling: temperature 1, top-k 64), then:

- separation: AUROC of the detector's -log10 p-value, and the true/false-positive rates at p < alpha;
- robustness: the same after replacing 10% of each text's words at random;
- quality: perplexity of each text under the unwatermarked model (the generating model itself), marked vs not.

    .venv/bin/python benchmarks/watermark_eval.py --texts 200 --tokens 200
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time

import torch
from tqdm import tqdm

import gemmakit
from gemmakit.engine import Engine
from gemmakit.safety.classifier import auroc
from gemmakit.safety.watermark import WatermarkConfig, WatermarkProcessor, detect
from gemmakit.sampling import SamplingParams

# Google's SynthID demo keys (30: tournament depth 30), n-gram length 5.
KEYS = (654, 400, 836, 123, 340, 443, 597, 160, 57, 29, 590, 639, 13, 715, 468, 990, 966, 226, 324, 585, 118, 504,
        421, 521, 129, 669, 732, 225, 90, 960)
OPENERS = ["The history of the city", "My favourite recipe is", "Scientists have discovered", "Once upon a time",
           "The best way to learn a language", "In the middle of the night", "The new smartphone", "Our team decided",
           "The weather in spring", "When I was a child", "The museum opened", "A good night's sleep",
           "The river flows", "Local farmers said", "The football match", "Learning to code", "The old library",
           "Electric cars are", "The mountain village", "During the meeting", "The first day of school",
           "Coffee is", "The train was late", "Artificial intelligence", "The garden in summer"]


def generate(engine: Engine, prompts: list[list[int]], tokens: int, config: WatermarkConfig | None,
             batch: int) -> list[list[int]]:
    out = []
    for start in tqdm(range(0, len(prompts), batch), desc="marked" if config else "plain", leave=False):
        chunk = prompts[start:start + batch]
        params = [SamplingParams(max_tokens=tokens, temperature=1.0, top_k=64, seed=start + i,
                                 logits_processors=(WatermarkProcessor(config),) if config else ())
                  for i in range(len(chunk))]
        out += [r.tokens for r in engine.generate(chunk, params)]
    return out


@torch.no_grad()
def perplexity(model: torch.nn.Module, prompt: list[int], text: list[int]) -> float:
    ids = torch.tensor([prompt + text])
    logp = torch.log_softmax(model(ids).float()[0, len(prompt) - 1:-1], -1)
    return math.exp(-float(logp.gather(1, torch.tensor(text)[:, None]).mean()))


def edited(text: str, rng: random.Random, share: float = 0.1) -> str:
    words = text.split(" ")
    for i in rng.sample(range(len(words)), int(len(words) * share)):
        words[i] = rng.choice(["house", "blue", "quickly", "seven", "river", "table", "green", "slowly"])
    return " ".join(words)


def rates(marked: list[float], plain: list[float], alpha: float) -> dict[str, float]:
    return {"auroc": auroc([-math.log10(max(p, 1e-300)) for p in marked + plain], [True] * len(marked) +
                           [False] * len(plain)),
            "tpr": sum(p < alpha for p in marked) / len(marked), "fpr": sum(p < alpha for p in plain) / len(plain)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--texts", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=1e-3)
    ap.add_argument("--compile", action="store_true", help="compiled decode steps (faster after a build)")
    args = ap.parse_args()
    t0 = time.time()
    llm = gemmakit.load(compile=args.compile)
    config = WatermarkConfig(KEYS, ngram_len=5)
    engine = Engine(llm.model, llm.tokenizer, max_batch=args.batch, context=64 + args.tokens, compile=args.compile)
    prompts = [llm.tokenizer.encode(OPENERS[i % len(OPENERS)]) for i in range(args.texts)]
    texts = {name: generate(engine, prompts, args.tokens, cfg, args.batch) for name, cfg in
             (("plain", None), ("marked", config))}
    decoded = {k: [llm.tokenizer.decode(t) for t in v] for k, v in texts.items()}
    p = lambda s: detect(config, llm.tokenizer.encode(s, add_bos=False), skip=(1,)).p_value  # noqa: E731
    rng = random.Random(0)
    result = {"texts": args.texts, "tokens": args.tokens, "alpha": args.alpha, "depth": config.depth,
              "ngram_len": config.ngram_len,
              "clean": rates([p(s) for s in decoded["marked"]], [p(s) for s in decoded["plain"]], args.alpha),
              "edited_10pct": rates([p(edited(s, rng)) for s in decoded["marked"]],
                                    [p(edited(s, rng)) for s in decoded["plain"]], args.alpha)}
    ppl = {k: [perplexity(llm.model, pr, t) for pr, t in zip(prompts, v, strict=True) if t] for k, v in texts.items()}
    result["perplexity"] = {k: {"mean": sum(v) / len(v), "median": sorted(v)[len(v) // 2]} for k, v in ppl.items()}
    result["seconds"] = round(time.time() - t0)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
