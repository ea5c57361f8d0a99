"""Stop conditions and held-back text, fed token by token without a model."""

from pathlib import Path

import pytest

from shoal.engine.embedded import embedded_model_path
from shoal.engine.output_processor import OutputProcessor
from shoal.engine.sampling import SampleResult, SamplingParams
from shoal.engine.sequence import Sequence
from shoal.engine.tokenizer import Tokenizer, load_tokenizer

EOS = 2


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    cache_dir: Path = tmp_path_factory.getbasetemp() / "xdg-cache" / "shoal" / "tokenizers"
    return load_tokenizer(embedded_model_path(), cache_dir=cache_dir)


def feed(
    tokenizer: Tokenizer, params: SamplingParams, tokens: list[int], text: bool = True
) -> list[tuple[str, str | None]]:
    """Run tokens through a processor until it finishes; (delta, finish_reason) per token."""
    seq = Sequence(
        seq_id=0, request_id="r", prompt_token_ids=[1], params=params, max_output_tokens=params.max_tokens
    )
    processor = OutputProcessor(seq, tokenizer, eos_token_ids={EOS}, text=text)
    steps = []
    for token in tokens:
        seq.append_token(token, now=0.0)
        delta, finish_reason = processor.process(SampleResult(token_id=token))
        steps.append((delta, finish_reason))
        if finish_reason:
            break
    return steps


def text_of(steps: list[tuple[str, str | None]]) -> str:
    return "".join(delta for delta, _ in steps)


def test_stop_string_spanning_tokens_is_cut_and_never_shown(tokenizer: Tokenizer) -> None:
    tokens = tokenizer.encode("Hello world, this is the END of it", add_special_tokens=False)
    steps = feed(tokenizer, SamplingParams(stop=["the END"]), tokens)
    assert text_of(steps) == "Hello world, this is "
    assert steps[-1][1] == "stop"
    assert all("END" not in delta and "the" not in delta for delta, _ in steps)


def test_earliest_of_several_stops_wins(tokenizer: Tokenizer) -> None:
    tokens = tokenizer.encode("one two three four", add_special_tokens=False)
    steps = feed(tokenizer, SamplingParams(stop=["four", " two"]), tokens)
    assert text_of(steps) == "one" and steps[-1][1] == "stop"


def test_held_back_prefix_is_released_when_it_is_not_a_stop(tokenizer: Tokenizer) -> None:
    tokens = tokenizer.encode("a b c d", add_special_tokens=False)
    steps = feed(tokenizer, SamplingParams(stop=[" c x"]), tokens)
    # " c" could start the stop string: held back until " d" shows it does not.
    assert text_of(steps) == "a b c d" and steps[-1][1] is None
    assert all(" c" not in delta for delta, _ in steps[:-1])


def test_held_back_text_is_flushed_when_length_ends_the_request(tokenizer: Tokenizer) -> None:
    tokens = tokenizer.encode("alpha beta", add_special_tokens=False)
    steps = feed(tokenizer, SamplingParams(stop=[" beta gamma"], max_tokens=len(tokens)), tokens)
    assert text_of(steps) == "alpha beta" and steps[-1][1] == "length"


def test_eos_and_stop_token_ids_end_without_text(tokenizer: Tokenizer) -> None:
    hello = tokenizer.encode("Hello", add_special_tokens=False)
    steps = feed(tokenizer, SamplingParams(), [*hello, EOS, *hello])
    assert text_of(steps) == "Hello" and steps[-1] == ("", "stop")
    ignored = feed(
        tokenizer, SamplingParams(ignore_eos=True, max_tokens=len(hello) * 2 + 1), [*hello, EOS, *hello]
    )
    assert text_of(ignored) == "HelloHello" and ignored[-1][1] == "length"
    custom = feed(
        tokenizer,
        SamplingParams(stop_token_ids=[hello[0]]),
        [*tokenizer.encode("Hi ", add_special_tokens=False), *hello],
    )
    assert text_of(custom) == "Hi " and custom[-1][1] == "stop"


class CountingTokenizer:
    """The real tokenizer, counting its decode calls."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self.decodes = 0

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        self.decodes += 1
        return self._tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=6),
        SamplingParams(max_tokens=50),  # ends on EOS
        SamplingParams(stop=["the END"], max_tokens=50),
        SamplingParams(stop=[" c x"], max_tokens=50),
    ],
)
def test_without_text_the_finish_decisions_are_the_same(tokenizer: Tokenizer, params: SamplingParams) -> None:
    """A rank that does not sample keeps no text: it decodes only for stop strings, and finishes its
    requests exactly where the sampling rank does."""
    tokens = tokenizer.encode("a b c d, Hello world, this is the END of it", add_special_tokens=False)
    tokens.append(EOS)
    with_text = feed(tokenizer, params, tokens)
    counting = CountingTokenizer(tokenizer)
    without = feed(counting, params, tokens, text=False)  # type: ignore[arg-type]
    assert [reason for _, reason in without] == [reason for _, reason in with_text]
    if params.stop:
        assert counting.decodes > 0
    else:
        assert counting.decodes == 0
        assert text_of(without) == ""
