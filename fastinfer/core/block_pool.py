"""The pool of KV-cache blocks: reference counts, a free queue in eviction order, and the prefix-cache map."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable


class BlockPool:
    """Blocks ``0..num_blocks-1``. A block with ``ref_cnt == 0`` sits in the free queue; one that also
    holds a cached hash can still be revived by a prefix hit until it is handed out again (evicted).

    Queue order: uncached free blocks are handed out first (they hold nothing worth keeping), then cached
    ones, least recently freed first (LRU).
    """

    def __init__(self, num_blocks: int, enable_caching: bool = False) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.ref_cnt = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[bytes, int] = {}
        self.num_evictions = 0
        self.peak_in_use = 0  # most blocks referenced at once (a sliding-window group's bound is read here)

    @property
    def num_in_use(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks off the front of the free queue (evicting their cached content)."""
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} blocks with {len(self._free)} free")
        out = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            self._evict(block_id)
            self.ref_cnt[block_id] = 1
            out.append(block_id)
        self.peak_in_use = max(self.peak_in_use, self.num_in_use)
        return out

    def touch(self, block_ids: Iterable[int]) -> None:
        """Take a reference on (possibly free, cached) blocks: a prefix hit or a share."""
        for b in block_ids:
            if self.ref_cnt[b] == 0:
                del self._free[b]
            self.ref_cnt[b] += 1
        self.peak_in_use = max(self.peak_in_use, self.num_in_use)

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference on each block, in the given order; blocks reaching zero join the free queue."""
        for b in block_ids:
            if self.ref_cnt[b] <= 0:
                raise RuntimeError(f"block {b} freed more often than allocated")
            self.ref_cnt[b] -= 1
            if self.ref_cnt[b] == 0:
                self._free[b] = None
                if self.block_hash[b] is None:
                    self._free.move_to_end(b, last=False)

    def lookup(self, block_hash: bytes) -> int | None:
        return self._cached.get(block_hash) if self.enable_caching else None

    def cache(self, block_id: int, block_hash: bytes) -> None:
        """Publish a full, computed block under its content hash (first writer wins)."""
        if not self.enable_caching or self.block_hash[block_id] is not None:
            return
        if block_hash not in self._cached:
            self._cached[block_hash] = block_id
            self.block_hash[block_id] = block_hash

    def reset_cache(self) -> bool:
        """Forget every cached block; only when no block is in use (returns False otherwise)."""
        if len(self._free) != self.num_blocks:
            return False
        for b in self._cached.values():
            self.block_hash[b] = None
        self._cached.clear()
        return True

    def _evict(self, block_id: int) -> None:
        h = self.block_hash[block_id]
        if h is not None:
            del self._cached[h]
            self.block_hash[block_id] = None
            self.num_evictions += 1
