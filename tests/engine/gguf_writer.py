"""Write a tiny GGUF file from a transformers model the way llama.cpp's converter does (Q/K permuted)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def permute_for_llama_cpp(weights: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp convert_hf_to_gguf.py's `permute`: half-split rotary rows -> interleaved pairs."""
    rows = weights.shape[0]
    return (
        weights.reshape(num_heads, 2, rows // num_heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def gguf_name(hf_name: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if hf_name in fixed:
        return fixed[hf_name]
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, layer, *rest = hf_name.split(".")
    module, kind = ".".join(rest[:-1]), rest[-1]
    return f"blk.{layer}.{_LAYER_NAMES[module]}.{kind}"


def write_tiny_gguf(
    path: Path,
    hf_model: Any,
    arch: str = "llama",
    tensor_type: gguf.GGMLQuantizationType | None = None,
    skip: tuple[str, ...] = (),
) -> Path:
    """Write `hf_model`'s weights as GGUF `arch` (F32, or `tensor_type` for the 2-D matrices)."""
    config = hf_model.config
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    rope = config.rope_parameters
    if rope.get("rope_type") == "llama3":  # llama.cpp stores llama3 scaling as per-frequency divisors
        from shoal.engine.config import RopeScaling
        from shoal.engine.layers.rotary import inverse_frequencies

        scaling = RopeScaling(
            "llama3",
            rope["factor"],
            rope["low_freq_factor"],
            rope["high_freq_factor"],
            rope["original_max_position_embeddings"],
        )
        base = inverse_frequencies(head_dim, rope["rope_theta"], None)
        writer.add_tensor(
            "rope_freqs.weight", (base / inverse_frequencies(head_dim, rope["rope_theta"], scaling)).numpy()
        )
    tied = config.tie_word_embeddings
    for name, tensor in hf_model.state_dict().items():
        if (tied and name == "lm_head.weight") or name in skip:
            continue
        weights = tensor.detach().float()
        if arch == "llama" and name.endswith("q_proj.weight"):
            weights = permute_for_llama_cpp(weights, config.num_attention_heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            weights = permute_for_llama_cpp(weights, config.num_key_value_heads)
        array = weights.numpy().astype(np.float32)
        if tensor_type is not None and array.ndim == 2:
            writer.add_tensor(
                gguf_name(name), gguf.quants.quantize(array, tensor_type), raw_dtype=tensor_type
            )
        else:
            writer.add_tensor(gguf_name(name), array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
