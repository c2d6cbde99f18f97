"""Paged KV-cache blocks: allocation, reference counts and prefix caching.

A full block is identified by a hash of (previous block's hash, its token ids), so equal prefixes map to
the same physical blocks. Freed blocks keep their hash and stay findable until they are reused (LRU).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

from splitserve.engine.sequence import Sequence


def block_hash(parent: bytes, token_ids: list[int]) -> bytes:
    return hashlib.blake2b(parent + np.asarray(token_ids, dtype=np.int64).tobytes(), digest_size=16).digest()


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: bytes | None = None
        self.token_ids: list[int] = []


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # LRU order
        self.hash_to_block: dict[bytes, int] = {}
        self.prefix_hit_tokens = 0
        self.prefix_query_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= len(self.free)

    def _take_free_block(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.hash_to_block.get(block.hash) == block_id:
            del self.hash_to_block[block.hash]
        block.hash, block.token_ids, block.ref_count = None, [], 1
        return block_id

    def match_prefix(self, seq: Sequence) -> None:
        """On first admission, reuse cached full blocks of the sequence's tokens (never the last token:
        it must be computed to get logits)."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        if not self.enable_prefix_caching:
            return
        parent = b""
        num_full = (seq.num_tokens - 1) // self.block_size
        self.prefix_query_tokens += seq.num_tokens
        for i in range(num_full):
            tokens = seq.token_ids[i * self.block_size:(i + 1) * self.block_size]
            h = block_hash(parent, tokens)
            block_id = self.hash_to_block.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
            seq.block_hashes.append(h)
            parent = h
        seq.num_computed_tokens = len(seq.block_table) * self.block_size
        seq.num_cached_tokens = seq.num_computed_tokens
        self.prefix_hit_tokens += seq.num_computed_tokens

    def can_fork(self, seq: Sequence, source: Sequence) -> bool:
        """`source` (running, same prompt) holds the KV of all of seq's prompt but its last token, and a free
        block is there for the copy of the partly filled block, if there is one."""
        last = seq.num_prompt_tokens - 1
        return (source.num_computed_tokens >= last and bool(source.block_table)
                and len(self.free) >= int(last % self.block_size != 0))

    def fork(self, seq: Sequence, source: Sequence) -> tuple[int, int] | None:
        """Share `source`'s full blocks of the prompt but its last token (reference counts), copy the partly
        filled block (the sequences write different tokens into it next); seq then computes only its last
        prompt token, and samples from it with its own generator. Returns the (source, copy) block pair for
        the runner to copy before the step, or None. Caller checked can_fork."""
        assert not seq.block_table
        shared, partial = divmod(seq.num_prompt_tokens - 1, self.block_size)
        for block_id in source.block_table[:shared]:
            self.blocks[block_id].ref_count += 1
        seq.block_table = source.block_table[:shared]
        seq.block_hashes = source.block_hashes[:shared]
        copy = None
        if partial:
            copy = (source.block_table[shared], self._take_free_block())
            seq.block_table.append(copy[1])
        seq.num_computed_tokens = seq.num_cached_tokens = seq.num_prompt_tokens - 1
        return copy

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow the block table to hold `num_tokens` tokens. Caller checked can_allocate."""
        for _ in range(self.blocks_needed(seq, num_tokens)):
            seq.block_table.append(self._take_free_block())

    def register_full_blocks(self, seq: Sequence) -> None:
        """Publish blocks whose tokens are all computed, so later requests can share them."""
        if not self.enable_prefix_caching:
            return
        # Only blocks not hashed yet are visited, so this costs O(new blocks) per step.
        while len(seq.block_hashes) < seq.num_computed_tokens // self.block_size:
            i = len(seq.block_hashes)
            tokens = seq.token_ids[i * self.block_size:(i + 1) * self.block_size]
            h = block_hash(seq.block_hashes[-1] if i else b"", tokens)
            seq.block_hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                block.hash, block.token_ids = h, tokens
                self.hash_to_block.setdefault(h, block.block_id)

    def free_sequence(self, seq: Sequence) -> None:
        # Free tail first so the LRU order evicts a sequence's last blocks before its shared prefix.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0
