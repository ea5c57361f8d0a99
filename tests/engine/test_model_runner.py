"""ModelRunner: continuous batches (prefill + decode of many sequences), prefix reuse, cache sizing, bad chunks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from shoal.engine.batch import ScheduledChunk
from shoal.engine.model_runner import ModelRunner, ThreadPolicy
from tests.engine.tiny_models import write_tiny_model

ATOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    path = tmp_path_factory.mktemp("llama")
    return path, write_tiny_model(path, "llama")


def make_runner(path: Path, **kwargs: object) -> ModelRunner:
    options: dict[str, object] = {"dtype": torch.float32, "kv_cache_bytes": 1 << 20, "block_size": 4}
    options.update(kwargs)
    return ModelRunner(path, **options)  # type: ignore[arg-type]


def hf_logits(hf_model: object, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([token_ids])).logits[0]  # type: ignore[operator]


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_mixed_batch_of_prefills_and_decodes_matches_each_alone(tiny: tuple[Path, object]) -> None:
    path, hf_model = tiny
    runner = make_runner(path)
    tables = {0: (0, 1, 2, 3), 1: (4, 5, 6, 7), 2: (8, 9, 10, 11), 3: (12, 13, 14, 15)}
    seqs = {s: ids(12, seed=s) for s in tables}
    # step 1: sequences 0 and 1 prefill different lengths (1 chunk each), 2 prefills its first part
    step1 = [
        ScheduledChunk(0, tuple(seqs[0][:5]), 0, tables[0], sample=True),
        ScheduledChunk(1, tuple(seqs[1][:9]), 0, tables[1], sample=True),
        ScheduledChunk(2, tuple(seqs[2][:4]), 0, tables[2], sample=False),
    ]
    logits1 = runner.execute(step1)
    assert logits1.shape == (2, 256) and logits1.dtype == torch.float32
    # step 2: decodes of 0 and 1 (different context lengths) around a mid-sequence chunk of 2, a new prompt 3
    step2 = [
        ScheduledChunk(0, (seqs[0][5],), 5, tables[0], sample=True),
        ScheduledChunk(2, tuple(seqs[2][4:10]), 4, tables[2], sample=True),
        ScheduledChunk(1, (seqs[1][9],), 9, tables[1], sample=True),
        ScheduledChunk(3, (seqs[3][0],), 0, tables[3], sample=True),
    ]
    logits2 = runner.execute(step2)
    expected = [
        hf_logits(hf_model, seqs[0][:5])[-1],
        hf_logits(hf_model, seqs[1][:9])[-1],
        hf_logits(hf_model, seqs[0][:6])[-1],
        hf_logits(hf_model, seqs[2][:10])[-1],
        hf_logits(hf_model, seqs[1][:10])[-1],
        hf_logits(hf_model, seqs[3][:1])[-1],
    ]
    torch.testing.assert_close(torch.cat([logits1, logits2]), torch.stack(expected), atol=ATOL, rtol=0)


def test_reused_prefix_blocks_give_the_same_logits(tiny: tuple[Path, object]) -> None:
    path, hf_model = tiny
    runner = make_runner(path)
    shared = ids(8, seed=7)  # two full blocks
    first = shared + ids(3, seed=8)
    second = shared + ids(5, seed=9)
    runner.execute([ScheduledChunk(0, tuple(first), 0, (3, 4, 5), sample=True)])
    # the second sequence reuses blocks 3 and 4 and computes only its own suffix
    logits = runner.execute([ScheduledChunk(1, tuple(second[8:]), 8, (3, 4, 6, 7), sample=True)])
    torch.testing.assert_close(logits[0], hf_logits(hf_model, second)[-1], atol=ATOL, rtol=0)


def test_kv_cache_is_sized_from_the_byte_budget(tiny: tuple[Path, object]) -> None:
    path, _ = tiny
    # per token: 3 layers x (k + v) x 2 kv heads x 16 dims x 4 bytes = 768 bytes; 4-token blocks
    runner = make_runner(path, kv_cache_bytes=768 * 4 * 100 + 5)
    assert runner.num_kv_blocks == 100 and runner.block_size == 4
    assert runner.kv_caches[0].shape == (100, 4, 2, 2, 16)  # blocks, block size, k/v, kv heads, dims
    with pytest.raises(ValueError, match="max_model_len"):
        make_runner(path, kv_cache_bytes=768 * 200)  # 256-token context needs 64 blocks, 50 fit
    assert make_runner(path, kv_cache_bytes=768 * 200, max_model_len=200).num_kv_blocks == 50


@pytest.mark.parametrize(
    ("chunk", "message"),
    [
        (ScheduledChunk(0, (), 0, (0,), sample=True), "empty chunk"),
        (ScheduledChunk(0, (5, 6, 7, 8, 9), 0, (0,), sample=True), "block table too short"),
        (ScheduledChunk(0, (5,), 0, (10_000,), sample=True), "outside the cache"),
        (ScheduledChunk(0, (5,), 300, tuple(range(80)), sample=True), "max_model_len"),
        (ScheduledChunk(0, (5, 999), 0, (0,), sample=True), "vocabulary"),
    ],
)
def test_bad_chunks_are_refused(tiny: tuple[Path, object], chunk: ScheduledChunk, message: str) -> None:
    runner = make_runner(tiny[0])
    with pytest.raises(ValueError, match=message):
        runner.execute([chunk])


def test_non_last_stage_needs_hidden_states(tiny: tuple[Path, object]) -> None:
    from shoal.engine.parallel import ShardSpec

    runner = make_runner(tiny[0], shard=ShardSpec(layer_start=1))
    with pytest.raises(ValueError, match="hidden_states"):
        runner.execute([ScheduledChunk(0, (5, 6), 0, (0,), sample=True)])


@pytest.fixture
def restore_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_thread_policy_picks_threads_by_step_size(tiny: tuple[Path, object], restore_threads: None) -> None:
    path, hf_model = tiny
    policy = ThreadPolicy(small_step_threads=1, large_step_threads=2, large_step_min_tokens=4)
    runner = make_runner(path, threads=policy)
    prompt = ids(6, seed=7)
    table = (0, 1, 2)
    runner.execute([ScheduledChunk(0, tuple(prompt[:5]), 0, table, sample=False)])
    assert torch.get_num_threads() == 2
    logits = runner.execute([ScheduledChunk(0, (prompt[5],), 5, table, sample=True)])
    assert torch.get_num_threads() == 1
    torch.testing.assert_close(logits[0], hf_logits(hf_model, prompt)[-1], atol=ATOL, rtol=0)


def test_thread_policy_refuses_zero_threads() -> None:
    with pytest.raises(ValueError, match="at least one thread"):
        ThreadPolicy(small_step_threads=0)
    with pytest.raises(ValueError, match="at least one thread"):
        ThreadPolicy(large_step_threads=0)


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


# inductor's own imports use the deprecated torch.jit.script_method
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiled_decode_matches_transformers(tiny: tuple[Path, object]) -> None:
    path, hf_model = tiny
    runner = make_runner(path, compile_decode=True)
    prompt, table = ids(9, seed=11), (0, 1, 2, 3)
    runner.execute([ScheduledChunk(0, tuple(prompt[:-5]), 0, table, sample=False)])
    graphs = _compiled_graphs()
    # one-stream decode steps: the compiled path, through dynamo for two steps, then called directly
    for back in (5, 4, 3, 2, 1):
        logits = runner.execute([ScheduledChunk(0, (prompt[-back],), len(prompt) - back, table, sample=True)])
        expected = hf_logits(hf_model, prompt[: len(prompt) - back + 1])[-1]
        torch.testing.assert_close(logits[0], expected, atol=ATOL, rtol=0)
    assert _compiled_graphs() > graphs, "the one-stream decode steps did not run compiled"
    compiled = runner.model.compiled_decode
    assert compiled is not None and compiled.direct


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiled_batched_decode_matches_transformers(tiny: tuple[Path, object]) -> None:
    path, hf_model = tiny
    runner = make_runner(path, compile_decode=True)
    prompts = {0: ids(7, seed=11), 1: ids(4, seed=12)}
    tables = {0: (0, 1, 2, 3), 1: (4, 5, 6, 7)}
    runner.execute([ScheduledChunk(s, tuple(p[:-3]), 0, tables[s], sample=False) for s, p in prompts.items()])
    graphs = _compiled_graphs()
    for back in (3, 2, 1):  # decode-only steps of two sequences of different lengths (padded context)
        chunks = [
            ScheduledChunk(s, (p[-back],), len(p) - back, tables[s], sample=True) for s, p in prompts.items()
        ]
        logits = runner.execute(chunks)
        for row, p in enumerate(prompts.values()):
            expected = hf_logits(hf_model, p[: len(p) - back + 1])[-1]
            torch.testing.assert_close(logits[row], expected, atol=ATOL, rtol=0)
    assert _compiled_graphs() > graphs
    compiled = runner.model.compiled_decode
    assert compiled is not None and compiled.num_plans == 1  # for batches of two
    longer = [*prompts[1], 77]  # then one stream: another batch size, so through dynamo, recording
    logits = runner.execute([ScheduledChunk(1, (77,), len(longer) - 1, tables[1], sample=True)])
    torch.testing.assert_close(logits[0], hf_logits(hf_model, longer)[-1], atol=ATOL, rtol=0)


def test_a_failing_compile_falls_back_to_eager_decode(
    tiny: tuple[Path, object], caplog: pytest.LogCaptureFixture
) -> None:
    """No C++ compiler, an op inductor cannot take: the step runs eagerly, and so do the ones after it."""
    path, hf_model = tiny
    calls: list[int] = []

    def broken_backend(graph: object, example_inputs: object) -> object:
        calls.append(1)
        raise RuntimeError("no C++ compiler here")

    runner = make_runner(path)
    runner.model.compile_decode(backend=broken_backend)
    prompt, table = ids(6, seed=3), (0, 1, 2)
    runner.execute([ScheduledChunk(0, tuple(prompt[:-2]), 0, table, sample=False)])
    for back in (2, 1):
        logits = runner.execute([ScheduledChunk(0, (prompt[-back],), len(prompt) - back, table, sample=True)])
        expected = hf_logits(hf_model, prompt[: len(prompt) - back + 1])[-1]
        torch.testing.assert_close(logits[0], expected, atol=ATOL, rtol=0)
    assert len(calls) == 1, "the compile was tried again after it failed"
    assert "decoding eagerly from now on: " in caplog.text and "no C++ compiler here" in caplog.text
