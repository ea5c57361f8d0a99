"""The model's shape and numerics, read once from a Hugging Face config.json or GGUF metadata.

`ModelConfig` is frozen plain data (no torch): model code, loader, placement and the scheduler all read it.
Unsupported architectures are rejected here, before any weight is touched.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal.engine.errors import ModelLoadError, UnsupportedModelError

# HF `architectures[0]` -> our family name. One model file (models/llama.py) serves them all.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
# HF `model_type` -> architecture, for configs that lack `architectures`.
_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
# GGUF `general.architecture` -> HF architecture.
GGUF_ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """Rotary frequency scaling.

    `kind`: "llama3" (Llama 3.1+ wavelength-dependent), "linear", or "freq_factors" (GGUF's precomputed
    per-frequency divisors in `factors`, which is how llama.cpp stores llama3 scaling).
    """

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    factors: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class ModelConfig:
    architecture: str  # HF class name, e.g. "LlamaForCausalLM"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]
    rope_scaling: RopeScaling | None = None
    attention_bias: bool = False
    qk_norm: bool = False
    bos_token_id: int | None = None
    dtype: str = "bfloat16"  # dtype the checkpoint was saved in

    @property
    def family(self) -> str:
        return SUPPORTED_ARCHITECTURES[self.architecture]

    @classmethod
    def from_hf_dir(cls, path: Path) -> ModelConfig:
        """Read `config.json` (and `generation_config.json` for extra EOS ids) from a model folder."""
        config = _read_json(path / "config.json")
        generation = (
            _read_json(path / "generation_config.json") if (path / "generation_config.json").is_file() else {}
        )
        return cls.from_hf_dict(config, generation)

    @classmethod
    def from_hf_dict(
        cls, config: Mapping[str, Any], generation: Mapping[str, Any] | None = None
    ) -> ModelConfig:
        architectures = config.get("architectures") or []
        model_type = str(config.get("model_type", "<none>"))
        architecture = architectures[0] if architectures else _MODEL_TYPES.get(model_type, model_type)
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported model architecture {architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        activation = config.get("hidden_act", "silu")
        if activation != "silu" or config.get("mlp_bias"):
            raise UnsupportedModelError(
                f"{architecture} with hidden_act={activation!r}, mlp_bias={config.get('mlp_bias')!r} is not "
                "supported (only silu without MLP bias)"
            )
        try:
            num_heads = int(config["num_attention_heads"])
            hidden_size = int(config["hidden_size"])
            head_dim = int(config.get("head_dim") or hidden_size // num_heads)
            # transformers >= 5 nests rope settings in `rope_parameters`; older files use rope_theta/rope_scaling.
            rope_params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
            rope_theta = float(rope_params.get("rope_theta", config.get("rope_theta", 10000.0)))
            max_positions = int(config.get("max_position_embeddings", 2048))
            # A sliding window at least as long as the context is plain causal attention; a shorter one is
            # honoured by never letting a sequence grow past it.
            window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
            if window is not None:
                max_positions = min(max_positions, int(window))
            eos = _eos_ids(config.get("eos_token_id")) + _eos_ids((generation or {}).get("eos_token_id"))
            return cls(
                architecture=architecture,
                vocab_size=int(config["vocab_size"]),
                hidden_size=hidden_size,
                intermediate_size=int(config["intermediate_size"]),
                num_layers=int(config["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
                head_dim=head_dim,
                rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=_rope_scaling(rope_params),
                max_position_embeddings=max_positions,
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                attention_bias=architecture == "Qwen2ForCausalLM"
                or bool(config.get("attention_bias", False)),
                qk_norm=architecture == "Qwen3ForCausalLM",
                bos_token_id=_optional_int(config.get("bos_token_id")),
                eos_token_ids=tuple(dict.fromkeys(eos)),
                dtype=_dtype_name(config.get("dtype") or config.get("torch_dtype") or "bfloat16"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"config.json is missing or has an invalid field: {exc!r}") from exc

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> ModelConfig:
        """Build from GGUF key/value metadata (`general.architecture`, `<arch>.block_count`, ...)."""
        arch = str(metadata.get("general.architecture", "<none>"))
        if arch not in GGUF_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported GGUF architecture {arch!r}; supported: {', '.join(GGUF_ARCHITECTURES)}"
            )

        def field(name: str, default: Any = None) -> Any:
            value = metadata.get(f"{arch}.{name}", default)
            if value is None:
                raise ModelLoadError(f"GGUF metadata lacks {arch}.{name}")
            return value

        try:
            num_heads = int(field("attention.head_count"))
            hidden_size = int(field("embedding_length"))
            head_dim = int(metadata.get(f"{arch}.attention.key_length") or hidden_size // num_heads)
            vocab = metadata.get(f"{arch}.vocab_size") or len(metadata.get("tokenizer.ggml.tokens") or ())
            scaling_type = metadata.get(f"{arch}.rope.scaling.type")
            rope_scaling = None
            if scaling_type == "linear":
                rope_scaling = RopeScaling(kind="linear", factor=float(field("rope.scaling.factor")))
            elif scaling_type not in (None, "none"):
                raise UnsupportedModelError(f"unsupported GGUF rope scaling type {scaling_type!r}")
            eos = metadata.get("tokenizer.ggml.eos_token_id")
            eot = metadata.get("tokenizer.ggml.eot_token_id")
            return cls(
                architecture=GGUF_ARCHITECTURES[arch],
                vocab_size=int(vocab),
                hidden_size=hidden_size,
                intermediate_size=int(field("feed_forward_length")),
                num_layers=int(field("block_count")),
                num_heads=num_heads,
                num_kv_heads=int(field("attention.head_count_kv", num_heads)),
                head_dim=head_dim,
                rms_norm_eps=float(field("attention.layer_norm_rms_epsilon", 1e-6)),
                rope_theta=float(field("rope.freq_base", 10000.0)),
                rope_scaling=rope_scaling,
                max_position_embeddings=int(field("context_length", 2048)),
                # Decided by the loader from the tensor list (no output.weight means tied).
                tie_word_embeddings=bool(metadata.get("_tie_word_embeddings", False)),
                attention_bias=arch == "qwen2",
                qk_norm=arch == "qwen3",
                bos_token_id=_optional_int(metadata.get("tokenizer.ggml.bos_token_id")),
                eos_token_ids=tuple(dict.fromkeys(_eos_ids(eos) + _eos_ids(eot))),
                dtype="float32",
            )
        except (TypeError, ValueError) as exc:
            raise ModelLoadError(f"GGUF metadata has an invalid field: {exc!r}") from exc


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelLoadError(f"{path} not found: not a Hugging Face model folder") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} is not a JSON object")
    return data


def _rope_scaling(params: Mapping[str, Any]) -> RopeScaling | None:
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "default":
        return None
    if kind == "llama3":
        return RopeScaling(
            kind="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
        )
    if kind == "linear":
        return RopeScaling(kind="linear", factor=float(params["factor"]))
    raise UnsupportedModelError(f"unsupported rope scaling type {kind!r}; supported: llama3, linear")


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, list | tuple):
        return tuple(int(v) for v in value)
    return (int(value),)


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _dtype_name(value: Any) -> str:
    name = str(value).removeprefix("torch.")
    return name if name in SUPPORTED_DTYPES else "bfloat16"
