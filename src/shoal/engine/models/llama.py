"""The Llama family in one file: Llama 2/3/3.x, SmolLM/SmolLM2, Mistral, Qwen2 (qkv bias), Qwen3 (q/k norm).

Inputs per step (built by the model runner): T new tokens of many sequences flattened into one row each,
their positions, the shared `AttentionMetadata`, and this stage's KV cache (one tensor per held layer, see `PagedAttention`).
The model holds only layers [layer_start, layer_end) of its `ShardSpec`: the first stage owns the
embedding and takes token ids, the others take the previous stage's hidden states (the residual stream,
(T, hidden)); the last stage owns the final norm and LM head (`compute_logits`). The same code serves any
tensor-parallel size: the parallel layers hold only their rank's heads and MLP columns.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch._dynamo.exc
import torch._inductor.exc
import torch.nn.functional as F
from torch import nn

from shoal.engine.config import ModelConfig
from shoal.engine.layers import (
    AttentionMetadata,
    MergedColumnParallelLinear,
    PagedAttention,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
    apply_rotary,
)
from shoal.engine.models.compiled_decode import CompiledDecode
from shoal.engine.parallel import Communicator, ShardSpec, SingleProcessCommunicator

KVCache = torch.Tensor  # per layer: (num_blocks, block_size, 2, num_kv_heads_local, head_dim), k then v


_log = logging.getLogger(__name__)

# Compiled decode steps (see `LlamaForCausalLM.compile_decode`) of up to this many sequences run inductor's
# own kernels on one thread: one stream (torch specializes a batch of 1) and batches of 2-4 (a second
# graph: 4 streams of the embedded model 17-18 vs 22-26 ms a step eager). Larger batches go through a third
# graph whose kernels use the step's threads (16 streams of the embedded model, 2 threads: 34-37 ms a step
# vs 42-55 with one thread and 43-58 eager); their weight products take the prepacked dense copies
# (`CPU_SMALL_M_DENSE`, the same bound).
COMPILED_DECODE_SMALL_ROWS = 4
# What a failed compile raises (inductor wraps its C++ compiler's errors in BackendCompilerFailed).
COMPILE_FAILURES: tuple[type[Exception], ...] = (
    torch._dynamo.exc.TorchDynamoException,
    torch._inductor.exc.CppCompileError,
    torch._inductor.exc.InvalidCxxCompiler,
)


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, shard: ShardSpec, comm: Communicator, dtype: torch.dtype) -> None:
        super().__init__()
        tp = shard.tp_size
        self.num_heads = config.num_heads // tp  # local
        self.num_kv_heads = config.num_kv_heads // tp  # local
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            config.head_dim,
            config.num_heads,
            config.num_kv_heads,
            config.attention_bias,
            dtype,
            shard.tp_rank,
            tp,
        )
        self.o_proj = RowParallelLinear(
            config.num_heads * config.head_dim, config.hidden_size, False, dtype, shard.tp_rank, tp, comm
        )
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, dtype) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, dtype) if config.qk_norm else None
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim)

    def forward(
        self,
        x: torch.Tensor,  # (T, hidden)
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: KVCache,
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)  # (T, (H + 2 * Hkv) * D)
        qk_size = self.q_size + self.kv_size
        # q and k are rotated in place, so k and v stay side by side in qkv: one cache write for both
        if self.q_norm is not None and self.k_norm is not None:
            q = qkv[:, : self.q_size].view(num_tokens, self.num_heads, self.head_dim)  # (T, H, D)
            k = qkv[:, self.q_size : qk_size].view(num_tokens, self.num_kv_heads, self.head_dim)
            q.copy_(apply_rotary(self.q_norm(q), cos, sin))
            k.copy_(apply_rotary(self.k_norm(k), cos, sin))
        else:  # rotate q and k heads in one go: fewer, larger elementwise kernels
            qk = qkv[:, :qk_size].view(num_tokens, self.num_heads + self.num_kv_heads, self.head_dim)
            qk.copy_(apply_rotary(qk, cos, sin))  # (dynamo refuses a strided out=)
        q = qkv[:, : self.q_size].view(num_tokens, self.num_heads, self.head_dim)  # (T, H, D)
        kv = qkv[:, self.q_size :].view(num_tokens, 2, self.num_kv_heads, self.head_dim)  # (T, 2, Hkv, D)
        out = self.attn(q, kv, kv_cache, meta)  # (T, H * D)
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, shard: ShardSpec, comm: Communicator, dtype: torch.dtype) -> None:
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [size, size], False, dtype, shard.tp_rank, shard.tp_size
        )
        self.down_proj = RowParallelLinear(
            size, config.hidden_size, False, dtype, shard.tp_rank, shard.tp_size, comm
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (T, intermediate_local) each
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, shard: ShardSpec, comm: Communicator, dtype: torch.dtype) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = LlamaAttention(config, shard, comm, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = LlamaMLP(config, shard, comm, dtype)

    def forward(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: KVCache,
    ) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, meta, kv_cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaForCausalLM(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        shard: ShardSpec | None = None,
        comm: Communicator | None = None,
        dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        super().__init__()
        self.config = config
        self.shard = (shard or ShardSpec()).resolve(config)
        comm = comm or SingleProcessCommunicator()
        rank, tp = self.shard.tp_rank, self.shard.tp_size
        self.is_first_stage = self.shard.is_first_stage
        self.is_last_stage = self.shard.is_last_stage(config.num_layers)
        self.embed_tokens = (
            VocabParallelEmbedding(config.vocab_size, config.hidden_size, dtype, rank, tp, comm)
            if self.is_first_stage
            else None
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, self.shard, comm, dtype)
            for _ in range(self.shard.layer_start, self.num_layers_end)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype) if self.is_last_stage else None
        self.lm_head = (
            ParallelLMHead(config.vocab_size, config.hidden_size, dtype, rank, tp, comm)
            if self.is_last_stage
            else None
        )
        if self.lm_head is not None and self.embed_tokens is not None and config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(
            config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling, dtype
        )
        self._decode: CompiledDecode | None = None  # steps of up to COMPILED_DECODE_SMALL_ROWS rows
        self._decode_batched: CompiledDecode | None = None  # larger ones
        self._compiled_max_rows = 0

    def compile_decode(
        self, max_rows: int | None = None, backend: str | Callable[..., object] = "inductor"
    ) -> None:
        """Run the layers of decode-only steps (of up to `max_rows` sequences; None: any number) through
        a torch.compile'd `LlamaDecoderLayer.forward`.

        A decode step is a few hundred tiny kernels whose dispatch costs more than their work on CPU;
        inductor fuses the elementwise ones (norms, rotary, residual adds, SiLU, the attention's casts)
        and calls the weight kernels as they are (its own kernels on one thread, the weight kernels on the
        step's threads). Graphs with a symbolic context length serve every layer (weights are inputs): one
        for one stream, one for 2-4 streams, one for more (see COMPILED_DECODE_SMALL_ROWS); each compiles
        on its first decode step with a context of 2 tokens or more (~10-25 s on the 2-core dev box the
        first time, a few seconds from inductor's on-disk cache). After two steps of a batch size through
        dynamo its graph is called directly, without dynamo's per-call guards (`CompiledDecode`). Prefill
        stays eager: its time is in the GEMMs. If compiling fails (no C++ compiler, an unsupported op), the
        model logs it once and decodes eagerly from then on; a request never fails for it. `backend`:
        torch.compile's (tests).
        """
        # In steps of a few rows inductor's own kernels stay single-threaded: each works on a few hundred
        # values, where an OpenMP region costs more than it saves; in larger ones they use the threads torch
        # has when the graph compiles (the step's). The weight products use torch's threads as set per step.
        # No size asserts in the graph's wrapper: ~20 a layer call, ~0.4 ms a SmolLM2 step, re-checking
        # what dynamo's guards already checked.
        inductor = backend == "inductor"
        small: dict[str, Any] | None = {"cpp.threads": 1, "size_asserts": False} if inductor else None
        batched: dict[str, Any] | None = {"size_asserts": False} if inductor else None
        self._decode = CompiledDecode(LlamaDecoderLayer.forward, backend, small)
        self._decode_batched = CompiledDecode(LlamaDecoderLayer.forward, backend, batched)
        self._compiled_max_rows = sys.maxsize if max_rows is None else max_rows

    @property
    def compiled_decode(self) -> CompiledDecode | None:
        """The compiled decode path of steps of up to COMPILED_DECODE_SMALL_ROWS rows (None: off, or off
        since a compile failed)."""
        return self._decode

    @property
    def compiled_batched_decode(self) -> CompiledDecode | None:
        """The compiled decode path of larger steps (None: off, or off since a compile failed)."""
        return self._decode_batched

    @property
    def num_layers_end(self) -> int:
        assert self.shard.layer_end is not None  # resolved in __init__
        return self.shard.layer_end

    def forward(
        self,
        inputs: torch.Tensor,  # first stage: (T,) token ids; others: (T, hidden) hidden states
        positions: torch.Tensor,  # (T,)
        meta: AttentionMetadata,
        kv_caches: list[KVCache],  # one per held layer
    ) -> torch.Tensor:  # (T, hidden) residual stream after this stage's last layer
        h = self.embed_tokens(inputs) if self.embed_tokens is not None else inputs
        cos, sin = self.rotary.cos_sin(positions)  # (T, 1, D) each
        decode = self._compiled_for(h, meta)
        if decode is not None:
            try:
                return decode.run(self.layers, h, cos, sin, meta, kv_caches)
            except COMPILE_FAILURES as exc:
                # Nothing to undo: a layer that ran wrote its K/V, and the eager rerun writes the same.
                _log.warning("compiled decode failed, decoding eagerly from now on: %s", _compile_cause(exc))
                self._decode = self._decode_batched = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            h = layer(h, cos, sin, meta, kv_cache)
        return h

    def _compiled_for(self, h: torch.Tensor, meta: AttentionMetadata) -> CompiledDecode | None:
        """The compiled path this step runs on, if any: decode only, up to `max_rows` rows, and a context of
        2 tokens or more (the graph's context length is symbolic, but torch specializes a size of 1: a first
        token alone would compile another graph)."""
        rows = h.shape[0]
        if not meta.decode_only or rows > self._compiled_max_rows:
            return None
        gather = meta.groups[0].gather
        if gather is None or gather.shape[1] < 2:
            return None
        return self._decode if rows <= COMPILED_DECODE_SMALL_ROWS else self._decode_batched

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, hidden) residual stream of the rows to sample -> (N, vocab) logits. Last stage only."""
        if self.norm is None or self.lm_head is None:
            raise RuntimeError("compute_logits runs on the last pipeline stage only")
        return self.lm_head(self.norm(hidden))

    def checkpoint_targets(self) -> dict[str, tuple[nn.Parameter, str | None]]:
        """Every Hugging Face tensor name this shard needs -> (our parameter, shard id for its loader)."""
        targets: dict[str, tuple[nn.Parameter, str | None]] = {}
        if self.embed_tokens is not None:
            targets["model.embed_tokens.weight"] = (self.embed_tokens.weight, None)
        if self.norm is not None and self.lm_head is not None:
            targets["model.norm.weight"] = (self.norm.weight, None)
            head_name = "model.embed_tokens.weight" if self.config.tie_word_embeddings else "lm_head.weight"
            targets.setdefault(head_name, (self.lm_head.weight, None))
        for local, layer in enumerate(self.layers):
            prefix = f"model.layers.{self.shard.layer_start + local}."
            assert isinstance(layer, LlamaDecoderLayer)
            attn, mlp = layer.self_attn, layer.mlp
            for proj in ("q", "k", "v"):
                targets[f"{prefix}self_attn.{proj}_proj.weight"] = (_p(attn.qkv_proj.weight), proj)
                if attn.qkv_proj.bias is not None:
                    targets[f"{prefix}self_attn.{proj}_proj.bias"] = (attn.qkv_proj.bias, proj)
            targets[f"{prefix}self_attn.o_proj.weight"] = (_p(attn.o_proj.weight), None)
            if attn.q_norm is not None and attn.k_norm is not None:
                targets[f"{prefix}self_attn.q_norm.weight"] = (attn.q_norm.weight, None)
                targets[f"{prefix}self_attn.k_norm.weight"] = (attn.k_norm.weight, None)
            targets[f"{prefix}mlp.gate_proj.weight"] = (_p(mlp.gate_up_proj.weight), "0")
            targets[f"{prefix}mlp.up_proj.weight"] = (_p(mlp.gate_up_proj.weight), "1")
            targets[f"{prefix}mlp.down_proj.weight"] = (_p(mlp.down_proj.weight), None)
            targets[f"{prefix}input_layernorm.weight"] = (layer.input_layernorm.weight, None)
            targets[f"{prefix}post_attention_layernorm.weight"] = (
                layer.post_attention_layernorm.weight,
                None,
            )
        return targets


def _p(param: nn.Parameter | None) -> nn.Parameter:
    if param is None:
        raise RuntimeError("weights are loaded before any layer is quantized")
    return param


def _compile_cause(exc: Exception) -> str:
    """`Type: first line` of what made a compile fail (the backend's own error, when torch wrapped one)."""
    cause = getattr(exc, "inner_exception", None) or exc.__cause__ or exc
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0]}" if lines else type(cause).__name__
