"""LoRA adapters that are PEFT adapters: the same parameter names, the same files, the same math.

A `LoRALinear` keeps the frozen base weight where the checkpoint has it (`q_proj.weight`) and adds
`lora_A` [r, in] and `lora_B` [out, r]: y = x W^T + scale * dropout(x) A^T B^T, scale = alpha / r, B
starting at zero so a fresh adapter leaves the model exactly as it was. On disk an adapter is what PEFT
writes: `adapter_config.json` and `adapter_model.safetensors` with keys
`base_model.model.<module path>.lora_A.weight`, so it loads with `PeftModel.from_pretrained` on the
transformers model, and adapters trained with PEFT load here (`load_adapter`). Module paths are HF's, so no
renaming is involved. `merge_lora` folds the adapters into plain linears for inference or export.

Over a QLoRA base (train/qlora.py) the frozen layer is kept whole as `base_layer`, PEFT's name for it; the
adapter files are the same either way.

Targets are chosen by name: a module is adapted when its own name is in `targets` (PEFT's list form) or, for
a string, when its full path matches that regular expression (PEFT's string form). Only the decoder is ever
adapted: a multimodal checkpoint's towers (`model.vision_tower`, `model.embed_vision`, ...) have their own
q_proj / k_proj, and they stay frozen, their soft tokens fixed inputs to the decoder being trained.

A multimodal checkpoint is, for transformers and PEFT, a `*ForConditionalGeneration` whose decoder sits at
`model.language_model.` (gemmakit's `model.` is that subtree). Its adapter is saved under those names, with a
`target_modules` pattern confined to `language_model`, so that PEFT on the HF class neither misses the
weights nor wraps the towers' projections; `load_adapter` takes either layout.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from gemmakit.files import write_atomic, write_text_atomic
from gemmakit.model import TOWER_NAMES
from gemmakit.train.qlora import QuantizedBase

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PREFIX = "base_model.model."
_LANGUAGE = "model.language_model."  # the decoder in HF's multimodal classes (gemmakit's "model.")
_TOWERS = tuple(f"model.{name}" for name in TOWER_NAMES)


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        if isinstance(base, nn.Linear):
            self.weight, self.bias = base.weight.requires_grad_(False), base.bias
            kw = {"dtype": base.weight.dtype, "device": base.weight.device}
        else:  # a quantized QLoRA base: it computes its own product
            self.base_layer = base.requires_grad_(False)
            kw = {"dtype": base.dtype, "device": base.codes.device}
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        self.enabled = True  # off: the base model's outputs (DPO's reference, without a second copy)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **kw)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **kw)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's default init
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        quantized = hasattr(self, "base_layer")
        y = self.base_layer(x) if quantized else nn.functional.linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        return y + self.lora_B(self.lora_A(self.dropout(x))) * self.scale

    def merged(self) -> nn.Linear:
        base = self.base_layer.dequantize() if hasattr(self, "base_layer") else self.weight
        bias = None if hasattr(self, "base_layer") else self.bias
        out = nn.Linear(self.in_features, self.out_features, bias=bias is not None, dtype=base.dtype,
                        device=base.device)
        with torch.no_grad():
            delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scale
            out.weight.copy_((base.float() + delta).to(base.dtype))
            if bias is not None:
                out.bias.copy_(self.bias)
        return out.requires_grad_(False)


def is_target(path: str, targets: Sequence[str] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return path.rsplit(".", 1)[-1] in targets


def in_tower(path: str) -> bool:
    """Whether a module path lies in a multimodal tower (never adapted, never quantized for QLoRA)."""
    return any(path == t or path.startswith(t + ".") for t in _TOWERS)


def target_linears(model: nn.Module, targets: Sequence[str] | str) -> list[str]:
    """Paths of the decoder's plain linears that `targets` selects (towers excluded)."""
    return [p for p, m in model.named_modules()
            if type(m) is nn.Linear and not in_tower(p) and is_target(p, targets)]


def add_lora(model: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
             targets: Sequence[str] | str = DEFAULT_TARGETS) -> list[str]:
    """Freeze the model and wrap every targeted nn.Linear of the decoder in a LoRALinear; returns the
    adapted paths."""
    model.requires_grad_(False)
    adapted = []
    for path, module in list(model.named_modules()):
        if (type(module) is nn.Linear or isinstance(module, QuantizedBase)) and not in_tower(path) \
                and is_target(path, targets):
            parent_path, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent_path), name, LoRALinear(module, r, alpha, dropout))
            adapted.append(path)
    if not adapted:
        raise ValueError(f"no linear layer matches LoRA targets {targets!r} (a model packed or quantized for "
                         "inference has none left: load it with gemmakit.checkpoints.load_model)")
    return adapted


def _multimodal(model: nn.Module) -> bool:
    """Whether HF keeps this checkpoint's decoder under `model.language_model.` (a multimodal config)."""
    return getattr(getattr(model, "config", None), "media_type", None) is not None


def peft_key(name: str, multimodal: bool) -> str:
    """PEFT's key for a gemmakit parameter name (`model.layers.0...lora_A.weight`)."""
    if multimodal and name.startswith("model."):
        name = _LANGUAGE + name[len("model."):]
    return _PREFIX + name


def from_peft_key(key: str) -> str:
    """The gemmakit parameter name of a PEFT key, from a text (`*ForCausalLM`) or multimodal adapter."""
    name = key.removeprefix(_PREFIX)
    return "model." + name[len(_LANGUAGE):] if name.startswith(_LANGUAGE) else name


def _lora_tensors(model: nn.Module) -> dict[str, Tensor]:
    return {f"{path}.{ab}.weight": getattr(m, ab).weight.detach().contiguous()
            for path, m in model.named_modules() if isinstance(m, LoRALinear) for ab in ("lora_A", "lora_B")}


def lora_state(model: nn.Module) -> dict[str, Tensor]:
    """The adapter weights under PEFT's key names (for the HF class this checkpoint loads as)."""
    return {peft_key(k, _multimodal(model)): v for k, v in _lora_tensors(model).items()}


def _target_modules(names: set[str], multimodal: bool) -> list[str] | str:
    """PEFT's `target_modules`: the adapted names, confined to the decoder when the HF class has towers
    with projections of the same names (PEFT would otherwise wrap them too)."""
    if not multimodal:
        return sorted(names)
    return rf"model\.language_model\..*\.({'|'.join(sorted(names))})"


def save_adapter(model: nn.Module, directory: str | Path, base_model: str = "",
                 state: dict[str, Tensor] | None = None) -> None:
    """Write adapter_config.json + adapter_model.safetensors (PEFT's format), each file atomically. `state`
    gives the adapter weights under the model's parameter names when they are not whole in `model` (FSDP)."""
    layers = {p: m for p, m in model.named_modules() if isinstance(m, LoRALinear)}
    if not layers:
        raise ValueError("the model has no LoRA layers to save")
    first, multimodal = next(iter(layers.values())), _multimodal(model)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": first.r, "lora_alpha": first.alpha,
              "lora_dropout": getattr(first.dropout, "p", 0.0), "bias": "none", "use_rslora": False,
              "target_modules": _target_modules({p.rsplit(".", 1)[-1] for p in layers}, multimodal),
              "fan_in_fan_out": False,
              "base_model_name_or_path": base_model, "inference_mode": True, "init_lora_weights": True}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_text_atomic(directory / "adapter_config.json", json.dumps(config, indent=2))
    weights = lora_state(model) if state is None else {
        peft_key(k, multimodal): v for k, v in state.items() if ".lora_A." in k or ".lora_B." in k}
    write_atomic(directory / "adapter_model.safetensors", lambda p: save_file(weights, str(p)))


def read_adapter(directory: str | Path) -> tuple[dict, dict[str, Tensor]]:
    """The adapter in `directory` (written here or by PEFT): its config, and its weights under gemmakit's
    parameter names (`model.layers.0.self_attn.q_proj.lora_A.weight`), checked to be plain LoRA on the decoder."""
    directory = Path(directory)
    try:
        config = json.loads((directory / "adapter_config.json").read_text())
        weights = load_file(str(directory / "adapter_model.safetensors"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{directory} is not a readable PEFT adapter (adapter_config.json + "
                         f"adapter_model.safetensors): {e}") from None
    if config.get("peft_type") != "LORA" or config.get("use_rslora") or config.get("use_dora"):
        raise ValueError(f"only plain LoRA adapters are supported, not {config.get('peft_type')} "
                         f"(rslora={config.get('use_rslora')}, dora={config.get('use_dora')})")
    weights = {from_peft_key(k): v for k, v in weights.items()}
    paths = sorted({k.rsplit(".lora_", 1)[0] for k in weights})
    towers = [p for p in paths if in_tower(p)]
    if towers:
        raise ValueError(f"the adapter adapts a multimodal tower ({towers[0]}, ...): gemmakit keeps the towers "
                         "frozen; use an adapter trained on the language model only")
    return config, weights


def load_adapter(model: nn.Module, directory: str | Path) -> list[str]:
    """Add the adapter in `directory` (written here or by PEFT) to `model`; returns the adapted paths."""
    config, weights = read_adapter(directory)
    paths = sorted({k.rsplit(".lora_", 1)[0] for k in weights})
    adapted = add_lora(model, int(config["r"]), float(config["lora_alpha"]), 0.0, "|".join(map(re.escape, paths)))
    state = _lora_tensors(model)
    if set(weights) != set(state):
        raise ValueError(f"adapter keys do not match the model: {sorted(set(weights) ^ set(state))[:4]}")
    for path in adapted:
        layer = model.get_submodule(path)
        for ab in ("lora_A", "lora_B"):
            tensor = weights[f"{path}.{ab}.weight"]
            target = getattr(layer, ab).weight
            if tensor.shape != target.shape:
                raise ValueError(f"{path}.{ab}: adapter has {list(tensor.shape)}, model needs {list(target.shape)}")
            with torch.no_grad():
                target.copy_(tensor)
    return adapted


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight: plain nn.Linear layers again, same outputs."""
    for path, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_path, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent_path), name, module.merged())
    return model
