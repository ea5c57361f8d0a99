"""The KV-cache block pool: which cache blocks each sequence owns, with prefix reuse. No torch here.

Inputs: the pool size and block size (from the model runner), sequences from the scheduler.
Outputs: each sequence's block table (block ids, in position order) and its count of cached tokens.

Invariants:
- A block is either free (ref count 0) or referenced by one or more sequences' block tables.
- Only full blocks are shared. A full block is hashed by (parent block's hash, its token ids) once its K/V
  are computed; a later sequence whose tokens hash the same reuses it instead of computing it again. Shared
  blocks are never written again, so no copy-on-write is needed.
- Freed blocks that hold a hash stay in an LRU of cached blocks and are evicted (hash dropped) only when a
  fresh block is needed and no never-hashed free block is left.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from shoal.engine.sequence import Sequence

# Hash of the (empty) parent of a sequence's first block.
_ROOT_HASH = 0


@dataclass(slots=True)
class _Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    # The tokens the hash was computed from, compared on a hit so a hash collision can never reuse a wrong block.
    token_ids: tuple[int, ...] = ()


def hash_block(parent_hash: int, token_ids: tuple[int, ...]) -> int:
    """The prefix-cache key of a full block. Python's hash of int tuples is deterministic across processes."""
    return hash((parent_hash, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks}x{block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [_Block(i) for i in range(num_blocks)]
        # Free blocks never hashed (or whose hash was dropped): handed out first.
        self._free_plain: list[int] = list(range(num_blocks - 1, -1, -1))
        # Free blocks still holding a cached prefix, oldest first (the LRU eviction order).
        self._free_cached: OrderedDict[int, None] = OrderedDict()
        self._hash_to_block: dict[int, int] = {}
        # Per sequence: how many of its leading blocks are hashed, and the last one's hash.
        self._num_hashed: dict[int, tuple[int, int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_plain) + len(self._free_cached)

    @property
    def num_cached_blocks(self) -> int:
        """Free blocks that still hold a reusable prefix."""
        return len(self._free_cached)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks to add to `seq`'s table so it covers num_computed_tokens + num_new_tokens positions."""
        end = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-end // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= self.num_free_blocks

    def reuse_prefix(self, seq: Sequence) -> int:
        """On admission of a sequence with no blocks: take the cached blocks that match its leading tokens.

        Always leaves at least the last token to compute, so the step that computes it yields a logit.
        Sets the block table and num_computed_tokens; returns the number of reused tokens.
        """
        assert not seq.block_table and seq.num_computed_tokens == 0, "prefix reuse needs a fresh sequence"
        if not self.enable_prefix_caching:
            return 0
        parent = _ROOT_HASH
        num_reusable_blocks = (seq.num_tokens - 1) // self.block_size
        for index in range(num_reusable_blocks):
            start = index * self.block_size
            token_ids = tuple(seq.token_ids(start, start + self.block_size))
            block_hash = hash_block(parent, token_ids)
            block_id = self._hash_to_block.get(block_hash)
            if block_id is None or self._blocks[block_id].token_ids != token_ids:
                break
            self._take(block_id)
            seq.block_table.append(block_id)
            parent = block_hash
        num_hit_blocks = len(seq.block_table)
        if num_hit_blocks:
            self._num_hashed[seq.seq_id] = (num_hit_blocks, parent)
        seq.num_computed_tokens = num_hit_blocks * self.block_size
        return seq.num_computed_tokens

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Extend `seq`'s block table to hold num_new_tokens more tokens; False (and no change) if the pool is short."""
        needed = self.blocks_needed(seq, num_new_tokens)
        if needed > self.num_free_blocks:
            return False
        for _ in range(needed):
            seq.block_table.append(self._take_fresh())
        return True

    def commit_computed(self, seq: Sequence) -> None:
        """Register the hashes of `seq`'s blocks that became full with computed K/V, so others can reuse them."""
        if not self.enable_prefix_caching:
            return
        num_hashed, parent = self._num_hashed.get(seq.seq_id, (0, _ROOT_HASH))
        num_full = seq.num_computed_tokens // self.block_size
        for index in range(num_hashed, num_full):
            start = index * self.block_size
            token_ids = tuple(seq.token_ids(start, start + self.block_size))
            block_hash = hash_block(parent, token_ids)
            block = self._blocks[seq.block_table[index]]
            # If another sequence computed the same block concurrently, keep its entry; ours stays private.
            if block_hash not in self._hash_to_block:
                block.block_hash = block_hash
                block.token_ids = token_ids
                self._hash_to_block[block_hash] = block.block_id
            parent = block_hash
        if num_full > num_hashed:
            self._num_hashed[seq.seq_id] = (num_full, parent)

    def free(self, seq: Sequence) -> None:
        """Release `seq`'s blocks (finish, abort or preemption); its computed state is gone."""
        # Tail first, so under eviction a shared prefix outlives the sequence-specific blocks behind it.
        for block_id in reversed(seq.block_table):
            block = self._blocks[block_id]
            assert block.ref_count > 0, f"block {block_id} freed more often than taken"
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.block_hash is not None:
                    self._free_cached[block_id] = None
                else:
                    self._free_plain.append(block_id)
        seq.block_table.clear()
        seq.num_computed_tokens = 0
        self._num_hashed.pop(seq.seq_id, None)

    def _take(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.ref_count == 0:
            del self._free_cached[block_id]
        block.ref_count += 1

    def _take_fresh(self) -> int:
        if self._free_plain:
            block_id = self._free_plain.pop()
        else:
            block_id, _ = self._free_cached.popitem(last=False)
            block = self._blocks[block_id]
            assert block.block_hash is not None
            del self._hash_to_block[block.block_hash]
            block.block_hash = None
            block.token_ids = ()
        self._blocks[block_id].ref_count = 1
        return block_id
