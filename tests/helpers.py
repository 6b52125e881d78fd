"""Shared test helpers: tiny configs with each released variant's structure, and reference HF models."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from gemmakit.config import Config, default_layer_types
from gemmakit.files import cache_dir

WINDOW = 8  # sequences in the parity tests are longer than this


def tiny(name: str) -> Config:
    """A small config that keeps the named variant's structure (pattern, PLE, sharing, MoE, K=V, geometry)."""
    g4 = dict(family="gemma4", vocab_size=1000, hidden_size=64, head_dim=16, global_head_dim=32,
              sliding_window=WINDOW, final_logit_softcapping=30.0, partial_rotary_factor=0.25,
              max_position_embeddings=256, intermediate_size=96)
    variants = {
        "gemma3": dict(family="gemma3", vocab_size=1000, hidden_size=64, intermediate_size=96,
                       num_hidden_layers=8, layer_types=default_layer_types(8, last_full=False), num_attention_heads=4,
                       num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW,
                       max_position_embeddings=256),
        # 27B-like: query_pre_attn_scalar != head_dim and linear RoPE scaling on global layers.
        "gemma3-27b": dict(family="gemma3", vocab_size=1000, hidden_size=64, intermediate_size=96,
                           num_hidden_layers=7, layer_types=default_layer_types(7, last_full=False),
                           num_attention_heads=4,
                           num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=16, sliding_window=WINDOW,
                           rope_scaling_factor=8.0, max_position_embeddings=256),
        "e2b": dict(g4, num_hidden_layers=10, layer_types=default_layer_types(10, period=5), num_attention_heads=4,
                    num_key_value_heads=1, hidden_size_per_layer_input=8, vocab_size_per_layer_input=1000,
                    num_kv_shared_layers=4, use_double_wide_mlp=True),
        "e4b": dict(g4, num_hidden_layers=12, layer_types=default_layer_types(12), num_attention_heads=4,
                    num_key_value_heads=2, hidden_size_per_layer_input=8, vocab_size_per_layer_input=1000,
                    num_kv_shared_layers=5),
        "26b-a4b": dict(g4, num_hidden_layers=7, layer_types=default_layer_types(7), num_attention_heads=4,
                        num_key_value_heads=2, attention_k_eq_v=True, num_global_key_value_heads=1,
                        enable_moe_block=True, num_experts=8, top_k_experts=3, moe_intermediate_size=24,
                        intermediate_size=40),
        "31b": dict(g4, num_hidden_layers=7, layer_types=default_layer_types(7), num_attention_heads=8,
                    num_key_value_heads=4, attention_k_eq_v=True, num_global_key_value_heads=2),
        "12b": dict(g4, num_hidden_layers=7, layer_types=default_layer_types(7), num_attention_heads=4,
                    num_key_value_heads=2, attention_k_eq_v=True, num_global_key_value_heads=1),
    }
    return Config(name=f"tiny-{name}", **variants[name])


def hf_model(config: Config, seed: int = 0):
    """The transformers reference model for `config`, with random weights and norms/scalars away from init."""
    import transformers

    d = config.to_hf()
    cls = transformers.Gemma3TextConfig if config.family == "gemma3" else transformers.Gemma4TextConfig
    hf_config = cls(**{k: v for k, v in d.items() if k not in ("model_type", "architectures")})
    torch.manual_seed(seed)
    model_cls = transformers.Gemma3ForCausalLM if config.family == "gemma3" else transformers.Gemma4ForCausalLM
    model = model_cls(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(("scale", "per_expert_scale")):
                centre = 0.0 if config.family == "gemma3" else 1.0
                p.copy_(centre + 0.5 * (torch.rand_like(p) - 0.5))
            else:
                p.normal_(0.0, 0.08)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(0.5 + torch.rand_like(b))
    return model


def default_gguf() -> Path:
    """The embedded default GGUF (joined from its package on first use), or a path that does not exist."""
    from gemmakit.checkpoints import CheckpointError, default_model_path

    try:
        return default_model_path()
    except CheckpointError:
        return Path("/nonexistent/default-model.gguf")


def transformers_from_gguf(path: Path, kind: str):
    """transformers' own model (fp32, eval) or tokenizer ("model" / "tokenizer") read from the GGUF at `path`.

    transformers dequantizes a GGUF in numpy, a minute or more for the 270M, so what it read is kept with its
    own `save_pretrained` under ~/.cache/gemmakit/test-reference (GEMMAKIT_CACHE_DIR), keyed by the file's
    hash and transformers' version, and later runs load that. The reference stays transformers' reading of
    the file: gemmakit never writes it."""
    import hashlib
    import os
    import shutil

    import transformers

    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    root = cache_dir("test-reference")
    saved = root / f"{kind}-{digest.hexdigest()[:16]}-transformers-{transformers.__version__}"
    auto = transformers.AutoModelForCausalLM if kind == "model" else transformers.AutoTokenizer
    extra = {"dtype": torch.float32} if kind == "model" else {}
    if not saved.is_dir():
        read = auto.from_pretrained(str(path.parent), gguf_file=path.name, **extra)
        partial = saved.with_name(f"{saved.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        if kind == "model":  # dequantized in full already; only the marker blocks saving
            read.hf_quantizer = None
            read.config.__dict__.pop("quantization_config", None)
        read.save_pretrained(partial)
        try:
            partial.rename(saved)  # whole or not at all: a run killed mid-save leaves only a .partial directory
        except OSError:  # another run saved it first
            shutil.rmtree(partial, ignore_errors=True)
        return read.eval() if kind == "model" else read
    read = auto.from_pretrained(str(saved), **extra)
    return read.eval() if kind == "model" else read


def weight_error(linear: torch.nn.Module, w: torch.Tensor) -> float:
    """Relative error of a (quantized) linear's effective weight, read through x = I, against `w` [N, K]."""
    return ((linear(torch.eye(w.shape[1])).float().T - w).norm() / w.norm()).item()


def greedy_without_cache(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens from full forward passes over the whole sequence, no cache, on the model's device."""
    device = next(model.parameters()).device
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids], device=device))[0, -1].argmax()))
    return ids[len(prompt):]


def assert_same_until_a_tie(got, want, tol: float, prefix: int) -> None:
    """Two requests' logprobs agree to `tol` step by step until their tokens part, which only a tie to
    rounding may cause (`want`'s top two within 2 x tol there); the first `prefix` tokens are equal."""
    for x, y in zip(got.logprobs, want.logprobs, strict=True):
        assert x.logprob == pytest.approx(y.logprob, abs=tol)
        if x.token != y.token:
            (_, first), (_, second) = y.top[:2]
            assert first - second <= 2 * tol, (x, y)
            break
    assert got.tokens[:prefix] == want.tokens[:prefix]


@contextlib.contextmanager
def running_server(args: list[str], log: Path, timeout: float = 120) -> Iterator[str]:
    """`gemmakit serve ARGS --port P` as a user starts it, until healthy; yields its URL, stops it after.
    Its output goes to `log` (shown if it never becomes healthy)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gemmakit.cli", "serve", "--port", str(port), *args],
                                stdout=out, stderr=subprocess.STDOUT)
    url, deadline, status = f"http://127.0.0.1:{port}", time.time() + timeout, None
    try:
        while time.time() < deadline and status != 200 and proc.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                status = httpx.get(url + "/health").status_code
            time.sleep(0.2)
        assert status == 200, log.read_text()
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
