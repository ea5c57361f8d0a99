"""Load a model (HF safetensors folder or GGUF file) into `LlamaForCausalLM` for one shard.

Order of work, so that bad input fails before anything is half-loaded: resolve the path, read the config
and validate every file's header/tensor table, check the shard against the config, check every tensor
this shard needs is present, and only then read those tensors (and no others) one by one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from shoal.engine.config import ModelConfig
from shoal.engine.errors import ModelLoadError
from shoal.engine.loader.gguf_source import GGUFSource
from shoal.engine.loader.safetensors_source import SafetensorsSource
from shoal.engine.models import LlamaForCausalLM
from shoal.engine.parallel import Communicator, ShardSpec
from shoal.paths import user_path

__all__ = ["GGUFSource", "SafetensorsSource", "TensorSource", "load_config", "load_model", "open_source"]


class TensorSource(Protocol):
    config: ModelConfig

    def names(self) -> set[str]: ...

    def read(self, name: str) -> torch.Tensor: ...

    def close(self) -> None: ...


def open_source(path: str | Path) -> TensorSource:
    """A validated tensor source for a model folder, a .gguf file, or a folder holding one .gguf file."""
    path = user_path(path)
    if not path.exists():
        raise ModelLoadError(f"model path does not exist: {path}")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(
                f"{path} is not a model: expected a .gguf file or a Hugging Face model folder"
            )
        return GGUFSource(path)
    if (path / "config.json").is_file():
        return SafetensorsSource(path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return GGUFSource(ggufs[0])
    raise ModelLoadError(
        f"{path} is not a model: no config.json"
        + (f" and {len(ggufs)} .gguf files (pass one)" if ggufs else "")
    )


def load_config(path: str | Path) -> ModelConfig:
    source = open_source(path)
    source.close()
    return source.config


def load_model(
    path: str | Path,
    shard: ShardSpec | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    comm: Communicator | None = None,
    source: TensorSource | None = None,
) -> LlamaForCausalLM:
    source = source or open_source(path)
    try:
        shard = (shard or ShardSpec()).resolve(source.config)
        model = LlamaForCausalLM(source.config, shard, comm, dtype)
        targets = model.checkpoint_targets()
        missing = sorted(set(targets) - source.names())
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise ModelLoadError(f"{path}: missing tensors {', '.join(missing[:5])}{more}")
        for name, (param, shard_id) in targets.items():
            _load_param(name, param, source.read(name), shard_id)
    finally:
        source.close()
    return model.to(device).eval()


def _load_param(name: str, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None) -> None:
    loader = getattr(param, "weight_loader", None)
    try:
        if loader is not None:
            loader(param, loaded, shard_id)
        elif param.shape != loaded.shape:
            raise ValueError(f"shape {tuple(loaded.shape)} does not fit {tuple(param.shape)}")
        else:
            param.data.copy_(loaded)
    except (ValueError, RuntimeError, IndexError) as exc:  # a checkpoint tensor of the wrong shape
        raise ModelLoadError(f"tensor {name!r} of shape {tuple(loaded.shape)} does not fit: {exc}") from exc
