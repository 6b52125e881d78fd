"""Prefix caching: keys and values of prompts already seen, reused by later prompts that start the same way.

A chat resends the whole conversation every turn and agents resend the same long system prompt and tool list,
so most of a new prompt's prefill recomputes keys/values the engine has computed before. This module keeps
them, in blocks of `block` tokens, and hands the longest stored run of blocks that a new prompt starts with
back to the engine, which copies them into the request's cache row and prefills only the rest.

Design:
- A block is identified by its tokens and its parent block (the blocks before it), so a match is exact for
  the whole prefix, never a hash that could collide. A `namespace` root (the LoRA adapter a request runs with)
  separates prefixes whose keys/values differ for the same tokens.
- A block holds the keys/values of every position it covers for every cache-owning layer, sliding ones
  included. A sliding layer's cache row is a ring that forgets old positions, but a block's positions were
  captured while they were being computed (during prefill, see cache.Prefill's `captured`) or while they
  were still in the ring (when a sequence finishes): what is stored is always complete and valid for any
  later prompt with that prefix, whatever the window; KV-shared layers store nothing (they read their
  producer's). Keys/values of a position depend only on the tokens up to it, which is what makes reuse exact.
- Memory is bounded by `budget` bytes: least recently used leaf blocks (no stored child) go first, so a chain
  is never cut in the middle and nothing becomes unreachable. Every block's bytes are counted.
- Prompts with images or audio are not cached: their placeholder tokens do not identify the media.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

from gemmakit.cache import available_bytes
from gemmakit.flags import parse_switch

BLOCK_TOKENS = 32


@dataclass
class Block:
    key: tuple
    id: int
    k: list[Tensor]  # per cache-owning layer: [n_kv, block, head_dim]
    v: list[Tensor]
    nbytes: int
    children: int = 0
    parent: Block | None = None


@dataclass
class PrefixStats:
    lookups: int = 0
    hit_tokens: int = 0
    stored_blocks: int = 0
    evicted_blocks: int = 0


class PrefixCache:
    """Blocks of keys/values by token prefix, within `budget` bytes."""

    def __init__(self, budget: int, block: int = BLOCK_TOKENS):
        if block < 1:
            raise ValueError(f"the prefix cache block must be at least 1 token, got {block}")
        self.budget, self.block = budget, block
        self.blocks: OrderedDict[tuple, Block] = OrderedDict()  # least recently used first
        self.nbytes = 0
        self.stats = PrefixStats()
        self._next_id = 0

    def __len__(self) -> int:
        return len(self.blocks)

    def _key(self, parent: Block | None, namespace: object, tokens: list[int]) -> tuple:
        return (parent.id if parent is not None else ("root", namespace), tuple(tokens))

    def match(self, tokens: list[int], namespace: object = None, limit: int | None = None) -> list[Block]:
        """The longest run of stored blocks `tokens` starts with, covering at most `limit` tokens (a lookup:
        counted in `stats`, and the run becomes the most recently used)."""
        found = self._chain(tokens, namespace, limit)
        self.stats.lookups += 1
        self.stats.hit_tokens += len(found) * self.block
        return found

    def _chain(self, tokens: list[int], namespace: object, limit: int | None) -> list[Block]:
        limit = len(tokens) if limit is None else min(limit, len(tokens))
        found: list[Block] = []
        parent = None
        for start in range(0, limit - self.block + 1, self.block):
            b = self.blocks.get(self._key(parent, namespace, tokens[start:start + self.block]))
            if b is None:
                break
            found.append(b)
            parent = b
        for b in found:  # parents before children: a chain's leaf is its most recently used block
            self.blocks.move_to_end(b.key)
        return found

    def store(self, tokens: list[int], namespace: object, start: int,
              kv: list[tuple[Tensor, Tensor]]) -> int:
        """Store the whole blocks of positions [start, start + T) of the sequence `tokens`, whose keys/values per
        cache-owning layer are kv[layer] = (k, v), each [n_kv, T, head_dim]; `start` is a multiple of the block.
        Blocks before `start` must be stored already (else nothing is). Returns how many tokens are now
        stored from the start of `tokens`."""
        if start % self.block:
            raise ValueError(f"blocks start at multiples of {self.block}, not {start}")
        chain = self._chain(tokens, namespace, limit=start)
        if len(chain) * self.block < start:
            return len(chain) * self.block
        parent = chain[-1] if chain else None
        T = kv[0][0].shape[1] if kv else 0
        end = start + (min(T, len(tokens) - start) // self.block) * self.block
        for s in range(start, end, self.block):
            key = self._key(parent, namespace, tokens[s:s + self.block])
            block = self.blocks.get(key)
            if block is None:
                block = self._new_block(key, parent, [(k[:, s - start:s - start + self.block],
                                                       v[:, s - start:s - start + self.block]) for k, v in kv])
                if block is None:
                    return s
            self.blocks.move_to_end(key)
            parent = block
        return end

    def _new_block(self, key: tuple, parent: Block | None, kv: list[tuple[Tensor, Tensor]]) -> Block | None:
        nbytes = sum(2 * k.numel() * k.element_size() for k, _ in kv)
        if nbytes > self.budget:
            return None
        while self.nbytes + nbytes > self.budget:
            if not self._evict_one(keep=parent):
                return None
        block = Block(key, self._next_id, [k.clone() for k, _ in kv], [v.clone() for _, v in kv], nbytes,
                      parent=parent)
        self._next_id += 1
        if parent is not None:
            parent.children += 1
        self.blocks[key] = block
        self.nbytes += nbytes
        self.stats.stored_blocks += 1
        return block

    def _evict_one(self, keep: Block | None = None) -> bool:
        """Drop the least recently used leaf (never `keep`, the parent a new block is about to hang from)."""
        for key, b in self.blocks.items():
            if b.children == 0 and b is not keep:
                del self.blocks[key]
                self.nbytes -= b.nbytes
                if b.parent is not None:
                    b.parent.children -= 1
                self.stats.evicted_blocks += 1
                return True
        return False

    def clear(self) -> None:
        self.blocks.clear()
        self.nbytes = 0


DEFAULT_BUDGET = 1 << 30


def make_prefix_cache(setting: bool | int | PrefixCache | None, kv_bytes: int, device: torch.device | str = "cpu"
                      ) -> PrefixCache | None:
    """The engine's prefix cache: `setting` False turns it off, an int is its budget in bytes, a PrefixCache is
    used as it is (block size, budget), True or None
    (then GEMMAKIT_PREFIX_CACHE=on|off decides, default on) give the default budget: the engine's own KV cache
    size, within 256 MiB..1 GiB, and never more than a quarter of the memory `device` has free now."""
    if isinstance(setting, PrefixCache):
        return setting
    if setting is None:
        setting = bool(parse_switch("GEMMAKIT_PREFIX_CACHE", os.environ.get("GEMMAKIT_PREFIX_CACHE", "on")))
    if setting is False:
        return None
    if setting is True:
        setting = min(max(kv_bytes, 256 << 20), DEFAULT_BUDGET, available_bytes(device) // 4)
    if setting < 0:
        raise ValueError(f"the prefix cache budget must be >= 0 bytes, got {setting}")
    return PrefixCache(int(setting))
