"""The engine end to end on the embedded SmolLM2, in fp32, with short generations to stay fast.

One runner (the slow part to load) serves the module; every test builds a fresh LLMEngine on it, so no
test sees another's prefix cache.
"""

import pytest
import torch

from shoal.engine.embedded import embedded_model_path
from shoal.engine.errors import ContextLengthExceededError, InvalidRequestError
from shoal.engine.llm_engine import EngineConfig, LLMEngine
from shoal.engine.model_runner import ModelRunner
from shoal.engine.output_processor import RequestOutput
from shoal.engine.sampling import SamplingParams
from shoal.engine.tokenizer import Tokenizer, load_tokenizer

GREEDY = SamplingParams(temperature=0, max_tokens=6)
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "1, 2, 3, 4,",
    "The three primary colors are",
    "Water boils at",
    "My favourite programming language is",
    "In 1969, the first humans",
]


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return ModelRunner(
        embedded_model_path(), dtype=torch.float32, kv_cache_bytes=128 << 20, max_model_len=2048
    )


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    cache_dir = tmp_path_factory.getbasetemp() / "xdg-cache" / "shoal" / "tokenizers"
    return load_tokenizer(embedded_model_path(), cache_dir=cache_dir)


@pytest.fixture
def engine(runner: ModelRunner, tokenizer: Tokenizer) -> LLMEngine:
    return LLMEngine(runner, tokenizer)


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_greedy_matches_transformers_for_64_tokens(engine: LLMEngine) -> None:
    from transformers import AutoModelForCausalLM

    path = embedded_model_path()
    prompt = chat("Write a long story about a brave knight and a dragon.")
    ours = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=64))[0]
    reference = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    input_ids = torch.tensor([ours.prompt_token_ids])
    with torch.inference_mode():
        expected = reference.generate(input_ids, max_new_tokens=64, do_sample=False)[0, input_ids.shape[1] :]
    assert len(ours.token_ids) == 64 and ours.finish_reason == "length"
    assert list(ours.token_ids) == expected.tolist()
    assert ours.text == engine.tokenizer.decode(expected.tolist())


def test_batch_of_eight_equals_each_alone(
    engine: LLMEngine, runner: ModelRunner, tokenizer: Tokenizer
) -> None:
    batched = engine.generate(PROMPTS, GREEDY)
    alone_engine = LLMEngine(runner, tokenizer, EngineConfig(enable_prefix_caching=False))
    for prompt, together in zip(PROMPTS, batched, strict=True):
        (alone,) = alone_engine.generate([prompt], GREEDY)
        assert together.token_ids == alone.token_ids, prompt
        assert together.text == alone.text


def test_prefix_reuse_gives_same_output_and_reports_cached_tokens(
    engine: LLMEngine, runner: ModelRunner, tokenizer: Tokenizer
) -> None:
    params = SamplingParams(temperature=0, max_tokens=6)
    first_turn = chat("Name a fruit.")
    (first,) = engine.generate([first_turn], params)
    assert first.stats.cached_tokens == 0
    second_turn = [*first_turn, {"role": "assistant", "content": first.text}, *chat("And a vegetable?")]
    (second,) = engine.generate([second_turn], params)
    # The system prompt and first question span at least two full 16-token blocks.
    assert second.stats.cached_tokens >= 32
    assert second.stats.cached_tokens % runner.block_size == 0
    (uncached,) = LLMEngine(runner, tokenizer, EngineConfig(enable_prefix_caching=False)).generate(
        [second_turn], params
    )
    assert uncached.stats.cached_tokens == 0
    assert second.token_ids == uncached.token_ids


def test_same_seed_same_sample_whatever_the_batch(engine: LLMEngine) -> None:
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=42, max_tokens=8, ignore_eos=True)
    (alone,) = engine.generate([PROMPTS[2]], seeded)
    together = engine.generate(
        [PROMPTS[2], PROMPTS[3]], [seeded, SamplingParams(temperature=1.0, max_tokens=8)]
    )
    assert together[0].token_ids == alone.token_ids
    (other_seed,) = engine.generate([PROMPTS[2]], SamplingParams(temperature=1.0, seed=7, max_tokens=8))
    assert other_seed.token_ids != alone.token_ids


def test_eos_stops_unless_ignored(engine: LLMEngine) -> None:
    prompt = chat("What is the capital of France?")
    (answer,) = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=32))
    assert answer.finish_reason == "stop"
    assert answer.token_ids[-1] in engine.eos_token_ids
    assert "Paris" in answer.text and "<|im_end|>" not in answer.text
    n = len(answer.token_ids)
    (ignored,) = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=n + 2, ignore_eos=True))
    assert ignored.finish_reason == "length" and len(ignored.token_ids) == n + 2
    assert ignored.token_ids[:n] == answer.token_ids


def test_stop_strings_cut_the_text_and_never_leak(engine: LLMEngine) -> None:
    prompt = chat("Write a long story about a brave knight and a dragon.")
    (full,) = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=16))
    # A stop string spanning several tokens, starting mid-text.
    stop = full.text[12:24]
    assert len(engine.tokenizer.encode(stop, add_special_tokens=False)) > 1
    engine.add_request("stopped", prompt, SamplingParams(temperature=0, max_tokens=16, stop=[stop, "zzzz"]))
    deltas: list[RequestOutput] = []
    while engine.has_unfinished():
        deltas.extend(engine.step())
    text = "".join(d.text for d in deltas)
    assert text == full.text[: full.text.index(stop)]
    assert deltas[-1].finished and deltas[-1].finish_reason == "stop"
    # The tokens went on until the stop string was complete, and no delta ever showed a piece of it.
    streamed = ""
    for delta in deltas:
        streamed += delta.text
        assert full.text.startswith(streamed)
        assert len(streamed) <= full.text.index(stop)


def test_abort_one_request_leaves_the_others_unchanged(engine: LLMEngine) -> None:
    baseline = engine.generate(PROMPTS[:3], GREEDY)
    for i, prompt in enumerate(PROMPTS[:3]):
        engine.add_request(f"req-{i}", prompt, GREEDY)
    collected: dict[str, list[RequestOutput]] = {f"req-{i}": [] for i in range(3)}
    for _ in range(2):
        for out in engine.step():
            collected[out.request_id].append(out)
    assert engine.abort("req-1")
    assert not engine.abort("req-1")  # already gone
    while engine.has_unfinished():
        for out in engine.step():
            collected[out.request_id].append(out)
    assert collected["req-1"][-1].finish_reason == "abort"
    assert len(collected["req-1"]) < len(baseline[1].token_ids) + 1
    for i in (0, 2):
        tokens = tuple(t for out in collected[f"req-{i}"] for t in out.token_ids)
        assert tokens == baseline[i].token_ids


def test_bad_requests_are_rejected_without_disturbing_others(engine: LLMEngine) -> None:
    engine.add_request("good", PROMPTS[0], GREEDY)
    engine.step()
    with pytest.raises(InvalidRequestError) as empty:
        engine.add_request("empty", "", GREEDY)
    assert empty.value.field == "prompt"
    with pytest.raises(ContextLengthExceededError):
        engine.add_request("long", [1] * engine.max_total_tokens, GREEDY)
    with pytest.raises(InvalidRequestError, match=r"must be in \[0, 49152\)"):
        engine.add_request("bad-ids", [1, 10**9], GREEDY)
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request("good", PROMPTS[1], GREEDY)
    with pytest.raises(InvalidRequestError) as bad_params:
        engine.add_request("bad-params", PROMPTS[1], {"temperature": -1})  # type: ignore[arg-type]
    assert "SamplingParams" in str(bad_params.value)
    # generate is all or nothing: the good prompt queued before the bad one is withdrawn.
    with pytest.raises(InvalidRequestError):
        engine.generate([PROMPTS[1], ""], GREEDY)
    assert engine.scheduler.num_unfinished == 1
    outputs: list[RequestOutput] = []
    while engine.has_unfinished():
        outputs.extend(engine.step())
    assert {o.request_id for o in outputs} == {"good"}
    (fresh,) = LLMEngine(engine.runner, engine.tokenizer).generate([PROMPTS[0]], GREEDY)
    # The first token came from the step before the bad requests.
    assert len(outputs) == len(fresh.token_ids) - 1
    assert tuple(t for o in outputs for t in o.token_ids) == fresh.token_ids[1:]


def test_max_tokens_is_capped_by_the_context_window(runner: ModelRunner, tokenizer: Tokenizer) -> None:
    engine = LLMEngine(runner, tokenizer, EngineConfig(max_model_len=32))
    prompt = list(range(1000, 1028))  # 28 tokens: room for 4 more
    (result,) = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
    assert result.finish_reason == "length" and len(result.token_ids) == 4
    with pytest.raises(ContextLengthExceededError):
        engine.add_request("too-long", list(range(1000, 1032)), GREEDY)


def test_logprobs_and_stats_are_reported(engine: LLMEngine) -> None:
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=True, top_logprobs=3, ignore_eos=True)
    (result,) = engine.generate([PROMPTS[0]], params)
    assert result.logprobs is not None and len(result.logprobs) == 4
    for token, lp in zip(result.token_ids, result.logprobs, strict=True):
        # Greedy: the chosen token is the most likely one.
        assert lp.token_id == token and lp.top_logprobs[0].token_id == token
        assert lp.logprob == pytest.approx(lp.top_logprobs[0].logprob)
    stats = result.stats
    assert stats.prompt_tokens == len(result.prompt_token_ids) and stats.completion_tokens == 4
    assert stats.time_to_first_token_s is not None and stats.time_to_first_token_s > 0
    assert stats.prefill_tokens_per_s is not None and stats.prefill_tokens_per_s > 0
    assert stats.decode_tokens_per_s is not None and stats.decode_tokens_per_s > 0
