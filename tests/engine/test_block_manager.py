import pytest

from shoal.engine.block_manager import BlockManager
from shoal.engine.sampling_params import SamplingParams
from shoal.engine.sequence import Sequence

_seq_ids = iter(range(1_000_000))


def make_seq(prompt: list[int]) -> Sequence:
    return Sequence(
        seq_id=next(_seq_ids),
        request_id="r",
        prompt_token_ids=list(prompt),
        params=SamplingParams(),
        max_output_tokens=16,
    )


def compute_all(bm: BlockManager, seq: Sequence) -> None:
    """What the scheduler does for a whole prefill in one step."""
    assert bm.allocate(seq, seq.num_uncomputed_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.commit_computed(seq)


def test_allocate_covers_positions_and_free_returns_blocks() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(list(range(10)))
    assert bm.blocks_needed(seq, 10) == 3
    assert bm.allocate(seq, 10)
    assert len(seq.block_table) == 3 and len(set(seq.block_table)) == 3
    assert bm.num_free_blocks == 5
    seq.num_computed_tokens = 10
    # Decode: positions 10 and 11 fit in the third block, position 12 needs a fourth.
    assert bm.blocks_needed(seq, 2) == 0
    assert bm.blocks_needed(seq, 3) == 1
    bm.free(seq)
    assert seq.block_table == [] and seq.num_computed_tokens == 0
    assert bm.num_free_blocks == 8


def test_allocate_fails_without_partial_change_when_pool_is_short() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    seq = make_seq(list(range(12)))
    assert not bm.can_allocate(seq, 12)
    assert not bm.allocate(seq, 12)
    assert seq.block_table == [] and bm.num_free_blocks == 2


def test_shared_prefix_reuses_full_blocks_and_recomputes_last_token() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    first = make_seq(list(range(12)))
    compute_all(bm, first)
    # Same 12 tokens: all three blocks are full, but the last token must be recomputed for a logit.
    same = make_seq(list(range(12)))
    assert bm.reuse_prefix(same) == 8
    assert same.block_table == first.block_table[:2]
    # Longer prompt sharing the 12 tokens (multi-turn): three blocks reused.
    longer = make_seq([*range(12), 50, 51, 52])
    assert bm.reuse_prefix(longer) == 12
    assert longer.block_table == first.block_table
    # Diverging inside the second block: only the first block matches.
    diverging = make_seq([0, 1, 2, 3, 4, 99, 6, 7, 8, 9])
    assert bm.reuse_prefix(diverging) == 4


def test_prefix_match_depends_on_parent_blocks() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    compute_all(bm, make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9]))
    # Second block's tokens equal, first differs: nothing reusable.
    other = make_seq([9, 9, 9, 9, 5, 6, 7, 8, 9])
    assert bm.reuse_prefix(other) == 0


def test_ref_counts_keep_shared_blocks_until_last_user_frees() -> None:
    bm = BlockManager(num_blocks=6, block_size=4)
    first = make_seq(list(range(9)))
    compute_all(bm, first)
    second = make_seq(list(range(9)))
    assert bm.reuse_prefix(second) == 8
    assert bm.allocate(second, 1)
    # 3 blocks for first, 1 extra for second; the two prefix blocks are shared.
    assert bm.num_free_blocks == 2
    bm.free(first)
    assert bm.num_free_blocks == 3  # only first's private tail block came back
    bm.free(second)
    assert bm.num_free_blocks == 6
    assert bm.num_cached_blocks == 2  # the hashed prefix blocks stay cached while free


def test_cached_blocks_are_reused_after_owner_finishes() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    first = make_seq([*range(8), 100])
    compute_all(bm, first)
    table = list(first.block_table)
    bm.free(first)
    again = make_seq([*range(8), 200])
    assert bm.reuse_prefix(again) == 8
    assert again.block_table == table[:2]


def test_lru_eviction_prefers_plain_blocks_then_oldest_cached() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    old = make_seq([1, 2, 3])  # one full hashed block + one partial
    compute_all(bm, old)
    bm.free(old)
    new = make_seq([5, 6, 7])
    compute_all(bm, new)
    bm.free(new)
    assert bm.num_cached_blocks == 2
    # Two fresh blocks: the two never-hashed free blocks go first, both prefixes survive.
    filler = make_seq([9, 9, 9, 9])
    assert bm.allocate(filler, 4)
    assert bm.num_cached_blocks == 2
    bm.free(filler)
    # Three fresh blocks: two plain ones, then the least recently freed cached prefix ([1, 2]).
    big = make_seq([8] * 6)
    assert bm.allocate(big, 6)
    assert bm.num_cached_blocks == 1
    assert bm.reuse_prefix(make_seq([1, 2, 0])) == 0
    assert bm.reuse_prefix(make_seq([5, 6, 0])) == 2


def test_prefix_caching_off_never_reuses() -> None:
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    first = make_seq(list(range(9)))
    compute_all(bm, first)
    assert bm.reuse_prefix(make_seq(list(range(9)))) == 0
    bm.free(first)
    assert bm.num_cached_blocks == 0


def test_decode_tokens_fill_blocks_that_become_reusable() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq([1, 2, 3])
    compute_all(bm, seq)
    for token in (4, 5, 6):
        seq.output_token_ids.append(token)
        assert bm.allocate(seq, 1)
        seq.num_computed_tokens += 1
        bm.commit_computed(seq)
    # Tokens 1..6 computed: block 0 ([1,2,3,4]) is full and hashed.
    assert bm.reuse_prefix(make_seq([1, 2, 3, 4, 5, 6])) == 4


def test_invalid_pool_is_rejected() -> None:
    with pytest.raises(ValueError, match="at least one block"):
        BlockManager(num_blocks=0, block_size=16)
