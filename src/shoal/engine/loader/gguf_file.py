"""A lean reader for the GGUF container: metadata and the tensor table, tensor bytes memory-mapped.

Why not `gguf.GGUFReader`: it builds a numpy view for every element of the tokenizer's string arrays,
which takes ~6 s for SmolLM2's 49k tokens and merges; here string arrays are skipped (only their length
is kept) and parsing takes milliseconds. Dequantization still goes through `gguf.quants.dequantize`.
Layout (GGUF v2/v3): magic, version, tensor count, metadata count, metadata key/values, tensor infos
(name, dims fastest-first, type, offset), then tensor data aligned to `general.alignment`.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quant_shape_to_byte_shape

from shoal.engine.errors import ModelLoadError

_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_NUMPY = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "<u1",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}
_STRING, _ARRAY = 8, 9
_PLAIN = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}


@dataclass(frozen=True, slots=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # row-major (slowest first), as torch wants it
    tensor_type: GGMLQuantizationType
    data: np.ndarray  # F32/F16: values; others: raw bytes shaped (..., row bytes) for gguf.quants


class GGUFFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            buffer = np.memmap(path, mode="r")
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot read {path}: {exc}") from exc
        self._buffer = buffer
        self._raw: memoryview = buffer.data  # what struct.unpack_from reads
        self._pos = 0
        try:
            if bytes(buffer[:4]) != b"GGUF":
                raise ModelLoadError(f"{path} is not a GGUF file (bad magic)")
            version, num_tensors, num_fields = struct.unpack_from("<IQQ", self._raw, 4)
            self._pos = 24
            if version not in (2, 3):
                raise ModelLoadError(f"{path}: unsupported GGUF version {version}")
            self.metadata: dict[str, Any] = {}
            for _ in range(num_fields):
                key = self._string()
                self.metadata[key] = self._value(struct.unpack_from("<I", self._raw, self._next(4))[0], key)
            infos = [self._tensor_info() for _ in range(num_tensors)]
        except (struct.error, UnicodeDecodeError, ValueError, IndexError, OverflowError) as exc:
            raise ModelLoadError(
                f"{path} is not a readable GGUF file (truncated or corrupt?): {exc}"
            ) from exc
        alignment = int(self.metadata.get("general.alignment", 32))
        data_start = -(-self._pos // alignment) * alignment
        self.tensors: dict[str, GGUFTensor] = {}
        for name, dims, tensor_type, offset in infos:
            self.tensors[name] = self._tensor(name, dims, tensor_type, data_start + offset)

    def _next(self, size: int) -> int:
        pos = self._pos
        self._pos += size
        if self._pos > len(self._buffer):
            raise ModelLoadError(f"{self.path} is truncated (metadata runs past the end of the file)")
        return pos

    def _string(self) -> str:
        (length,) = struct.unpack_from("<Q", self._raw, self._next(8))
        start = self._next(length)
        return bytes(self._buffer[start : start + length]).decode("utf-8")

    def _value(self, value_type: int, key: str) -> Any:
        if value_type in _SCALARS:
            fmt = _SCALARS[value_type]
            return struct.unpack_from(fmt, self._raw, self._next(struct.calcsize(fmt)))[0]
        if value_type == _STRING:
            return self._string()
        if value_type != _ARRAY:
            raise ValueError(f"metadata {key!r} has unknown value type {value_type}")
        item_type, count = struct.unpack_from("<IQ", self._raw, self._next(12))
        if item_type in _NUMPY:
            size = np.dtype(_NUMPY[item_type]).itemsize * count
            start = self._next(size)
            return np.frombuffer(self._buffer, _NUMPY[item_type], count, start).tolist()
        if item_type == _STRING:  # skipped, not decoded: tokenizer vocabularies are large
            for _ in range(count):
                (length,) = struct.unpack_from("<Q", self._raw, self._next(8))
                self._next(length)
            return _SkippedStrings(count)
        return [self._value(item_type, key) for _ in range(count)]

    def _tensor_info(self) -> tuple[str, tuple[int, ...], int, int]:
        name = self._string()
        (num_dims,) = struct.unpack_from("<I", self._raw, self._next(4))
        dims = struct.unpack_from(f"<{num_dims}Q", self._raw, self._next(8 * num_dims))
        tensor_type, offset = struct.unpack_from("<IQ", self._raw, self._next(12))
        return name, tuple(int(d) for d in dims), tensor_type, offset

    def _tensor(self, name: str, dims: tuple[int, ...], raw_type: int, start: int) -> GGUFTensor:
        try:
            tensor_type = GGMLQuantizationType(raw_type)
            block_size, type_size = GGML_QUANT_SIZES[tensor_type]
        except (ValueError, KeyError) as exc:
            raise ModelLoadError(f"{self.path}: tensor {name!r} has unknown type {raw_type}") from exc
        shape = tuple(reversed(dims))
        num_bytes = math.prod(dims) * type_size // block_size
        if start + num_bytes > len(self._buffer):
            raise ModelLoadError(f"{self.path} is truncated: tensor {name!r} runs past the end of the file")
        if len(dims) == 0 or dims[0] % block_size:
            raise ModelLoadError(
                f"{self.path}: tensor {name!r} has a row of {dims[:1]} not in {block_size}-blocks"
            )
        if tensor_type in _PLAIN:
            dtype = _PLAIN[tensor_type]
            data = np.frombuffer(self._buffer, dtype, math.prod(dims), start).reshape(shape)
        else:
            data = np.frombuffer(self._buffer, np.uint8, num_bytes, start)
            data = data.reshape(quant_shape_to_byte_shape(shape, tensor_type))
        return GGUFTensor(name, shape, tensor_type, data)


class _SkippedStrings:
    """Stands in for a string array that was not decoded; only its length is known."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __len__(self) -> int:
        return self.count
