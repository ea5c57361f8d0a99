"""Weight-only int8 / int4 quantization for the engine's linear layers and LM head (CPU and CUDA)."""

from shoal.engine.quant.apply import (
    DEFAULT_DENSE_COPY_BYTES,
    DEFAULT_INT4_GROUP_SIZE,
    QUANT_MODES,
    QuantizationSummary,
    QuantMode,
    quantize_model,
)
from shoal.engine.quant.formats import (
    Int4Weight,
    Int8Weight,
    dequantize_int4,
    dequantize_int8,
    quantize_int4,
    quantize_int8,
    relative_error,
)
from shoal.engine.quant.head import RefinedHeadKernel
from shoal.engine.quant.kernels import Int4Kernel, Int8Kernel

__all__ = [
    "DEFAULT_DENSE_COPY_BYTES",
    "DEFAULT_INT4_GROUP_SIZE",
    "QUANT_MODES",
    "Int4Kernel",
    "Int4Weight",
    "Int8Kernel",
    "Int8Weight",
    "QuantMode",
    "QuantizationSummary",
    "RefinedHeadKernel",
    "dequantize_int4",
    "dequantize_int8",
    "quantize_int4",
    "quantize_int8",
    "quantize_model",
    "relative_error",
]
