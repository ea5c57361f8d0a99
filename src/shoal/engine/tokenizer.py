"""The model's tokenizer and chat template, through transformers' tokenizer classes. No templates of our own
(for a template that knows no tools, the tools are described in the system message instead).

Inputs: a Hugging Face model folder or a GGUF file (or a folder holding one). Output: a `Tokenizer`.
Converting a GGUF tokenizer takes seconds to tens of seconds, so the converted tokenizer is saved under a
cache directory keyed by the file's identity (resolved path, size, mtime, transformers version) and loaded
from there next time. The cache directory is a parameter: the edge (the CLI) picks the default.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import transformers
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from shoal.engine.errors import ModelLoadError
from shoal.paths import user_path

_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")

ChatMessage = Mapping[str, Any]


def default_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """`$XDG_CACHE_HOME/shoal/tokenizers`, else `~/.cache/shoal/tokenizers`. Call this at the edge only."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "shoal" / "tokenizers"


class Tokenizer:
    """A thin typed view of a transformers tokenizer: the calls the engine needs, nothing more."""

    def __init__(self, hf_tokenizer: PreTrainedTokenizerBase) -> None:
        self.hf = hf_tokenizer

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = self.hf.eos_token_id
        return () if eos is None else (int(eos),)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return str(self.hf.decode(list(token_ids), skip_special_tokens=skip_special_tokens))

    def apply_chat_template(
        self, messages: Sequence[ChatMessage], tools: Sequence[Mapping[str, Any]] | None = None
    ) -> list[int]:
        """Token ids of the conversation rendered with the model's own template, ready for the reply.

        `tools` are OpenAI-style function specs ({"type": "function", "function": {...}}). A template that
        knows tools renders them itself; for one that does not, they are described in a system message that
        asks for calls as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.
        """
        if not self.has_chat_template:
            raise ModelLoadError("this model has no chat template: send a plain text prompt instead")
        conversation = [dict(message) for message in messages]
        template = str(self.hf.chat_template)
        extra: dict[str, Any] = {}
        if tools:
            if "tools" in template:
                extra["tools"] = [dict(tool) for tool in tools]
            else:
                conversation = _with_tool_instructions(conversation, tools)
        text = self.hf.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True, **extra)
        # The rendered text already holds the template's special tokens (BOS included where it wants one).
        return self.encode(str(text), add_special_tokens=False)


TOOL_INSTRUCTIONS = (
    "You can call the functions described below. To call one, answer with only\n"
    '<tool_call>{"name": "<function name>", "arguments": {<arguments as JSON>}}</tool_call>\n'
    "and nothing else. Functions:\n"
)


def _with_tool_instructions(
    conversation: list[dict[str, Any]], tools: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """The conversation with the tools described in its system message (added when there is none), and
    earlier calls and tool results written as plain text, for templates that know nothing of tools."""
    described = "\n".join(json.dumps(tool.get("function", tool)) for tool in tools)
    rendered = [_as_plain_message(message) for message in conversation]
    if rendered and rendered[0].get("role") == "system":
        first = dict(rendered[0])
        first["content"] = f"{first.get('content') or ''}\n\n{TOOL_INSTRUCTIONS}{described}".lstrip()
        return [first, *rendered[1:]]
    return [{"role": "system", "content": TOOL_INSTRUCTIONS + described}, *rendered]


def _as_plain_message(message: dict[str, Any]) -> dict[str, Any]:
    calls = message.get("tool_calls") or []
    if message.get("role") == "tool":
        return {"role": "user", "content": f"<tool_response>{message.get('content') or ''}</tool_response>"}
    if not calls:
        return message
    written = "".join(
        "<tool_call>"
        + json.dumps({"name": call["function"]["name"], "arguments": call["function"]["arguments"]})
        + "</tool_call>"
        for call in calls
    )
    return {"role": message.get("role", "assistant"), "content": (message.get("content") or "") + written}


def resolve_tokenizer_source(model_path: Path) -> tuple[Path, str | None]:
    """(folder, gguf file name or None) for a model path; a clear error when it holds no tokenizer."""
    path = user_path(model_path)
    if not path.exists():
        raise ModelLoadError(f"model path does not exist: {path}")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"not a GGUF file or a model folder: {path}")
        return path.parent, path.name
    if any((path / name).is_file() for name in _HF_TOKENIZER_FILES):
        return path, None
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return path, ggufs[0].name
    if ggufs:
        raise ModelLoadError(f"{path} holds several GGUF files; pass the one to use")
    raise ModelLoadError(
        f"no tokenizer in {path} (expected tokenizer.json, tokenizer_config.json or a .gguf)"
    )


def load_tokenizer(model_path: Path, *, cache_dir: Path | None = None) -> Tokenizer:
    """Load the tokenizer of an HF folder or GGUF file; GGUF conversions are cached under `cache_dir`."""
    folder, gguf_name = resolve_tokenizer_source(model_path)
    if gguf_name is None:
        return Tokenizer(_from_pretrained(folder))
    gguf_path = folder / gguf_name
    if cache_dir is None:
        return Tokenizer(_from_pretrained(folder, gguf_file=gguf_name))
    cached = Path(cache_dir) / _cache_key(gguf_path)
    if (cached / "tokenizer_config.json").is_file():
        return Tokenizer(_from_pretrained(cached))
    hf_tokenizer = _from_pretrained(folder, gguf_file=gguf_name)
    _save_atomically(hf_tokenizer, cached)
    return Tokenizer(hf_tokenizer)


def _cache_key(gguf_path: Path) -> str:
    resolved = gguf_path.resolve()
    stat = resolved.stat()
    identity = f"{resolved}|{stat.st_size}|{stat.st_mtime_ns}|transformers={transformers.__version__}"
    return hashlib.sha256(identity.encode()).hexdigest()[:24]


def _from_pretrained(folder: Path, gguf_file: str | None = None) -> PreTrainedTokenizerBase:
    what = folder / gguf_file if gguf_file else folder
    try:
        if gguf_file is None:
            return AutoTokenizer.from_pretrained(str(folder))
        return AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file)
    except Exception as exc:  # transformers raises many kinds; each becomes one clear load error
        raise ModelLoadError(f"cannot load the tokenizer of {what}: {exc}") from exc


def _save_atomically(hf_tokenizer: PreTrainedTokenizerBase, target: Path) -> None:
    """Write to a temporary sibling, then rename: a reader never sees a half-written cache entry."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        hf_tokenizer.save_pretrained(str(staging))
        try:
            staging.rename(target)
        except OSError:
            # Another process stored the same entry first: theirs is as good as ours.
            if not (target / "tokenizer_config.json").is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging)
