"""The KV cache: preallocated, per batch row, rolling for sliding layers, absent for KV-shared layers.

Layout. Every layer that computes its own keys/values owns `k`, `v` of shape [rows, n_kv, slots, head_dim].
Full-attention layers have one slot per position of the context (rounded up to SPAN_GRANULE). Sliding layers
are ring buffers of `window + slack` slots (a key lives at slot `position % slots`): a query only ever sees the
last `window` keys, so the rest of the context is never stored. Every layer holds one spare slot past these,
never written (`cache_slots`). The `slack` slots let a speculative chunk of up
to `slack + 1` tokens be written before it is attended to, and rolled back, without overwriting a key that a
later query still needs. KV-shared layers (Gemma 4 E-series) have no cache: they attend with their producer's.

Positions, not slots, decide visibility. Per layer kind, `slot_pos[row, slot]` records which position a slot
holds (-1: empty), so one mask rule serves every case (prefill, batched decode of rows at different
positions, speculative verification, rollback): a key is visible to a query at position q iff it is in the
same row, its position is <= q, and (sliding) > q - window.

A forward pass sees the cache through a `Step`: `Step.kv` stores a layer's new keys/values and returns what
to attend over, `Step.mask` gives the boolean mask. `Prefill` is a fresh sequence from position 0 (attend
within the chunk, keep the tail in the ring); `Append` continues rows that already hold context (write, then
attend over the cache). The model itself stays cache-agnostic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gemmakit.config import FULL, SLIDING, Config


def chunk_mask(q_pos: Tensor, k_pos: Tensor, window: int | None) -> Tensor:
    """[..., T, S] bool: key positions k_pos [..., S] visible to query positions q_pos [..., T]."""
    q, k = q_pos[..., :, None], k_pos[..., None, :]
    allowed = (k <= q) & (k >= 0)
    if window is not None:
        allowed &= k > q - window
    return allowed


# A step's span (`span_for`) is a multiple of SPAN_GRANULE, and so are the full-attention slots, and at least
# MIN_SPAN: a compiled step receives span / SPAN_GRANULE as a symbol of at least 2 (a symbol of 0 or 1 would
# be made a constant of the graph), and the span is then known to split into 32 parts (model.decode_plain).
SPAN_GRANULE = 32
MIN_SPAN = 2 * SPAN_GRANULE


def cache_slots(config: Config, context: int, slack: int) -> dict[str, int]:
    """Slots per layer kind that positions map to: a full-attention layer's one per position (rounded up to
    SPAN_GRANULE, so that every span fits), a ring's `window + slack`. The cache holds one more of each, a spare
    slot never written (`KVCache`): what a step attends is then always shorter than the tensor, so a compiled
    step's symbolic span never equals its size (which would make the span a constant)."""
    return {FULL: _round_up(context, SPAN_GRANULE), SLIDING: min(context, config.sliding_window + slack)}


def _round_up(n: int, granule: int) -> int:
    return -(-n // granule) * granule


class KVCache:
    def __init__(self, config: Config, rows: int, context: int, dtype: torch.dtype, device: torch.device | str,
                 slack: int = 8):
        self.config, self.rows, self.context = config, rows, context
        self.window = config.sliding_window
        self.slots = cache_slots(config, context, slack)
        self.slot_pos = {kind: torch.full((rows, n + 1), -1, dtype=torch.long, device=device)
                         for kind, n in self.slots.items()}
        self.k: dict[int, Tensor] = {}
        self.v: dict[int, Tensor] = {}
        for i in range(config.first_kv_shared_layer):
            kind = config.layer_types[i]
            shape = (rows, config.layer_kv_heads(i), self.slots[kind] + 1, config.layer_head_dim(i))
            self.k[i] = torch.zeros(shape, dtype=dtype, device=device)
            self.v[i] = torch.zeros(shape, dtype=dtype, device=device)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k.values(), *self.v.values()))

    def clear(self, rows: Tensor | list[int]) -> None:
        """Forget everything stored for `rows` (a finished sequence leaves its row)."""
        for pos in self.slot_pos.values():
            pos[rows] = -1

    def rollback(self, row: int, keep_until: int) -> None:
        """Forget positions > keep_until of one row (rejected speculative tokens)."""
        for pos in self.slot_pos.values():
            pos[row].masked_fill_(pos[row] > keep_until, -1)

    def load_prefix(self, row: int, kv: dict[int, tuple[Tensor, Tensor]], length: int) -> None:
        """Put the keys/values of positions 0..length-1 into `row` as a prefill of them would have left it: every
        position in full-attention slots, the last ones in each ring. kv[layer] = (k, v), [n_kv, T, head_dim],
        covering positions length - T .. length - 1 (a ring's layers may be given only their tail)."""
        self.clear([row])
        for kind, n in self.slots.items():
            pos = torch.arange(max(0, length - n), length, device=self.slot_pos[kind].device)
            self.slot_pos[kind][row, pos % n] = pos
        for i, (k, v) in kv.items():
            n = self.slots[self.config.layer_types[i]]
            pos = torch.arange(max(0, length - n), length, device=k.device)
            self.k[i][row][:, pos % n] = k[:, k.shape[1] - len(pos):]
            self.v[i][row][:, pos % n] = v[:, v.shape[1] - len(pos):]

    def read(self, row: int, start: int, end: int) -> dict[int, tuple[Tensor, Tensor]] | None:
        """Keys/values of positions start..end-1 of `row` per layer ([n_kv, T, head_dim] views), or None where a
        ring no longer holds all of them."""
        pos = {kind: torch.arange(start, end, device=p.device) for kind, p in self.slot_pos.items()}
        for kind, p in self.slot_pos.items():
            if not bool((p[row, pos[kind] % self.slots[kind]] == pos[kind]).all()):
                return None
        out = {}
        for i in self.k:
            kind = self.config.layer_types[i]
            slots = pos[kind] % self.slots[kind]
            out[i] = (self.k[i][row][:, slots], self.v[i][row][:, slots])
        return out

    def save_slot0(self, rows: Tensor) -> tuple:
        """Copies of what slot 0 of `rows` holds in every layer (see `restore_slot0`)."""
        return ({i: (k[rows, :, 0].clone(), self.v[i][rows, :, 0].clone()) for i, k in self.k.items()},
                {kind: p[rows, 0].clone() for kind, p in self.slot_pos.items()})

    def restore_slot0(self, rows: Tensor, saved: tuple) -> None:
        """Put back slot 0 of `rows` as `save_slot0` found it (a padded batch step wrote a throw-away token there)."""
        kv, pos = saved
        for i, (k, v) in kv.items():
            self.k[i][rows, :, 0], self.v[i][rows, :, 0] = k, v
        for kind, p in pos.items():
            self.slot_pos[kind][rows, 0] = p

    def record(self, rows: Tensor, positions: Tensor) -> None:
        """Mark the slots that positions [b, T] of `rows` occupy (called once per forward, for all layers)."""
        for kind, pos in self.slot_pos.items():
            slots = positions % self.slots[kind]
            pos[rows[:, None], slots] = positions


@dataclass
class Step:
    """One forward pass over `rows` at `positions` [b, T]; `cache` None means no caching at all."""

    positions: Tensor
    cache: KVCache | None = None
    rows: Tensor | None = None

    def kv(self, layer: int, kind: str, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return k, v

    def key_positions(self, kind: str) -> Tensor:
        """[b, S] the positions of the keys `kv` returns for a layer of `kind` (-1: an empty slot)."""
        return self.positions

    def mask(self, kind: str, window: int) -> Tensor:
        """[b, 1, T, S] visibility of the keys `kv` returned."""
        return chunk_mask(self.positions, self.key_positions(kind), window if kind == SLIDING else None)[:, None]

    def begin(self) -> None:
        """Called once before the layers run."""


class Prefill(Step):
    """A fresh sequence from position 0 in one row: attend within the chunk, then keep what later steps need.
    Set `captured` to a dict to be handed every layer's keys/values of the chunk ([n_kv, T, head_dim]), all of
    them, before a ring forgets any: the prefix cache (prefix.py) stores them."""

    captured: dict[int, tuple[Tensor, Tensor]] | None = None

    def begin(self) -> None:
        self.cache.clear(self.rows)
        self._record_tail()

    def kv(self, layer: int, kind: str, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self._write_tail(layer, kind, k, v)
        return k, v

    def _record_tail(self) -> None:
        T = self.positions.shape[1]
        # A ring keeps only the last `slots` positions; writing more would hit the same slot twice.
        self._keep = {kind: slice(max(0, T - n), T) for kind, n in self.cache.slots.items()}
        for kind, keep in self._keep.items():
            pos = self.positions[:, keep]
            self.cache.slot_pos[kind][self.rows[:, None], pos % self.cache.slots[kind]] = pos

    def _write_tail(self, layer: int, kind: str, k: Tensor, v: Tensor) -> None:
        if self.captured is not None:
            self.captured[layer] = (k[0], v[0])
        keep = self._keep[kind]
        slots = self.positions[0, keep] % self.cache.slots[kind]
        self.cache.k[layer][self.rows[:, None], :, slots] = k[:, :, keep].transpose(1, 2)
        self.cache.v[layer][self.rows[:, None], :, slots] = v[:, :, keep].transpose(1, 2)


def span_for(positions: list[int] | list[list[int]]) -> int:
    """The slots an `Append` at these positions (a list per row, or one each) must attend: every key it may
    see is at a position no later than the last of them, and below a layer's slot count a key's slot is its
    position (full-attention slots, and a ring's before it wraps). Rounded up to SPAN_GRANULE, at least
    MIN_SPAN."""
    last = max(max(p) if isinstance(p, list) else p for p in positions)
    return max(MIN_SPAN, _round_up(last + 1, SPAN_GRANULE))


@dataclass
class Append(Step):
    """Rows that already hold context: write the new keys/values, then attend over the cache rows.
    At most `slack + 1` tokens per row at a time (a decode step, a speculative chunk): more would overwrite
    ring slots that the chunk's own first queries still need. Longer continuations use `Extend`.
    `all_rows` says `rows` is every row in order, so the cache is attended in place instead of gathered.
    `span` (`span_for` the step's positions; None: every slot) attends over the first `span` slots only (a
    ring's first `min(span, slots)`): a decode step early in an 8192-token context would otherwise read all
    8192 slots of every full-attention layer and the whole of every ring, empty slots too, every step
    (docs/performance.md, "Attending over the used slots").
    A compiled CPU step's span is a symbol (one graph serves every span), so it is cut to a ring's length with
    `sym_min`, not a test: a test would be a guard, and crossing it a recompilation."""

    all_rows: bool = False
    span: int | None = None

    def begin(self) -> None:
        self.cache.record(self.rows, self.positions)

    def kv(self, layer: int, kind: str, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        slots = self.positions % self.cache.slots[kind]  # [b, T]
        rows = self.rows[:, None]
        self.cache.k[layer][rows, :, slots] = k.transpose(1, 2)
        self.cache.v[layer][rows, :, slots] = v.transpose(1, 2)
        k_all, v_all, n = self.cache.k[layer], self.cache.v[layer], self._used(kind)
        if n is not None:  # narrow, not a slice: a slice of a symbolic length would be a guard on it
            k_all, v_all = k_all.narrow(2, 0, n), v_all.narrow(2, 0, n)
        if not self.all_rows:  # gathered after narrowing: only the span is copied
            k_all, v_all = k_all[self.rows], v_all[self.rows]
        return k_all, v_all

    def key_positions(self, kind: str) -> Tensor:
        pos, n = self.cache.slot_pos[kind], self._used(kind)
        pos = pos if n is None else pos.narrow(1, 0, n)
        return pos if self.all_rows else pos[self.rows]

    def _used(self, kind: str) -> int | None:
        """How many of a `kind` layer's slots to attend (None: all of them)."""
        if self.span is None:
            return None
        n = self.cache.slots[kind]
        if n % SPAN_GRANULE or self.span % SPAN_GRANULE:
            return torch.sym_min(self.span, n)
        # Counted in granules, so that a compiled step's symbolic result is still known to be a multiple of one
        # (model.decode_plain).
        return torch.sym_min(self.span // SPAN_GRANULE, n // SPAN_GRANULE) * SPAN_GRANULE


class Extend(Prefill):
    """A chunk of any length continuing one row (chunked prefill of a long prompt): attend over what the
    cache held before the chunk plus the chunk itself, then keep the chunk's tail in the ring as `Prefill`
    does. Reading before writing is what lets a chunk be longer than the ring's slack."""

    def begin(self) -> None:
        # Full-attention slots hold positions 0..start-1 (slot = position): attend over those only, not the
        # whole context, so a chunk's cost grows with the prompt so far rather than with --context.
        start = int(self.positions[0, 0])
        self._used = {kind: (start if kind == FULL else n) for kind, n in self.cache.slots.items()}
        self._before = {kind: pos[self.rows, :self._used[kind]] for kind, pos in self.cache.slot_pos.items()}
        self._record_tail()

    def kv(self, layer: int, kind: str, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        used = self._used[kind]
        k_all = torch.cat([self.cache.k[layer][self.rows, :, :used], k], dim=2)  # copies: safe to write after
        v_all = torch.cat([self.cache.v[layer][self.rows, :, :used], v], dim=2)
        self._write_tail(layer, kind, k, v)
        return k_all, v_all

    def key_positions(self, kind: str) -> Tensor:
        return torch.cat([self._before[kind], self.positions], dim=1)


# The forecast's allowances for compiled code, calibrated against the peaks `gemmakit bench` and the benchmarks/
# scripts measure (docs/performance.md, "Memory forecast calibration", lists the runs).
# Resident memory torch.compile leaves behind on CPU for a one-row decode step (dynamo/inductor state, generated
# code); it scales with the graph (layers), not the weights.
COMPILED_BYTES = 160 << 20
# What each compiled int4 prompt unpack adds (quantize.compile_prompt_unpack; one kernel per weight shape),
# over the compiled decode steps alone.
UNPACK_KERNEL_BYTES = 8 << 20
# On a GPU that code stays in host memory; what the device holds besides the eager working set is the CUDA
# graphs' private pool and the cuBLAS workspace of the stream they were captured on; one allowance serves any
# dtype or quantization (benchmarks/cuda_engine.py compares the peak with the forecast).
CUDA_GRAPHS_BYTES = 64 << 20


def estimate_bytes(config: Config, rows: int, context: int, dtype: torch.dtype, weight_bytes: int,
                   slack: int = 8, prefill_tokens: int = 512, compiled: bool = False,
                   device_type: str = "cpu", unpack_kernels: int = 0, head_screen: int = 0) -> dict[str, int]:
    """Memory a model + cache needs on `device_type` before anything is allocated: weights, KV cache, a
    working set for the largest forward pass (activations of a prefill chunk, its attention over the whole
    context, fp32 logits of a decode batch) and, when the decode step is compiled, the compiler's resident
    code (CPU, with `unpack_kernels` compiled int4 prompt unpacks) or the CUDA graphs' memory (GPU), and the
    `head_screen` bytes of a greedy screen (screen.py), not yet allocated."""
    elt = torch.tensor([], dtype=dtype).element_size()
    slots = cache_slots(config, context, slack)  # and the spare slot
    kv = sum(2 * rows * config.layer_kv_heads(i) * (slots[config.layer_types[i]] + 1) * config.layer_head_dim(i) * elt
             for i in range(config.first_kv_shared_layer))
    widest = max(config.layer_intermediate(i) for i in range(config.num_hidden_layers))
    heads = config.num_attention_heads * max(config.head_dim, config.global_head_dim or 0)
    activations = prefill_tokens * (4 * config.hidden_size + 3 * widest + 3 * heads) * elt
    # A late prefill chunk attends over everything before it (Extend): its boolean masks and the float copy
    # SDPA makes of one (its fused kernels never hold the scores), and one full layer's gathered keys/values.
    span = min(prefill_tokens, context) + context
    kv_width = max(config.layer_kv_heads(i) * config.layer_head_dim(i) for i in range(config.num_hidden_layers))
    scores = prefill_tokens * span * (4 + 3) + 2 * span * kv_width * elt
    logits = max(rows, 1) * config.vocab_size * 4 * 2
    work = activations + scores + logits
    out = {"weights": weight_bytes, "kv_cache": kv, "workspace": work}
    if head_screen:
        out["head_screen"] = head_screen
    if compiled:
        out["compiled"] = (CUDA_GRAPHS_BYTES if device_type == "cuda"
                           else COMPILED_BYTES + unpack_kernels * UNPACK_KERNEL_BYTES)
    return {**out, "total": sum(out.values())}


def proc_field_bytes(path: str, field: str) -> int | None:
    """A "Field:  N kB" line of a Linux /proc file (meminfo, self/status) in bytes; None where there is none."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_bytes(device: torch.device | str) -> int:
    """Memory that can still be allocated: free CUDA memory, or MemAvailable on Linux."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    free = proc_field_bytes("/proc/meminfo", "MemAvailable")
    return 1 << 62 if free is None else free  # unknown: do not refuse


def check_fits_memory(need: dict[str, int], device: torch.device | str, already_resident: int = 0) -> None:
    """Refuse, with the numbers, a cache that would not fit instead of failing with out-of-memory later."""
    extra = need["total"] - already_resident
    free = available_bytes(device)
    if extra > free:
        gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
        raise MemoryError(f"this needs {gib(extra)} more ({gib(need['kv_cache'])} KV cache, "
                          f"{gib(need['workspace'])} working memory) but only {gib(free)} is available; "
                          "lower --context or the batch size, or quantize the model")
