"""One rank's engine: the engine's own LLMEngine (scheduler, block manager, sampler, output processing),
composed with a model runner that passes activations between pipeline stages and a sampler that shares
the sampling rank's tokens with every rank.

Invariant: every rank holds an identical LLMEngine state after each step. The inputs are the same (the
delta rank 0 broadcasts, applied in the same order), the scheduler is deterministic, the KV pool has the
same number of blocks everywhere (the minimum over the ranks), and the tokens are the sampling rank's.
Finish decisions (EOS, stop strings, length) follow from the tokens, so each rank reaches them itself.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from shoal.engine.batch import ScheduledChunk
from shoal.engine.config import ModelConfig
from shoal.engine.llm_engine import EngineConfig, LLMEngine
from shoal.engine.model_runner import ModelRunner
from shoal.engine.models.llama import COMPILED_DECODE_SMALL_ROWS
from shoal.engine.parallel import Communicator, ShardSpec, TorchDistributedCommunicator
from shoal.engine.quant import quantize_model
from shoal.engine.sampling import Sampler, SampleResult, SamplingParams
from shoal.engine.sequence import Sequence as Seq
from shoal.engine.tokenizer import load_tokenizer
from shoal.runner.group import StepChannel
from shoal.runner.spec import RunnerSpec

WARM_UP_PARAMS = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)


class DistributedStage:
    """The engine's `Runner` for one rank: receives the previous stage's hidden states, runs its layers,
    and hands its hidden states to the next stage. Only the last stage returns logits; the others return
    an empty (num sampled, 0) tensor, since their tokens come from the sampling rank."""

    def __init__(self, runner: ModelRunner, channel: StepChannel, num_kv_blocks: int) -> None:
        self.model_runner = runner
        self.channel = channel
        self.config: ModelConfig = runner.config
        self.block_size = runner.block_size
        self.num_kv_blocks = num_kv_blocks
        self.max_model_len = runner.max_model_len
        self.max_num_batched_tokens = runner.max_num_batched_tokens
        # Called right after this stage hands its hidden states on (a pipeline's rank 0 begins the next
        # step there, while the later stages compute: see serve.StepLoop).
        self.on_handoff: Callable[[], None] | None = None

    @torch.inference_mode()
    def execute(self, chunks: Sequence[ScheduledChunk]) -> torch.Tensor:
        """Inference mode throughout: a received hidden state is then an inference tensor like every
        activation after it, so a compiled decode layer sees one kind of input (not two graphs)."""
        runner = self.model_runner
        # Inputs first: a later stage builds them while the earlier stages compute.
        step = runner.prepare(chunks)
        hidden: torch.Tensor | None = None
        if not runner.model.is_first_stage:
            num_tokens = step.token_ids.shape[0]
            hidden = self.channel.recv_hidden((num_tokens, self.config.hidden_size), runner.dtype)
        output = runner.run(step, hidden)
        if runner.is_last_stage:
            return output
        self.channel.send_hidden(output)
        if self.on_handoff is not None:
            self.on_handoff()
        return torch.empty((sum(chunk.sample for chunk in chunks), 0))


class LockstepSampler(Sampler):
    """Every rank returns the same token ids.

    Pipeline: only the last stage has logits; it samples and sends the ids to every other stage. Tensor parallel: every
    rank holds the same full logits (the LM head's all-reduce sums disjoint slices into zeros, exact on
    every rank), so each rank samples for itself and no collective is spent on the tokens; random rows
    stay identical because rank 0 gives every request a seed (`lockstep_params`), and the next exchange
    compares a hash of the tokens across ranks (`StepChannel.note_sampled`).

    Logprobs leave the process only from the sampling rank."""

    def __init__(self, channel: StepChannel) -> None:
        super().__init__()
        self.channel = channel

    def __call__(self, logits: torch.Tensor, seqs: Sequence[Seq]) -> list[SampleResult]:
        if self.channel.samples_locally:
            results = super().__call__(logits, seqs)
            self.channel.note_sampled([r.token_id for r in results])
            return results
        if self.channel.rank == self.channel.sampling_rank:
            results = super().__call__(logits, seqs)
            self.channel.share_tokens([r.token_id for r in results], len(seqs))
            return results
        token_ids = self.channel.share_tokens(None, len(seqs))
        return [SampleResult(token_id=token_id) for token_id in token_ids]


def lockstep_params(spec: RunnerSpec, params: SamplingParams) -> dict[str, object]:
    """Rank 0's admission of `params` as every rank applies it: for tensor parallel, a request without a
    seed gets a random one, so each rank's sampler draws the same numbers for it."""
    fields = dataclasses.asdict(params)
    if spec.sharding == "tensor" and spec.world_size > 1 and params.seed is None:
        fields["seed"] = secrets.randbits(62)
    return fields


class ModelMismatchError(RuntimeError):
    """The ranks of one instance loaded models or limits that do not fit together."""


def build_engine(spec: RunnerSpec, channel: StepChannel) -> LLMEngine:
    """Load this rank's shard and tokenizer, agree with the other ranks, and compose the engine."""
    tokenizer = load_tokenizer(
        Path(spec.model_path),
        cache_dir=Path(spec.tokenizer_cache_dir) if spec.tokenizer_cache_dir else None,
    )
    communicator: Communicator | None = None
    if spec.tp_size > 1:
        communicator = channel.mesh if channel.mesh is not None else TorchDistributedCommunicator()
    runner = ModelRunner(
        spec.model_path,
        shard=ShardSpec(spec.tp_rank, spec.tp_size, spec.layer_start, spec.layer_end),
        device=spec.device,
        dtype=getattr(torch, spec.dtype),
        kv_cache_bytes=spec.kv_cache_bytes,
        block_size=spec.block_size,
        communicator=communicator,
        max_num_batched_tokens=spec.max_num_batched_tokens,
        max_model_len=spec.max_model_len,
        compile_decode=spec.compile_decode and spec.tp_size == 1 and spec.device == "cpu",
    )
    # Each rank quantizes its own slices ("auto" chooses per slice); KV cache and activations keep the
    # model dtype, and the kernels cast in and out. "none" too: on CPU it prepacks bf16 weights.
    quantize_model(runner.model, spec.quant, device=spec.device)
    config = runner.config
    shape = [
        config.num_layers,
        config.vocab_size,
        config.hidden_size,
        runner.max_model_len,
        runner.block_size,
        runner.max_num_batched_tokens,
    ]
    lowest, highest = channel.min_across_ranks(shape), channel.max_across_ranks(shape)
    if lowest != highest:
        names = ("layers", "vocabulary", "hidden size", "max_model_len", "block size", "step token budget")
        differ = [f"{n} {lo}..{hi}" for n, lo, hi in zip(names, lowest, highest, strict=True) if lo != hi]
        raise ModelMismatchError(f"the ranks loaded models that differ: {', '.join(differ)}")
    (num_kv_blocks,) = channel.min_across_ranks([runner.num_kv_blocks])
    stage = DistributedStage(runner, channel, num_kv_blocks)
    engine = LLMEngine(
        stage,
        tokenizer,
        EngineConfig(max_num_batched_tokens=spec.max_num_batched_tokens, max_num_seqs=spec.max_num_seqs),
    )
    engine.sampler = LockstepSampler(channel)
    # Only the sampling rank's text leaves the process (serve.StepLoop._publish).
    engine.emit_text = spec.is_sampling_rank
    return engine


def warm_up(engine: LLMEngine) -> None:
    """Short greedy generations through every rank: exercise each layer and every collective, and, when
    the spec compiles decode, compile the decode graphs (one stream, two at once: the graph of 2-4 streams,
    then the graph of larger batches) before the runner is Ready, so no request waits for a compile."""
    engine.generate([[0]], WARM_UP_PARAMS)
    engine.generate([[0], [1]], WARM_UP_PARAMS)
    engine.generate([[i] for i in range(COMPILED_DECODE_SMALL_ROWS + 1)], WARM_UP_PARAMS)
