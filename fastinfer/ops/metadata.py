"""Attention metadata: built once per step by the model runner, read by every attention layer."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

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
    def _build_small(cls, query_lens: list[int], seq_lens: list[int], block_ids: list[list[int]], block_size: int,
                     device: torch.device | str, input_ids: list[int] | None) -> AttentionMetadata:
        """:meth:`build` for small steps (decode): the same fields from plain lists, one int64 upload whose
        tail is cast to int32 on the device."""
        b = len(query_lens)
        qsl = [0]
        for q in query_lens:
            qsl.append(qsl[-1] + q)
        t = qsl[-1]
        width = max((len(x) for x in block_ids), default=1) or 1
        slots: list[int] = []
        pos: list[int] = []
        for i, (q, s, blocks) in enumerate(zip(query_lens, seq_lens, block_ids)):
            if not 0 <= q <= s:
                raise ValueError(f"need 0 <= query_len <= seq_len: query_lens={query_lens} seq_lens={seq_lens}")
            if q and (s - 1) // block_size >= len(blocks):
                raise ValueError(f"sequence {i}: {len(blocks)} blocks of {block_size} cannot hold position {s - 1}")
            for p in range(s - q, s):
                pos.append(p)
                slots.append(blocks[p // block_size] * block_size + p % block_size)
        lead: list[int] = []
        if input_ids is not None:
            if len(input_ids) != t:
                raise ValueError(f"{len(input_ids)} input ids for {t} scheduled tokens")
            lead = [*input_ids, *pos]
        table = [x for blocks in block_ids for x in (*blocks, *([0] * (width - len(blocks))))]
        host = torch.tensor([*lead, *slots, *qsl, *seq_lens, *table], dtype=torch.int64)
        packed = host.to(_resolve_device(device), non_blocking=True)
        n = len(lead) + t
        ints = packed.narrow(0, n, packed.shape[0] - n).to(torch.int32)
        not_decode = next((i for i, q in enumerate(query_lens) if q != 1), b)
        return cls._from_packed(packed, ints, input_ids is not None, t, width, query_lens, seq_lens, not_decode)

    @classmethod
    def build(cls, query_lens: list[int], seq_lens: list[int], block_ids: list[list[int]], block_size: int,
              device: torch.device | str = "cpu", input_ids: list[int] | None = None) -> AttentionMetadata:
        """From host lists; decode rows must already come first.

        Vectorised on the host with numpy (no per-token Python loop): token ``t`` of sequence ``i`` sits at
        position ``p = seq_lens[i] - query_lens[i] + (t - query_start_loc[i])`` and goes to slot
        ``block_ids[i][p // block_size] * block_size + p % block_size``. Every field then reaches ``device``
        in one host-to-device copy of one packed int64 buffer (``[slot_mapping | int32 words of
        query_start_loc, seq_lens, block_table]``); the fields are views of it. Works for a fake device under
        FakeTensorMode too (numpy runs for real, the copy is faked). With ``input_ids`` (the packed tokens), the
        model's inputs ride in the same copy: ``input_ids`` and ``positions`` [T] int64 are set too."""
        b = len(query_lens)
        if len(seq_lens) != b or len(block_ids) != b:
            raise ValueError(f"{b} query_lens, {len(seq_lens)} seq_lens and {len(block_ids)} block lists")
        if sum(query_lens) <= cls.SMALL_BATCH_TOKENS:
            return cls._build_small(query_lens, seq_lens, block_ids, block_size, device, input_ids)
        qlen = np.asarray(query_lens, dtype=np.int64).reshape(b)
        slen = np.asarray(seq_lens, dtype=np.int64).reshape(b)
        nblocks = np.fromiter(map(len, block_ids), dtype=np.int64, count=b)
        if (qlen < 0).any() or (slen < qlen).any():
            raise ValueError(f"need 0 <= query_len <= seq_len: query_lens={query_lens} seq_lens={seq_lens}")
        not_decode = np.flatnonzero(qlen != 1)
        num_decodes = int(not_decode[0]) if not_decode.size else b
        qsl = np.zeros(b + 1, dtype=np.int64)
        np.cumsum(qlen, out=qsl[1:])
        t = int(qsl[-1])
        width = int(nblocks.max()) if b else 1
        table = np.zeros((b, width), dtype=np.int64)  # [B, width], padded with 0
        table[np.arange(width) < nblocks[:, None]] = np.fromiter(
            itertools.chain.from_iterable(block_ids), dtype=np.int64, count=int(nblocks.sum()))
        seq_of = np.repeat(np.arange(b), qlen)  # [T] sequence of each new token
        pos = np.arange(t) - qsl[:-1][seq_of] + (slen - qlen)[seq_of]  # [T] its position
        blk = pos // block_size
        short = blk >= nblocks[seq_of]
        if short.any():
            i = int(seq_of[np.argmax(short)])
            raise ValueError(f"sequence {i}: {len(block_ids[i])} blocks of {block_size} cannot hold position "
                             f"{seq_lens[i] - 1}")
        slots = table[seq_of, blk] * block_size + pos % block_size

        n32 = 2 * b + 1 + b * width  # int32 words after the slots
        lead = 0 if input_ids is None else 2 * t  # [input_ids | positions] before the slots
        if input_ids is not None and len(input_ids) != t:
            raise ValueError(f"{len(input_ids)} input ids for {t} scheduled tokens")
        buf = np.zeros(lead + t + (n32 + 1) // 2, dtype=np.int64)
        if input_ids is not None:
            buf[:t] = input_ids
            buf[t:2 * t] = pos
        buf[lead:lead + t] = slots
        words = buf[lead + t:].view(np.int32)
        words[:b + 1] = qsl
        words[b + 1:2 * b + 1] = slen
        words[2 * b + 1:n32] = table.reshape(-1)
        packed = torch.from_numpy(buf).to(_resolve_device(device), non_blocking=True)
        # narrow/view, not Python indexing: indexing a fake CUDA tensor needs a CUDA runtime
        ints = packed.narrow(0, lead + t, buf.shape[0] - lead - t).view(torch.int32)
        return cls._from_packed(packed, ints, input_ids is not None, t, width, query_lens, seq_lens, num_decodes)

    @classmethod
    def _from_packed(cls, packed: torch.Tensor, ints: torch.Tensor, with_inputs: bool, t: int, width: int,
                     query_lens: list[int], seq_lens: list[int], num_decodes: int) -> AttentionMetadata:
        """Views of the one uploaded buffer: int64 ``packed`` = [input_ids | positions (``with_inputs``) | slots
        | ...] and int32 ``ints`` = [query_start_loc | seq_lens | block_table]."""
        b = len(query_lens)
        lead = 2 * t if with_inputs else 0
        return cls(
            input_ids=packed.narrow(0, 0, t) if with_inputs else None,
            positions=packed.narrow(0, t, t) if with_inputs else None,
            query_start_loc=ints.narrow(0, 0, b + 1),
            seq_lens=ints.narrow(0, b + 1, b),
            block_table=ints.narrow(0, 2 * b + 1, b * width).view(b, width),
            slot_mapping=packed.narrow(0, lead, t),
            query_lens_cpu=list(query_lens),
            seq_lens_cpu=list(seq_lens),
            num_decodes=num_decodes,
        )
