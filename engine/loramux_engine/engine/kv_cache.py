"""The paged KV cache's bookkeeping: fixed-size blocks, block tables, prefix caching.

The cache is ``num_blocks`` blocks of ``block_size`` token rows. A sequence holds a
block table, the blocks its tokens live in, in order: token ``i`` is in row
``table[i // block_size] * block_size + i % block_size``. Blocks are taken as a
sequence's tokens are scheduled and given back when it finishes or is preempted, so
memory follows the tokens a sequence has, never the ``max_tokens`` it may reach.

Prefix caching: a block that is full (every row computed) gets a key, a chained hash
of its token ids and the key of the block before it, salted with what else decides
its keys and values: the tenant and the adapter version (an adapter on k_proj/v_proj
changes them; the tenant salt also closes the cross-tenant timing side channel, where
a hit, measurably faster, tells one tenant another's prompt). A new sequence takes
the longest run of cached blocks that starts its tokens and computes only the rest.
Freed blocks keep their keys and stay reusable until the space is needed: an
allocation takes a block that holds nothing first, then evicts the least recently
freed cached block. Keys are blake2b digests, not Python's ``hash``, so a tenant
cannot construct a collision with another prompt.

Not thread-safe: the engine's stepping thread owns it.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Sequence as Seq

from loramux_engine.engine.sequence import Sequence
from loramux_engine.lora.ref import AdapterRef
from loramux_engine.models.config import ModelArgs

_DIGEST_BYTES = 16


def block_key(parent: bytes, token_ids: Seq[int]) -> bytes:
    """The prefix-cache key of one full block.

    ``parent`` is the previous block's key, or for the first block the sequence's salt.
    """
    digest = hashlib.blake2b(parent, digest_size=_DIGEST_BYTES)
    digest.update(b"".join(t.to_bytes(4, "little") for t in token_ids))
    return digest.digest()


def kv_cache_capacity(
    args: ModelArgs,
    dtype_bytes: int,
    kv_cache_bytes: int,
    block_size: int,
    max_model_len: int | None = None,
) -> tuple[int, int]:
    """(blocks, max_model_len) for a budget: whole blocks, and the model's context capped
    by the tokens they hold unless ``max_model_len`` is given (the engine checks it)."""
    num_blocks = kv_cache_bytes // (args.kv_bytes_per_token * dtype_bytes * block_size)
    return num_blocks, max_model_len or min(args.max_position_embeddings, num_blocks * block_size)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._keys: list[bytes | None] = [None] * num_blocks
        self._empty: list[int] = list(range(num_blocks - 1, -1, -1))  # hold nothing; a stack
        self._evictable: OrderedDict[int, None] = OrderedDict()  # free, cached; LRU first
        self._cached: dict[bytes, int] = {}  # key -> block holding it
        self.prefix_queries_tokens = 0
        self.prefix_hits_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._empty) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """New blocks the sequence needs to hold ``num_tokens`` more computed tokens."""
        total = seq.num_computed_tokens + num_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    # -- prefix cache -------------------------------------------------------------------

    def _salt(self, seq: Sequence) -> bytes:
        adapter = seq.adapter
        parts = [seq.fairness_key]
        if isinstance(adapter, AdapterRef):
            parts += [adapter.namespace, adapter.id]
        return hashlib.blake2b(json.dumps(parts).encode()).digest()  # unambiguous: quoted

    def take_cached_prefix(self, seq: Sequence) -> int:
        """Give a sequence holding no blocks the longest cached run of its leading blocks.

        Returns the tokens it may skip (always leaving its last token to compute, whose
        logits it needs); they count as computed. A no-op with prefix caching off.
        The caller counts the lookup (``count_lookup``) once the sequence is admitted.
        """
        assert not seq.block_table and seq.num_computed_tokens == 0
        if not self.enable_prefix_caching:
            return 0
        bs = self.block_size
        usable = (len(seq) - 1) // bs  # full blocks that leave the last token to compute
        seq.prefix_salt = self._salt(seq)
        parent = seq.prefix_salt
        for i in range(usable):
            key = block_key(parent, seq.token_ids[i * bs : (i + 1) * bs])
            block = self._cached.get(key)
            if block is None:
                break
            if self._ref_counts[block] == 0:
                del self._evictable[block]
            self._ref_counts[block] += 1
            seq.block_table.append(block)
            seq.block_keys.append(key)
            parent = key
        hit = len(seq.block_table) * bs
        seq.num_computed_tokens = hit
        return hit

    def count_lookup(self, seq: Sequence, hit: int) -> None:
        """Count an admitted sequence's lookup: its tokens queried, ``hit`` of them cached."""
        if self.enable_prefix_caching:
            self.prefix_queries_tokens += len(seq)
            self.prefix_hits_tokens += hit

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Key the sequence's blocks that its computed tokens have filled since last time."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        if not seq.prefix_salt:
            seq.prefix_salt = self._salt(seq)
        full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        for i in range(len(seq.block_keys), full):
            parent = seq.block_keys[-1] if seq.block_keys else seq.prefix_salt
            key = block_key(parent, seq.token_ids[i * bs : (i + 1) * bs])
            seq.block_keys.append(key)
            block = seq.block_table[i]
            if key not in self._cached and self._keys[block] is None:
                self._cached[key] = block
                self._keys[block] = key

    # -- allocation ---------------------------------------------------------------------

    def _take(self) -> int:
        if self._empty:
            block = self._empty.pop()
        else:
            block, _ = self._evictable.popitem(last=False)  # least recently freed
            key = self._keys[block]
            self._keys[block] = None
            if key is not None and self._cached.get(key) == block:
                del self._cached[key]
        self._ref_counts[block] = 1
        return block

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Give the sequence blocks for ``num_tokens`` more tokens; False (taking none) if short."""
        needed = self.blocks_needed(seq, num_tokens)
        if needed > self.num_free_blocks:
            return False
        for _ in range(needed):
            seq.block_table.append(self._take())
        return True

    def free(self, seq: Sequence) -> None:
        """Return every block of the sequence; keyed blocks stay cached until evicted.

        The tail is freed first, so the blocks a later prefix would reach last are
        evicted first.
        """
        for block in reversed(seq.block_table):
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                if self._keys[block] is not None:
                    self._evictable[block] = None
                else:
                    self._empty.append(block)
        seq.block_table = []
        seq.block_keys = []
        seq.num_computed_tokens = 0

    def tokens_stored(self, seqs: Seq[Sequence]) -> int:
        """Tokens whose keys and values the given sequences hold, each block counted once."""
        seen: set[int] = set()
        total = 0
        bs = self.block_size
        for seq in seqs:
            for i, block in enumerate(seq.block_table):
                if block not in seen:
                    seen.add(block)
                    total += max(0, min(bs, seq.num_computed_tokens - i * bs))
        return total
