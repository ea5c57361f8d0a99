"""Vocabulary-parallel token embedding and LM head.

Both split the vocabulary rows evenly across tensor-parallel ranks (the last rank's slice may be padded
when the vocabulary does not divide). The embedding looks up the ids it owns, zeroes the others and
all-reduces; the head computes its slice of the logits and rebuilds the full row with the same single
collective (each rank writes its slice into zeros, then all-reduce), so `Communicator` needs only
`all_reduce`. With tied embeddings the head's weight is the embedding's (same shard on every rank).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from shoal.engine.parallel import Communicator, SingleProcessCommunicator


class VocabParallelEmbedding(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        dtype: torch.dtype,
        tp_rank: int = 0,
        tp_size: int = 1,
        comm: Communicator | None = None,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.tp_rank = tp_rank
        self.tp_size = tp_size
        self.comm: Communicator = comm or SingleProcessCommunicator()
        self.rows_per_rank = -(-vocab_size // tp_size)  # ceil
        self.vocab_start = tp_rank * self.rows_per_rank
        self.vocab_end = min(vocab_size, self.vocab_start + self.rows_per_rank)
        self.weight = nn.Parameter(
            torch.zeros(self.rows_per_rank, hidden_size, dtype=dtype), requires_grad=False
        )
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None = None) -> None:
        if loaded.shape != (self.vocab_size, param.shape[1]):
            raise ValueError(
                f"{type(self).__name__}: checkpoint tensor of shape {tuple(loaded.shape)} does not fit "
                f"({self.vocab_size}, {param.shape[1]})"
            )
        rows = self.vocab_end - self.vocab_start
        param.data[:rows].copy_(loaded.narrow(0, self.vocab_start, rows))

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(token_ids, self.weight)
        owned = (token_ids >= self.vocab_start) & (token_ids < self.vocab_end)
        local_ids = torch.where(owned, token_ids - self.vocab_start, 0)
        hidden = F.embedding(local_ids, self.weight) * owned.unsqueeze(-1).to(self.weight.dtype)
        return self.comm.all_reduce(hidden)


class ParallelLMHead(VocabParallelEmbedding):
    """hidden (N, hidden) -> logits (N, vocab_size), full rows on every rank.

    Quantization hook like `LinearBase`'s: `set_weight_kernel(kernel)` routes the product through
    `kernel(x) -> x @ W.T` for the local W = `.weight` (rows_per_rank, hidden), zero rows padding the
    vocabulary included. Unlike a linear layer the head keeps `.weight`: with tied embeddings the token
    embedding reads the same tensor (the quant module may free it itself when the head is untied).
    """

    _kernel: Callable[[torch.Tensor], torch.Tensor] | None = None

    def set_weight_kernel(self, kernel: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self._kernel = kernel

    def apply_weight(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._kernel(hidden) if self._kernel is not None else F.linear(hidden, self.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        local = self.apply_weight(hidden)  # (N, rows_per_rank)
        if self.tp_size == 1:
            return local[:, : self.vocab_size]
        full = hidden.new_zeros(hidden.shape[0], self.rows_per_rank * self.tp_size)
        full[:, self.vocab_start : self.vocab_start + self.rows_per_rank] = local
        return self.comm.all_reduce(full)[:, : self.vocab_size]
