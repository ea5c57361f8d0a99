import math
from typing import Any

import pytest
import torch

from shoal.engine.errors import InvalidRequestError
from shoal.engine.sampling import Sampler, SamplingParams
from shoal.engine.sequence import Sequence

_seq_ids = iter(range(1_000_000))


def make_seq(
    params: SamplingParams, prompt: list[int] | None = None, output: list[int] | None = None
) -> Sequence:
    return Sequence(
        seq_id=next(_seq_ids),
        request_id="r",
        prompt_token_ids=prompt or [0],
        params=params,
        max_output_tokens=params.max_tokens,
        output_token_ids=list(output or []),
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", "hot"),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("top_k", 1.5),
        ("min_p", -0.1),
        ("min_p", 1.1),
        ("repetition_penalty", 0.0),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3.0),
        ("seed", "abc"),
        ("seed", 2**64),
        ("seed", -(2**63) - 1),
        ("stop", [""]),
        ("stop_token_ids", [-1]),
        ("ignore_eos", "yes"),
        ("max_tokens", 0),
        ("logprobs", 1),
        ("top_logprobs", 21),
        ("top_logprobs", -1),
    ],
)
def test_invalid_params_name_the_field(field: str, value: Any) -> None:
    kwargs: dict[str, Any] = {field: value}
    if field == "top_logprobs":
        kwargs["logprobs"] = True
    with pytest.raises(InvalidRequestError) as exc:
        SamplingParams(**kwargs)
    assert exc.value.field == field
    assert field in str(exc.value)


def test_top_logprobs_needs_logprobs() -> None:
    with pytest.raises(InvalidRequestError) as exc:
        SamplingParams(top_logprobs=3)
    assert exc.value.field == "top_logprobs"


def test_valid_params_normalize_stop() -> None:
    params = SamplingParams(stop="END", stop_token_ids=[5], top_k=0, temperature=0)
    assert params.stop == ("END",) and params.stop_token_ids == (5,) and params.greedy
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")


def test_greedy_takes_argmax_per_row() -> None:
    logits = torch.tensor([[0.1, 3.0, 2.0], [5.0, -1.0, 4.9]])
    seqs = [make_seq(SamplingParams(temperature=0)) for _ in range(2)]
    assert [r.token_id for r in Sampler()(logits, seqs)] == [1, 0]


def sample_many(logits: torch.Tensor, params: SamplingParams, n: int = 400) -> set[int]:
    sampler = Sampler()
    seqs = [make_seq(params) for _ in range(n)]
    return {r.token_id for r in sampler(logits.expand(n, -1).contiguous(), seqs)}


def test_top_k_keeps_only_k_best() -> None:
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0, 0.0]])
    assert sample_many(logits, SamplingParams(top_k=2)) == {1, 2}


def test_top_p_keeps_smallest_nucleus() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    # 0.5 + 0.3 reaches 0.8: tokens 0 and 1 only.
    assert sample_many(probs.log(), SamplingParams(top_p=0.8)) == {0, 1}
    # A tiny top_p still keeps the best token.
    assert sample_many(probs.log(), SamplingParams(top_p=0.01)) == {0}


def test_wide_top_p_nucleus_beyond_the_candidate_window_is_exact() -> None:
    # 5000 nearly equal tokens: the 0.9 nucleus holds ~4500 of them, far more than the 1024 candidates.
    logits = -torch.arange(5000, dtype=torch.float32).unsqueeze(0) * 1e-5
    tokens = sample_many(logits, SamplingParams(top_p=0.9))
    assert max(tokens) >= 1024 and max(tokens) < 4600


def test_top_k_then_top_p_and_mixed_batch() -> None:
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    # top-k 3 renormalizes to 4/9, 3/9, 2/9: top-p 0.7 then keeps tokens 0 and 1 (4/9 < 0.7 <= 7/9).
    assert sample_many(probs.log(), SamplingParams(top_k=3, top_p=0.7)) == {0, 1}
    sampler = Sampler()
    rows = [SamplingParams(top_k=1), SamplingParams(temperature=0), SamplingParams(min_p=0.9)]
    results = sampler(probs.log().expand(3, -1).contiguous(), [make_seq(p) for p in rows])
    assert [r.token_id for r in results] == [0, 0, 0]


def test_min_p_drops_tokens_below_fraction_of_best() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    # threshold 0.25: tokens 0 and 1 survive.
    assert sample_many(probs.log(), SamplingParams(min_p=0.5)) == {0, 1}


def test_temperature_sampling_follows_distribution() -> None:
    probs = torch.tensor([[0.7, 0.2, 0.1]])
    sampler = Sampler()
    n = 4000
    seqs = [make_seq(SamplingParams(seed=i)) for i in range(n)]
    tokens = torch.tensor([r.token_id for r in sampler(probs.log().expand(n, -1).contiguous(), seqs)])
    freq = torch.bincount(tokens, minlength=3).float() / n
    assert torch.allclose(freq, probs[0], atol=0.03)


def test_repetition_penalty_divides_positive_and_multiplies_negative() -> None:
    # Token 0 (positive logit) seen in the prompt, token 1 (negative) in the output.
    logits = torch.tensor([[2.0, -1.0, 1.5, -2.5]])
    seq = make_seq(SamplingParams(temperature=0, repetition_penalty=2.0), prompt=[0], output=[1])
    # 2.0 / 2 = 1.0 < 1.5: token 2 wins.
    assert Sampler()(logits, [seq])[0].token_id == 2
    seq = make_seq(SamplingParams(temperature=0, repetition_penalty=2.0), prompt=[3], output=[1])
    logits = torch.tensor([[-2.1, -1.0, -3.0, -1.2]])
    # Token 1 becomes -2.0, token 3 becomes -2.4: token 1 still beats token 0 (-2.1).
    assert Sampler()(logits, [seq])[0].token_id == 1
    logits = torch.tensor([[-1.9, -1.0, -3.0, -1.2]])
    assert Sampler()(logits, [seq])[0].token_id == 0


def test_presence_and_frequency_penalties_count_output_tokens_only() -> None:
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    # Token 0 appears 3 times in the output: 3 - 3 * 0.5 = 1.5 < 2.
    freq = make_seq(SamplingParams(temperature=0, frequency_penalty=0.5), output=[0, 0, 0])
    assert Sampler()(logits, [freq])[0].token_id == 1
    # Presence subtracts once regardless of count: 3 - 0.9 = 2.1 > 2.
    presence = make_seq(SamplingParams(temperature=0, presence_penalty=0.9), output=[0, 0, 0])
    assert Sampler()(logits, [presence])[0].token_id == 0
    # Prompt occurrences do not count.
    prompt_only = make_seq(SamplingParams(temperature=0, frequency_penalty=2.0), prompt=[0, 0, 0])
    assert Sampler()(logits, [prompt_only])[0].token_id == 0


def test_same_seed_same_tokens_independent_of_batch() -> None:
    torch.manual_seed(0)
    vocab = 1000
    steps = [torch.randn(6, vocab) for _ in range(8)]
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)

    def run(row: int, batch_size: int) -> list[int]:
        sampler = Sampler()
        seqs = [make_seq(params if i == row else SamplingParams(temperature=0.8)) for i in range(batch_size)]
        return [sampler(step[:batch_size], seqs)[row].token_id for step in steps]

    alone = run(0, 1)
    # The row's logits are the same; its neighbours differ and draw from the global generator.
    steps = [torch.cat([step[:1], step[1:].roll(1, 0)]) for step in steps]
    assert run(0, 6) == alone
    other_seed = Sampler()
    seq = make_seq(SamplingParams(temperature=1.0, top_p=0.9, seed=99))
    assert [other_seed(step[:1], [seq])[0].token_id for step in steps] != alone


def test_logprobs_are_the_model_distribution() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.5], [0.0, 0.0, 5.0, 0.0]])
    seqs = [
        make_seq(SamplingParams(temperature=0, logprobs=True, top_logprobs=3, repetition_penalty=1.5), [2]),
        make_seq(SamplingParams(temperature=0.7, seed=1)),
    ]
    first, second = Sampler()(logits, seqs)
    expected = logits[0].log_softmax(-1)
    assert first.logprob is not None
    assert math.isclose(first.logprob, expected[first.token_id].item(), rel_tol=1e-6)
    assert [t.token_id for t in first.top_logprobs] == [2, 1, 0]
    assert [t.logprob for t in first.top_logprobs] == pytest.approx(expected[[2, 1, 0]].tolist())
    assert sum(math.exp(t.logprob) for t in first.top_logprobs) < 1
    # The penalty moved the choice off token 2 (3 / 1.5 = 2 ties token 1; argmax picks the first).
    assert first.token_id == 1
    assert second.logprob is None and second.top_logprobs == ()


def test_release_forgets_generator() -> None:
    sampler = Sampler()
    seq = make_seq(SamplingParams(seed=5))
    logits = torch.randn(1, 50)
    a = sampler(logits, [seq])[0].token_id
    sampler.release(seq.seq_id)
    assert sampler(logits, [seq])[0].token_id == a
