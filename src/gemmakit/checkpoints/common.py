"""What every checkpoint format shares: build the model on the meta device, assign tensors one at a time,
and refuse with a clear message anything that does not fit (wrong shape, missing or unexpected tensors)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gemmakit.config import Config
from gemmakit.media.towers import attach_towers, is_tower
from gemmakit.model import Gemma


def return_freed_memory() -> None:
    """Hand freed heap memory back to the OS. glibc keeps freed pages mapped, so the temporaries of a load
    (a GGUF dequantization's are a sizeable share of the resident memory) would otherwise count against the
    process for its whole life; the call is cheap next to a load."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        _libc().malloc_trim(0)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded or saved; the message says what is wrong and what to do."""


def check_size(path: Path, limit: int, advice: str) -> None:
    """Refuse a file larger than `limit` bytes before reading it (parsers hold several times a file's size)."""
    with contextlib.suppress(OSError):  # a missing file is reported by whoever opens it
        size = path.stat().st_size
        if size > limit:
            raise CheckpointError(f"{path} is {size / 2**20:.0f} MiB, more than the {limit / 2**20:.0f} MiB such "
                                  f"a file can sensibly be; it is damaged or not what its name says: {advice}")


MAX_TOKENIZER_JSON = 128 << 20  # Gemma's 262k-entry tokenizer.json is 33 MB; the tokenizers library parses it whole


# safetensors dtype names -> torch. Float checkpoints are cast to the dtype the caller asked for (a bf16
# release loaded in fp32, or fp32 weights in bf16, is the user's explicit choice and loses nothing that
# matters); anything else is refused: casting int64 or bool data to floats yields a silently broken model,
# and fp8 weights need scales stored in other tensors that a plain cast ignores.
FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

# (field, least, most) for a config: generous next to the largest Gemma (62 layers, 5376 wide, 262k vocabulary),
# tight enough that a damaged config cannot make building the model on the meta device take hours.
CONFIG_BOUNDS = (("num_hidden_layers", 1, 1024), ("hidden_size", 1, 1 << 16), ("intermediate_size", 0, 1 << 18),
                 ("num_attention_heads", 1, 1024), ("num_key_value_heads", 1, 1024), ("head_dim", 1, 1 << 12),
                 ("vocab_size", 1, 1 << 22), ("num_experts", 0, 1024), ("hidden_size_per_layer_input", 0, 1 << 12))


def check_bounds(values: dict[str, Any], source: str) -> None:
    """Refuse a config whose sizes are not integers within CONFIG_BOUNDS (absent ones are left to defaults)."""
    for field, least, most in CONFIG_BOUNDS:
        value = values.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not least <= value <= most):
            raise CheckpointError(f"{source}: {field} = {value!r} is not an integer in [{least}, {most}]; the "
                                  "config is damaged or not for a Gemma model: re-download it")


_SHARED_KV = re.compile(r"^model\.layers\.(\d+)\.self_attn\.(k_proj|v_proj|k_norm|v_norm)\.")


@dataclass
class RowSource:
    """A 2-D checkpoint tensor read a block of rows at a time. Quantize-while-loading turns the 262k-row
    vocabulary into int4/int8 through this without ever holding it in full precision (fp32: 671 MB)."""

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device
    read: Callable[[int, int], torch.Tensor]  # rows [start, stop)

    def split(self, rows: int) -> Iterator[torch.Tensor]:
        for start in range(0, self.shape[0], rows):
            yield self.read(start, min(start + rows, self.shape[0])).to(self.device, self.dtype)


def place(model: nn.Module, key: str, tensor: torch.Tensor) -> nn.Module:
    """Put `tensor` in place of the (meta) parameter or buffer `key` of `model`, frozen; returns its module."""
    module_name, _, leaf = key.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    elif leaf in module._buffers:
        module._buffers[leaf] = tensor
    else:
        raise CheckpointError(f"{key} is neither a weight nor a buffer of the model")
    return module


class Loader:
    """`quantize` ("int8" / "int4") quantizes each module the moment its last tensor arrives, so the model is
    never resident in full precision: peak memory is the quantized model plus one full-precision module."""

    def __init__(self, config: Config, dtype: torch.dtype, device: str | torch.device, source: str,
                 quantize: str | None = None):
        self.config, self.dtype, self.device, self.source = config, dtype, torch.device(device), source
        self.quantize = quantize
        check_bounds({field: getattr(config, field) for field, _, _ in CONFIG_BOUNDS}, source)
        with torch.device("meta"):
            self.model = Gemma(config)
            attach_towers(self.model)
        self.expected = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        self.loaded: set[str] = set()
        self.unexpected: list[str] = []

    def is_ignorable(self, key: str) -> bool:
        """K/V weights of KV-shared layers: older Gemma 4 checkpoints still store them; they are unused."""
        m = _SHARED_KV.match(key)
        return bool(m) and int(m.group(1)) >= self.config.first_kv_shared_layer

    def check_shape(self, key: str, shape: tuple[int, ...]) -> None:
        if shape != self.expected[key]:
            raise CheckpointError(f"{self.source}: tensor {key} has shape {list(shape)} but the config implies "
                                  f"{list(self.expected[key])}; the config does not match these weights")

    def check_dtype(self, key: str, dtype: str) -> None:
        """Refuse a stored dtype that is not a float format (see FLOAT_DTYPES) where a float is expected."""
        if dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{self.source}: tensor {key} is stored as {dtype}, but gemmakit expects a float "
                                  f"tensor ({', '.join(FLOAT_DTYPES)}) and never reinterprets other types; the "
                                  "checkpoint is damaged or uses a format gemmakit cannot load (e.g. fp8 or "
                                  "GPTQ/AWQ-quantized weights): use an unquantized release")

    def assign(self, key: str, tensor: torch.Tensor, quantize: str | None = None) -> None:
        """Place one tensor; `quantize` overrides the loader's mode for the module it completes."""
        module_name = key.rpartition(".")[0]
        module = place(self.model, key, tensor.to(device=self.device, dtype=self.dtype))
        self.loaded.add(key)
        if self.quantize and not is_tower(key) and not any(p.is_meta for p in module.parameters(recurse=False)):
            from gemmakit.quantize import quantize_child

            parent_name, _, name = module_name.rpartition(".")
            quantize_child(self.model, self.model.get_submodule(parent_name), name, quantize or self.quantize)
            return_freed_memory()  # else the freed fp32 weights pile up as heap garbage, module after module

    def assign_int4_codes(self, key: str, codes: Callable[[], tuple[torch.Tensor, ...]]) -> bool:
        """When quantizing to int4, a linear weight stored as 4-bit codes (a GGUF's Q4_0/Q4_1/Q4_K blocks)
        becomes an `Int4Linear` on those very codes, not on a re-fit of their dequantized values: no second
        rounding. `codes()` gives (q, scale, zero) as `quants.four_bit_codes` does. False when this does not
        apply (another mode, not a plain linear, one int4 keeps at int8, a shape the kernel refuses): the caller
        dequantizes."""
        from gemmakit.model import Router
        from gemmakit.quantize import Int4Linear, int4_problem, linear_mode

        module_name, _, leaf = key.rpartition(".")
        parent_name, _, name = module_name.rpartition(".")
        parent = self.model.get_submodule(parent_name)
        linear = getattr(parent, name)
        if (self.quantize != "int4" or linear_mode(name, "int4") != "int4" or leaf != "weight"
                or type(linear) is not nn.Linear
                or isinstance(parent, Router) or int4_problem(*linear.weight.shape, 32, self.device)):
            return False
        setattr(parent, name, Int4Linear.from_codes(*(c.to(self.device) for c in codes())))
        self.loaded.add(key)
        return True

    def assign_rows(self, key: str, source: RowSource) -> None:
        """Like `assign`, for a tensor that may be read in row blocks: the tied embedding table is quantized
        straight from them when quantizing; anything else is read whole."""
        if self.quantize and key == "model.embed_tokens.weight":
            from gemmakit.quantize import quantize_tied_head

            quantize_tied_head(self.model, self.quantize, weight=source)
            self.loaded.add(key)
        else:
            self.assign(key, source.read(0, source.shape[0]))  # assign casts and moves it

    def finish(self) -> Gemma:
        missing = sorted(set(self.expected) - self.loaded)
        if missing:
            raise CheckpointError(f"{self.source} lacks {len(missing)} tensor(s) the config needs, e.g. "
                                  f"{', '.join(missing[:4])}. The checkpoint is incomplete or for another model.")
        if self.unexpected:
            raise CheckpointError(f"{self.source} has {len(self.unexpected)} tensor(s) gemmakit does not know, e.g. "
                                  f"{', '.join(self.unexpected[:4])}. Is the config.json for these weights?")
        return self.model.eval()
