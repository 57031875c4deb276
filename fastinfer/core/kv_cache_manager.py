"""Maps requests to their KV blocks: allocation for new tokens, prefix-cache hits, freeing."""
from __future__ import annotations

from fastinfer.core.block_pool import BlockPool
from fastinfer.core.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = False) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_caching)
        self.enable_caching = enable_caching
        self.req_blocks: dict[str, list[int]] = {}
        self._num_published: dict[str, int] = {}
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # prompt tokens found

    def get_computed_blocks(self, req: Request) -> list[int]:
        """Longest cached prefix of ``req`` in whole blocks. Never covers the last token: its logits are
        needed, so at least one token is always computed."""
        if not self.enable_caching or req.num_computed_tokens:
            return []
        req.update_block_hashes(self.block_size)
        limit = (req.num_tokens - 1) // self.block_size
        hits: list[int] = []
        for h in req.block_hashes[:limit]:
            b = self.pool.lookup(h)
            if b is None:
                break
            hits.append(b)
        return hits

    def record_prefix_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Count a scheduled request's lookup (hit-rate metrics)."""
        if self.enable_caching:
            self.prefix_queries += num_tokens
            self.prefix_hits += num_hit_tokens

    def allocate_slots(self, req: Request, num_new_tokens: int, new_computed_blocks: list[int] | None = None,
                       ) -> bool:
        """Make room for ``num_new_tokens`` more tokens after the computed ones (plus any prefix-hit blocks).
        Returns False, changing nothing, when the pool cannot supply the blocks."""
        hits = new_computed_blocks or []
        blocks = self.req_blocks.setdefault(req.request_id, [])
        total = req.num_computed_tokens + len(hits) * self.block_size + num_new_tokens
        need = cdiv(total, self.block_size) - len(blocks) - len(hits)
        revived = sum(1 for b in hits if self.pool.ref_cnt[b] == 0)
        if need > self.pool.num_free_blocks - revived:
            return False
        self.pool.touch(hits)
        blocks.extend(hits)
        if need > 0:
            blocks.extend(self.pool.allocate(need))
        if hits:  # only on a first schedule: the hit blocks are the request's first, already published
            self._num_published[req.request_id] = len(hits)
        return True

    def cache_blocks(self, req: Request) -> None:
        """Publish the request's full blocks whose KV has been computed."""
        if not self.enable_caching:
            return
        n_full = min(req.num_computed_tokens, req.num_tokens) // self.block_size
        start = self._num_published.get(req.request_id, 0)
        if n_full <= start:
            return
        req.update_block_hashes(self.block_size)
        blocks = self.req_blocks[req.request_id]
        for i in range(start, n_full):
            self.pool.cache(blocks[i], req.block_hashes[i])
        self._num_published[req.request_id] = n_full

    def fork(self, parent: Request, child: Request, num_shared: int) -> tuple[int, int] | None:
        """Give ``child`` ``parent``'s first ``num_shared`` blocks (shared, ref-counted) plus a fresh block that
        will receive a copy of the parent's next block. Returns (src, dst) for the copy, or None if no block."""
        if self.pool.num_free_blocks < 1:
            return None
        blocks = self.req_blocks[parent.request_id]
        shared = blocks[:num_shared]
        self.pool.touch(shared)
        [new] = self.pool.allocate(1)
        self.req_blocks[child.request_id] = shared + [new]
        if self.enable_caching:
            self._num_published[child.request_id] = min(num_shared, self._num_published.get(parent.request_id, 0))
        return blocks[num_shared], new

    def free(self, req: Request) -> None:
        """Release the request's blocks; the tail goes first so a prefix outlives its continuations."""
        blocks = self.req_blocks.pop(req.request_id, [])
        self._num_published.pop(req.request_id, None)
        self.pool.free(reversed(blocks))

    def usage(self) -> float:
        return self.pool.usage()
