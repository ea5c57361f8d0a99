"""Turn a batch of logit rows into next tokens, one row per sequence, each with its own SamplingParams.

Inputs: fp32 logits (num_seqs, vocab) from the runner and the sequences they belong to (for penalties,
parameters and seeds). Output: one SampleResult per row, in row order.

Order per row: penalties (repetition over prompt + output, presence/frequency over output) → greedy argmax
when temperature is 0, else temperature → top-k → top-p → min-p → sample. Sampling uses the exponential race
(argmax of p / Exp(1) noise), which draws from p exactly and lets each seeded request draw its noise from its
own torch.Generator: the same seed gives the same tokens whatever else is in the batch.
Logprobs are those of the model's raw distribution (before penalties and temperature), as OpenAI reports them.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from shoal.engine.sampling_params import SamplingParams
from shoal.engine.sequence import Sequence

__all__ = ["SampleResult", "Sampler", "SamplingParams", "TokenLogprob"]


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    logprob: float


@dataclass(frozen=True, slots=True)
class SampleResult:
    token_id: int
    # Set when the request asked for logprobs.
    logprob: float | None = None
    top_logprobs: tuple[TokenLogprob, ...] = ()


class Sampler:
    """Holds one torch.Generator per seeded sequence; call `release` when a sequence ends."""

    def __init__(self) -> None:
        self._generators: dict[int, torch.Generator] = {}

    def release(self, seq_id: int) -> None:
        self._generators.pop(seq_id, None)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: Seq[Sequence]) -> list[SampleResult]:
        assert logits.dim() == 2 and logits.shape[0] == len(seqs), "one logit row per sequence"
        params = [seq.params for seq in seqs]
        raw = logits.float()
        processed = raw
        if any(p.has_penalties for p in params):
            processed = raw.clone()
            for row, seq in enumerate(seqs):
                if seq.params.has_penalties:
                    _apply_penalties(processed[row], seq)

        token_ids = processed.argmax(dim=-1)
        sampled_rows = [row for row, p in enumerate(params) if not p.greedy]
        if sampled_rows:
            index = torch.tensor(sampled_rows, device=raw.device)
            draws = self._sample(processed.index_select(0, index), [seqs[r] for r in sampled_rows])
            token_ids = token_ids.index_copy(0, index, draws)

        tokens = token_ids.tolist()
        if not any(p.logprobs for p in params):
            return [SampleResult(token_id=t) for t in tokens]
        return _with_logprobs(raw, tokens, params)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        params = [seq.params for seq in seqs]
        device = logits.device
        temperature = torch.tensor([p.temperature for p in params], device=device, dtype=logits.dtype)
        logits = logits / temperature.unsqueeze(1)
        if any(p.top_k > 0 or p.top_p < 1 for p in params):
            logits = _top_k_top_p(logits, params)
        probs = logits.softmax(dim=-1)
        if any(p.min_p > 0 for p in params):
            min_p = torch.tensor([p.min_p for p in params], device=device, dtype=probs.dtype)
            threshold = probs.max(dim=-1, keepdim=True).values * min_p.unsqueeze(1)
            probs = probs.masked_fill(probs < threshold, 0.0)
        noise = torch.empty_like(probs)
        for row, seq in enumerate(seqs):
            if seq.params.seed is None:
                continue
            generator = self._generators.get(seq.seq_id)
            if generator is None:
                generator = torch.Generator(device=device).manual_seed(seq.params.seed)
                self._generators[seq.seq_id] = generator
            noise[row].exponential_(generator=generator)
        unseeded = [row for row, p in enumerate(params) if p.seed is None]
        if len(unseeded) == len(params):
            noise.exponential_()
        elif unseeded:
            noise[unseeded] = torch.empty_like(noise[unseeded]).exponential_()
        return (probs / noise).argmax(dim=-1)


def _apply_penalties(row: torch.Tensor, seq: Sequence) -> None:
    """In place on one (vocab,) row."""
    p = seq.params
    vocab = row.shape[0]
    if p.repetition_penalty != 1:
        seen = torch.tensor(seq.prompt_token_ids + seq.output_token_ids, device=row.device).unique()
        seen = seen[seen < vocab]
        values = row[seen]
        row[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
    if (p.presence_penalty != 0 or p.frequency_penalty != 0) and seq.output_token_ids:
        output = torch.tensor(seq.output_token_ids, device=row.device)
        counts = torch.bincount(output[output < vocab], minlength=vocab).to(row.dtype)
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)


def _top_k_top_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Mask with -inf every token outside each row's top-k and top-p nucleus (the best token always stays)."""
    num_rows, vocab = logits.shape
    device = logits.device
    sorted_logits, sorted_index = logits.sort(dim=-1, descending=True)
    top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=device)
    rank = torch.arange(vocab, device=device).expand(num_rows, vocab)
    sorted_logits = sorted_logits.masked_fill(rank >= top_k.unsqueeze(1), float("-inf"))
    top_p = torch.tensor([p.top_p for p in params], device=device, dtype=logits.dtype)
    sorted_probs = sorted_logits.softmax(dim=-1)
    # Mass of the strictly better tokens: a token stays while that mass is below p, so the best always stays.
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_p.unsqueeze(1), float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, sorted_index, sorted_logits)


def _with_logprobs(raw: torch.Tensor, tokens: list[int], params: list[SamplingParams]) -> list[SampleResult]:
    logprobs = raw.log_softmax(dim=-1)
    chosen = logprobs.gather(1, torch.tensor(tokens, device=raw.device).unsqueeze(1)).squeeze(1).tolist()
    max_top = max(p.top_logprobs for p in params)
    top_values: list[list[float]] = []
    top_ids: list[list[int]] = []
    if max_top:
        values, ids = logprobs.topk(max_top, dim=-1)
        top_values, top_ids = values.tolist(), ids.tolist()
    results = []
    for row, (token, p) in enumerate(zip(tokens, params, strict=True)):
        if not p.logprobs:
            results.append(SampleResult(token_id=token))
            continue
        top: tuple[TokenLogprob, ...] = ()
        if p.top_logprobs:
            n = p.top_logprobs
            pairs = zip(top_ids[row][:n], top_values[row][:n], strict=True)
            top = tuple(TokenLogprob(token_id=i, logprob=v) for i, v in pairs)
        results.append(SampleResult(token_id=token, logprob=chosen[row], top_logprobs=top))
    return results
