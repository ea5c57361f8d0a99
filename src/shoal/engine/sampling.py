"""Turn a batch of logit rows into next tokens, one row per sequence, each with its own SamplingParams.

Inputs: fp32 logits (num_seqs, vocab) from the runner and the sequences they belong to (for penalties,
parameters and seeds). Output: one SampleResult per row, in row order.

Order per row: penalties (repetition over prompt + output, presence/frequency over output) → greedy argmax
when temperature is 0, else temperature → top-k → top-p (over the renormalized top-k) → min-p → sample.
Sampling is by inverse CDF with one uniform per row, which a seeded request draws from its own
torch.Generator: the same seed gives the same tokens whatever else is in the batch.
Logprobs are those of the model's raw distribution (before penalties and temperature), as OpenAI reports them.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from shoal.engine.sampling_params import SamplingParams
from shoal.engine.sequence import Sequence

__all__ = ["SampleResult", "Sampler", "SamplingParams", "TokenLogprob"]

# How many best tokens a top-p row samples among before falling back to sorting the whole vocabulary.
_NUM_CANDIDATES = 1024


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
        temperature = torch.tensor([p.temperature for p in params], device=logits.device, dtype=logits.dtype)
        probs = (logits / temperature.unsqueeze(1)).softmax(dim=-1)
        # Which path a row takes depends only on its own parameters (and logits), never on its neighbours,
        # so a seeded row draws the same noise whatever the batch.
        restricted = [row for row, p in enumerate(params) if p.top_k > 0 or p.top_p < 1]
        if not restricted:
            return self._sample_full(probs, seqs)
        token_ids = torch.empty(len(seqs), dtype=torch.long, device=logits.device)
        restricted_set = set(restricted)
        full = [row for row in range(len(seqs)) if row not in restricted_set]
        for rows, sample in ((restricted, self._sample_candidates), (full, self._sample_full)):
            if rows:
                index = torch.tensor(rows, device=logits.device)
                token_ids[index] = sample(probs.index_select(0, index), [seqs[r] for r in rows])
        return token_ids

    def _sample_full(self, probs: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Rows without top-k/top-p: the whole vocabulary, with min-p."""
        min_p = [seq.params.min_p for seq in seqs]
        if any(min_p):
            ratio = torch.tensor(min_p, device=probs.device, dtype=probs.dtype).unsqueeze(1)
            probs = probs.masked_fill(probs < probs.max(dim=-1, keepdim=True).values * ratio, 0.0)
        return self._draw(probs, seqs)

    def _sample_candidates(self, probs: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Rows with top-k/top-p: only their best candidates, via a partial top-k instead of a full sort
        (sorting a 49k vocabulary costs tens of ms on a small CPU). A top-p nucleus that does not fit in
        _NUM_CANDIDATES tokens falls back to the full sort, so the result is exact."""
        params = [seq.params for seq in seqs]
        vocab = probs.shape[1]
        device = probs.device
        lengths = [min(p.top_k, vocab) if p.top_k > 0 else min(_NUM_CANDIDATES, vocab) for p in params]
        cand_probs, cand_ids = probs.topk(max(lengths), dim=-1)
        mass = cand_probs.cumsum(dim=-1)
        for row, p in enumerate(params):
            if p.top_k <= 0 and mass[row, lengths[row] - 1] < p.top_p:
                lengths[row] = vocab
        if max(lengths) > cand_probs.shape[1]:
            cand_probs, cand_ids = probs.sort(dim=-1, descending=True)
        num_cands = cand_probs.shape[1]
        rank = torch.arange(num_cands, device=device).unsqueeze(0)
        keep = rank < torch.tensor(lengths, device=device).unsqueeze(1)  # top-k
        kept = cand_probs * keep
        kept = kept / kept.sum(dim=-1, keepdim=True)
        top_p = torch.tensor([p.top_p if p.top_p < 1 else 2.0 for p in params], device=device)
        keep &= kept.cumsum(dim=-1) - kept < top_p.unsqueeze(1).to(kept.dtype)  # the best always stays
        min_p = torch.tensor([p.min_p for p in params], device=device, dtype=cand_probs.dtype).unsqueeze(1)
        keep &= cand_probs >= cand_probs[:, :1] * min_p
        choice = self._draw(cand_probs * keep, seqs)
        return cand_ids.gather(1, choice.unsqueeze(1)).squeeze(1)

    def _draw(self, probs: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """One token per row from (unnormalized) probabilities by inverse CDF: one uniform per row, drawn
        from the row's own generator when seeded (so the draw never depends on the rest of the batch)."""
        uniforms = torch.rand((len(seqs), 1), device=probs.device, dtype=probs.dtype)
        for row, seq in enumerate(seqs):
            if seq.params.seed is None:
                continue
            generator = self._generators.get(seq.seq_id)
            if generator is None:
                generator = torch.Generator(device=probs.device).manual_seed(seq.params.seed)
                self._generators[seq.seq_id] = generator
            uniforms[row] = torch.rand(1, generator=generator, device=probs.device, dtype=probs.dtype)
        cdf = probs.cumsum(dim=-1)
        # right=True: the first index whose cumulative mass exceeds the target, so zero-mass tokens never win.
        index = torch.searchsorted(cdf, uniforms * cdf[:, -1:], right=True)
        return index.clamp_(max=probs.shape[1] - 1).squeeze(1)


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
