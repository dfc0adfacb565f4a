"""BlockManager: which KV blocks each request holds, and prefix caching over the BlockPool.

A request's tokens (prompt, then output) live in ``req.block_ids``, ``block_size`` per block, in order. Each
full block has a content hash chained from its parent's:

    hash[i] = sha256(hash[i - 1] | identity | tokens of block i)

where ``identity`` is the content hash of the request's adapter (its weights and config, never its name; empty
for the base model), salted with the request's ``cache_salt`` when it has one (vLLM's field; the API salts
every request of a tenant with the tenant's name, so tenants never share KV: a prefix-cache hit is visible
in the time to first token, and would tell one tenant what another has sent). So a base-model request never
reuses an adapter's KV and the other way round, two names for the same weights share KV, and a name reloaded
with other weights never meets the old weights' KV. SHA-256, not Python's hash: a tenant must not be able to
craft a collision into another tenant's prefix.

Blocks are registered in the pool (``commit``) only after the step that computed them ran, so a block is never
findable before its KV exists: a request preempted, aborted or failed mid-step leaves nothing wrong behind.
"""
from __future__ import annotations

import hashlib
import struct
from array import array

from server.engine.block_pool import BlockPool
from server.engine.request import Request


def adapter_identity(uses) -> bytes:
    """What a request's KV depends on besides its tokens: nothing for the base model, an adapter's content hash
    for one adapter at scale 1 (so plain requests on one adapter share blocks whatever its name), and a hash of
    the components' content hashes and scales for a mixture or a scaled adapter."""
    if not uses:
        return b""
    if len(uses) == 1 and uses[0].scale == 1.0:
        return uses[0].entry.content_hash
    parts = sorted((u.entry.content_hash, u.scale) for u in uses)
    return hashlib.sha256(b"mix" + b"".join(h + struct.pack("<d", s) for h, s in parts)).digest()


def prefix_identity(uses, salt: str | None = None) -> bytes:
    """``adapter_identity``, salted with a request's ``cache_salt`` when it has one: a salted request shares
    blocks only with requests of the same salt and adapter content, never with unsalted ones."""
    identity = adapter_identity(uses)
    if salt is None:
        return identity
    return hashlib.sha256(b"salt" + struct.pack("<I", len(identity)) + identity + salt.encode()).digest()


def block_hash(parent: bytes, identity: bytes, tokens) -> bytes:
    """The content hash of one full block (see the module docstring)."""
    return hashlib.sha256(parent + identity + array("q", tokens).tobytes()).digest()


class BlockManager:
    def __init__(self, pool: BlockPool, block_size: int):
        self.pool = pool
        self.block_size = block_size

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def capacity_tokens(self) -> int:
        """The most tokens one sequence can hold (the whole pool but the null block)."""
        return (self.pool.num_blocks - 1) * self.block_size

    def looks_up(self, req: Request) -> bool:
        """Whether ``req``'s admission asks the prefix cache (cached blocks hold no logits for prompt_logprobs)."""
        return self.pool.enable_caching and req.params.prompt_logprobs is None

    def cached_prefix(self, req: Request) -> list[int]:
        """Cached blocks holding the start of ``req``'s tokens. At least its last token is left to compute
        (the step needs its logits), so a fully cached sequence recomputes its last block."""
        if not self.looks_up(req):
            return []
        usable = (req.num_tokens - 1) // self.block_size
        return self.pool.lookup(self._hashes(req, usable))[:usable]

    def allocate(self, req: Request, num_new_tokens: int, prefix: list[int] = ()) -> bool:
        """Give ``req`` blocks for ``num_new_tokens`` more tokens after its computed ones (and first take the
        cached ``prefix``, a fresh request's prefix hit). False, changing nothing, when the pool is short."""
        computed = req.num_computed_tokens + len(prefix) * self.block_size
        fresh = self.blocks_for(computed + num_new_tokens) - len(req.block_ids) - len(prefix)
        revived = sum(1 for b in prefix if self.pool.ref[b] == 0)  # free cached blocks leave the free queue
        if max(fresh, 0) + revived > self.pool.num_free:
            return False
        if prefix:
            self.pool.take(list(prefix))
            req.block_ids.extend(prefix)
            req.num_computed_tokens = computed
            if not req.num_preemptions:  # the prompt's, reported in usage; a resumed request's recompute is not
                req.num_cached_tokens = computed
        if fresh > 0:
            req.block_ids.extend(self.pool.allocate(fresh))
        return True

    def free(self, req: Request) -> None:
        """Release ``req``'s blocks, tail first (see BlockPool.release); cached full blocks stay warm."""
        self.pool.release(req.block_ids[::-1])
        req.block_ids = []
        req.num_registered_blocks = 0

    def commit(self, req: Request) -> None:
        """Enter ``req``'s full, computed blocks in the prefix cache (after the step that computed them)."""
        if not self.pool.enable_caching:
            return
        full = req.num_computed_tokens // self.block_size
        hashes = self._hashes(req, full)
        for i in range(req.num_registered_blocks, full):
            self.pool.register(req.block_ids[i], hashes[i])
        req.num_registered_blocks = max(req.num_registered_blocks, full)

    def _hashes(self, req: Request, n: int) -> list[bytes]:
        """The hashes of ``req``'s first ``n`` full blocks, extending the request's memo as it grows."""
        hashes = req.block_hashes
        size = self.block_size
        while len(hashes) < n:
            i = len(hashes)
            parent = hashes[-1] if hashes else b""
            hashes.append(block_hash(parent, req.prefix_identity, req.token_slice(i * size, (i + 1) * size)))
        return hashes[:n]
