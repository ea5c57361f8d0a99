"""Tensor-parallel half of bench/sharding.py: decode tok/s of a ~1B-shape random-weight Llama on 1 rank
pinned to one core vs 2 tensor-parallel ranks pinned to one core each.

It runs the runner processes directly under a `RunnerSupervisor` in this process (the same
`python -m shoal.runner` processes, RunnerSpecs and gloo group a node spawns), not through `shoal node`
processes: on a 2-core box the two nodes' own event loops would share the two pinned cores and measure
the nodes, not tensor parallelism. Each runner has 1 torch thread and `cpu_affinity` set to its core.

Per decode step a tensor-parallel rank makes 35 all-reduces with 16 layers: the step's control exchange
(1: delta, stop votes, sampled-token check), the vocabulary-parallel embedding (1), two per layer
(attention out and MLP down projections, 32) and the LM head's logits (1). The sampled tokens cost none:
every rank holds the full logits and samples for itself. On CPU they run over the runners' socket mesh
(shoal.runner.mesh, ~0.2 ms each here) rather than gloo (0.5-2.2 ms each here).
"""

from __future__ import annotations

import json
import socket
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import anyio
import psutil
import torch

from membw import decode_weight_bytes, measure_core_scaling  # bench/ is on sys.path
from shoal.engine.sampling import SamplingParams
from shoal.runner.messages import SubmitTask
from shoal.runner.spec import RunnerSpec
from shoal.types.instance_ids import InstanceId, TaskId, runner_id_for
from shoal.types.runners import is_serving, is_terminal
from shoal.worker.supervisor import RunnerSupervisor

# ~1B parameters: hidden 2048, 16 layers, 32 heads / 8 KV heads, MLP 5632, vocabulary 32000 (TinyLlama's shape).
SHAPE = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
}
PROMPT = list(range(10, 42))  # token ids: the model's vocabulary is its own


def write_random_llama(path: Path, shape: dict[str, int] = SHAPE) -> Path:
    """A Llama folder with random bf16 weights (std 0.02), config.json and a word-level tokenizer."""
    from safetensors.torch import save_file

    if (path / "model.safetensors").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    hidden, inter, vocab = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    head_dim = hidden // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * head_dim
    generator = torch.Generator().manual_seed(0)

    def weight(*size: int) -> torch.Tensor:
        return (torch.randn(*size, generator=generator) * 0.02).to(torch.bfloat16)

    tensors = {"model.embed_tokens.weight": weight(vocab, hidden), "lm_head.weight": weight(vocab, hidden)}
    tensors["model.norm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    for i in range(shape["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        for name, size in (
            ("self_attn.q_proj", (hidden, hidden)),
            ("self_attn.k_proj", (kv, hidden)),
            ("self_attn.v_proj", (kv, hidden)),
            ("self_attn.o_proj", (hidden, hidden)),
            ("mlp.gate_proj", (inter, hidden)),
            ("mlp.up_proj", (inter, hidden)),
            ("mlp.down_proj", (hidden, inter)),
        ):
            tensors[f"{prefix}{name}.weight"] = weight(*size)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"{prefix}{norm}.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    save_file(tensors, str(path / "model.safetensors.partial"), metadata={"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
        **shape,
    }
    (path / "config.json").write_text(json.dumps(config, indent=1))
    _write_word_tokenizer(path, vocab)
    (path / "model.safetensors.partial").rename(path / "model.safetensors")
    return path


def _write_word_tokenizer(path: Path, vocab_size: int) -> None:
    """One word per id ("w0" .. "wN"), split on whitespace: any id decodes, text encodes word by word."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="w0", eos_token="w2").save_pretrained(
        str(path)
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def tensor_specs(
    model: Path, cores: Sequence[int], *, dtype: str, quant: str, instance: str
) -> list[RunnerSpec]:
    """One rank per core: a tensor-parallel group of len(cores) ranks, each on 1 thread pinned to its core."""
    world = len(cores)
    port = _free_port()
    return [
        RunnerSpec.model_validate(
            {
                "runner_id": runner_id_for(InstanceId(instance), rank),
                "instance_id": instance,
                "sharding": "tensor",
                "backend": "gloo",
                "rank": rank,
                "world_size": world,
                "layer_start": 0,
                "layer_end": SHAPE["num_hidden_layers"],
                "tp_rank": rank,
                "tp_size": world,
                "device": "cpu",
                "rendezvous": {"host": "127.0.0.1", "port": port},
                "model_path": str(model),
                "dtype": dtype,
                "quant": quant,
                "kv_cache_bytes": 64 << 20,
                "max_model_len": 512,
                "num_threads": 1,
                "cpu_affinity": (core,),
                "group_timeout_s": 300.0,
            },
            strict=False,
        )
        for rank, core in enumerate(cores)
    ]


async def _decode_tok_s(supervisor: RunnerSupervisor, spec: RunnerSpec, task_id: str, tokens: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    stamps: list[float] = []
    counts: list[int] = []
    async for chunk in supervisor.submit(spec.runner_id, SubmitTask(TaskId(task_id), PROMPT, params)):
        if chunk.error is not None:
            raise RuntimeError(f"task {task_id}: {chunk.error}")
        if chunk.token_ids:
            stamps.append(time.perf_counter())
            counts.append(len(chunk.token_ids))
    return (sum(counts) - counts[0]) / (stamps[-1] - stamps[0])


async def _wait_serving(supervisor: RunnerSupervisor, specs: Sequence[RunnerSpec]) -> None:
    with anyio.fail_after(900):
        while True:
            statuses = [supervisor.status(spec.runner_id) for spec in specs]
            if any(is_terminal(s) for s in statuses):
                raise RuntimeError(f"a runner ended before serving: {statuses}")
            if all(is_serving(s) for s in statuses):
                return
            await anyio.sleep(0.2)


def _runner_processes() -> set[int]:
    return {child.pid for child in psutil.Process().children() if "shoal.runner" in " ".join(child.cmdline())}


def _cpu_seconds(pids: set[int]) -> float:
    times = [psutil.Process(pid).cpu_times() for pid in pids]
    return sum(t.user + t.system for t in times)


async def measure(
    placements: dict[str, list[RunnerSpec]], tokens: int, requests: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Decode tok/s of `requests` greedy requests per placement after one warm-up request each, and the
    CPU seconds per generated token of all the placement's runner processes (prefill included): what
    the work costs however loaded the machine is. All the placements stay loaded and take turns request
    by request, so a change in the machine's load (other jobs on a shared box) hits them alike."""
    runs: dict[str, list[float]] = {name: [] for name in placements}
    cpu: dict[str, list[float]] = {name: [] for name in placements}
    pids: dict[str, set[int]] = {}
    async with RunnerSupervisor() as supervisor:
        for name, specs in placements.items():  # one at a time: loads do not compete for memory
            before = _runner_processes()
            for spec in specs:
                await supervisor.spawn(spec)
            await _wait_serving(supervisor, specs)
            pids[name] = _runner_processes() - before
        for specs in placements.values():
            await _decode_tok_s(supervisor, specs[0], f"{specs[0].instance_id}-warm", 4)
        for i in range(requests):
            for name, specs in placements.items():
                start = _cpu_seconds(pids[name])
                runs[name].append(
                    await _decode_tok_s(supervisor, specs[0], f"{specs[0].instance_id}-{i}", tokens)
                )
                cpu[name].append((_cpu_seconds(pids[name]) - start) / tokens)
    return runs, cpu


def print_read_bound(cores: tuple[int, int], dtype: str, quant: str) -> None:
    """What the memory of the two pinned cores allows: a decode step reads every weight once, so a rank
    (or two ranks together) cannot decode faster than its cores read the weights."""
    alone, together = measure_core_scaling(*cores)
    line = (
        f"memory read: core {cores[0]} alone {alone:.1f} GB/s, cores {cores[0]} and {cores[1]} together"
        f" {together:.1f} GB/s ({together / alone:.2f}x)"
    )
    if quant == "none":
        head_dim = SHAPE["hidden_size"] // SHAPE["num_attention_heads"]
        weights = decode_weight_bytes(
            SHAPE["num_hidden_layers"],
            SHAPE["hidden_size"],
            SHAPE["intermediate_size"],
            SHAPE["hidden_size"],
            SHAPE["num_key_value_heads"] * head_dim,
            SHAPE["vocab_size"],
        )["bf16"] * (2 if dtype == "float32" else 1)
        line += (
            f": reading its {dtype} weights ({weights / 1e9:.2f} GB a token) bounds 1 rank at"
            f" {alone * 1e9 / weights:.1f} and 2 ranks at {together * 1e9 / weights:.1f} decode tok/s"
        )
    print(line, flush=True)


def run_tensor_bench(
    model_dir: Path, *, tokens: int, requests: int, dtype: str, quant: str, cores: tuple[int, int]
) -> dict[str, float]:
    model = write_random_llama(model_dir)
    print_read_bound(cores, dtype, quant)
    single, tensor = "1 rank, 1 core", "2 TP ranks, 1 core each"
    placements = {
        single: tensor_specs(model, cores[:1], dtype=dtype, quant=quant, instance="tp1"),
        tensor: tensor_specs(model, cores, dtype=dtype, quant=quant, instance="tp2"),
    }
    runs, cpu = anyio.run(measure, placements, tokens, requests)
    results = {name: statistics.median(values) for name, values in runs.items()}
    for name, values in runs.items():
        print(
            f"{name:>24}: {results[name]:7.2f} decode tok/s (runs: {', '.join(f'{r:.2f}' for r in values)}); "
            f"CPU {statistics.median(cpu[name]):.3f} s per token, all ranks"
        )
    pairs = [t / s for s, t in zip(runs[single], runs[tensor], strict=True)]
    print(
        f"2 TP ranks / 1 rank: {results[tensor] / results[single]:.2f}x of the medians, "
        f"{statistics.median(pairs):.2f}x the median of back-to-back pairs (target >= 1.5x)"
    )
    return results
