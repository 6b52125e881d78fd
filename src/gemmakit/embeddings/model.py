"""EmbeddingGemma's encoder: gemmakit's Gemma 3 backbone run as an encoder, then sentence-transformers' head.

google/embeddinggemma-300m is a sentence-transformers directory. `modules.json` lists the pipeline: a
`Transformer` (a Gemma 3 text model, `config.json` at the root), `1_Pooling` (mean over the real tokens),
`2_Dense` (768 -> 3072) and `3_Dense` (3072 -> 768), both bias-free linears with an identity activation, and
`4_Normalize`. This module reads that layout, refusing modules and options it does not implement by name
(nothing is skipped silently), and runs it in plain PyTorch.

The backbone is `gemmakit.model.Gemma` unchanged. What makes it an encoder is the mask, and the model already
takes its masks from the `Step` a caller passes (cache.py), so `Encode` is a `Step` for one full, uncached,
right-padded batch: with `use_bidirectional_attention` (EmbeddingGemma's config) a full layer sees every real
token and a sliding layer every real token within sliding_window // 2 on either side. That halving is easy to
miss: transformers' Gemma3TextConfig turns the stored window W (512) into W // 2 + 1 (257) when the flag is set,
and `_bidirectional_window_overlay` then admits |q - k| < 257, i.e. 256 keys each side and 513 in all (the
stored value is what config.json keeps). Without the flag the usual causal mask applies. Padding keys are
hidden from every query; a padding query still sees itself, so no softmax row is empty (no NaN), and pooling
drops those rows anyway. Right padding with positions 0..n-1 gives each row what it gets alone: RoPE scores
depend only on distances, and so does the window.

Pooling and the dense head run in float32 whatever the backbone dtype (they are ~5M multiply-adds a text), so
a bfloat16 backbone loses precision only where it must. `encode` returns the pipeline's output *before* the
final L2 normalisation: the `Embedder` truncates (Matryoshka) and normalises, for this encoder and for
EmbeddingGemma 2's (gemma2.py) alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from gemmakit.cache import Step
from gemmakit.checkpoints.common import CheckpointError, Loader
from gemmakit.checkpoints.hf import read_config, read_json, shard_files
from gemmakit.config import SLIDING
from gemmakit.model import Gemma


class Encoder(Protocol):
    """What the `Embedder` drives: EmbeddingGemma's `GemmaEncoder`, or EmbeddingGemma 2's (gemma2.py)."""

    max_length: int

    def encode(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """input_ids, attention_mask: [B, T] (1 = real token); the sentence embeddings [B, D], not normalised."""
        ...


@dataclass
class Encode(Step):
    """A full, uncached forward of right-padded rows; `valid` [B, T] marks real tokens."""

    valid: Tensor | None = None
    bidirectional: bool = True

    def mask(self, kind: str, window: int) -> Tensor:
        q, k = self.positions[:, :, None], self.positions[:, None, :]
        if self.bidirectional:  # the config's window W, split: |q - k| <= W // 2 (transformers' __post_init__)
            seen = (q - k).abs() <= window // 2 if kind == SLIDING else torch.ones_like(q - k, dtype=torch.bool)
        else:
            seen = (k <= q) & (k > q - window) if kind == SLIDING else k <= q
        seen = seen & self.valid[:, None, :] | (q == k)
        return seen[:, None]


# ---------------------------------------------------------------------------------------------------------
# The sentence-transformers head: modules after the Transformer, in modules.json order.

_ACTIVATIONS = {"Identity": nn.Identity, "Tanh": nn.Tanh, "GELU": nn.GELU, "ReLU": nn.ReLU, "Sigmoid": nn.Sigmoid}


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """sentence-transformers' mean pooling, in float32: the average of the real tokens' states [B, D] (the count
    clamped at 1e-9, so a row without tokens gives zeros). EmbeddingGemma 2's encoder pools with it too."""
    m = mask[..., None].float()
    return (hidden.float() * m).sum(1) / m.sum(1).clamp(min=1e-9)


class MeanPooling(nn.Module):
    """`1_Pooling` with pooling_mode "mean": the average of the real tokens' final hidden states."""

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        return mean_pool(hidden, mask)


class Dense(nn.Module):
    """A sentence-transformers `Dense` module: activation(linear(x)); weights in the folder's model.safetensors."""

    def __init__(self, in_features: int, out_features: int, bias: bool, activation: str):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=bias)
        self.activation = _ACTIVATIONS[activation]()

    def forward(self, x: Tensor) -> Tensor:
        return self.activation(self.linear(x))


class Normalize(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=-1)


def module_kind(module: dict[str, Any]) -> str:
    """A modules.json entry's class name: "sentence_transformers.models.Dense" and the 6.x spelling
    "sentence_transformers.base.modules.dense.Dense" both read "Dense"."""
    kind = module.get("type")
    if not isinstance(kind, str) or not kind.startswith("sentence_transformers."):
        raise CheckpointError(f"modules.json names {kind!r}; gemmakit runs only sentence-transformers' own modules "
                              "(Transformer, Pooling, Dense, Normalize) and never imports code a model names")
    return kind.rsplit(".", 1)[-1]


def read_pooling(folder: Path) -> MeanPooling:
    c = read_json(folder / "config.json")
    mode = c.get("pooling_mode")
    if mode is None:  # sentence-transformers < 6 saved one boolean per mode
        mode = [k[len("pooling_mode_"):] for k, v in c.items() if k.startswith("pooling_mode_") and v] or ["mean"]
    modes = [mode] if isinstance(mode, str) else list(mode)
    if [m.replace("mean_tokens", "mean") for m in modes] != ["mean"]:
        raise CheckpointError(f"{folder}: pooling {modes} is not supported; gemmakit implements mean pooling "
                              "(EmbeddingGemma's)")
    if c.get("include_prompt", True) is not True:
        raise CheckpointError(f"{folder}: include_prompt false (pooling without the prompt's tokens) is not "
                              "supported; gemmakit pools over every real token, prompt included")
    return MeanPooling()


def read_dense(folder: Path) -> Dense:
    c = read_json(folder / "config.json")
    name = str(c.get("activation_function", "torch.nn.modules.activation.Tanh")).rsplit(".", 1)[-1]
    if name not in _ACTIVATIONS:
        raise CheckpointError(f"{folder}: activation {c.get('activation_function')!r} is not supported (gemmakit "
                              f"knows {', '.join(_ACTIVATIONS)})")
    if c.get("use_residual") or c.get("module_input_name", "sentence_embedding") != "sentence_embedding":
        raise CheckpointError(f"{folder}: a residual Dense or one reading another feature than the sentence "
                              "embedding is not supported")
    dense = Dense(int(c["in_features"]), int(c["out_features"]), bool(c.get("bias", True)), name)
    file = folder / "model.safetensors"
    if not file.is_file():
        raise CheckpointError(f"{folder} has no model.safetensors; gemmakit never unpickles weights "
                              "(pytorch_model.bin): re-save the model with a current sentence-transformers")
    try:
        with safe_open(str(file), framework="pt") as st:
            state = {k: st.get_tensor(k) for k in st.keys()}  # noqa: SIM118 - safe_open has no __iter__
        dense.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError) as e:
        raise CheckpointError(f"{file} does not hold this Dense module's weights ({e})") from e
    return dense


def read_head(path: Path, modules: list[dict[str, Any]], width: int) -> list[nn.Module]:
    """The modules after the Transformer, checked to chain: pooling first, each Dense taking the width before."""
    head: list[nn.Module] = []
    for m in modules:
        kind, folder = module_kind(m), path / str(m.get("path", ""))
        if kind == "Pooling" and not head:
            head.append(read_pooling(folder))
        elif kind == "Dense" and head:
            dense = read_dense(folder)
            if dense.linear.in_features != width:
                raise CheckpointError(f"{folder}: in_features {dense.linear.in_features} does not match the "
                                      f"{width}-wide input it gets")
            width = dense.linear.out_features
            head.append(dense)
        elif kind == "Normalize" and head:
            head.append(Normalize())
        else:
            raise CheckpointError(f"{path}/modules.json: module {m.get('type')!r} at position {m.get('idx')} is "
                                  "not supported here (gemmakit runs Transformer, Pooling, Dense, Normalize)")
    return head or [MeanPooling()]


class GemmaEncoder(nn.Module):
    """Gemma 3 backbone + pooling + dense head (EmbeddingGemma); `encode` gives [B, D] before normalising."""

    def __init__(self, backbone: Gemma, head: list[nn.Module], bidirectional: bool, max_length: int):
        super().__init__()
        self.backbone, self.head = backbone, nn.ModuleList(head)
        self.bidirectional, self.max_length = bidirectional, max_length
        self.vocab_size = backbone.config.vocab_size

    @torch.inference_mode()
    def encode(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        B, T = input_ids.shape
        valid = attention_mask.bool()
        step = Encode(torch.arange(T, device=input_ids.device).expand(B, T), valid=valid,
                      bidirectional=self.bidirectional)
        x = self.backbone.hidden(input_ids, step=step)
        x = self.head[0](x, valid)
        for module in self.head[1:]:
            x = module(x)
        return x


def read_modules(path: Path) -> list[dict[str, Any]]:
    """modules.json (a sentence-transformers directory), or the implied [Transformer] of a bare HF directory."""
    file = path / "modules.json"
    if not file.is_file():
        return [{"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"}]
    modules = read_json(file)
    if not isinstance(modules, list) or not modules or not all(isinstance(m, dict) for m in modules):
        raise CheckpointError(f"{file} is not a list of modules; re-download the model")
    modules = sorted(modules, key=lambda m: int(m.get("idx", 0)))
    if module_kind(modules[0]) != "Transformer":
        raise CheckpointError(f"{file}: the first module is {modules[0].get('type')!r}, not a Transformer")
    return modules


def max_length_of(folder: Path, config: dict[str, Any]) -> int:
    """The longest input in tokens: sentence_bert_config's max_seq_length (sentence-transformers < 6), else
    the tokenizer's model_max_length, else the model's max_position_embeddings, and never beyond that."""
    limit = int(config.get("max_position_embeddings") or 2048)
    for file, key in (("sentence_bert_config.json", "max_seq_length"), ("tokenizer_config.json", "model_max_length")):
        if (folder / file).is_file():
            value = read_json(folder / file).get(key)
            if isinstance(value, int) and 0 < value < limit:
                return value
            if isinstance(value, int) and value >= limit:
                break
    return limit


def load_backbone(folder: Path, dtype: torch.dtype, device: str | torch.device) -> Gemma:
    """The Gemma 3 text model of a sentence-transformers directory. transformers saves `Gemma3TextModel` without
    the `model.` prefix (`layers.0.mlp...`); a causal-LM checkpoint keeps it, and its `lm_head` is unused."""
    loader = Loader(read_config(folder), dtype, device, source=str(folder))
    for f in shard_files(folder):
        try:
            with safe_open(str(f), framework="pt") as st:
                for raw in st.keys():  # noqa: SIM118 - safe_open has no __iter__
                    key = raw if raw.startswith("model.") else "model." + raw
                    if key in loader.expected:
                        t = st.get_slice(raw)
                        loader.check_shape(key, tuple(t.get_shape()))
                        loader.check_dtype(key, t.get_dtype())
                        loader.assign(key, t[:])
                    elif not raw.startswith("lm_head."):
                        loader.unexpected.append(raw)
        except SafetensorError as e:
            raise CheckpointError(f"{f} is not a readable safetensors file ({e}); re-download it") from e
    return loader.finish()


def load_gemma_encoder(path: Path, modules: list[dict[str, Any]], dtype: torch.dtype,
                       device: str | torch.device) -> GemmaEncoder:
    folder = path / str(modules[0].get("path", ""))
    raw = read_json(folder / "config.json")
    if load_json_if_present(folder / "sentence_bert_config.json").get("do_lower_case"):
        raise CheckpointError(f"{folder}/sentence_bert_config.json: do_lower_case is not supported (gemmakit passes "
                              "text to the tokenizer as given)")
    bidirectional = raw.get("use_bidirectional_attention") is True
    backbone = load_backbone(folder, dtype, device)
    head = read_head(path, modules[1:], backbone.config.hidden_size)
    return GemmaEncoder(backbone, head, bidirectional, max_length_of(folder, raw)).to(device)


def model_type(path: Path, modules: list[dict[str, Any]]) -> str | None:
    """config.json's model_type of the directory's Transformer module (`read_modules`' first; None: no
    config.json)."""
    file = path / str(modules[0].get("path", "")) / "config.json"
    return read_json(file).get("model_type") if file.is_file() else None


def load_json_if_present(file: Path) -> dict[str, Any]:
    if not file.is_file():
        return {}
    data = read_json(file, limit=1 << 20)
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} is not a JSON object; re-download the model")
    return data


__all__ = ["Encode", "Encoder", "GemmaEncoder", "load_gemma_encoder", "load_json_if_present",
           "max_length_of", "mean_pool", "model_type", "module_kind", "read_modules", "read_pooling"]
