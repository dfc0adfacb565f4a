"""BlockPool: the paged KV cache's blocks as bookkeeping (no tensors): reference counts, a free queue in
eviction order, and the table of full blocks by content hash that prefix caching looks blocks up in.

Block 0 is the null block: never handed out, always zero in the KV tensors; padded attention positions point
at it, so a padded read sees finite zeros, never another sequence's stale (or non-finite) values.

A block is *free* when no sequence holds it (ref count 0). A free block that is full and hashed stays in the
hash table (its KV is still valid) until it is handed out again: freeing keeps prefixes warm, allocating
evicts the least recently freed block first (LRU), and a lookup hit takes a free block back out of the queue.
"""
from __future__ import annotations

from collections import OrderedDict

NULL_BLOCK = 0


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks (one is the null block), got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.ref = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # content hash -> block holding that KV
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(1, num_blocks))  # LRU first

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        """Share of usable blocks held by sequences (free cached blocks count as free: they can be taken)."""
        return 1.0 - self.num_free / (self.num_blocks - 1)

    def allocate(self, n: int) -> list[int]:
        """``n`` fresh blocks (ref count 1), evicting the least recently freed; the caller checked num_free."""
        if n > len(self.free):
            raise RuntimeError(f"asked for {n} KV blocks with {len(self.free)} free")
        blocks = []
        for _ in range(n):
            block, _ = self.free.popitem(last=False)
            self._forget(block)
            self.ref[block] = 1
            blocks.append(block)
        return blocks

    def take(self, blocks: list[int]) -> None:
        """Share cached blocks (a prefix hit): one more holder each; free ones leave the free queue."""
        for block in blocks:
            if self.ref[block] == 0:
                del self.free[block]
            self.ref[block] += 1

    def release(self, blocks: list[int]) -> None:
        """Drop one holder of each block, in the order given: blocks that reach 0 join the queue's end, so the
        caller passes a sequence's blocks tail first and its (less shared) tail is evicted before its head."""
        for block in blocks:
            self.ref[block] -= 1
            if self.ref[block] == 0:
                self.free[block] = None

    def lookup(self, hashes: list[bytes]) -> list[int]:
        """The blocks of the longest cached run of ``hashes`` from the start (a prefix, in order)."""
        hits = []
        if self.enable_caching:
            for h in hashes:
                block = self.cached.get(h)
                if block is None:
                    break
                hits.append(block)
        return hits

    def register(self, block: int, block_hash: bytes) -> None:
        """``block`` now holds the full block ``block_hash`` names. When another block already holds the same
        content, that one stays the cached copy (both stay valid; this one is plain when freed)."""
        if self.enable_caching and self.hash_of[block] is None and block_hash not in self.cached:
            self.hash_of[block] = block_hash
            self.cached[block_hash] = block

    def reset_cache(self) -> None:
        """Forget every hash (after a failed step, whose blocks may not hold what their hashes say)."""
        self.cached.clear()
        self.hash_of = [None] * self.num_blocks

    def _forget(self, block: int) -> None:
        h = self.hash_of[block]
        if h is not None:
            self.hash_of[block] = None
            if self.cached.get(h) == block:
                del self.cached[h]
