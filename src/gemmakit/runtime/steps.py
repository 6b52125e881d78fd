"""Forward passes for the engine, run the way the plan says: `prefill` a prompt into a cache row, `decode` one
token for a set of rows, each returning either logits to sample from or certified greedy tokens.

The engine decides what runs (which requests, which rows, how to sample); this module decides how: which
compiled graph or eager call, whether a greedy step reads the head screen or the full head, how a partly
filled batch goes through the full-batch graph. Nothing here changes the tokens: every path gives what the
plain eager model gives, up to the dtype's rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gemmakit.adapters import adapter_names, set_rows
from gemmakit.cache import MIN_SPAN, SPAN_GRANULE, Append, Extend, KVCache, Prefill, check_fits_memory, span_for
from gemmakit.config import FULL
from gemmakit.media.soft import PromptMedia, batch_media
from gemmakit.quantize import (
    UNPACK_ROWS,
    compile_prompt_unpack,
    quantized_bytes,
    small_row_reductions,
    use_gemv_kernels,
)
from gemmakit.runtime.compiled import compile_decode
from gemmakit.runtime.packing import PackedLinear
from gemmakit.runtime.plan import Plan, make_plan, model_dtype_device
from gemmakit.runtime.screen import HeadScreen


@dataclass
class StepOut:
    """A step's result: `tokens` [B] where the head screen certified every row's greedy pick, else `logits`
    [B, V] to sample from."""

    logits: Tensor | None = None
    tokens: Tensor | None = None


class Runtime:
    """One model's cache and forward passes on this machine, for an engine of `max_batch` rows."""

    def __init__(self, model: Any, max_batch: int, context: int, compile: bool = False, screen: bool = True,
                 slack: int = 8, prefill_chunk: int = 512, check_memory: bool = True):
        self.model, self.max_batch, self.prefill_chunk = model, max_batch, prefill_chunk
        self.dtype, self.device = model_dtype_device(model)
        self.plan: Plan = make_plan(model, max_batch, context, compile, screen, slack, prefill_chunk)
        if check_memory:
            check_fits_memory(self.plan.forecast, self.device, already_resident=self.plan.forecast["weights"])
        set_decode_attention(model, self.plan.decode_attention)
        if self.plan.int4_unpack:
            compile_prompt_unpack(model)
        if self.plan.gemv_kernels:
            use_gemv_kernels(model)
        self.screen: HeadScreen | None = HeadScreen(*self.plan.screen) if self.plan.screen else None
        self.cache = KVCache(model.config, max_batch, context, self.dtype, self.device, slack)
        self.compiled = self.plan.compiled
        self._logits_step, self._greedy_step = self._forward_logits, self._forward_greedy
        if self.compiled:
            static = [*self.cache.k.values(), *self.cache.v.values(), *self.cache.slot_pos.values()]
            self._logits_step = compile_decode(self._forward_logits, self.device, static)
            if self.screen is not None:
                self._greedy_step = compile_decode(self._forward_greedy, self.device, static)

    # --- the two calls the engine makes ---------------------------------------------------
    def prefill(self, tokens: list[int], row: int, greedy: bool, media: PromptMedia | None = None,
                adapter: int = -1) -> StepOut:
        """Prompt `tokens` into cache `row` (cleared before); the last position's result."""
        return self.prefill_part(tokens, row, 0, len(tokens), greedy, media, adapter)[1]

    def prefill_part(self, tokens: list[int], row: int, start: int, end: int, greedy: bool,
                     media: PromptMedia | None = None, adapter: int = -1, on_chunk: Any = None
                     ) -> tuple[int, StepOut | None]:
        """Positions start..end-1 of prompt `tokens` into cache `row`, which holds positions 0..start-1 (a
        fresh row when start is 0), in chunks of `prefill_chunk` tokens so a long prompt's working memory stays
        that of one chunk (as forecast). Returns how far it got (`end`, or further where a chunk may not end
        inside an image, which must see itself whole) and, once the whole prompt is in, the last position's
        result. `media`: the prompt's image / audio soft tokens; `adapter`: the index of the attached LoRA
        adapter that answers (-1: none); `on_chunk(start, kv)`: handed each chunk's keys/values per layer."""
        rows = torch.tensor([row], device=self.device)
        self.select_adapters([adapter])
        screened = greedy and self._screens(1, compiled=False)
        forward = self.model.hidden if screened else self.model
        kinds = self.model.config.bidirectional_kinds
        out = None
        while start < end:
            stop = min(start + self.prefill_chunk, end)
            stop = media.safe_chunk_end(start, stop) if media is not None else stop
            pos = torch.arange(start, stop, device=self.device)[None]
            step = (Prefill if start == 0 else Extend)(pos, self.cache, rows)
            if on_chunk is not None:
                step.captured = {}
            # Only a prompt with soft tokens passes them: a draft model or a test double needs no media argument.
            soft = batch_media([media], pos, kinds) if media is not None else None
            extra = {} if soft is None else {"media": soft}
            out = forward(torch.tensor([tokens[start:stop]], device=self.device), step=step, logits_to_keep=1,
                          **extra)[:, -1]
            if on_chunk is not None:
                on_chunk(start, step.captured)
            start = stop
        if start < len(tokens):
            return start, None
        return start, (self._certify(*self.screen(out, layout="packed"), out) if screened else StepOut(logits=out))

    def restore(self, row: int, blocks: list[Any]) -> int:
        """Load prefix-cache `blocks` (prefix.py, a chain from position 0) into `row`; the positions now held."""
        length = sum(b.k[0].shape[1] for b in blocks) if blocks else 0
        if not length:
            return 0
        kv = {}
        for j, layer in enumerate(self.cache.k):
            n = self.cache.slots[self.model.config.layer_types[layer]]
            first, seen = len(blocks), 0  # a ring takes only the blocks that reach into its last n positions
            while first and seen < n:
                first -= 1
                seen += blocks[first].k[j].shape[1]
            kv[layer] = (torch.cat([b.k[j] for b in blocks[first:]], dim=1),
                         torch.cat([b.v[j] for b in blocks[first:]], dim=1))
        self.cache.load_prefix(row, kv, length)
        return length

    def decode(self, last_tokens: list[int], positions: list[int], rows: list[int], greedy: bool,
               adapters: list[int] | None = None) -> StepOut:
        """One token for each of `rows` (ascending), fed `last_tokens` at `positions`. `greedy`: every row is a
        plain argmax, so the head screen may pick. `adapters`: each row's LoRA adapter index (-1: none)."""
        n = len(rows)
        self.select_adapters(adapters or [-1] * n)
        ids = torch.tensor([[t] for t in last_tokens], device=self.device)
        pos = torch.tensor([[p] for p in positions], device=self.device)
        rows_t = torch.tensor(rows, device=self.device)
        padded = self.compiled and 1 < n < self.max_batch
        compiled = self.compiled and (padded or n in (1, self.max_batch))
        screened = greedy and self._screens(self.max_batch if padded else n, compiled)
        if screened:
            forward = self._greedy_step if compiled else self._forward_greedy
        else:
            forward = self._logits_step if compiled else self._forward_logits
        # Compiled steps take int8 products of a step's few rows as fused reductions (quantize.py).
        # Only the slots these positions can see: a length eager steps read as it is, and compiled CPU steps
        # as a marker tensor's symbolic size (`_span_marker`). CUDA graphs keep every slot: their shapes are
        # fixed.
        span: int | Tensor | None = min(span_for(positions), self.cache.slots[FULL])
        if compiled:  # a context shorter than MIN_SPAN is attended whole: its spans are not all multiples of 32
            span = self._span_marker(span) if self.device.type == "cpu" and span >= MIN_SPAN else None
        with small_row_reductions(self.plan.int8_reduce_rows if compiled else 0):
            if padded:  # every slot's outputs: the rows' are picked from them here, or by _certify
                out = self._padded(forward, ids, pos, rows_t, span)
            else:
                out = forward(ids, pos, rows_t, n == self.max_batch, span)
        if screened:
            return self._certify(*out, slots=rows_t if padded else None)
        return StepOut(logits=out[rows_t] if padded else out)

    def longest_warmup_prompt(self, context: int) -> int:
        """A prompt length that reaches every compiled prompt kernel (0: there are none to build)."""
        return UNPACK_ROWS if self.plan.int4_unpack and context > UNPACK_ROWS else 0

    def clear(self, rows: list[int]) -> None:
        """Forget what `rows` hold (their sequences finished)."""
        self.cache.clear(rows)

    # --- how ----------------------------------------------------------------------------------
    def select_adapters(self, ids: list[int]) -> None:
        """Each batch row's LoRA adapter index (-1: none) for the next forward pass, where adapters are attached."""
        if adapter_names(self.model):  # attached after the engine was built, too
            set_rows(self.model, torch.tensor(ids, device=self.device))

    def _screens(self, rows: int, compiled: bool) -> bool:
        return self.screen is not None and self.screen.usable(rows, compiled)

    def _certify(self, tokens: Tensor, certified: Tensor, upper: Tensor, floor: Tensor, hidden: Tensor,
                 slots: Tensor | None = None) -> StepOut:
        """Screened tokens: a row its candidates did not certify settles from its bounds (HeadScreen.settle);
        only where one cannot does the step compute the full head's logits. `slots`: the rows' slots where the
        outputs are every slot's (a padded step). The upper bounds are not gathered (a copy of [slots, V] floats
        every such step, for the rare row that settles): a settling row reads its own."""
        if slots is not None:
            tokens, certified, floor, hidden = tokens[slots], certified[slots], floor[slots], hidden[slots]
        if bool(certified.all()):
            return StepOut(tokens=tokens)
        tokens = tokens.clone()
        for row in (~certified).nonzero()[:, 0].tolist():
            token = self.screen.settle(hidden[row], upper[row if slots is None else slots[row]], floor[row])
            if token is None:
                self.screen.fallbacks += 1
                return StepOut(logits=self.model.head(hidden))
            tokens[row] = token
        return StepOut(tokens=tokens)

    def _span_marker(self, span: int) -> Tensor:
        """An empty tensor of `span` / SPAN_GRANULE elements, its size marked dynamic: a compiled step reads the
        span from it as a symbol, so one graph serves every span, known to be a multiple of the granule."""
        marker = torch.empty(span // SPAN_GRANULE, dtype=torch.int8)
        torch._dynamo.mark_dynamic(marker, 0)
        return marker

    def _padded(self, forward: Any, ids: Tensor, pos: Tensor, rows: Tensor, span: int | Tensor | None) -> Any:
        """A partly filled batch through the compiled full-batch step: the other rows decode a throw-away token
        at position 0, and what it overwrote there is put back afterwards (a row may be half way through a
        chunked prefill, or hold a prefix being reused). On CPU the matmuls of 8 rows cost about what 2 rows
        cost, while an eager step costs several compiled ones, and a graph per batch size would cost a
        compilation each. Returns the step's outputs for every slot; the caller picks `rows`' from them."""
        others = torch.tensor(sorted(set(range(self.max_batch)) - set(rows.tolist())), device=self.device)
        saved = self.cache.save_slot0(others)
        full_ids = torch.zeros(self.max_batch, 1, dtype=ids.dtype, device=self.device)
        full_pos = torch.zeros(self.max_batch, 1, dtype=pos.dtype, device=self.device)
        full_ids[rows], full_pos[rows] = ids, pos
        every_row = torch.arange(self.max_batch, device=self.device)
        out = forward(full_ids, full_pos, every_row, True, span)
        self.cache.restore_slot0(others, saved)
        return out

    def _append(self, pos: Tensor, rows: Tensor, all_rows: bool, span: int | Tensor | None) -> Append:
        # Every row decoding (rows sorted): attend over the cache in place rather than gathering a copy of it.
        if isinstance(span, Tensor):  # a compiled step's marker (_span_marker)
            return Append(pos, self.cache, rows, all_rows, span.shape[0] * SPAN_GRANULE)
        return Append(pos, self.cache, rows, all_rows, span)

    def _forward_logits(self, ids: Tensor, pos: Tensor, rows: Tensor, all_rows: bool,
                        span: int | Tensor | None = None) -> Tensor:
        return self.model(ids, step=self._append(pos, rows, all_rows, span))[:, -1]

    def _forward_greedy(self, ids: Tensor, pos: Tensor, rows: Tensor, all_rows: bool,
                        span: int | Tensor | None = None) -> tuple[Tensor, ...]:
        """A decode step whose rows are all plain greedy: (screened tokens, certified, upper bounds, floors,
        hidden states; HeadScreen.forward). One-row
        steps read the plain copy of the head where there is one (compiled steps stream it fastest)."""
        x = self.model.hidden(ids, step=self._append(pos, rows, all_rows, span))[:, -1]
        layout = "plain" if x.shape[0] == 1 and self.screen.cheap is not None else "packed"
        return (*self.screen(x, layout=layout), x)

    def read_bytes_per_step(self) -> int:
        """Weight bytes a greedy decode step of every row streams: every weight once, in the layout the step
        reads (a packed-only linear in oneDNN's; the plain one where both are kept), and the screen's copy of
        the head instead of the head itself where a full-batch step is screened."""
        packed_only = sum(m.packed_bytes for m in self.model.modules()
                          if isinstance(m, PackedLinear) and m.weight is None)
        saved = self.screen.bytes_saved if self._screens(self.max_batch, self.compiled) else 0
        return quantized_bytes(self.model) + packed_only - saved


def set_decode_attention(model: Any, kernel: str | int | Callable) -> None:
    """Give every attention layer of `model` the plan's kernel for one-query (decode) steps."""
    for m in model.modules():
        if hasattr(m, "decode_kernel"):
            m.decode_kernel = kernel
