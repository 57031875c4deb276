"""Attention metadata: built once per step by the model runner, read by every attention layer."""
from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch


def _resolve_device(device: torch.device | str) -> torch.device:
    """``device`` with an explicit index. A bare "cuda" means the current GPU; without a CUDA runtime (a fake
    CUDA device under FakeTensorMode on a CPU-only torch) it is "cuda:0", since asking for the current device
    would need a driver."""
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return d


@dataclass
class AttentionMetadata:
    """A packed batch of ``B`` sequences with ``T`` new tokens in all.

    Sequence ``i`` computes queries for its positions ``seq_lens[i] - query_lens[i] .. seq_lens[i] - 1``;
    their keys and values are already in the paged cache (``store_kv`` runs first), as are all earlier
    positions. Decode rows (``query_len == 1``) come first: ``num_decodes`` of them.

    KV cache groups (:mod:`fastinfer.core.kv_cache_manager`): with several, each group has its own block table
    and slot mapping; :meth:`for_window` gives an attention layer the metadata of its group (by its sliding
    window). In a sliding-window group, the blocks wholly before a sequence's window point at a null block that
    no backend reads.
    """

    query_start_loc: torch.Tensor  # [B + 1] int32, offsets into the packed tokens
    seq_lens: torch.Tensor  # [B] int32, context length including this step's tokens
    block_table: torch.Tensor  # [B, max_blocks] int32, padded with 0
    slot_mapping: torch.Tensor  # [T] int64, cache slot of each new token (block * block_size + offset)
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    num_decodes: int
    input_ids: torch.Tensor | None = None  # [T] int64 packed tokens, when built with them (same upload)
    positions: torch.Tensor | None = None  # [T] int64 their positions
    # sliding window of a layer -> the metadata of its KV cache group; None: one group for every layer
    kv_groups: Mapping[int | None, AttentionMetadata] | None = field(default=None, repr=False, compare=False)

    def for_window(self, sliding_window: int | None) -> AttentionMetadata:
        """The metadata (block table, slot mapping) of the KV cache group that holds the layers with this
        sliding window (None: full attention); ``self`` when one group holds every layer."""
        if self.kv_groups is None:
            return self
        meta = self.kv_groups.get(sliding_window)
        if meta is None:
            raise ValueError(f"no KV cache group for sliding_window={sliding_window}: the groups hold the windows "
                             f"{sorted(self.kv_groups, key=str)}")
        return meta

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens_cpu, default=0)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_cpu, default=0)

    SMALL_BATCH_TOKENS = 128  # up to this many tokens plain Python lists beat numpy's per-call cost

    @classmethod
    def _build_small(cls, query_lens: list[int], seq_lens: list[int], tables: list[tuple[list[int], ...]],
                     block_size: int, device: torch.device | str, input_ids: list[int] | None,
                     group_of_window: Mapping[int | None, int] | None) -> AttentionMetadata:
        """:meth:`build` for small steps (decode): the same fields from plain lists, one int64 upload whose
        tail is cast to int32 on the device."""
        b = len(query_lens)
        qsl = [0]
        for q in query_lens:
            qsl.append(qsl[-1] + q)
        t = qsl[-1]
        num_groups = len(tables[0]) if tables else 1
        widths = [max((len(x[g]) for x in tables), default=1) or 1 for g in range(num_groups)]
        slots: list[list[int]] = [[] for _ in range(num_groups)]
        pos: list[int] = []
        for i, (q, s, groups) in enumerate(zip(query_lens, seq_lens, tables)):
            if not 0 <= q <= s:
                raise ValueError(f"need 0 <= query_len <= seq_len: query_lens={query_lens} seq_lens={seq_lens}")
            for blocks in groups:
                if q and (s - 1) // block_size >= len(blocks):
                    raise ValueError(f"sequence {i}: {len(blocks)} blocks of {block_size} cannot hold position "
                                     f"{s - 1}")
            pos.extend(range(s - q, s))
            for g, blocks in enumerate(groups):
                slots[g].extend(blocks[p // block_size] * block_size + p % block_size for p in range(s - q, s))
        lead: list[int] = []
        if input_ids is not None:
            if len(input_ids) != t:
                raise ValueError(f"{len(input_ids)} input ids for {t} scheduled tokens")
            lead = [*input_ids, *pos]
        table = [x for g, width in enumerate(widths) for groups in tables
                 for x in (*groups[g], *([0] * (width - len(groups[g]))))]
        host = torch.tensor([*lead, *itertools.chain.from_iterable(slots), *qsl, *seq_lens, *table],
                            dtype=torch.int64)
        packed = host.to(_resolve_device(device), non_blocking=True)
        n = len(lead) + num_groups * t
        ints = packed.narrow(0, n, packed.shape[0] - n).to(torch.int32)
        not_decode = next((i for i, q in enumerate(query_lens) if q != 1), b)
        return cls._from_packed(packed, ints, input_ids is not None, t, widths, query_lens, seq_lens, not_decode,
                                group_of_window)

    @classmethod
    def build(cls, query_lens: list[int], seq_lens: list[int], block_ids: Sequence[list[int] | tuple[list[int], ...]],
              block_size: int, device: torch.device | str = "cpu", input_ids: list[int] | None = None,
              group_of_window: Mapping[int | None, int] | None = None) -> AttentionMetadata:
        """From host lists; decode rows must already come first.

        ``block_ids[i]`` is sequence ``i``'s block ids, or with several KV cache groups a tuple of lists, one
        per group, and ``group_of_window`` maps each layer's sliding window to its group (see
        :meth:`for_window`).

        Vectorised on the host with numpy (no per-token Python loop): token ``t`` of sequence ``i`` sits at
        position ``p = seq_lens[i] - query_lens[i] + (t - query_start_loc[i])`` and goes to slot
        ``block_ids[i][p // block_size] * block_size + p % block_size`` (per group). Every field then reaches
        ``device`` in one host-to-device copy of one packed int64 buffer (``[slot_mapping of each group | int32
        words of query_start_loc, seq_lens, block_table of each group]``); the fields are views of it. Works for
        a fake device under FakeTensorMode too (numpy runs for real, the copy is faked). With ``input_ids`` (the
        packed tokens), the model's inputs ride in the same copy: ``input_ids`` and ``positions`` [T] int64 are
        set too."""
        b = len(query_lens)
        if len(seq_lens) != b or len(block_ids) != b:
            raise ValueError(f"{b} query_lens, {len(seq_lens)} seq_lens and {len(block_ids)} block lists")
        tables = [x if isinstance(x, tuple) else (x,) for x in block_ids]
        num_groups = len(tables[0]) if tables else 1
        if any(len(x) != num_groups for x in tables):
            raise ValueError(f"every sequence needs block ids for the same KV cache groups, got "
                             f"{sorted({len(x) for x in tables})} groups")
        if group_of_window is None and num_groups > 1:
            raise ValueError(f"{num_groups} KV cache groups need group_of_window (a layer's window -> its group)")
        if group_of_window is not None and not all(0 <= g < num_groups for g in group_of_window.values()):
            raise ValueError(f"group_of_window {dict(group_of_window)} names a group outside 0..{num_groups - 1}")
        if sum(query_lens) <= cls.SMALL_BATCH_TOKENS:
            return cls._build_small(query_lens, seq_lens, tables, block_size, device, input_ids, group_of_window)
        qlen = np.asarray(query_lens, dtype=np.int64).reshape(b)
        slen = np.asarray(seq_lens, dtype=np.int64).reshape(b)
        if (qlen < 0).any() or (slen < qlen).any():
            raise ValueError(f"need 0 <= query_len <= seq_len: query_lens={query_lens} seq_lens={seq_lens}")
        not_decode = np.flatnonzero(qlen != 1)
        num_decodes = int(not_decode[0]) if not_decode.size else b
        qsl = np.zeros(b + 1, dtype=np.int64)
        np.cumsum(qlen, out=qsl[1:])
        t = int(qsl[-1])
        seq_of = np.repeat(np.arange(b), qlen)  # [T] sequence of each new token
        pos = np.arange(t) - qsl[:-1][seq_of] + (slen - qlen)[seq_of]  # [T] its position
        blk = pos // block_size
        group_tables, group_slots = [], []
        for g in range(num_groups):
            lists = [x[g] for x in tables]
            nblocks = np.fromiter(map(len, lists), dtype=np.int64, count=b)
            width = int(nblocks.max()) if b else 1
            table = np.zeros((b, width), dtype=np.int64)  # [B, width], padded with 0
            table[np.arange(width) < nblocks[:, None]] = np.fromiter(
                itertools.chain.from_iterable(lists), dtype=np.int64, count=int(nblocks.sum()))
            short = blk >= nblocks[seq_of]
            if short.any():
                i = int(seq_of[np.argmax(short)])
                raise ValueError(f"sequence {i}: {len(lists[i])} blocks of {block_size} cannot hold position "
                                 f"{seq_lens[i] - 1}")
            group_tables.append(table)
            group_slots.append(table[seq_of, blk] * block_size + pos % block_size)
        widths = [x.shape[1] for x in group_tables]

        n32 = 2 * b + 1 + b * sum(widths)  # int32 words after the slots
        lead = 0 if input_ids is None else 2 * t  # [input_ids | positions] before the slots
        if input_ids is not None and len(input_ids) != t:
            raise ValueError(f"{len(input_ids)} input ids for {t} scheduled tokens")
        ns = num_groups * t
        buf = np.zeros(lead + ns + (n32 + 1) // 2, dtype=np.int64)
        if input_ids is not None:
            buf[:t] = input_ids
            buf[t:2 * t] = pos
        for g, slots in enumerate(group_slots):
            buf[lead + g * t:lead + (g + 1) * t] = slots
        words = buf[lead + ns:].view(np.int32)
        words[:b + 1] = qsl
        words[b + 1:2 * b + 1] = slen
        words[2 * b + 1:n32] = np.concatenate([x.reshape(-1) for x in group_tables])
        packed = torch.from_numpy(buf).to(_resolve_device(device), non_blocking=True)
        # narrow/view, not Python indexing: indexing a fake CUDA tensor needs a CUDA runtime
        ints = packed.narrow(0, lead + ns, buf.shape[0] - lead - ns).view(torch.int32)
        return cls._from_packed(packed, ints, input_ids is not None, t, widths, query_lens, seq_lens, num_decodes,
                                group_of_window)

    @classmethod
    def _from_packed(cls, packed: torch.Tensor, ints: torch.Tensor, with_inputs: bool, t: int, widths: list[int],
                     query_lens: list[int], seq_lens: list[int], num_decodes: int,
                     group_of_window: Mapping[int | None, int] | None) -> AttentionMetadata:
        """Views of the one uploaded buffer: int64 ``packed`` = [input_ids | positions (``with_inputs``) | slots
        of each group | ...] and int32 ``ints`` = [query_start_loc | seq_lens | block_table of each group]. Returns
        the first group's metadata; with ``group_of_window``, every group's is reachable by :meth:`for_window`."""
        b = len(query_lens)
        lead = 2 * t if with_inputs else 0
        shared = dict(
            input_ids=packed.narrow(0, 0, t) if with_inputs else None,
            positions=packed.narrow(0, t, t) if with_inputs else None,
            query_start_loc=ints.narrow(0, 0, b + 1),
            seq_lens=ints.narrow(0, b + 1, b),
            query_lens_cpu=list(query_lens),
            seq_lens_cpu=list(seq_lens),
            num_decodes=num_decodes,
        )
        metas, off = [], 2 * b + 1
        for g, width in enumerate(widths):
            metas.append(cls(block_table=ints.narrow(0, off, b * width).view(b, width),
                             slot_mapping=packed.narrow(0, lead + g * t, t), **shared))  # type: ignore[arg-type]
            off += b * width
        if group_of_window is not None:
            by_window = {w: metas[g] for w, g in group_of_window.items()}
            for m in metas:
                m.kv_groups = by_window
        return metas[0]
