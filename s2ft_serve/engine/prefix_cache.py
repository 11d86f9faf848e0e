"""Automatic prefix caching: a prompt that starts like an earlier one reuses its keys and values.

Prompts are cut into blocks of `block_size` tokens. A block's keys and values depend on every
token up to its end and on the weights that made them: the request's adapter version and whatever
is fused into the base. A block is therefore found by the exact key (adapter version, parent
block, its tokens): no hashes, so a hit is never a collision. The fused state is not in the key;
when it changes (the registry's `epoch`), the cache empties. When an adapter version retires
(replaced, removed or evicted), its blocks go at once rather than waiting for the LRU.

On a hit the engine copies the blocks into the request's cache row and prefills only the rest of
the prompt, which attends over them like a later chunk of a chunked prefill. At least one prompt
token is always computed (its logits give the first output token). Blocks are evicted least
recently used first within a byte budget; a chain is touched leaf first, so a parent is always
more recent than its children and never leaves before them.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass

import torch

from s2ft_serve.model.forward import KVCache


@dataclass(eq=False)
class Block:
    id: int
    key: tuple  # (owner, parent block id, tokens)
    k: torch.Tensor  # [layers, kv_heads, block_size, head_dim]
    v: torch.Tensor


class PrefixCache:
    def __init__(self, kv: KVCache, block_size: int, max_bytes: int):
        if block_size < 1:
            raise ValueError("prefix cache block size must be at least 1")
        self.kv = kv
        self.block_size = block_size
        layers, _, heads, _, head_dim = kv.k.shape
        self.block_bytes = 2 * layers * heads * block_size * head_dim * kv.k.element_size()
        self.max_blocks = max(0, max_bytes) // self.block_bytes
        self.blocks: OrderedDict[tuple, Block] = OrderedDict()
        self.epoch = 0
        self._ids = itertools.count(1)  # block ids are never reused: 0 is the root
        self.hit_tokens = 0  # prompt tokens served from the cache, since start
        self.query_tokens = 0  # prompt tokens of the requests that looked

    @property
    def enabled(self) -> bool:
        return self.max_blocks > 0

    @property
    def nbytes(self) -> int:
        return len(self.blocks) * self.block_bytes

    def clear(self) -> None:
        self.blocks.clear()

    def drop_owner(self, owner: int) -> None:
        """Drop every block of `owner` (an adapter version that retired: no request will match them)."""
        for key in [key for key in self.blocks if key[0] == owner]:
            del self.blocks[key]

    def _check_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:  # the base weights changed (fuse / unfuse): every block is stale
            self.blocks.clear()
            self.epoch = epoch

    def _touch(self, chain: list[Block]) -> None:
        for block in reversed(chain):  # leaf first: the root ends up the most recent
            self.blocks.move_to_end(block.key)

    def match(self, owner: int, ids: list[int], epoch: int) -> list[Block]:
        """The blocks of the longest cached prefix of `ids` for `owner`, leaving at least one token."""
        if not self.enabled:
            return []
        self._check_epoch(epoch)
        B, parent, chain = self.block_size, 0, []
        for start in range(0, (len(ids) - 1) // B * B, B):
            block = self.blocks.get((owner, parent, tuple(ids[start: start + B])))
            if block is None:
                break
            chain.append(block)
            parent = block.id
        self._touch(chain)
        return chain

    def restore(self, chain: list[Block], row: int) -> int:
        """Copy `chain` into cache row `row` from position 0; returns the tokens restored."""
        B = self.block_size
        for i, block in enumerate(chain):
            self.kv.k[:, row, :, i * B: (i + 1) * B] = block.k
            self.kv.v[:, row, :, i * B: (i + 1) * B] = block.v
        return len(chain) * B

    def record(self, hit: int, prompt: int) -> None:
        self.hit_tokens += hit
        self.query_tokens += prompt

    def insert(self, owner: int, ids: list[int], row: int, epoch: int) -> None:
        """Keep the full blocks of prompt `ids`, whose keys and values are in cache row `row`."""
        if not self.enabled:
            return
        self._check_epoch(epoch)
        B, parent, chain = self.block_size, 0, []
        for start in range(0, len(ids) // B * B, B):
            if len(chain) >= self.max_blocks:
                break
            key = (owner, parent, tuple(ids[start: start + B]))
            block = self.blocks.get(key)
            if block is not None:
                self.blocks.move_to_end(key)  # not evicted while this chain is being extended
            else:
                while len(self.blocks) >= self.max_blocks:
                    self.blocks.popitem(last=False)
                block = Block(next(self._ids), key, self.kv.k[:, row, :, start: start + B].clone(),
                              self.kv.v[:, row, :, start: start + B].clone())
                self.blocks[key] = block
            chain.append(block)
            parent = block.id
        self._touch(chain)
