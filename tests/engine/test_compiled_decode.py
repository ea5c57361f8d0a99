"""CompiledDecode: after two recorded decode steps, layers run by calling the compiled graph directly, with
the same results as eager; steps unlike the recorded ones, and graphs with breaks, keep dynamo's path."""

from __future__ import annotations

import torch
from torch import nn

from shoal.engine.layers import AttentionGroup, AttentionMetadata
from shoal.engine.models.compiled_decode import MAX_PLAN_ATTEMPTS, CompiledDecode

DIM = 8
NUM_SLOTS = 64


class ToyLayer(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(DIM, DIM, generator=torch.Generator().manual_seed(seed)))
        self.scale = torch.full((DIM,), 0.5 + seed)  # a plain attribute, like a quantized kernel's tensors


def toy_forward(
    layer: ToyLayer,
    h: torch.Tensor,  # (B, DIM)
    cos: torch.Tensor,  # (B, DIM)
    sin: torch.Tensor,
    meta: AttentionMetadata,
    kv_cache: torch.Tensor,  # (NUM_SLOTS, DIM)
) -> torch.Tensor:
    """A decode layer's shape of work: write this token's entry, attend over the gathered context."""
    group = meta.groups[0]
    assert group.gather is not None and group.mask is not None
    x = (h @ layer.weight.T) * layer.scale * cos + sin
    kv_cache.index_copy_(0, meta.slot_mapping, x)
    context = kv_cache.index_select(0, group.gather.view(-1)).view(group.batch, -1, DIM)  # (B, L, DIM)
    scores = (context * x[:, None]).sum(-1) + group.mask.view(group.batch, -1)  # (B, L)
    return h + (scores.softmax(-1)[..., None] * context).sum(1)


def toy_forward_with_a_break(*args: object) -> torch.Tensor:
    out = toy_forward(*args)  # type: ignore[arg-type]
    torch._dynamo.graph_break()
    return out + 0


def step_inputs(
    batch: int, context: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, DIM, generator=gen)
    cos, sin = torch.rand(batch, DIM, generator=gen), torch.rand(batch, DIM, generator=gen)
    # sequence b holds slots [16 b, 16 b + context); its new token goes to the last one
    gather = torch.stack([torch.arange(16 * b, 16 * b + context) for b in range(batch)])  # (B, L)
    mask = torch.zeros(batch, 1, context)
    meta = AttentionMetadata(
        slot_mapping=gather[:, -1].contiguous(),
        groups=(AttentionGroup(slice(0, batch), gather, mask, causal=False, batch=batch, decode=True),),
        decode_only=True,
    )
    return h, cos, sin, meta


def eager(layers: list[ToyLayer], inputs: tuple, kv_caches: list[torch.Tensor]) -> torch.Tensor:
    h, cos, sin, meta = inputs
    for layer, kv_cache in zip(layers, kv_caches, strict=True):
        h = toy_forward(layer, h, cos, sin, meta, kv_cache)
    return h


def count_dynamo_calls(decode: CompiledDecode) -> list[int]:
    """Appends to the returned list for each layer call that goes through dynamo (not the plan)."""
    calls: list[int] = []
    through_dynamo = decode._compiled

    def counted(*args: object) -> torch.Tensor:
        calls.append(1)
        return through_dynamo(*args)

    decode._compiled = counted
    return calls


def caches(seed: int, num_layers: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(NUM_SLOTS, DIM, generator=gen) for _ in range(num_layers)]


@torch.inference_mode()
def test_direct_calls_start_after_two_steps_and_match_eager() -> None:
    layers = [ToyLayer(seed) for seed in range(3)]
    decode = CompiledDecode(toy_forward, "eager", None)
    dynamo_calls = count_dynamo_calls(decode)
    ours, theirs = caches(0, 3), caches(0, 3)
    for step, context in enumerate(range(2, 9)):
        inputs = step_inputs(1, context, seed=step)
        before = len(dynamo_calls)
        got = decode.run(layers, *inputs, ours)
        assert len(dynamo_calls) - before == (3 if step < 2 else 0)
        want = eager(layers, inputs, theirs)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)  # the K/V entries were written too
        assert decode.direct == (step >= 1), f"step {step}: direct {decode.direct}"


@torch.inference_mode()
def test_steps_unlike_the_recorded_ones_go_through_dynamo() -> None:
    layers = [ToyLayer(seed) for seed in range(2)]
    decode = CompiledDecode(toy_forward, "eager", None)
    ours, theirs = caches(1, 2), caches(1, 2)
    for step, context in enumerate(range(3, 6)):  # one stream: the plan
        inputs = step_inputs(1, context, seed=step)
        torch.testing.assert_close(decode.run(layers, *inputs, ours), eager(layers, inputs, theirs))
    assert decode.direct
    dynamo_calls = count_dynamo_calls(decode)
    h, _, sin, meta = step_inputs(1, 8, seed=11)
    strided_cos = torch.rand(1, 2 * DIM)[:, ::2]  # not contiguous
    unlike = [step_inputs(2, 7, seed=10), (h, strided_cos, sin, meta)]
    for inputs in unlike:
        before = len(dynamo_calls)
        torch.testing.assert_close(decode.run(layers, *inputs, ours), eager(layers, inputs, theirs))
        assert len(dynamo_calls) - before == len(layers)
    inputs = step_inputs(1, 9, seed=12)  # like the recorded steps again
    torch.testing.assert_close(decode.run(layers, *inputs, ours), eager(layers, inputs, theirs))
    assert len(dynamo_calls) == 2 * len(layers)


@torch.inference_mode()
def test_each_batch_size_gets_its_own_plan() -> None:
    layers = [ToyLayer(seed) for seed in range(2)]
    decode = CompiledDecode(toy_forward, "eager", None)
    dynamo_calls = count_dynamo_calls(decode)
    ours, theirs = caches(3, 2), caches(3, 2)
    schedule = [(1, 3), (2, 3), (1, 4), (2, 4), (1, 5), (2, 5), (3, 5)]  # (batch, context)
    through_dynamo = []
    for step, (batch, context) in enumerate(schedule):
        inputs = step_inputs(batch, context, seed=step)
        before = len(dynamo_calls)
        torch.testing.assert_close(decode.run(layers, *inputs, ours), eager(layers, inputs, theirs))
        through_dynamo.append(len(dynamo_calls) > before)
    assert through_dynamo == [True, True, True, True, False, False, True]
    assert decode.num_plans == 2


@torch.inference_mode()
def test_a_graph_break_leaves_every_step_on_dynamo() -> None:
    layers = [ToyLayer(seed) for seed in range(2)]
    decode = CompiledDecode(toy_forward_with_a_break, "eager", None)
    ours, theirs = caches(2, 2), caches(2, 2)
    for step, context in enumerate(range(2, 4 + MAX_PLAN_ATTEMPTS)):
        inputs = step_inputs(1, context, seed=step)
        torch.testing.assert_close(decode.run(layers, *inputs, ours), eager(layers, inputs, theirs))
    assert not decode.direct
