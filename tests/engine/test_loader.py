"""Loading: safetensors (single, sharded), GGUF (tiny written here, and the embedded SmolLM2), bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from shoal.engine.batch import ScheduledChunk
from shoal.engine.errors import ModelLoadError, UnsupportedModelError
from shoal.engine.loader import load_model, open_source
from shoal.engine.model_runner import ModelRunner
from shoal.engine.parallel import ShardSpec
from tests.engine.gguf_writer import write_tiny_gguf
from tests.engine.tiny_models import tiny_hf_model, write_tiny_model

PROMPT = (5, 17, 200, 33, 4, 99, 150, 7, 61, 12)


def last_logits(path: Path) -> torch.Tensor:
    runner = ModelRunner(path, dtype=torch.float32, kv_cache_bytes=1 << 20, block_size=4)
    return runner.execute([ScheduledChunk(0, PROMPT, 0, (0, 1, 2), sample=True)])[0]


def hf_last_logits(hf_model: object) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([PROMPT])).logits[0, -1]  # type: ignore[operator]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny")
    write_tiny_model(path, "smollm")
    return path


def test_sharded_safetensors_with_index_load(tmp_path: Path) -> None:
    hf_model = write_tiny_model(tmp_path, "qwen2", sharded=True)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    torch.testing.assert_close(last_logits(tmp_path), hf_last_logits(hf_model), atol=1e-4, rtol=0)


def test_only_the_shards_tensors_are_read(tmp_path: Path) -> None:
    write_tiny_model(tmp_path, "llama", sharded=True)
    source = open_source(tmp_path)
    read: list[str] = []
    original = source.read

    def recording_read(name: str) -> torch.Tensor:
        read.append(name)
        return original(name)

    source.read = recording_read  # type: ignore[method-assign]
    load_model(
        tmp_path, ShardSpec(tp_rank=1, tp_size=2, layer_start=1, layer_end=2), torch.float32, source=source
    )
    assert read and all(name.startswith("model.layers.1.") for name in read)


@pytest.mark.parametrize(
    ("arch", "gguf_arch"), [("smollm", "llama"), ("llama", "llama"), ("qwen2", "qwen2"), ("qwen3", "qwen3")]
)
def test_tiny_gguf_matches_transformers(tmp_path: Path, arch: str, gguf_arch: str) -> None:
    """llama-architecture files hold Q/K permuted (and llama3 scaling as rope_freqs); qwen files do not."""
    hf_model = tiny_hf_model(arch)
    path = write_tiny_gguf(tmp_path / "model.gguf", hf_model, gguf_arch)
    torch.testing.assert_close(last_logits(path), hf_last_logits(hf_model), atol=1e-4, rtol=0)


def test_quantized_gguf_loads_dequantized(tmp_path: Path) -> None:
    hf_model = tiny_hf_model("smollm")
    path = write_tiny_gguf(tmp_path / "q8.gguf", hf_model, "llama", gguf.GGMLQuantizationType.Q8_0)
    q_weight = load_model(path, dtype=torch.float32).layers[0].self_attn.o_proj.weight
    torch.testing.assert_close(q_weight, hf_model.model.layers[0].self_attn.o_proj.weight, atol=2e-3, rtol=0)


@pytest.mark.slow
def test_embedded_smollm2_matches_transformers_gguf() -> None:
    from transformers import AutoModelForCausalLM

    from shoal.engine.embedded import embedded_model_path

    path = embedded_model_path()
    hf_model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    expected = hf_last_logits(hf_model)
    runner = ModelRunner(path, dtype=torch.float32, kv_cache_bytes=64 << 20, block_size=16, max_model_len=512)
    assert runner.config.tie_word_embeddings and runner.config.num_layers == 30
    got = runner.execute([ScheduledChunk(0, PROMPT, 0, (0,), sample=True)])[0]
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=0)
    assert int(got.argmax()) == int(expected.argmax())


# --- bad input ---------------------------------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        open_source(tmp_path / "nope")


def test_folder_that_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelLoadError, match="not a model"):
        open_source(tmp_path)
    with pytest.raises(ModelLoadError, match="not a model"):
        open_source(tmp_path / "notes.txt")


def test_garbage_config(tmp_path: Path, tiny_dir: Path) -> None:
    shutil.copytree(tiny_dir, tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        open_source(tmp_path / "m")


def test_unsupported_architecture(tmp_path: Path, tiny_dir: Path) -> None:
    shutil.copytree(tiny_dir, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        open_source(tmp_path / "m")


def test_truncated_safetensors(tmp_path: Path, tiny_dir: Path) -> None:
    shutil.copytree(tiny_dir, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match="truncated"):
        load_model(tmp_path / "m")


def test_garbage_safetensors(tmp_path: Path, tiny_dir: Path) -> None:
    shutil.copytree(tiny_dir, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage-garbage!")
    with pytest.raises(ModelLoadError, match="not a valid safetensors"):
        load_model(tmp_path / "m")


def test_missing_tensor(tmp_path: Path, tiny_dir: Path) -> None:
    shutil.copytree(tiny_dir, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    tensors = load_file(weights)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, weights)
    with pytest.raises(ModelLoadError, match=r"missing tensors model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(tmp_path / "m")
    # a stage that does not hold layer 1 never needs it
    load_model(tmp_path / "m", ShardSpec(layer_start=2), torch.float32)


def test_wrong_tensor_shape(tmp_path: Path, tiny_dir: Path) -> None:
    shutil.copytree(tiny_dir, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.layers.0.mlp.down_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, weights)
    with pytest.raises(ModelLoadError, match="down_proj"):
        load_model(tmp_path / "m")


def test_truncated_and_garbage_gguf(tmp_path: Path) -> None:
    good = write_tiny_gguf(tmp_path / "good.gguf", tiny_hf_model("smollm"))
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size - 1000])
    with pytest.raises(ModelLoadError, match="truncated"):
        load_model(truncated)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(ModelLoadError, match="GGUF"):
        load_model(garbage)


def test_unsupported_gguf_architecture_and_tensor_type(tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(tmp_path / "gpt2.gguf", "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        open_source(tmp_path / "gpt2.gguf")
    writer = gguf.GGUFWriter(tmp_path / "i8.gguf", "llama")
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((64, 64), dtype=np.int8))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match="unsupported type I8"):
        open_source(tmp_path / "i8.gguf")


def test_gguf_missing_tensor(tmp_path: Path) -> None:
    hf_model = tiny_hf_model("smollm")
    path = write_tiny_gguf(tmp_path / "partial.gguf", hf_model, skip=("model.layers.0.mlp.up_proj.weight",))
    with pytest.raises(ModelLoadError, match="missing tensors"):
        load_model(path)


# --- config ------------------------------------------------------------------------------------------------


def test_config_reads_every_eos_id_rope_scaling_and_sliding_window(tmp_path: Path) -> None:
    from shoal.engine.config import ModelConfig

    write_tiny_model(tmp_path / "llama", "llama")
    generation = json.loads((tmp_path / "llama" / "generation_config.json").read_text())
    generation["eos_token_id"] = [2, 7]
    (tmp_path / "llama" / "generation_config.json").write_text(json.dumps(generation))
    config = ModelConfig.from_hf_dir(tmp_path / "llama")
    assert config.eos_token_ids == (2, 3, 7)  # config.json's list plus generation_config's extra id
    assert config.rope_scaling is not None and config.rope_scaling.kind == "llama3"
    assert config.rope_scaling.factor == 8.0 and config.rope_theta == 500000.0
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (4, 2, 16)

    write_tiny_model(tmp_path / "mistral", "mistral", sliding_window=64)
    assert ModelConfig.from_hf_dir(tmp_path / "mistral").max_position_embeddings == 64

    write_tiny_model(tmp_path / "qwen3", "qwen3")
    qwen3 = ModelConfig.from_hf_dir(tmp_path / "qwen3")
    assert qwen3.qk_norm and qwen3.tie_word_embeddings and qwen3.head_dim == 32 and not qwen3.attention_bias


def test_pre_quantized_and_unsupported_activation_are_refused(tmp_path: Path, tiny_dir: Path) -> None:
    for field, value, message in [
        ("quantization_config", {"quant_method": "gptq"}, "gptq"),
        ("hidden_act", "gelu", "gelu"),
    ]:
        folder = tmp_path / field
        shutil.copytree(tiny_dir, folder)
        config = json.loads((folder / "config.json").read_text())
        config[field] = value
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(UnsupportedModelError, match=message):
            open_source(folder)
