"""A model's decode layers through one torch.compile'd graph, called directly once its inputs are known.

Inputs per step: the layers, the residual stream h, rotary cos/sin, the step's `AttentionMetadata` and
the layers' KV caches; output: h after the last layer (the K/V written into the caches as a side effect).

Why direct calls: through torch.compile, every layer call first runs dynamo's guards and pulls the
graph's ~40 inputs (weights, scales, sizes) out of the layer's modules. On the 2-core dev box that costs
~200 us a SmolLM2 layer, as much as the layer's four weight products: 30 layers took 17.0 ms through
dynamo and 11.0 ms calling the same compiled graph with the same arguments (1 thread, thread CPU time).

How: the backend hands us each graph it compiles. Steps are told apart by their signature (`_signature`:
dtypes, sizes but the context's, contiguity, batch, grad mode; in practice the batch size). While a kind
of step has no plan, it goes through dynamo and records, per layer call, the graph called and its
arguments. Two recorded steps of one signature with different context lengths (consecutive decode steps)
make its plan: each argument position is either the same object both times (a weight, the layer's KV
cache, a size that does not change: bound once per layer), one of the step's inputs (h, cos, sin, slot
mapping, gather, mask, found by identity), or an int that equals the context length both times.
Anything else (a graph break, so two graphs per layer; an input of another kind) leaves the plan
unbuilt, and such steps keep going through dynamo as before.

Invariant: a plan is used only for steps with its signature, which the recorded graphs were compiled
for. Dynamo's guards checked that per call; the signature is checked once per step. Any other step goes
through dynamo, which recompiles as it would have.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx.experimental._config
from torch import nn

from shoal.engine.layers import AttentionMetadata

_log = logging.getLogger(__name__)

# Recorded steps that fail to make a plan before recording stops (a graph break fails every time).
MAX_PLAN_ATTEMPTS = 8
LayerForward = Callable[..., torch.Tensor]  # (layer, h, cos, sin, meta, kv_cache) -> h


@dataclass(frozen=True, slots=True)
class _Call:  # one call of a compiled graph
    graph: Callable[..., Any]
    args: list[Any]
    output: Any


@dataclass(frozen=True, slots=True)
class _Slot:
    position: int
    kind: str  # a key of `_step_inputs`, or "context" (an int: the context length)


@dataclass(frozen=True, slots=True)
class _Plan:
    graphs: list[Callable[..., Any]]  # per layer
    bound: list[list[Any]]  # per layer: the arguments, with the per-step ones to fill in
    slots: list[list[_Slot]]  # per layer


class CompiledDecode:
    """`run(layers, h, cos, sin, meta, kv_caches) -> h` through one compiled `forward` per layer call."""

    def __init__(
        self,
        forward: LayerForward,
        backend: str | Callable[..., object],
        options: dict[str, Any] | None,
    ) -> None:
        self._compiled = torch.compile(forward, dynamic=True, backend=_recording_backend(backend, options))
        self._last_steps: dict[tuple[Any, ...], _Step] = {}  # per signature, while it has no plan
        self._plans: dict[tuple[Any, ...], _Plan] = {}  # per signature (batch size, in practice)
        self._attempts = 0

    @property
    def direct(self) -> bool:
        """Whether some steps (those like the recorded ones) skip dynamo."""
        return bool(self._plans)

    @property
    def num_plans(self) -> int:
        """Kinds of steps (batch sizes) called directly."""
        return len(self._plans)

    def run(
        self,
        layers: Iterable[nn.Module],
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        inputs = _step_inputs(h, cos, sin, meta)
        context = _context(meta)
        signature = _signature(inputs, meta)
        plan = self._plans.get(signature)
        if plan is not None:
            return _run_direct(plan, inputs, context)
        record = self._attempts < MAX_PLAN_ATTEMPTS
        calls: list[_Call] = []
        hs = [h]  # each layer call's h, then the output
        _recorder.calls = calls if record else None
        try:
            # Without duck sizing a context of 2 would share its symbol with the cache's k/v axis and be
            # specialized with it, compiling again on the next step.
            with torch.fx.experimental._config.patch(use_duck_shape=False):  # type: ignore[attr-defined]
                for layer, kv_cache in zip(layers, kv_caches, strict=True):
                    hs.append(self._compiled(layer, hs[-1], cos, sin, meta, kv_cache))
        finally:
            _recorder.calls = None
        if record:
            self._learn(_Step(calls, inputs, hs, context, signature))
        return hs[-1]

    def _learn(self, step: _Step) -> None:
        """Keep this step's recording; with the previous one, try to make the plan."""
        if len(step.calls) != len(step.hs) - 1:  # a graph break: more than one graph per layer call
            self._attempts += 1
            self._last_steps.pop(step.signature, None)
            return
        previous = self._last_steps.get(step.signature)
        if previous is not None and previous.context == step.context:
            return
        self._last_steps[step.signature] = step
        if previous is None:
            return
        plan = _make_plan(previous, step)
        if plan is None:
            self._attempts += 1
            return
        self._plans[step.signature] = plan
        del self._last_steps[step.signature]
        _log.info("compiled decode: %d layers now called without dynamo", len(step.calls))


class _Recorder(threading.local):
    calls: list[_Call] | None = None  # where the graphs called on this thread append their calls


_recorder = _Recorder()
_BACKENDS: dict[tuple[Any, ...], Callable[..., Any]] = {}


def _recording_backend(
    backend: str | Callable[..., object], options: dict[str, Any] | None
) -> Callable[..., Any]:
    """torch.compile's `backend` with each compiled graph wrapped to record its calls into `_recorder`.

    One wrapper per (backend, options): dynamo caches graphs per function and backend, so every model of
    a process shares the graphs it compiled for the same shapes (weights are graph inputs), and a process
    that builds many models (the tests) does not run into dynamo's recompile limit."""
    key = (backend, tuple(sorted((options or {}).items())))
    if key in _BACKENDS:
        return _BACKENDS[key]
    if callable(backend):
        compiler: Callable[..., Any] = backend
    elif backend == "inductor":
        from torch._inductor.compile_fx import compile_fx

        compiler = functools.partial(compile_fx, config_patches=dict(options or {}))
    else:
        compiler = torch._dynamo.lookup_backend(backend)

    def compile_recording(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        inner = compiler(gm, example_inputs)

        def graph(*args: Any) -> Any:
            output = inner(*args)
            if _recorder.calls is not None:
                _recorder.calls.append(_Call(inner, list(args), output))
            return output

        return graph

    _BACKENDS[key] = compile_recording
    return compile_recording


@dataclass(frozen=True, slots=True)
class _Step:
    calls: list[_Call]
    inputs: dict[str, Any]  # `_step_inputs`
    hs: list[torch.Tensor]  # h into each layer, then out of the last
    context: int
    signature: tuple[Any, ...]


def _step_inputs(
    h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata
) -> dict[str, Any]:
    group = meta.groups[0]
    return {
        "h": h,
        "cos": cos,
        "sin": sin,
        "slot_mapping": meta.slot_mapping,
        "gather": group.gather,
        "mask": group.mask,
    }


def _context(meta: AttentionMetadata) -> int:
    gather = meta.groups[0].gather
    return -1 if gather is None else int(gather.shape[1])


# Step inputs whose last axis is the context (`AttentionGroup` of decode: gather (B, L), mask (B * Hkv, 1, L)).
_CONTEXT_LAST = ("gather", "mask")


def _signature(inputs: dict[str, Any], meta: AttentionMetadata) -> tuple[Any, ...]:
    """What the compiled graph relies on, with the context length left out: two steps with equal
    signatures run the same graph (see the module docstring)."""
    group = meta.groups[0]
    rows = group.rows
    parts: list[Any] = [
        torch.is_grad_enabled(),
        torch.is_inference_mode_enabled(),
        meta.decode_only,
        len(meta.groups),
        group.batch,
        group.decode,
        group.causal,
        (rows.start, rows.stop, rows.step) if isinstance(rows, slice) else None,
    ]
    for name, value in inputs.items():
        if not isinstance(value, torch.Tensor):
            parts.append((name, value))
            continue
        sizes: tuple[int | None, ...] = tuple(value.shape)
        if name in _CONTEXT_LAST:
            sizes = (*sizes[:-1], None)
        parts.append((name, value.dtype, value.device, sizes, value.is_contiguous()))
    return tuple(parts)


def _make_plan(first: _Step, second: _Step) -> _Plan | None:
    """The plan two recorded steps imply, or None where an argument is none of the known kinds."""
    graphs, bound, slots = [], [], []
    for layer, (a, b) in enumerate(zip(first.calls, second.calls, strict=True)):
        if a.graph is not b.graph or len(a.args) != len(b.args):
            return None
        if not _returns(a, first.hs[layer + 1]) or not _returns(b, second.hs[layer + 1]):
            return None
        known_a = {id(v): k for k, v in {**first.inputs, "h": first.hs[layer]}.items() if v is not None}
        known_b = {id(v): k for k, v in {**second.inputs, "h": second.hs[layer]}.items() if v is not None}
        layer_slots = []
        for position, (x, y) in enumerate(zip(a.args, b.args, strict=True)):
            kind = _kind(x, y, known_a, known_b, first.context, second.context)
            if kind is None:
                return None
            if kind != "bound":
                layer_slots.append(_Slot(position, kind))
        graphs.append(a.graph)
        args = list(a.args)
        for slot in layer_slots:
            args[slot.position] = None  # filled in per call
        bound.append(args)
        slots.append(layer_slots)
    return _Plan(graphs, bound, slots)


def _kind(
    x: Any, y: Any, known_x: dict[int, str], known_y: dict[int, str], context_x: int, context_y: int
) -> str | None:
    """ "bound", a step input's name, "context", or None (not explained) for one argument position."""
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        name = known_x.get(id(x))
        if name is not None:
            return name if known_y.get(id(y)) == name else None
        return "bound" if x is y and id(y) not in known_y else None
    if isinstance(x, int) and isinstance(y, int) and not isinstance(x, bool):
        if x == context_x and y == context_y:
            return "context"
        return "bound" if x == y else None
    return "bound" if type(x) is type(y) and x == y else None


def _returns(call: _Call, h: torch.Tensor) -> bool:
    output = call.output
    return isinstance(output, list | tuple) and len(output) == 1 and output[0] is h


def _run_direct(plan: _Plan, inputs: dict[str, Any], context: int) -> torch.Tensor:
    h = inputs["h"]
    for graph, bound, slots in zip(plan.graphs, plan.bound, plan.slots, strict=True):
        args = bound.copy()
        for slot in slots:
            args[slot.position] = context if slot.kind == "context" else inputs[slot.kind]
        (h,) = graph(*args)
        inputs["h"] = h
    return h
