"""The engine loop on one process: requests in, token and text deltas out.

Inputs: `add_request` (a text prompt, token ids, or chat messages, with SamplingParams) and `abort`.
Output: `step()` returns one RequestOutput per request that advanced (or was aborted) in that step.
Each step is schedule → runner.execute → sample → postprocess. Bad requests are rejected by `add_request`
before anything is queued, so they never disturb the requests already running.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from shoal.engine.batch import ScheduledChunk
from shoal.engine.block_manager import BlockManager
from shoal.engine.config import ModelConfig
from shoal.engine.errors import ContextLengthExceededError, EngineDeadError, InvalidRequestError
from shoal.engine.model_runner import DEFAULT_KV_CACHE_BYTES, ModelRunner, ThreadPolicy
from shoal.engine.output_processor import FINISH_ABORT, OutputProcessor, RequestOutput
from shoal.engine.quant import QUANT_MODES, QuantizationSummary, quantize_model
from shoal.engine.sampling import Sampler, SampleResult, SamplingParams
from shoal.engine.scheduler import Scheduler, SchedulerConfig
from shoal.engine.sequence import RequestStats
from shoal.engine.sequence import Sequence as Seq
from shoal.engine.tokenizer import ChatMessage, Tokenizer, load_tokenizer

Prompt = str | Sequence[int] | Sequence[ChatMessage]


class Runner(Protocol):
    """What the engine needs from a model runner (shoal.engine.model_runner.ModelRunner)."""

    config: ModelConfig
    block_size: int
    num_kv_blocks: int
    max_model_len: int
    max_num_batched_tokens: int

    def execute(self, chunks: Sequence[ScheduledChunk]) -> torch.Tensor: ...


@dataclass(frozen=True, slots=True)
class EngineConfig:
    max_num_batched_tokens: int = 1024
    max_num_seqs: int = 64
    enable_prefix_caching: bool = True
    # Serve a shorter context window than the runner's (None: the runner's max_model_len).
    max_model_len: int | None = None


@dataclass(frozen=True, slots=True)
class CompletedRequest:
    """A whole request's result, as `generate` returns it."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[SampleResult, ...] | None
    finish_reason: str
    stats: RequestStats


class LLMEngine:
    def __init__(self, runner: Runner, tokenizer: Tokenizer, config: EngineConfig | None = None) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        scheduler_config = SchedulerConfig(
            max_num_batched_tokens=min(self.config.max_num_batched_tokens, runner.max_num_batched_tokens),
            max_num_seqs=self.config.max_num_seqs,
            enable_prefix_caching=self.config.enable_prefix_caching,
        )
        block_manager = BlockManager(
            runner.num_kv_blocks, runner.block_size, enable_prefix_caching=self.config.enable_prefix_caching
        )
        self.scheduler = Scheduler(scheduler_config, block_manager)
        self.sampler = Sampler()
        # The model's every end-of-sequence id (Llama 3 has two), plus the tokenizer's own.
        self.eos_token_ids = frozenset(runner.config.eos_token_ids) | frozenset(tokenizer.eos_token_ids)
        # A sequence's tokens must fit the context window and the KV pool.
        self.max_total_tokens = min(
            runner.max_model_len,
            runner.num_kv_blocks * runner.block_size,
            self.config.max_model_len or runner.max_model_len,
        )
        self._processors: dict[str, OutputProcessor] = {}
        self._seqs: dict[int, Seq] = {}
        self._pending: list[RequestOutput] = []
        self._seq_ids = itertools.count()
        # False: the outputs' text is never read (a rank that does not sample), so tokens are decoded
        # only for stop strings; token ids and finish decisions are unchanged.
        self.emit_text = True
        # what `load_engine(quant=...)` installed (None: an engine built around a runner by hand)
        self.quantization: QuantizationSummary | None = None

    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams | None = None) -> None:
        """Queue a request; raises InvalidRequestError (or ContextLengthExceededError) and queues nothing."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"params must be SamplingParams, got {type(params).__name__}")
        if request_id in self._processors:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", field="request_id")
        prompt_ids = self._tokenize(prompt)
        if len(prompt_ids) + 1 > self.max_total_tokens:
            raise ContextLengthExceededError(
                f"the prompt has {len(prompt_ids)} tokens; with the reply it must fit the context window of "
                f"{self.max_total_tokens} tokens",
                field="prompt",
            )
        seq = Seq(
            seq_id=next(self._seq_ids),
            request_id=request_id,
            prompt_token_ids=prompt_ids,
            params=params,
            max_output_tokens=min(params.max_tokens, self.max_total_tokens - len(prompt_ids)),
        )
        self._processors[request_id] = OutputProcessor(
            seq, self.tokenizer, self.eos_token_ids, text=self.emit_text
        )
        self._seqs[seq.seq_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        """Cancel one request; its final output (finish_reason "abort") comes with the next step."""
        processor = self._processors.get(request_id)
        if processor is None:
            return False
        self._finish(processor.seq)
        self._pending.append(_output(processor.seq, "", (), None, FINISH_ABORT))
        return True

    def has_unfinished(self) -> bool:
        return bool(self._processors) or bool(self._pending)

    def step(self) -> list[RequestOutput]:
        outputs, self._pending = self._pending, []
        chunks = self.scheduler.schedule()
        if not chunks:
            if self.scheduler.num_unfinished:
                # Every request fits the pool alone (add_request caps it), so this is a bookkeeping bug.
                raise EngineDeadError(f"the scheduler stalled with {self.scheduler.num_unfinished} requests")
            return outputs
        self._mark_scheduled(chunks)
        logits = self.runner.execute(chunks)
        self.scheduler.on_computed(chunks, self._seqs)
        sampled = [self._seqs[chunk.seq_id] for chunk in chunks if chunk.sample]
        results = self.sampler(logits, sampled) if sampled else []
        return outputs + self._postprocess(sampled, results)

    def generate(
        self, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> list[CompletedRequest]:
        """Run prompts to completion (for tests and the CLI); results in prompt order."""
        per_prompt = (
            list(params) if isinstance(params, Sequence) else [params or SamplingParams()] * len(prompts)
        )
        if len(per_prompt) != len(prompts):
            raise InvalidRequestError("give one SamplingParams per prompt, or one for all", field="params")
        request_ids = [f"generate-{next(self._seq_ids)}-{i}" for i in range(len(prompts))]
        try:
            for request_id, prompt, p in zip(request_ids, prompts, per_prompt, strict=True):
                self.add_request(request_id, prompt, p)
        except InvalidRequestError:
            # All or nothing: withdraw the prompts queued before the bad one, without a trace.
            for request_id in request_ids:
                self.abort(request_id)
            self._pending = [o for o in self._pending if o.request_id not in request_ids]
            raise
        collected: dict[str, list[RequestOutput]] = {request_id: [] for request_id in request_ids}
        prompt_ids = {rid: tuple(self._processors[rid].seq.prompt_token_ids) for rid in request_ids}
        while any(not outs or not outs[-1].finished for outs in collected.values()):
            for output in self.step():
                if output.request_id in collected:
                    collected[output.request_id].append(output)
        return [_completed(rid, prompt_ids[rid], collected[rid]) for rid in request_ids]

    def _tokenize(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt) if prompt else []
        elif prompt and all(isinstance(m, Mapping) for m in prompt):
            ids = self.tokenizer.apply_chat_template([m for m in prompt if isinstance(m, Mapping)])
        elif all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = [int(t) for t in prompt if isinstance(t, int)]
            vocab = self.runner.config.vocab_size
            if any(not 0 <= t < vocab for t in ids):
                raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})", field="prompt")
        else:
            raise InvalidRequestError("prompt must be text, token ids or chat messages", field="prompt")
        if not ids:
            raise InvalidRequestError("the prompt is empty", field="prompt")
        return ids

    def _mark_scheduled(self, chunks: list[ScheduledChunk]) -> None:
        now = time.perf_counter()
        for chunk in chunks:
            seq = self._seqs[chunk.seq_id]
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now

    def _postprocess(self, seqs: list[Seq], results: list[SampleResult]) -> list[RequestOutput]:
        now = time.perf_counter()
        outputs = []
        for seq, result in zip(seqs, results, strict=True):
            seq.append_token(result.token_id, now)
            delta, finish_reason = self._processors[seq.request_id].process(result)
            if finish_reason is not None:
                self._finish(seq)
            logprobs = (result,) if seq.params.logprobs else None
            outputs.append(_output(seq, delta, (result.token_id,), logprobs, finish_reason))
        return outputs

    def _finish(self, seq: Seq) -> None:
        self.scheduler.remove(seq)
        self.sampler.release(seq.seq_id)
        del self._processors[seq.request_id]
        del self._seqs[seq.seq_id]


def load_engine(
    model_path: str | Path,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES,
    max_model_len: int | None = None,
    config: EngineConfig | None = None,
    tokenizer_cache_dir: Path | None = None,
    threads: ThreadPolicy | None = ThreadPolicy(),  # noqa: B008 (frozen, so a shared default is safe)
    compile_decode: bool = False,
    quant: str = "none",
) -> LLMEngine:
    """Tokenizer first (a bad path fails fast, before any weight is read), then the model runner.

    `threads`: the CPU thread policy per step (default: decode steps on 1 thread, prefill on all of
    torch's threads; see ThreadPolicy); None leaves torch's thread count alone. `compile_decode`: run
    decode steps through torch.compile'd layers (compiles lazily on the first decode steps; see
    `LlamaForCausalLM.compile_decode`). `quant`: weight quantization mode ("none", "int8", "int4",
    "auto"; see `shoal.engine.quant.quantize_model`, which runs for "none" too), applied right after
    loading; the summary is `engine.quantization`.
    """
    if quant not in QUANT_MODES:  # before anything is loaded
        raise ValueError(f"unknown quantization mode {quant!r}: expected one of {', '.join(QUANT_MODES)}")
    config = config or EngineConfig()
    tokenizer = load_tokenizer(Path(model_path), cache_dir=tokenizer_cache_dir)
    runner = ModelRunner(
        model_path,
        device=device,
        dtype=dtype,
        kv_cache_bytes=kv_cache_bytes,
        max_model_len=max_model_len,
        max_num_batched_tokens=config.max_num_batched_tokens,
        threads=threads,
        compile_decode=compile_decode,
    )
    engine = LLMEngine(runner, tokenizer, config)
    # "none" too: it installs the prepacked bf16 weights on CPU (see quantize_model)
    engine.quantization = quantize_model(runner.model, quant, device=device)
    return engine


def _output(
    seq: Seq,
    text: str,
    token_ids: tuple[int, ...],
    logprobs: tuple[SampleResult, ...] | None,
    finish_reason: str | None,
) -> RequestOutput:
    return RequestOutput(
        request_id=seq.request_id,
        text=text,
        token_ids=token_ids,
        logprobs=logprobs,
        finished=finish_reason is not None,
        finish_reason=finish_reason,
        stats=seq.stats(),
    )


def _completed(
    request_id: str, prompt_ids: tuple[int, ...], outputs: list[RequestOutput]
) -> CompletedRequest:
    last = outputs[-1]
    assert last.finish_reason is not None
    logprobs = [lp for o in outputs if o.logprobs is not None for lp in o.logprobs]
    return CompletedRequest(
        request_id=request_id,
        prompt_token_ids=prompt_ids,
        text="".join(o.text for o in outputs),
        token_ids=tuple(t for o in outputs for t in o.token_ids),
        logprobs=tuple(logprobs) if any(o.logprobs is not None for o in outputs) else None,
        finish_reason=last.finish_reason,
        stats=last.stats,
    )
