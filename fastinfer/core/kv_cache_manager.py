"""Maps requests to their KV blocks: allocation for new tokens, prefix-cache hits, freeing.

KV cache groups: the layers of one sliding window (None: full attention) form a group with its own block pool
and its own block table per request (vLLM's KV cache groups). In a window group the blocks that lie wholly
before the window of a request's next token are freed as soon as it passes them and their table entries become
the group's null block (an id past the pool, never handed out, never read by a kernel), so window layers hold
about ``window`` tokens per request instead of the whole context. Prefix caching works per group: a hit of
``L`` tokens needs the full groups' blocks below ``L`` and, in a window group, the blocks covering
``[L - window + 1, L)`` (freed blocks keep their hash and stay revivable until evicted)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fastinfer.core.block_pool import BlockPool
from fastinfer.core.kv_cache_utils import cdiv
from fastinfer.core.request import Request

__all__ = ["ComputedBlocks", "KVCacheManager", "KVGroupStats", "cdiv"]


@dataclass(frozen=True)
class ComputedBlocks:
    """A prefix-cache hit: the first ``num_tokens`` tokens have their KV cached in ``blocks[g]`` (one list per
    group, ``num_tokens / block_size`` entries each; the null block where a window group needs none)."""

    num_tokens: int
    blocks: tuple[list[int], ...]


@dataclass(frozen=True)
class KVGroupStats:
    """One KV cache group: its sliding window (None: full attention), its blocks, those in use now and at most
    so far (the null block not counted)."""

    sliding_window: int | None
    num_blocks: int
    num_in_use: int
    peak_in_use: int


class _Group:
    def __init__(self, num_blocks: int, window: int | None, block_size: int, enable_caching: bool) -> None:
        self.window, self.block_size = window, block_size
        self.pool = BlockPool(num_blocks, enable_caching)
        self.null_block = num_blocks  # one past the pool: the cache tensors of a window group have it extra
        self.req_blocks: dict[str, list[int]] = {}
        self.num_published: dict[str, int] = {}  # leading blocks published to the prefix cache
        self.num_skipped: dict[str, int] = {}  # leading blocks freed (window groups)

    def first_needed(self, pos: int) -> int:
        """Index of the first block that position ``pos`` (or a later one) still reads."""
        return 0 if self.window is None else max(0, pos - self.window + 1) // self.block_size

    def hit_length(self, cached: list[int | None], n: int) -> int:
        """The longest hit of ``m <= n`` blocks this group can serve, ``cached[j]`` being block j's cached id
        (full attention: ``first_needed`` is 0, so this is the leading run of cached blocks)."""
        run = 0
        runs = []
        for j in range(n):  # run[j]: consecutive cached blocks ending at j
            run = run + 1 if cached[j] is not None else 0
            runs.append(run)
        for m in range(n, 0, -1):  # blocks [first_needed(m * bs), m) must all be cached
            if runs[m - 1] >= m - self.first_needed(m * self.block_size):
                return m
        return 0


class KVCacheManager:
    """``num_blocks`` blocks per group (one count, or one per group), groups by ``sliding_windows`` (default:
    one full-attention group)."""

    def __init__(self, num_blocks: int | Sequence[int], block_size: int, enable_caching: bool = False,
                 sliding_windows: Sequence[int | None] = (None,)) -> None:
        counts = [num_blocks] * len(sliding_windows) if isinstance(num_blocks, int) else list(num_blocks)
        if len(counts) != len(sliding_windows) or not sliding_windows:
            raise ValueError(f"{len(counts)} block counts for {len(sliding_windows)} KV cache groups")
        if any(w is not None and w < 1 for w in sliding_windows):
            raise ValueError(f"sliding windows must be >= 1, got {list(sliding_windows)}")
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.groups = [_Group(n, w, block_size, enable_caching) for n, w in zip(counts, sliding_windows)]
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # prompt tokens found

    # -- views -----------------------------------------------------------------------------------------
    @property
    def pool(self) -> BlockPool:
        """The first group's pool (the only one of a model without sliding windows)."""
        return self.groups[0].pool

    @property
    def req_blocks(self) -> dict[str, list[int]]:
        """The first group's block ids per request."""
        return self.groups[0].req_blocks

    @property
    def sliding_windows(self) -> list[int | None]:
        return [g.window for g in self.groups]

    def null_block(self, group: int) -> int:
        return self.groups[group].null_block

    def block_ids(self, request_id: str) -> tuple[list[int], ...]:
        """Copies of the request's block ids, one list per group."""
        return tuple(list(g.req_blocks.get(request_id, ())) for g in self.groups)

    def usage(self) -> float:
        """Fraction of blocks in use in the fullest group (the one that preempts first)."""
        return max(g.pool.usage() for g in self.groups)

    def group_stats(self) -> list[KVGroupStats]:
        return [KVGroupStats(g.window, g.pool.num_blocks, g.pool.num_in_use, g.pool.peak_in_use) for g in self.groups]

    @property
    def num_cached_blocks(self) -> int:
        return sum(g.pool.num_cached_blocks for g in self.groups)

    @property
    def num_evictions(self) -> int:
        return sum(g.pool.num_evictions for g in self.groups)

    def reset_cache(self) -> bool:
        """Forget every cached block; only when no block of any group is in use (returns False otherwise)."""
        if any(g.pool.num_in_use for g in self.groups):
            return False
        return all([g.pool.reset_cache() for g in self.groups])

    # -- prefix cache ----------------------------------------------------------------------------------
    def get_computed_blocks(self, req: Request) -> ComputedBlocks:
        """Longest cached prefix of ``req`` in whole blocks that every group can serve. Never covers the last
        token: its logits are needed, so at least one token is always computed; nothing for a request that asks
        for prompt logprobs."""
        none = ComputedBlocks(0, tuple([] for _ in self.groups))
        if not self.enable_caching or req.num_computed_tokens or req.sampling_params.prompt_logprobs is not None:
            return none  # prompt logprobs need every prompt position computed
        req.update_block_hashes(self.block_size)
        hashes = req.block_hashes[:(req.num_tokens - 1) // self.block_size]
        cached: list[list[int | None]] = [[] for _ in self.groups]
        n, changed = len(hashes), True
        while changed:  # each group can only shorten the hit; stop when all agree
            changed = False
            for g, grp in enumerate(self.groups):
                have = cached[g]
                have.extend(grp.pool.lookup(h) for h in hashes[len(have):n])
                m = grp.hit_length(have, n)
                if m < n:
                    n, changed = m, True
        if n == 0:
            return none
        blocks: list[list[int]] = []
        for g, grp in enumerate(self.groups):
            first = grp.first_needed(n * self.block_size)  # every block from ``first`` to ``n`` is cached
            blocks.append([grp.null_block] * first + [b for b in cached[g][first:n] if b is not None])
        return ComputedBlocks(n * self.block_size, tuple(blocks))

    def record_prefix_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Count a scheduled request's lookup (hit-rate metrics)."""
        if self.enable_caching:
            self.prefix_queries += num_tokens
            self.prefix_hits += num_hit_tokens

    # -- allocation ------------------------------------------------------------------------------------
    def allocate_slots(self, req: Request, num_new_tokens: int, new_computed: ComputedBlocks | None = None,
                       ) -> bool:
        """Make room for ``num_new_tokens`` more tokens after the computed ones (plus a prefix hit), after
        freeing the window groups' blocks that the first of those tokens no longer reads. Returns False, changing
        nothing else, when a group's pool cannot supply the blocks."""
        rid = req.request_id
        hit_tokens = new_computed.num_tokens if new_computed else 0
        start = req.num_computed_tokens + hit_tokens
        total = cdiv(start + num_new_tokens, self.block_size)
        needs = []
        for g, grp in enumerate(self.groups):
            blocks = grp.req_blocks.setdefault(rid, [])
            self._free_skipped(grp, rid, start)
            hits = new_computed.blocks[g] if new_computed else []
            need = total - len(blocks) - len(hits)
            revived = sum(1 for b in hits if b != grp.null_block and grp.pool.ref_cnt[b] == 0)
            if need > grp.pool.num_free_blocks - revived:
                return False
            needs.append(need)
        for g, (grp, need) in enumerate(zip(self.groups, needs)):
            blocks = grp.req_blocks[rid]
            if new_computed and hit_tokens:  # only on a first schedule: the hit blocks are the first, published
                hits = new_computed.blocks[g]
                grp.pool.touch(b for b in hits if b != grp.null_block)
                blocks.extend(hits)
                grp.num_published[rid] = len(hits)
                grp.num_skipped[rid] = sum(1 for b in hits if b == grp.null_block)
            if need > 0:
                blocks.extend(grp.pool.allocate(need))
        return True

    def remove_skipped_blocks(self, req: Request) -> None:
        """Free the window groups' blocks that no position from ``req.num_computed_tokens`` on reads."""
        for grp in self.groups:
            if grp.window is not None and req.request_id in grp.req_blocks:
                self._free_skipped(grp, req.request_id, req.num_computed_tokens)

    def _free_skipped(self, grp: _Group, rid: str, pos: int) -> None:
        if grp.window is None:
            return
        blocks = grp.req_blocks[rid]
        done = grp.num_skipped.get(rid, 0)
        end = min(grp.first_needed(pos), len(blocks))
        if end <= done:
            return
        freed = [b for b in blocks[done:end] if b != grp.null_block]
        blocks[done:end] = [grp.null_block] * (end - done)
        grp.num_skipped[rid] = end
        grp.pool.free(freed)

    def cache_blocks(self, req: Request) -> None:
        """Publish the request's full blocks whose KV has been computed (those still held)."""
        if not self.enable_caching:
            return
        n_full = min(req.num_computed_tokens, req.num_tokens) // self.block_size
        req.update_block_hashes(self.block_size)
        for grp in self.groups:
            start = grp.num_published.get(req.request_id, 0)
            if n_full <= start:
                continue
            blocks = grp.req_blocks[req.request_id]
            for i in range(start, n_full):
                if blocks[i] != grp.null_block:
                    grp.pool.cache(blocks[i], req.block_hashes[i])
            grp.num_published[req.request_id] = n_full

    def fork(self, parent: Request, child: Request, num_shared: int) -> list[tuple[int, int, int]] | None:
        """Give ``child`` ``parent``'s first ``num_shared`` blocks in every group (shared, ref-counted; null
        entries stay null) plus a fresh block per group that will receive a copy of the parent's next block.
        Returns the copies as (group, src, dst), or None (changing nothing) if a group has no free block."""
        if any(g.pool.num_free_blocks < 1 for g in self.groups):
            return None
        copies = []
        for g, grp in enumerate(self.groups):
            blocks = grp.req_blocks[parent.request_id]
            shared = blocks[:num_shared]
            grp.pool.touch(b for b in shared if b != grp.null_block)
            [new] = grp.pool.allocate(1)
            grp.req_blocks[child.request_id] = shared + [new]
            grp.num_skipped[child.request_id] = min(num_shared, grp.num_skipped.get(parent.request_id, 0))
            if self.enable_caching:
                grp.num_published[child.request_id] = min(num_shared, grp.num_published.get(parent.request_id, 0))
            copies.append((g, blocks[num_shared], new))
        return copies

    def free(self, req: Request) -> None:
        """Release the request's blocks; the tail goes first so a prefix outlives its continuations."""
        for grp in self.groups:
            blocks = grp.req_blocks.pop(req.request_id, [])
            grp.num_published.pop(req.request_id, None)
            grp.num_skipped.pop(req.request_id, None)
            grp.pool.free(b for b in reversed(blocks) if b != grp.null_block)
