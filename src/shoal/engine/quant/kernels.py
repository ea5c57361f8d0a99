"""Weight kernels: callables `kernel(x) -> x @ W.T` that own a packed, quantized copy of W.

Each kernel has two paths, chosen per call by the number of rows M of x:
- M <= `small_m` (decode): torch's fused weight-only kernels, which read the packed weight once per row
  and are memory-bound, so fewer weight bytes is faster (CPU: `_weight_int8pack_mm`,
  `_weight_int4pack_mm_for_cpu`; CUDA: `_weight_int4pack_mm` (tinygemm, sm80+) and `_weight_int8pack_mm`
  where this torch build has it).
- larger M (prefill, big batches): those kernels' cost grows linearly with M, so past a crossover one
  dense GEMM in the compute dtype runs instead. With `dense=True` the kernel keeps that dense copy of W
  (2 bytes a weight: the quant module grants it while the copies of the whole model fit its budget) and
  switches at M > 4; without it W is dequantized per call, which pays off only later (int8: M > 8, int4:
  M > 128). Both give the same numbers: the copy is what the per-call dequantization would build.

Activations: the fused CPU kernels are vectorized for bf16/fp16 only (fp32 input is 10-100x slower), and
tinygemm takes bf16 only, so a kernel computes in `compute_dtype` and casts x in (and y back) when the
model runs in another dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shoal.engine.quant.formats import Int4Weight, Int8Weight

# Largest M that still goes through the fused kernel: the measured crossover with dequantize + GEMM
# (1 thread, SmolLM2 shapes). The int4 unpack is costlier than int8's cast, so int4 stays fused longer:
# at M=16 the fused int4 kernel takes 240 us where unpack + GEMM takes 1350 us (960x576), at M=64 850 vs
# 1450; int8 at M=16 already 270 us fused vs 215 us cast + GEMM.
CPU_SMALL_M_INT8 = 8
CPU_SMALL_M_INT4 = 128
# With a kept dense copy, the GEMM wins from M = 5 on (16 decode streams: 3072x576 int4 fused 662 us, bf16
# GEMM 362 us; at M = 4 they tie on warm caches, and the dense copy reads 4x the bytes from memory).
CPU_SMALL_M_DENSE = 4
CUDA_SMALL_M = 32


class Int8Kernel:
    """Per-output-channel int8 weight: y = (x @ q.T) * s."""

    format = "int8"

    def __init__(
        self, q: Int8Weight, device: torch.device, compute_dtype: torch.dtype, dense: bool = False
    ) -> None:
        self.out_features, self.in_features = q.codes.shape
        self.compute_dtype = compute_dtype
        self.codes = q.codes.to(device).contiguous()  # (N, K) int8
        self.scales = q.scales.to(device, compute_dtype)  # (N,)
        # the codes in the compute dtype (exact: they fit bf16's mantissa) for the GEMM path
        self.dense_codes = DenseWeight(self.codes.to(compute_dtype)) if dense else None
        self.small_m = _small_m(device, dense, CPU_SMALL_M_INT8)
        self.fused = has_fused_int8(device, compute_dtype)

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes

    @property
    def dense_nbytes(self) -> int:
        return _nbytes(self.dense_codes)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        if in_dtype != self.compute_dtype:
            x = x.to(self.compute_dtype)
        x2 = x.reshape(-1, self.in_features).contiguous()  # the fused kernels read rows densely
        if self.fused and x2.shape[0] <= self.small_m:
            y = torch._weight_int8pack_mm(x2, self.codes, self.scales)
        else:  # exact: int8 codes fit bf16's mantissa, and the per-row scale commutes with the product
            if self.dense_codes is not None:
                y = self.dense_codes(x2) * self.scales
            else:
                y = F.linear(x2, self.codes.to(self.compute_dtype)) * self.scales
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if in_dtype == self.compute_dtype else y.to(in_dtype)


class Int4Kernel:
    """Group-wise asymmetric int4 weight: W = (q - 8) * s + z per group of K."""

    format = "int4"

    def __init__(self, q: Int4Weight, device: torch.device, dense: bool = False) -> None:
        n, k = q.codes.shape
        g = q.group_size
        self.out_features, self.in_features, self.group_size = n, k, g
        self.compute_dtype = torch.bfloat16
        self.device = device
        self.small_m = _small_m(device, dense, CPU_SMALL_M_INT4)
        dt = self.compute_dtype
        # (K // g, N, 2): the layout torch's int4 kernels read their scales and zeros in
        self.scales_and_zeros = (
            torch.stack([q.scales, q.zeros], dim=-1).transpose(0, 1).contiguous().to(device, dt)
        )
        if device.type == "cuda":
            pairs = q.codes.to(torch.int32)
            packed_in = ((pairs[:, ::2] << 4) | pairs[:, 1::2]).to(torch.uint8).to(device)  # (N, K/2)
            self.packed = torch._convert_weight_to_int4pack(packed_in, _inner_k_tiles(k))
        else:
            self.packed = torch._convert_weight_to_int4pack_for_cpu(q.codes.to(torch.int32), 1)
        # For the dequantize path: the two halves of each group in one byte's low and high nibble, so
        # unpacking is two bit ops and one cat (no interleave).
        groups = q.codes.reshape(n, k // g, g)
        self.nibbles = (groups[..., : g // 2] | (groups[..., g // 2 :] << 4)).to(device)  # (N, G, g/2)
        self.group_scales = q.scales[..., None].to(device, dt)  # (N, G, 1)
        self.group_offsets = (q.zeros - 8 * q.scales)[..., None].to(device, dt)  # (N, G, 1)
        self.dense_weight = DenseWeight(self.dequantize()) if dense else None  # (N, K) compute dtype

    @property
    def nbytes(self) -> int:
        return (
            self.packed.nbytes
            + self.nibbles.nbytes
            + self.scales_and_zeros.nbytes
            + self.group_scales.nbytes
            + self.group_offsets.nbytes
        )

    @property
    def dense_nbytes(self) -> int:
        return _nbytes(self.dense_weight)

    def dequantize(self) -> torch.Tensor:
        codes = torch.cat([self.nibbles & 15, self.nibbles >> 4], dim=-1).to(self.compute_dtype)
        w = torch.addcmul(self.group_offsets, codes, self.group_scales)  # (N, G, g)
        return w.reshape(self.out_features, self.in_features)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        if in_dtype != self.compute_dtype:
            x = x.to(self.compute_dtype)
        x2 = x.reshape(-1, self.in_features).contiguous()  # the fused kernels read rows densely
        if x2.shape[0] > self.small_m:
            y = self.dense_weight(x2) if self.dense_weight is not None else F.linear(x2, self.dequantize())
        elif self.device.type == "cuda":
            y = torch._weight_int4pack_mm(x2, self.packed, self.group_size, self.scales_and_zeros)
        else:
            y = torch._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_and_zeros)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if in_dtype == self.compute_dtype else y.to(in_dtype)


class DenseKernel:
    """An unquantized bf16 weight, prepacked for oneDNN on CPU (see `DenseWeight`).

    `F.linear` reorders a plain bf16 weight on every call, which at decode sizes costs as much as the
    product itself (3072x576, 1 row: 204 vs 109 us; the 49152x576 head: 7.5 vs 4.4 ms).
    """

    format = "none"

    def __init__(self, weight: torch.Tensor) -> None:
        self.out_features, self.in_features = weight.shape
        self.dense = DenseWeight(weight)

    @property
    def nbytes(self) -> int:
        return self.dense.nbytes

    @property
    def dense_nbytes(self) -> int:
        return 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dense(x.reshape(-1, self.in_features))
        return y.reshape(*x.shape[:-1], self.out_features)


def packs_dense(weight: torch.Tensor) -> bool:
    """Whether `DenseKernel` prepacks this weight (CPU bf16 with oneDNN), i.e. is worth installing."""
    return weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and _has_mkldnn_linear()


def _small_m(device: torch.device, dense: bool, per_call_dequantize: int) -> int:
    if device.type == "cuda":
        return CUDA_SMALL_M
    return CPU_SMALL_M_DENSE if dense else per_call_dequantize


def _nbytes(weight: DenseWeight | None) -> int:
    return 0 if weight is None else weight.nbytes


class DenseWeight:
    """A dense (N, K) weight for x @ W.T, in oneDNN's blocked layout on CPU when this build has oneDNN.

    The prepacked product is bit-identical to `F.linear` on the plain weight and 1.2-2x faster for the
    few-row products of batched decode (16 rows x 3072x576: 308 vs 438 us), since F.linear reorders the
    weight on every call; inductor packs linear weights the same way.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        self.out_features, self.in_features = weight.shape
        self.nbytes = weight.nbytes
        self.packed = weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and _has_mkldnn_linear()
        self.weight = (
            torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), CPU_SMALL_M_DENSE * 4)
            if self.packed
            else weight
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (M, K) -> (M, N)
        if self.packed:
            return _packed_linear(x, self.weight)
        return F.linear(x, self.weight)


def _packed_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return torch.ops.shoal.packed_linear(x, packed, packed.shape[0])
    return _mkldnn_linear(x, packed)


def _mkldnn_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int = 0) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


# Inductor lowers oneDNN's linear only for weights it packed itself (graph constants), and our weights are
# graph inputs (`LlamaForCausalLM.compile_decode`). As an op of our own the product is one opaque call
# inside the graph, not a graph break. Defined through `torch.library.Library` rather than `custom_op`,
# whose Python wrapper costs ~20 us a call (16 rows x 576x576: 75-81 vs 55-61 us).
_LIBRARY = torch.library.Library("shoal", "DEF")
_LIBRARY.define("packed_linear(Tensor x, Tensor packed, SymInt out_features) -> Tensor")
_LIBRARY.impl("packed_linear", _mkldnn_linear, "CompositeExplicitAutograd")


@torch.library.register_fake("shoal::packed_linear")
def _packed_linear_shape(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features)


_MKLDNN_LINEAR: list[bool] = []


def _has_mkldnn_linear() -> bool:
    """Whether oneDNN's prepacked bf16 linear runs here and matches F.linear (probed once)."""
    if not _MKLDNN_LINEAR:
        ok = False
        if torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled:
            try:
                w = torch.arange(64, dtype=torch.bfloat16).reshape(8, 8) / 64
                x = torch.ones(3, 8, dtype=torch.bfloat16)
                packed = torch.ops.mkldnn._reorder_linear_weight(w, 4)
                y = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
                ok = bool(torch.equal(y, F.linear(x, w)))
            except (RuntimeError, AttributeError, NotImplementedError):  # op missing from this build
                ok = False
        _MKLDNN_LINEAR.append(ok)
    return _MKLDNN_LINEAR[0]


def int4_supported(out_features: int, in_features: int, group_size: int, device: torch.device) -> bool:
    """Whether this device's int4 kernel takes a weight of this shape and group size."""
    if group_size < 2 or group_size % 2 or in_features % group_size:
        return False
    if device.type == "cuda":
        # tinygemm: Ampere or newer, N a multiple of 8, K a multiple of 16 * innerKTiles (2 at least)
        major, _ = torch.cuda.get_device_capability(device)
        return (
            major >= 8
            and out_features % 8 == 0
            and in_features % 32 == 0
            and group_size in (32, 64, 128, 256)
        )
    return device.type == "cpu"


def _inner_k_tiles(in_features: int) -> int:
    return next(t for t in (8, 4, 2) if in_features % (16 * t) == 0)


_FUSED_INT8: dict[tuple[str, torch.dtype], bool] = {}


def has_fused_int8(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `_weight_int8pack_mm` runs on this device type and dtype (probed once on a tiny input)."""
    key = (device.type, dtype)
    if key not in _FUSED_INT8:
        try:
            x = torch.ones(1, 32, dtype=dtype, device=device)
            w = torch.ones(8, 32, dtype=torch.int8, device=device)
            s = torch.ones(8, dtype=dtype, device=device)
            y = torch._weight_int8pack_mm(x, w, s)
            _FUSED_INT8[key] = bool(torch.all(y == 32).item())
        except (RuntimeError, NotImplementedError):  # no kernel registered for this backend or dtype
            _FUSED_INT8[key] = False
    return _FUSED_INT8[key]
