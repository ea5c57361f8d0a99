"""Hugging Face safetensors folders (one file, or shards listed in model.safetensors.index.json).

Opening validates every file's header against its size, so a truncated or corrupt file is refused before
any weight is read. Tensors are then read one at a time, by name, only when asked for.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from shoal.engine.config import ModelConfig
from shoal.engine.errors import ModelLoadError, UnsupportedModelError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_DTYPE_SIZES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsSource:
    """Tensor names -> lazily read tensors, across all files of one model folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.config = ModelConfig.from_hf_dir(folder)
        quant = _read_config_field(folder, "quantization_config")
        if quant is not None:
            method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
            raise UnsupportedModelError(f"pre-quantized checkpoints ({method}) are not supported: {folder}")
        self._file_of: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for file in _weight_files(folder):
            for name, shape in _validated_header(file).items():
                self._file_of[name] = file
                self.shapes[name] = shape
        self._handles: dict[Path, Any] = {}

    def names(self) -> set[str]:
        return set(self._file_of)

    def read(self, name: str) -> torch.Tensor:
        file = self._file_of[name]
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = safe_open(str(file), framework="pt")
        tensor: torch.Tensor = handle.get_tensor(name)
        return tensor

    def close(self) -> None:
        self._handles.clear()


def _read_config_field(folder: Path, field: str) -> Any:
    return json.loads((folder / "config.json").read_text(encoding="utf-8")).get(field)


def _weight_files(folder: Path) -> list[Path]:
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted({folder / str(name) for name in weight_map.values()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelLoadError(f"corrupt safetensors index {index}: {exc!r}") from exc
        for file in files:
            if not file.is_file():
                raise ModelLoadError(f"{index} lists {file.name}, which is missing")
        return files
    if (folder / SINGLE_NAME).is_file():
        return [folder / SINGLE_NAME]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no safetensors weights in {folder}")
    return files


def _validated_header(file: Path) -> dict[str, tuple[int, ...]]:
    """Parse a safetensors header and check every tensor lies inside the file; name -> shape."""
    size = file.stat().st_size
    try:
        with file.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > min(size - 8, _MAX_HEADER):
                raise ModelLoadError(f"{file}: header length {header_len} exceeds the file ({size} bytes)")
            header = json.loads(f.read(header_len))
    except (struct.error, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{file} is not a valid safetensors file: {exc}") from exc
    if not isinstance(header, dict):
        raise ModelLoadError(f"{file} is not a valid safetensors file: header is not an object")
    data_size = size - 8 - header_len
    shapes: dict[str, tuple[int, ...]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = (
                entry["dtype"],
                tuple(int(d) for d in entry["shape"]),
                entry["data_offsets"],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"{file}: malformed header entry for {name!r}") from exc
        if dtype not in _DTYPE_SIZES:
            raise UnsupportedModelError(f"{file}: tensor {name!r} has unsupported dtype {dtype}")
        if end > data_size:
            raise ModelLoadError(
                f"{file} is truncated: tensor {name!r} ends at byte {end} of a {data_size}-byte data section"
            )
        if end - begin != math.prod(shape) * _DTYPE_SIZES[dtype]:
            raise ModelLoadError(f"{file}: tensor {name!r} size does not match its shape {shape} and {dtype}")
        shapes[name] = shape
    return shapes
