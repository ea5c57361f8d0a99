"""GGUF files (llama.cpp), parsed by `gguf_file` and dequantized to float through the `gguf` package.

Tensor names are mapped to Hugging Face's so one loading path serves both formats. llama.cpp stores the
Q and K projections of Llama-architecture models permuted for its interleaved rotary layout; reading
undoes it so they match the half-split layout of our rotary embedding (Qwen2/Qwen3 files are not
permuted). Llama 3.x files carry their rope scaling as a `rope_freqs.weight` tensor of per-frequency
factors, which becomes the config's rope scaling.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from shoal.engine.config import ModelConfig, RopeScaling
from shoal.engine.errors import ModelLoadError, UnsupportedModelError
from shoal.engine.loader.gguf_file import GGUFFile, GGUFTensor

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_SKIPPED = {"rope_freqs.weight"}
_PLAIN_TYPES = {GGMLQuantizationType.F32, GGMLQuantizationType.F16}
_SUPPORTED_QUANT_TYPES: set[GGMLQuantizationType] = set()  # probed once per type
# Metadata arrays we never need as Python values (they are large).
_BULK_FIELDS = (
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
)


class GGUFSource:
    """Tensor names (Hugging Face's) -> dequantized float32 tensors, read lazily from one GGUF file."""

    def __init__(self, file: Path) -> None:
        self.file = file
        gguf_file = GGUFFile(file)
        self._tensors = gguf_file.tensors
        for tensor in self._tensors.values():
            _check_type(file, tensor)
        metadata = dict(gguf_file.metadata)
        metadata["_tie_word_embeddings"] = "output.weight" not in self._tensors
        config = ModelConfig.from_gguf_metadata(metadata)
        self._permute_qk = metadata.get("general.architecture") in ("llama", "mistral")
        self._hf_to_gguf: dict[str, str] = {}
        for name in self._tensors:
            if name in _SKIPPED:
                continue
            hf_name = _hf_name(name)
            if hf_name is None:
                raise UnsupportedModelError(
                    f"{file}: unexpected tensor {name!r} for a {config.architecture} model"
                )
            self._hf_to_gguf[hf_name] = name
        if "rope_freqs.weight" in self._tensors:
            factors = tuple(self._dequantized("rope_freqs.weight").reshape(-1).tolist())
            config = replace(
                config, rope_scaling=RopeScaling(kind="freq_factors", factor=1.0, factors=factors)
            )
        self.config = config

    def names(self) -> set[str]:
        return set(self._hf_to_gguf)

    def read(self, name: str) -> torch.Tensor:
        weights = torch.from_numpy(self._dequantized(self._hf_to_gguf[name]))
        if self._permute_qk and name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            heads = self.config.num_heads if "q_proj" in name else self.config.num_kv_heads
            weights = _unpermute(weights, heads)
        return weights

    def close(self) -> None:
        self._tensors = {}

    def _dequantized(self, gguf_name: str) -> np.ndarray:
        tensor = self._tensors[gguf_name]
        try:
            array = dequantize(tensor.data, tensor.tensor_type).reshape(tensor.shape)
        except (ValueError, NotImplementedError) as exc:
            raise ModelLoadError(f"{self.file}: cannot decode tensor {gguf_name!r}: {exc}") from exc
        # F32 tensors come back as read-only views of the memory-mapped file; torch wants its own copy.
        array = np.ascontiguousarray(array, dtype=np.float32)
        return array if array.flags.writeable else array.copy()


def _unpermute(weights: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's rotary permutation of a Q/K weight (out = heads * head_dim rows)."""
    rows = weights.shape[0]
    # stored as (heads, head_dim/2, 2, in) (pairs interleaved) -> (heads, 2, head_dim/2, in) (halves)
    return (
        weights.reshape(num_heads, rows // num_heads // 2, 2, *weights.shape[1:])
        .transpose(1, 2)
        .reshape(weights.shape)
    )


def _hf_name(name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = _LAYER_RE.fullmatch(name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        return None
    return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.{match.group(3)}"


def _check_type(file: Path, tensor: GGUFTensor) -> None:
    qtype = tensor.tensor_type
    if qtype in _PLAIN_TYPES or qtype in _SUPPORTED_QUANT_TYPES:
        return
    try:  # probe the gguf package with one zero block of this type
        dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8), qtype)
    except (NotImplementedError, KeyError) as exc:
        raise UnsupportedModelError(
            f"{file}: tensor {tensor.name!r} has unsupported type {qtype.name}"
        ) from exc
    _SUPPORTED_QUANT_TYPES.add(qtype)
