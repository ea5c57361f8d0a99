"""The scheduler on plain data: a fake step computes the chunks and "samples" a fixed token."""

from shoal.engine.batch import ScheduledChunk
from shoal.engine.block_manager import BlockManager
from shoal.engine.sampling_params import SamplingParams
from shoal.engine.scheduler import Scheduler, SchedulerConfig
from shoal.engine.sequence import Sequence, SequenceStatus


def make_scheduler(
    num_blocks: int = 64, block_size: int = 4, max_tokens: int = 32, max_seqs: int = 8, prefix: bool = True
) -> Scheduler:
    config = SchedulerConfig(
        max_num_batched_tokens=max_tokens, max_num_seqs=max_seqs, enable_prefix_caching=prefix
    )
    return Scheduler(config, BlockManager(num_blocks, block_size, enable_prefix_caching=prefix))


def make_seq(seq_id: int, prompt_len: int, first_token: int = 0) -> Sequence:
    return Sequence(
        seq_id=seq_id,
        request_id=f"r{seq_id}",
        prompt_token_ids=list(range(first_token, first_token + prompt_len)),
        params=SamplingParams(),
        max_output_tokens=64,
    )


def run_step(sched: Scheduler, seqs: dict[int, Sequence]) -> list[ScheduledChunk]:
    """One engine step without a model: every sampled sequence gets token 7."""
    chunks = sched.schedule()
    sched.on_computed(chunks, seqs)
    for chunk in chunks:
        if chunk.sample:
            seqs[chunk.seq_id].output_token_ids.append(7)
    return chunks


def check_chunk_invariants(chunks: list[ScheduledChunk], seqs: dict[int, Sequence], block_size: int) -> None:
    for chunk in chunks:
        assert len(chunk.token_ids) > 0
        assert len(chunk.block_table) * block_size >= chunk.end_pos
    assert len({c.seq_id for c in chunks}) == len(chunks)


def test_prefill_then_decode_one_token_per_step() -> None:
    sched = make_scheduler()
    seq = make_seq(0, 10)
    seqs = {0: seq}
    sched.add(seq)
    (chunk,) = run_step(sched, seqs)
    assert chunk.token_ids == tuple(range(10)) and chunk.start_pos == 0 and chunk.sample
    assert seq.status is SequenceStatus.RUNNING
    (chunk,) = run_step(sched, seqs)
    assert chunk.token_ids == (7,) and chunk.start_pos == 10 and chunk.sample
    assert seq.num_computed_tokens == 11


def test_chunked_prefill_respects_token_budget() -> None:
    sched = make_scheduler(max_tokens=8)
    seq = make_seq(0, 20)
    seqs = {0: seq}
    sched.add(seq)
    sizes = []
    samples = []
    for _ in range(3):
        (chunk,) = run_step(sched, seqs)
        sizes.append((chunk.start_pos, len(chunk.token_ids)))
        samples.append(chunk.sample)
    assert sizes == [(0, 8), (8, 8), (16, 4)]
    assert samples == [False, False, True]
    assert seq.output_token_ids == [7]


def test_step_mixes_decode_and_prefill_within_budget() -> None:
    sched = make_scheduler(max_tokens=10)
    seqs = {0: make_seq(0, 6), 1: make_seq(1, 20, first_token=100)}
    sched.add(seqs[0])
    run_step(sched, seqs)  # prefill of seq 0
    sched.add(seqs[1])
    chunks = run_step(sched, seqs)
    check_chunk_invariants(chunks, seqs, 4)
    assert sum(len(c.token_ids) for c in chunks) <= 10
    # Decode of the running sequence comes first, the rest of the budget goes to the prefill.
    assert chunks[0].seq_id == 0 and chunks[0].token_ids == (7,)
    assert chunks[1].seq_id == 1 and len(chunks[1].token_ids) == 9


def test_waiting_sequences_are_admitted_fifo_with_max_seqs() -> None:
    sched = make_scheduler(max_tokens=100, max_seqs=2)
    seqs = {i: make_seq(i, 4, first_token=10 * i) for i in range(4)}
    for seq in seqs.values():
        sched.add(seq)
    chunks = run_step(sched, seqs)
    assert [c.seq_id for c in chunks] == [0, 1]
    sched.remove(seqs[0])
    chunks = run_step(sched, seqs)
    assert [c.seq_id for c in chunks] == [1, 2]


def test_fifo_head_that_does_not_fit_blocks_later_arrivals() -> None:
    sched = make_scheduler(num_blocks=4, block_size=4, max_tokens=100)
    seqs = {0: make_seq(0, 8), 1: make_seq(1, 12, first_token=50), 2: make_seq(2, 2, first_token=90)}
    for seq in seqs.values():
        sched.add(seq)
    chunks = run_step(sched, seqs)
    # seq 0 takes 2 blocks; seq 1 needs 3 of the 2 left and waits; seq 2 would fit but must not jump the queue.
    assert [c.seq_id for c in chunks] == [0]
    assert list(sched.waiting) == [seqs[1], seqs[2]]


def test_preemption_frees_newest_and_requeues_it_first() -> None:
    # 4 blocks of 4: two sequences of 7 prompt tokens fill 2 blocks each; decode needs a third block.
    sched = make_scheduler(num_blocks=4, block_size=4, max_tokens=100, prefix=False)
    seqs = {0: make_seq(0, 7), 1: make_seq(1, 7, first_token=50)}
    sched.add(seqs[0])
    sched.add(seqs[1])
    run_step(sched, seqs)  # both prefilled, 8 tokens each after sampling
    chunks = run_step(sched, seqs)  # positions 7: still within block 2 of each
    assert [c.seq_id for c in chunks] == [0, 1]
    chunks = run_step(sched, seqs)  # position 8 needs a third block each: seq 1 is preempted
    assert [c.seq_id for c in chunks] == [0]
    assert seqs[1].status is SequenceStatus.WAITING and seqs[1].block_table == []
    assert seqs[1].num_computed_tokens == 0 and seqs[1].num_preemptions == 1
    assert sched.waiting[0] is seqs[1]
    # Once seq 0 finishes, seq 1 is recomputed from scratch: prompt plus its two output tokens.
    sched.remove(seqs[0])
    (chunk,) = run_step(sched, seqs)
    assert chunk.seq_id == 1 and chunk.start_pos == 0
    assert chunk.token_ids == (*range(50, 57), 7, 7) and chunk.sample


def test_running_sequence_preempts_itself_when_alone_and_out_of_blocks() -> None:
    sched = make_scheduler(num_blocks=1, block_size=4, max_tokens=100)
    seqs = {0: make_seq(0, 3)}
    sched.add(seqs[0])
    run_step(sched, seqs)
    run_step(sched, seqs)  # position 3, last slot of the only block
    assert run_step(sched, seqs) == []  # position 4 cannot fit anywhere
    assert seqs[0].status is SequenceStatus.WAITING


def test_prefix_cache_hit_skips_computed_tokens() -> None:
    sched = make_scheduler(block_size=4)
    seqs = {0: make_seq(0, 10)}
    sched.add(seqs[0])
    run_step(sched, seqs)
    sched.remove(seqs[0])
    seqs[1] = Sequence(
        seq_id=1, request_id="r1", prompt_token_ids=[*range(10), 7, 40, 41], params=SamplingParams(),
        max_output_tokens=8,
    )  # fmt: skip
    sched.add(seqs[1])
    (chunk,) = run_step(sched, seqs)
    # Blocks [0..3] and [4..7] were cached; the sequence computes from position 8.
    assert chunk.start_pos == 8 and chunk.token_ids == (8, 9, 7, 40, 41)
    assert seqs[1].num_cached_tokens == 8


def test_many_sequences_finish_under_pressure_with_valid_chunks() -> None:
    sched = make_scheduler(num_blocks=12, block_size=4, max_tokens=16, max_seqs=4)
    seqs = {i: make_seq(i, 3 + 2 * i, first_token=20 * i) for i in range(6)}
    for seq in seqs.values():
        sched.add(seq)
    for _ in range(200):
        if not sched.num_unfinished:
            break
        chunks = run_step(sched, seqs)
        check_chunk_invariants(chunks, seqs, 4)
        assert sum(len(c.token_ids) for c in chunks) <= 16
        assert len(sched.running) <= 4
        for seq in list(sched.running):
            if seq.num_output_tokens >= 5 and seq.num_uncomputed_tokens == 1:
                sched.remove(seq)
    assert sched.num_unfinished == 0
    assert all(seq.num_output_tokens == 5 for seq in seqs.values())
    assert sched.block_manager.num_free_blocks == 12


def test_remove_waiting_sequence() -> None:
    sched = make_scheduler()
    seq = make_seq(0, 4)
    sched.add(seq)
    sched.remove(seq)
    assert seq.status is SequenceStatus.FINISHED and sched.num_unfinished == 0
    assert sched.schedule() == []
