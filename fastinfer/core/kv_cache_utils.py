"""Content hashes of KV blocks: SHA-256 over the parent block's hash, an optional salt and the token ids."""
from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence


def hash_block_tokens(parent: bytes | None, token_ids: Sequence[int], salt: str | None = None) -> bytes:
    """Key of one full block. Chaining the parent makes the key name the whole prefix, not just the block;
    the salt (per tenant) keeps different tenants' caches apart."""
    h = hashlib.sha256()
    h.update(parent or b"\0" * 32)
    if salt:
        data = salt.encode()
        h.update(struct.pack("<I", len(data)) + data)
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return h.digest()


def extend_block_hashes(hashes: list[bytes], token_ids: Sequence[int], block_size: int,
                        salt: str | None = None) -> None:
    """Extend the hash chain ``hashes`` (in place) over every full block of ``token_ids``."""
    n_full = len(token_ids) // block_size
    while len(hashes) < n_full:
        i = len(hashes)
        block = token_ids[i * block_size:(i + 1) * block_size]
        hashes.append(hash_block_tokens(hashes[-1] if i else None, block, salt))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def kv_cache_groups(layer_windows: Sequence[int | None], max_model_len: int, free_windows: bool = True,
                    ) -> tuple[list[int | None], dict[int | None, int]]:
    """The KV cache groups of a model whose attention layers have the sliding windows ``layer_windows`` (None:
    full attention). One group per distinct window, each with its own block table per request: the
    full-attention group first, then the windows in ascending order. A window of at least ``max_model_len`` never
    drops a key, so its layers join the full group. With ``free_windows`` False there is one group (window None,
    no block is ever dropped) for every layer. Returns (window of each group, group of each layer window)."""
    windows = [None if w is not None and w >= max_model_len else w for w in layer_windows]
    if not free_windows:
        return [None], dict.fromkeys(layer_windows, 0)
    groups: list[int | None] = ([None] if None in windows else []) + sorted({w for w in windows if w is not None})
    return groups, {lw: groups.index(w) for lw, w in zip(layer_windows, windows)}


def window_group_blocks(window: int, block_size: int, max_num_seqs: int, max_num_batched_tokens: int) -> int:
    """Blocks a sliding-window group can ever hold at once: each running request keeps the blocks covering
    the ``window - 1`` positions before its next token plus a partly filled one (at most ``cdiv(window - 1,
    block_size) + 2`` blocks between steps), and a step adds the blocks of its scheduled tokens (at most
    ``cdiv(max_num_batched_tokens, block_size)`` over all requests, plus one per request for the alignment)."""
    return max_num_seqs * (cdiv(window - 1, block_size) + 2) + cdiv(max_num_batched_tokens, block_size)


def window_group_min_blocks(window: int, block_size: int, max_chunk: int, max_model_len: int) -> int:
    """Blocks one request needs in a sliding-window group for its longest step (``max_chunk`` tokens after the
    ``window - 1`` it still reads), never more than a whole ``max_model_len`` sequence."""
    return min(cdiv(window - 1 + max_chunk, block_size) + 1, cdiv(max_model_len, block_size))
