"""A model card's byte counts equal the parameter counts of the real transformers model of that shape."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers
from placement_helpers import cluster, make_node

from shoal.engine.config import ModelConfig
from shoal.engine.embedded import embedded_model_path
from shoal.engine.loader import load_config
from shoal.master.model_card import model_card_from_config
from shoal.master.placement import PlacementError, place
from shoal.master.shard_memory import stage_kv_bytes, stage_weight_bytes
from shoal.types.instance_ids import InstanceId
from shoal.types.instances import Instance, PlacementRequest

TINY: dict[str, Any] = {
    "vocab_size": 97,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}


def hf_model(arch: str, tie: bool) -> torch.nn.Module:
    config_cls = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
    }
    model_cls = {
        "llama": transformers.LlamaForCausalLM,
        "qwen2": transformers.Qwen2ForCausalLM,
        "qwen3": transformers.Qwen3ForCausalLM,
    }
    extra = {"head_dim": 16} if arch == "qwen3" else {}
    config = config_cls[arch](**TINY, **extra, tie_word_embeddings=tie)
    config.architectures = [model_cls[arch].__name__]
    return model_cls[arch](config)


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("tie", [False, True])
def test_card_bytes_match_the_real_parameter_counts(arch: str, tie: bool) -> None:
    model = hf_model(arch, tie)
    config = ModelConfig.from_hf_dict(model.config.to_dict())
    card = model_card_from_config(config, model_id="tiny", source="/tmp/tiny", dtype="float32")
    inner = model.model  # type: ignore[attr-defined]
    assert card.layer_bytes == 4 * numel(inner.layers[0])
    assert card.embedding_bytes == 4 * numel(inner.embed_tokens)
    assert card.head_bytes == 4 * (numel(inner.norm) + TINY["vocab_size"] * TINY["hidden_size"])
    assert card.weight_bytes == 4 * numel(model)  # parameters() yields a tied weight once
    assert (card.num_layers, card.num_heads, card.num_kv_heads) == (3, 4, 2)
    assert card.head_dim == (16 if arch == "qwen3" else 8)
    assert card.context_length == 128 and card.tie_word_embeddings == tie
    # a 2-stage split holds every layer once, plus the embedding first and the head last
    first, last = stage_weight_bytes(card, 0, 2), stage_weight_bytes(card, 2, 3)
    assert first + last == card.weight_bytes + (card.embedding_bytes if tie else 0)


def test_dtype_sets_the_bytes_per_element_and_the_kv_size() -> None:
    config = ModelConfig.from_hf_dict(hf_model("llama", False).config.to_dict())
    fp32 = model_card_from_config(config, model_id="t", source="s", dtype="float32")
    bf16 = model_card_from_config(config, model_id="t", source="s", dtype="bfloat16")
    assert fp32.weight_bytes == 2 * bf16.weight_bytes
    assert bf16.kv_bytes_per_token == 3 * 2 * 2 * 8 * 2  # layers * (k, v) * kv heads * head dim * bytes
    assert stage_kv_bytes(bf16, 3, 10) == 10 * bf16.kv_bytes_per_token
    assert stage_kv_bytes(bf16, 3, 10, tp_size=2) == 5 * bf16.kv_bytes_per_token


def test_known_total_scales_the_parts() -> None:
    config = ModelConfig.from_hf_dict(hf_model("llama", False).config.to_dict())
    base = model_card_from_config(config, model_id="t", source="s", dtype="bfloat16")
    doubled = model_card_from_config(
        config, model_id="t", source="s", dtype="bfloat16", weight_bytes=2 * base.weight_bytes
    )
    assert doubled.layer_bytes == 2 * base.layer_bytes and doubled.weight_bytes == 2 * base.weight_bytes
    with pytest.raises(ValueError, match="positive"):
        model_card_from_config(config, model_id="t", source="s", weight_bytes=0)
    with pytest.raises(ValueError, match="unsupported dtype"):
        model_card_from_config(config, model_id="t", source="s", dtype="int8")


def test_embedded_model_card_matches_its_gguf_tensors_and_places() -> None:
    """SmolLM2-135M: the card counts every parameter; its 9 heads cannot split in 2."""
    path = embedded_model_path()
    card = model_card_from_config(load_config(path), model_id="smollm2", source=str(path), dtype="bfloat16")
    # the published parameter count of SmolLM2-135M (what its GGUF tensors hold: tied, no output.weight)
    assert card.weight_bytes == 2 * 134_515_008
    nodes = cluster(make_node("a", 500 * 10**6), make_node("b", 500 * 10**6))
    request = PlacementRequest(model_id="smollm2", kv_headroom_tokens=1024)
    instance = place(card, nodes, {}, request, instance_id=InstanceId("i"))
    assert isinstance(instance, Instance) and instance.sharding == "pipeline"
    assert [(s.layer_start, s.layer_end) for s in instance.shards] == [(0, 15), (15, 30)]
    tensor = place(
        card, nodes, {}, request.model_copy(update={"sharding": "tensor"}), instance_id=InstanceId("i")
    )
    assert isinstance(tensor, PlacementError)
    assert "tensor parallel needs num_heads (9), num_kv_heads (3) divisible by world size 2" in tensor.reason
