"""Runs one shard of a model over the paged KV cache: scheduled chunks in, logits (or hidden states) out.

Inputs: each step, a sequence of `ScheduledChunk`s (prefill chunks and decode tokens of many sequences,
in any mix; see batch.py). Outputs: fp32 logits, one row per chunk with `sample=True`, in chunk order, on
the last pipeline stage; on other stages the hidden states (T, hidden) to hand to the next stage, where
T is the total number of tokens in the step in chunk order.
Invariants: the KV cache holds per layer one tensor (num_kv_blocks, block_size, 2, num_kv_heads_local,
head_dim), k then v; a chunk's positions below `start_pos` must already be in the slots its block table names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from shoal.engine.batch import ScheduledChunk
from shoal.engine.config import ModelConfig
from shoal.engine.layers import AttentionGroup, AttentionMetadata, attention_compute_dtype
from shoal.engine.loader import load_model, open_source
from shoal.engine.models import KVCache
from shoal.engine.parallel import Communicator, ShardSpec

DEFAULT_KV_CACHE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ThreadPolicy:
    """CPU intra-op threads per step, chosen by the step's size; the runner applies it before each step.

    A decode step is a few hundred small kernels (per layer: norms, mat-vecs, attention over a short
    context), and each multi-threaded kernel ends in an OpenMP barrier: on a machine whose cores are
    shared, one descheduled worker stalls the barrier for a time slice. Measured on the 2-core dev box with
    other jobs running: a bf16 decode step took 50 ms on 1 thread and up to 1.3 s on 2. A step of many
    tokens (prefill, big batches) is a few large GEMMs that split well across cores. So a step of fewer
    than `large_step_min_tokens` tokens runs on `small_step_threads` (1: robust under load; a dedicated
    machine may give it more), a larger one on `large_step_threads` (None: torch's thread count when the
    runner was built).
    """

    small_step_threads: int = 1
    large_step_threads: int | None = None
    large_step_min_tokens: int = 64

    def __post_init__(self) -> None:
        if self.small_step_threads < 1 or (
            self.large_step_threads is not None and self.large_step_threads < 1
        ):
            raise ValueError("a thread policy needs at least one thread per step")


@dataclass(frozen=True, slots=True)
class StepInputs:
    """One step's inputs as `ModelRunner.prepare` builds them: token ids and positions (T,), the attention
    plan, and the rows whose logits are sampled (each sampling chunk's last token)."""

    token_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    sample_rows: tuple[int, ...]


class ModelRunner:
    def __init__(
        self,
        model_path: str | Path,
        shard: ShardSpec | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES,
        block_size: int = 16,
        communicator: Communicator | None = None,
        max_num_batched_tokens: int = 8192,
        max_model_len: int | None = None,
        threads: ThreadPolicy | None = None,
        compile_decode: bool = False,
    ) -> None:
        """`threads`: how many CPU threads each step uses (see ThreadPolicy); None leaves torch's setting.
        `compile_decode`: run decode-only steps through torch.compile'd layers (see
        `LlamaForCausalLM.compile_decode`; compiles lazily, a few seconds per new shape family)."""
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but CUDA is not available")
        if block_size < 1 or max_num_batched_tokens < 1:
            raise ValueError("block_size and max_num_batched_tokens must be positive")
        source = open_source(model_path)
        self.config: ModelConfig = source.config
        self.shard = (shard or ShardSpec()).resolve(self.config)
        _check_communicator(self.shard, communicator)
        self.dtype = dtype
        self.block_size = block_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = min(
            max_model_len or self.config.max_position_embeddings, self.config.max_position_embeddings
        )
        self.num_kv_blocks = self._num_kv_blocks(kv_cache_bytes)
        self.model = load_model(model_path, self.shard, dtype, self.device, communicator, source=source)
        if compile_decode:
            self.model.compile_decode()
        num_layers = len(self.model.layers)
        kv_heads = self.config.num_kv_heads // self.shard.tp_size
        self.num_kv_heads = kv_heads  # local
        cache = torch.zeros(
            (num_layers, self.num_kv_blocks, block_size, 2, kv_heads, self.config.head_dim),
            dtype=dtype,
            device=self.device,
        )
        self.kv_caches: list[KVCache] = list(cache.unbind(0))
        self.attention_dtype = attention_compute_dtype(dtype, self.device)
        self.threads = threads if self.device.type == "cpu" else None
        self._large_step_threads = (
            threads.large_step_threads if threads else None
        ) or torch.get_num_threads()

    @property
    def is_last_stage(self) -> bool:
        return self.model.is_last_stage

    def _num_kv_blocks(self, kv_cache_bytes: int) -> int:
        layers = self.shard.layer_end - self.shard.layer_start if self.shard.layer_end is not None else 0
        kv_heads = self.config.num_kv_heads // self.shard.tp_size
        element_size = torch.empty((), dtype=self.dtype).element_size()
        block_bytes = 2 * layers * self.block_size * kv_heads * self.config.head_dim * element_size
        num_blocks = kv_cache_bytes // block_bytes
        needed = -(-self.max_model_len // self.block_size)
        if num_blocks < needed:
            raise ValueError(
                f"KV cache budget of {kv_cache_bytes} bytes holds {num_blocks} blocks of {self.block_size} tokens, "
                f"but one sequence of max_model_len={self.max_model_len} tokens needs {needed} "
                f"({needed * block_bytes} bytes): raise kv_cache_bytes or lower max_model_len"
            )
        return int(num_blocks)

    @torch.inference_mode()
    def execute(
        self, chunks: Sequence[ScheduledChunk], hidden_states: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One step. Returns (num sampled chunks, vocab) fp32 logits on the last stage, else (T, hidden).

        The result is an inference-mode tensor: read it, or modify it only inside `torch.inference_mode()`.
        """
        return self.run(self.prepare(chunks), hidden_states)

    def prepare(self, chunks: Sequence[ScheduledChunk]) -> StepInputs:
        """The step's input tensors and attention plan: all a step needs but the previous stage's hidden
        states, so a later pipeline stage builds them while the earlier ones compute."""
        token_ids, positions, meta = self._prepare(chunks)
        rows, offset = [], 0
        for chunk in chunks:
            offset += len(chunk.token_ids)
            if chunk.sample:
                rows.append(offset - 1)
        return StepInputs(token_ids, positions, meta, tuple(rows))

    @torch.inference_mode()
    def run(self, step: StepInputs, hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        """`execute` for inputs `prepare` built."""
        num_tokens = step.token_ids.shape[0]
        if self.threads is not None:
            self._set_threads(num_tokens)
        if self.model.is_first_stage:
            inputs = step.token_ids
        else:
            if hidden_states is None or hidden_states.shape != (num_tokens, self.config.hidden_size):
                raise ValueError(
                    f"stage starting at layer {self.shard.layer_start} needs hidden_states of shape "
                    f"({num_tokens}, {self.config.hidden_size})"
                )
            inputs = hidden_states.to(self.device, self.dtype)
        hidden = self.model(inputs, step.positions, step.meta, self.kv_caches)
        if not self.model.is_last_stage:
            return hidden
        rows = step.sample_rows
        if not rows:
            return torch.empty((0, self.config.vocab_size), dtype=torch.float32, device=self.device)
        selected = hidden[rows[0] : rows[0] + 1] if len(rows) == 1 else hidden[list(rows)]
        return self.model.compute_logits(selected).float()

    def _set_threads(self, num_tokens: int) -> None:
        assert self.threads is not None
        large = num_tokens >= self.threads.large_step_min_tokens
        wanted = self._large_step_threads if large else self.threads.small_step_threads
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)

    def _prepare(
        self, chunks: Sequence[ScheduledChunk]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Flatten the chunks into token/position/slot tensors and plan the attention groups."""
        if not chunks:
            raise ValueError("execute needs at least one chunk")
        bs = self.block_size
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        groups: list[AttentionGroup] = []
        decode_rows: list[int] = []
        decode_chunks: list[ScheduledChunk] = []
        for chunk in chunks:
            self._check_chunk(chunk)
            row = len(token_ids)
            n = len(chunk.token_ids)
            token_ids.extend(chunk.token_ids)
            table = chunk.block_table
            for pos in range(chunk.start_pos, chunk.end_pos):
                positions.append(pos)
                slots.append(table[pos // bs] * bs + pos % bs)
            if n == 1:
                decode_rows.append(row)
                decode_chunks.append(chunk)
            elif chunk.start_pos == 0:
                groups.append(AttentionGroup(slice(row, row + n), None, None, True, 1))
            else:
                groups.append(self._context_group(slice(row, row + n), [chunk]))
        if len(token_ids) > self.max_num_batched_tokens:
            raise ValueError(
                f"{len(token_ids)} tokens in one step exceed max_num_batched_tokens={self.max_num_batched_tokens}"
            )
        if decode_chunks:
            first, last = decode_rows[0], decode_rows[-1]
            contiguous = last - first + 1 == len(decode_rows)
            rows = slice(first, last + 1) if contiguous else torch.tensor(decode_rows, device=self.device)
            groups.append(self._context_group(rows, decode_chunks))
        meta = AttentionMetadata(
            torch.tensor(slots, device=self.device),
            tuple(groups),
            decode_only=len(decode_chunks) == len(chunks),
        )
        return (
            torch.tensor(token_ids, device=self.device),
            torch.tensor(positions, device=self.device),
            meta,
        )

    def _context_group(self, rows: slice | torch.Tensor, chunks: list[ScheduledChunk]) -> AttentionGroup:
        """Queries that read their context from the cache: one chunk (any length) or many 1-token chunks."""
        bs = self.block_size
        lengths = [c.end_pos for c in chunks]
        longest = max(lengths)
        num_blocks = -(-longest // bs)
        tables = torch.tensor(
            [(list(c.block_table[:num_blocks]) + [0] * num_blocks)[:num_blocks] for c in chunks]
        )
        key_pos = torch.arange(longest)
        gather = tables[:, key_pos // bs] * bs + key_pos % bs  # (B, L)
        mask: torch.Tensor | None = None
        if len(chunks) == 1 and len(chunks[0].token_ids) > 1:
            chunk = chunks[0]
            query_pos = torch.arange(chunk.start_pos, chunk.end_pos)
            mask = (key_pos[None, :] <= query_pos[:, None])[None, None]  # (1, 1, Tq, L)
            return AttentionGroup(rows, gather.to(self.device), mask.to(self.device), False, 1)
        # decode batch: additive mask hiding each sequence's padding, one row per (sequence, kv head)
        bias = torch.zeros((len(chunks), longest), dtype=self.attention_dtype)
        if min(lengths) != longest:
            bias.masked_fill_(key_pos[None, :] >= torch.tensor(lengths)[:, None], float("-inf"))
        mask = bias.repeat_interleave(self.num_kv_heads, dim=0)[:, None]  # (B * Hkv, 1, L)
        return AttentionGroup(
            rows, gather.to(self.device), mask.to(self.device), False, len(chunks), decode=True
        )

    def _check_chunk(self, chunk: ScheduledChunk) -> None:
        if not chunk.token_ids or chunk.start_pos < 0:
            raise ValueError(f"sequence {chunk.seq_id}: empty chunk or negative start position")
        if min(chunk.token_ids) < 0 or max(chunk.token_ids) >= self.config.vocab_size:
            raise ValueError(
                f"sequence {chunk.seq_id}: token id outside the vocabulary of {self.config.vocab_size}"
            )
        if chunk.end_pos > self.max_model_len:
            raise ValueError(
                f"sequence {chunk.seq_id}: position {chunk.end_pos} exceeds max_model_len={self.max_model_len}"
            )
        used = chunk.block_table[: -(-chunk.end_pos // self.block_size)]
        if len(used) * self.block_size < chunk.end_pos:
            raise ValueError(f"sequence {chunk.seq_id}: block table too short for {chunk.end_pos} positions")
        if min(used) < 0 or max(used) >= self.num_kv_blocks:
            raise ValueError(
                f"sequence {chunk.seq_id}: block id outside the cache's {self.num_kv_blocks} blocks"
            )


def _check_communicator(shard: ShardSpec, communicator: Communicator | None) -> None:
    if communicator is None:
        if shard.tp_size > 1:
            raise ValueError(f"tensor-parallel size {shard.tp_size} needs a communicator")
        return
    if communicator.world_size != shard.tp_size or communicator.rank != shard.tp_rank:
        raise ValueError(
            f"communicator (rank {communicator.rank} of {communicator.world_size}) does not match the shard "
            f"(tp rank {shard.tp_rank} of {shard.tp_size})"
        )
