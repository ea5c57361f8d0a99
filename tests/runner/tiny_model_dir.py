"""A tiny random-weight model folder with a byte-level tokenizer that fits its 256-token vocabulary."""

from __future__ import annotations

from pathlib import Path

from tests.engine.tiny_models import write_tiny_model


def write_byte_tokenizer(path: Path) -> None:
    """One token per byte (ids 0..255, no merges): any text encodes, and ids decode back to text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=alphabet[2])
    fast.save_pretrained(str(path))


def write_tiny_model_dir(path: Path, arch: str = "llama", **overrides: object) -> Path:
    write_tiny_model(path, arch, **overrides)
    write_byte_tokenizer(path)
    return path
