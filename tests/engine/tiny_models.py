"""Tiny random-weight Hugging Face models for tests, written with transformers' own model classes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

ARCHS = ("llama", "smollm", "mistral", "qwen2", "qwen3")

_COMMON: dict[str, Any] = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def tiny_hf_config(arch: str, **overrides: Any) -> Any:
    """A transformers config object for `arch` (one of ARCHS) with tiny shapes."""
    import transformers

    kwargs = dict(_COMMON)
    if arch == "llama":
        kwargs["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        }
        kwargs["rope_theta"] = 500000.0
        kwargs["eos_token_id"] = [2, 3]  # Llama 3 style: several EOS ids
        cls = transformers.LlamaConfig
    elif arch == "smollm":
        kwargs["tie_word_embeddings"] = True
        kwargs["rope_theta"] = 100000.0
        cls = transformers.LlamaConfig
    elif arch == "mistral":
        kwargs["sliding_window"] = None
        cls = transformers.MistralConfig
    elif arch == "qwen2":
        cls = transformers.Qwen2Config
    elif arch == "qwen3":
        kwargs["head_dim"] = 32  # Qwen3 decouples head_dim from hidden / heads
        kwargs["tie_word_embeddings"] = True
        cls = transformers.Qwen3Config
    else:
        raise ValueError(f"unknown tiny arch {arch!r}; one of {ARCHS}")
    kwargs.update(overrides)
    return cls(**kwargs)


def tiny_hf_model(arch: str, seed: int = 0, **overrides: Any) -> Any:
    """A transformers causal LM with random weights (fp32, eval mode). Biases get random values too."""
    import transformers

    config = tiny_hf_config(arch, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:  # default init is zeros / ones: too easy to get wrong
                param.copy_(torch.randn_like(param) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model.eval()


def write_tiny_model(path: Path, arch: str, *, sharded: bool = False, seed: int = 0, **overrides: Any) -> Any:
    """Save a tiny model to `path` (config.json, generation_config.json, safetensors); returns the HF model.

    `sharded=True` splits the weights over several files with model.safetensors.index.json.
    """
    model = tiny_hf_model(arch, seed, **overrides)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, max_shard_size="40KB" if sharded else "2GB")
    return model
