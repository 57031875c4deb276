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
