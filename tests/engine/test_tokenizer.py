import time
from pathlib import Path

import pytest

from shoal.engine.detokenizer import IncrementalDetokenizer
from shoal.engine.embedded import embedded_model_path
from shoal.engine.errors import ModelLoadError
from shoal.engine.tokenizer import Tokenizer, default_cache_dir, load_tokenizer

TEXTS = [
    "Hello, world! The quick brown fox.",
    "Emoji 👋🏽 and family 👨‍👩‍👧 then text.",
    "中文字符测试，日本語のテキスト、한국어 텍스트.",
    "  leading spaces\tand\nnewlines  ",
    "Ünïcödé àçcènts — dashes … and ∑ math ≥ 3.",
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Shared by this session's test modules: the first load converts the GGUF, later ones hit the cache.
    return tmp_path_factory.getbasetemp() / "xdg-cache" / "shoal" / "tokenizers"


@pytest.fixture(scope="module")
def tokenizer(cache_dir: Path) -> Tokenizer:
    return load_tokenizer(embedded_model_path(), cache_dir=cache_dir)


def test_gguf_tokenizer_is_cached_and_loads_fast(tokenizer: Tokenizer, cache_dir: Path) -> None:
    entries = [p for p in cache_dir.iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and (entries[0] / "tokenizer.json").is_file()
    start = time.perf_counter()
    again = load_tokenizer(embedded_model_path(), cache_dir=cache_dir)
    assert time.perf_counter() - start < 2.0
    text = "Cached tokenizers must tokenize the same: 👋 世界"
    assert again.encode(text) == tokenizer.encode(text)
    assert again.eos_token_ids == tokenizer.eos_token_ids == (2,)


def test_chat_template_comes_from_the_model(tokenizer: Tokenizer) -> None:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}])
    text = tokenizer.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\n")
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    # Special tokens are single ids, not their spelled-out text.
    assert ids.count(tokenizer.hf.convert_tokens_to_ids("<|im_start|>")) == 3


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_detokenizer_equals_full_decode(tokenizer: Tokenizer, text: str) -> None:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Say something."}])
    output = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detok.add(token) for token in output]
    assert "".join(deltas) == tokenizer.decode(output) == text
    assert not any("\ufffd" in delta for delta in deltas)


def test_multibyte_characters_are_held_until_complete(tokenizer: Tokenizer) -> None:
    output = tokenizer.encode("👋", add_special_tokens=False)
    assert len(output) > 1  # byte-level pieces of one emoji
    detok = IncrementalDetokenizer(tokenizer, [1])
    deltas = [detok.add(token) for token in output]
    assert deltas[:-1] == [""] * (len(output) - 1) and deltas[-1] == "👋"


def test_special_tokens_add_no_text(tokenizer: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tokenizer, [1])
    assert detok.add(tokenizer.hf.convert_tokens_to_ids("<|im_end|>")) == ""
    assert detok.add(tokenizer.encode("Hi", add_special_tokens=False)[0]) == "Hi"


def test_bad_paths_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(ModelLoadError, match="no tokenizer"):
        load_tokenizer(tmp_path)
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"xx")
    with pytest.raises(ModelLoadError, match="not a GGUF"):
        load_tokenizer(not_gguf)
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF-but-not-really")
    with pytest.raises(ModelLoadError, match=r"corrupt\.gguf"):
        load_tokenizer(corrupt, cache_dir=tmp_path / "cache")


def test_default_cache_dir_follows_xdg() -> None:
    assert default_cache_dir({"XDG_CACHE_HOME": "/x/cache"}) == Path("/x/cache/shoal/tokenizers")
    assert default_cache_dir({}) == Path.home() / ".cache" / "shoal" / "tokenizers"
