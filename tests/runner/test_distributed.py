"""Runner processes of one instance, over real gloo on 127.0.0.1, give what one process gives."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest
import torch

from shoal.engine.sampling import SamplingParams
from shoal.runner.spec import RunnerSpec
from shoal.types.instance_ids import TaskId
from shoal.types.runners import RunnerFailed, RunnerReady, RunnerShutdown, is_terminal
from shoal.worker.supervisor import RunnerSupervisor
from tests.runner.harness import collect, instance_specs, reference, start_instance, task, tokens_of, wait_for
from tests.runner.tiny_model_dir import write_tiny_model_dir

PROMPTS = ["hello world", [5, 17, 200, 33, 4, 99, 150, 7, 8], "a much longer prompt, prefilled in one go"]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=True, top_logprobs=2)
RANDOM = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=8, ignore_eos=True)

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


async def run_prompts(supervisor: RunnerSupervisor, rank0: RunnerSpec) -> list[list]:
    """All prompts at once (one batch, so admissions and steps interleave across the ranks)."""
    results: list[list] = [[] for _ in PROMPTS]

    async def one(index: int) -> None:
        results[index] = await collect(supervisor, rank0.runner_id, task(f"t{index}", PROMPTS[index], GREEDY))

    async with anyio.create_task_group() as group:
        for index in range(len(PROMPTS)):
            group.start_soon(one, index)
    return results


@pytest.mark.parametrize(("world_size", "splits"), [(2, (1,)), (3, (1, 2))])
async def test_pipeline_gives_the_tokens_and_logprobs_of_one_process(
    tmp_path: Path, world_size: int, splits: tuple[int, ...]
) -> None:
    model = write_tiny_model_dir(tmp_path / "model", "llama")
    expected = reference(model, PROMPTS, GREEDY)
    specs = instance_specs(model, "pipeline", world_size, splits=splits)
    async with RunnerSupervisor() as supervisor:
        await start_instance(supervisor, specs)
        results = await run_prompts(supervisor, specs[0])
        for chunks, want in zip(results, expected, strict=True):
            assert [c.error for c in chunks] == [None] * len(chunks)
            assert tokens_of(chunks) == list(want.token_ids)
            assert chunks[-1].finish_reason == "length"
            assert "".join(c.text for c in chunks) == want.text
            got_logprobs = [lp for c in chunks for lp in c.logprobs or ()]
            assert want.logprobs is not None
            for got, ref in zip(got_logprobs, want.logprobs, strict=True):
                assert got.token_id == ref.token_id
                assert got.logprob == pytest.approx(ref.logprob, abs=1e-5)
                assert [t.token_id for t in got.top] == [t.token_id for t in ref.top_logprobs]
        # A stop asked of the last rank alone stops the whole group cleanly.
        await supervisor.shutdown(specs[-1].runner_id)
        await wait_for(
            lambda: all(is_terminal(supervisor.status(s.runner_id)) for s in specs), 20, "every rank to stop"
        )
        assert all(supervisor.status(s.runner_id) == RunnerShutdown() for s in specs)


async def test_a_pipeline_admits_and_cancels_tasks_while_it_decodes(tmp_path: Path) -> None:
    """Rank 0 begins each next step while the later stage computes (serve.StepLoop): a task that arrives
    mid-stream joins the running batch and gets the tokens it gets alone, and a cancel mid-stream ends
    its task at once without disturbing the other."""
    model = write_tiny_model_dir(tmp_path / "model", "llama")
    long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    expected = reference(model, [PROMPTS[1]], GREEDY)[0]
    specs = instance_specs(model, "pipeline", 2, splits=(1,))
    async with RunnerSupervisor() as supervisor:
        await start_instance(supervisor, specs)
        first: list = []

        async def stream_first() -> None:
            async for chunk in supervisor.submit(specs[0].runner_id, task("long", PROMPTS[0], long)):
                first.append(chunk)

        async with anyio.create_task_group() as group:
            group.start_soon(stream_first)
            await wait_for(lambda: len(first) >= 3, 30, "the long task to stream")
            joined = await collect(supervisor, specs[0].runner_id, task("joined", PROMPTS[1], GREEDY))
            assert not first[-1].is_last  # the joined task really ran beside the long one
            assert supervisor.cancel(TaskId("long"))
        assert [c.error for c in joined] == [None] * len(joined)
        assert tokens_of(joined) == list(expected.token_ids)
        assert first[-1].finish_reason == "abort"
        assert 3 <= len(tokens_of(first)) < 400
        # The instance goes on serving after the cancel.
        again = await collect(supervisor, specs[0].runner_id, task("again", PROMPTS[1], GREEDY))
        assert tokens_of(again) == list(expected.token_ids)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
async def test_a_compiled_pipeline_gives_the_tokens_and_logprobs_of_one_eager_process(tmp_path: Path) -> None:
    """Each rank compiles its layers' one-stream decode in its warm-up (a node's default)."""
    model = write_tiny_model_dir(tmp_path / "model", "llama")
    expected = [reference(model, [p], GREEDY)[0] for p in PROMPTS]
    specs = instance_specs(model, "pipeline", 2, splits=(2,), compile_decode=True)
    async with RunnerSupervisor() as supervisor:
        await start_instance(supervisor, specs, timeout=240)  # a cold compile: ~10-30 s a rank here
        for i, (prompt, want) in enumerate(zip(PROMPTS, expected, strict=True)):  # one stream at a time
            chunks = await collect(supervisor, specs[0].runner_id, task(f"t{i}", prompt, GREEDY))
            assert tokens_of(chunks) == list(want.token_ids)
            got = [lp.logprob for c in chunks for lp in c.logprobs or ()]
            assert want.logprobs is not None
            assert got == pytest.approx([lp.logprob for lp in want.logprobs], abs=1e-4)


async def test_int8_pipeline_gives_the_tokens_and_logprobs_of_one_int8_process(tmp_path: Path) -> None:
    model = write_tiny_model_dir(tmp_path / "model", "llama")
    # One prompt at a time on both sides: the int8 kernels compute in bf16, whose results depend on the
    # batch's shape, so the same shapes are what makes the logprobs comparable bit for bit.
    # fp32 on both sides (the specs' dtype here): a random tiny model's bf16 logits are too close to call
    expected = [reference(model, [p], GREEDY, quant="int8", dtype=torch.float32)[0] for p in PROMPTS]
    unquantized = reference(model, PROMPTS, GREEDY)
    specs = instance_specs(model, "pipeline", 2, splits=(2,), quant="int8")
    async with RunnerSupervisor() as supervisor:
        await start_instance(supervisor, specs)
        results = [
            await collect(supervisor, specs[0].runner_id, task(f"t{i}", p, GREEDY))
            for i, p in enumerate(PROMPTS)
        ]
    moved = 0.0
    for chunks, want, plain in zip(results, expected, unquantized, strict=True):
        assert tokens_of(chunks) == list(want.token_ids)
        got = [lp.logprob for c in chunks for lp in c.logprobs or ()]
        assert want.logprobs is not None and plain.logprobs is not None
        assert got == pytest.approx([lp.logprob for lp in want.logprobs], abs=1e-5)
        moved = max(moved, *(abs(a - b.logprob) for a, b in zip(got, plain.logprobs, strict=False)))
    assert moved > 1e-4  # the ranks really ran int8 weights, not the float ones


async def test_tensor_parallel_gives_the_tokens_of_one_process(tmp_path: Path) -> None:
    model = write_tiny_model_dir(tmp_path / "model", "qwen2")
    expected = reference(model, PROMPTS, GREEDY)
    specs = instance_specs(model, "tensor", 2)
    async with RunnerSupervisor() as supervisor:
        await start_instance(supervisor, specs)
        results = await run_prompts(supervisor, specs[0])
        # Random sampling: each rank samples for itself (no token broadcast); they must stay in lockstep
        # (the next exchange compares what they sampled and fails the runners if they differ).
        randoms = [
            await collect(supervisor, specs[0].runner_id, task(f"r{i}", PROMPTS[0], RANDOM)) for i in range(2)
        ]
        # in lockstep: every rank back to Ready (a rank whose sample differed would have failed instead;
        # the last rank's Ready may come a moment after rank 0's last chunk)
        await wait_for(
            lambda: all(supervisor.status(spec.runner_id) == RunnerReady() for spec in specs), 10, "Ready"
        )
    for chunks, want in zip(results, expected, strict=True):
        assert tokens_of(chunks) == list(want.token_ids)
        got_logprobs = [lp.logprob for c in chunks for lp in c.logprobs or ()]
        assert want.logprobs is not None
        assert got_logprobs == pytest.approx([lp.logprob for lp in want.logprobs], abs=1e-4)
    for chunks in randoms:
        assert [c.error for c in chunks] == [None] * len(chunks)
        assert len(tokens_of(chunks)) == RANDOM.max_tokens
    # Leaving the supervisor stopped both ranks cleanly.
    assert [r.status for r in supervisor.runners()] == [RunnerShutdown(), RunnerShutdown()]


async def test_a_wrong_world_size_or_a_missing_peer_fails_the_group_start(tmp_path: Path) -> None:
    """Rank 0 expects 2 ranks while rank 1 claims 3: both fail, naming the mismatch. In another instance
    rank 1 waits for a rank 0 that never comes: it fails at the group timeout. Nobody serves alone."""
    model = write_tiny_model_dir(tmp_path / "model", "llama")
    rank0, _ = instance_specs(model, "pipeline", 2, splits=(1,), group_timeout_s=4.0)
    wrong = instance_specs(model, "pipeline", 3, splits=(1, 2), group_timeout_s=4.0)[1]
    wrong = wrong.model_copy(update={"rendezvous": rank0.rendezvous, "runner_id": "inst-r1"})
    _, lonely = instance_specs(model, "pipeline", 2, splits=(1,), instance="other", group_timeout_s=3.0)
    started = time.monotonic()
    async with RunnerSupervisor() as supervisor:
        for spec in (rank0, wrong, lonely):
            await supervisor.spawn(spec)
        ids = (rank0.runner_id, wrong.runner_id, lonely.runner_id)
        await wait_for(lambda: all(is_terminal(supervisor.status(r)) for r in ids), 40, "every rank to fail")
        first, second, third = (supervisor.status(r) for r in ids)
    assert isinstance(first, RunnerFailed) and isinstance(second, RunnerFailed)
    assert "rank 1 joined as pipeline instance inst with world size 3" in first.reason
    assert "expects pipeline instance inst with world size 2" in first.reason
    # Rank 1 sees the mismatch itself, or loses the rendezvous when rank 0 leaves first: never a hang.
    assert (
        "rank 0 joined as pipeline instance inst with world size 2" in second.reason
        or "rank 0 of 3 did not join the group of instance inst" in second.reason
    ), second.reason
    assert isinstance(third, RunnerFailed)
    assert "rank 1 could not reach rank 0's rendezvous at 127.0.0.1:" in third.reason
    assert "within 3 s" in third.reason
    assert time.monotonic() - started < 40
