"""Block pool: exact block ids, free-queue order, LRU eviction of cached blocks, reference counts."""
import pytest

from fastinfer.core.block_pool import BlockPool
from fastinfer.core.kv_cache_utils import hash_block_tokens


def test_allocation_order_and_uncached_reuse_first():
    pool = BlockPool(8)
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.allocate(2) == [3, 4]
    pool.free([2, 1, 0])  # uncached blocks go to the front: reused before anything else
    assert pool.num_free_blocks == 6
    assert pool.allocate(2) == [0, 1]
    assert pool.allocate(4) == [2, 5, 6, 7]
    with pytest.raises(RuntimeError):
        pool.allocate(1)


def test_cached_blocks_evicted_lru_and_revived_by_touch():
    pool = BlockPool(4, enable_caching=True)
    h = [hash_block_tokens(None, [i]) for i in range(4)]
    assert pool.allocate(2) == [0, 1]
    pool.cache(0, h[0])
    pool.cache(1, h[1])
    pool.free([1, 0])  # freed tail-first: 1 becomes least recently used
    assert pool.num_cached_blocks == 2
    assert pool.allocate(2) == [2, 3]  # uncached free blocks first
    assert pool.allocate(1) == [1]  # then LRU: evicts block 1's content
    assert pool.num_evictions == 1
    assert pool.lookup(h[1]) is None and pool.lookup(h[0]) == 0
    pool.touch([0])  # a prefix hit revives the free cached block
    assert pool.ref_cnt[0] == 1 and pool.num_free_blocks == 0
    pool.touch([0])
    pool.free([0])
    assert pool.ref_cnt[0] == 1 and pool.num_free_blocks == 0  # still in use: never freed
    pool.free([0])
    assert pool.num_free_blocks == 1 and pool.lookup(h[0]) == 0


def test_double_free_is_an_error():
    pool = BlockPool(2)
    b = pool.allocate(1)
    pool.free(b)
    with pytest.raises(RuntimeError, match="freed more often"):
        pool.free(b)


def test_caching_disabled_never_hits():
    pool = BlockPool(2, enable_caching=False)
    [b] = pool.allocate(1)
    pool.cache(b, b"x" * 32)
    assert pool.lookup(b"x" * 32) is None


def test_hash_chain_depends_on_parent_and_salt():
    a = hash_block_tokens(None, [1, 2, 3])
    assert a == hash_block_tokens(None, [1, 2, 3])
    assert a != hash_block_tokens(hash_block_tokens(None, [0]), [1, 2, 3])
    assert a != hash_block_tokens(None, [1, 2, 3], salt="tenant-a")
    assert hash_block_tokens(None, [1, 2, 3], "a") != hash_block_tokens(None, [1, 2, 3], "b")
    assert len(a) == 32


def test_reset_cache_only_when_idle():
    pool = BlockPool(3, enable_caching=True)
    [b] = pool.allocate(1)
    pool.cache(b, b"h" * 32)
    assert not pool.reset_cache()  # in use
    pool.free([b])
    assert pool.lookup(b"h" * 32) == b
    assert pool.reset_cache() and pool.lookup(b"h" * 32) is None and pool.num_cached_blocks == 0
