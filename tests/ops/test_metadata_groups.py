"""AttentionMetadata with several KV cache groups: each group's block table and slot mapping (both builders),
``for_window`` choosing a layer's group, and clear errors for inconsistent group lists."""
from __future__ import annotations

import random

import pytest

from fastinfer.ops import AttentionMetadata


@pytest.mark.parametrize("small", [0, 10**9], ids=["numpy", "lists"])  # both builders: large and small steps
def test_every_group_gets_its_own_table_and_slots(small, monkeypatch):
    monkeypatch.setattr(AttentionMetadata, "SMALL_BATCH_TOKENS", small)
    rng = random.Random(1)
    windows = {None: 0, 8: 1, 32: 2}
    for _ in range(100):
        bs = rng.choice([1, 4, 16])
        seq_lens = [rng.randint(1, 60) for _ in range(rng.randint(1, 5))]
        query_lens = [rng.choice([1, rng.randint(1, s)]) for s in seq_lens]
        order = sorted(range(len(seq_lens)), key=lambda i: query_lens[i] != 1)  # decode rows first
        seq_lens, query_lens = [seq_lens[i] for i in order], [query_lens[i] for i in order]
        tables = [tuple([rng.randint(0, 999) for _ in range(-(-s // bs) + rng.randint(0, 2))] for _ in windows)
                  for s in seq_lens]
        ids = [rng.randint(0, 9999) for _ in range(sum(query_lens))]
        meta = AttentionMetadata.build(query_lens, seq_lens, tables, bs, input_ids=ids, group_of_window=windows)
        for w, g in windows.items():
            m = meta.for_window(w)
            assert (m is meta) == (g == 0)
            blocks = [t[g] for t in tables]
            width = max(len(b) for b in blocks)
            assert m.block_table.tolist() == [b + [0] * (width - len(b)) for b in blocks]
            assert m.slot_mapping.tolist() == [b[p // bs] * bs + p % bs for q, s, b in zip(query_lens, seq_lens, blocks)
                                               for p in range(s - q, s)]
            assert m.seq_lens.tolist() == seq_lens and m.query_lens_cpu == query_lens
            assert m.input_ids is not None and m.input_ids.tolist() == ids


def test_one_group_serves_every_window_and_bad_groups_fail():
    meta = AttentionMetadata.build([1], [5], [[0, 1]], 4)
    assert meta.for_window(None) is meta and meta.for_window(16) is meta  # one group holds every layer
    two = AttentionMetadata.build([1], [5], [([0, 1], [2, 3])], 4, group_of_window={None: 0, 16: 1})
    with pytest.raises(ValueError, match="no KV cache group for sliding_window=8"):
        two.for_window(8)
    with pytest.raises(ValueError, match="need group_of_window"):
        AttentionMetadata.build([1], [5], [([0, 1], [2, 3])], 4)
    with pytest.raises(ValueError, match="the same KV cache groups"):
        AttentionMetadata.build([1, 1], [5, 5], [([0, 1], [2, 3]), ([4, 5],)], 4, group_of_window={None: 0, 16: 1})
    with pytest.raises(ValueError, match="outside 0..1"):
        AttentionMetadata.build([1], [5], [([0, 1], [2, 3])], 4, group_of_window={None: 0, 16: 2})
    with pytest.raises(ValueError, match="cannot hold position 4"):
        AttentionMetadata.build([1], [5], [([0, 1], [2])], 4, group_of_window={None: 0, 16: 1})
