"""Decode step-time breakdown and decode tok/s of the embedded SmolLM2 on this machine.

For each weight mode (bf16 "none", and the quant module's "auto" when it is there) and each stream count
(1, 4, 16 by default): prefills the streams, then times greedy decode steps through the whole engine
(schedule, runner, sampler, postprocess) and prints the median step time, the aggregate tok/s, and the
median split of a step into runner prepare / layers / LM head / the rest (sampler, scheduler,
detokenization), and the median CPU time of the calling thread per step: with 1 thread that is the
figure to compare between runs on a shared machine, where wall times swing by a third with the load. `--profile` adds torch.profiler's top operators for one-stream decode.

    .venv/bin/python bench/decode_profile.py [--threads 2] [--decode-threads 1] [--streams 1,4,16] [--modes none,auto] [--compile]

With --compile the first decode steps of each new batch size compile (seconds); the timed steps
follow a warm-up step, so run with the stream counts in the order you want them compiled.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from shoal.engine.embedded import embedded_model_path
from shoal.engine.llm_engine import EngineConfig, LLMEngine
from shoal.engine.model_runner import ModelRunner, ThreadPolicy
from shoal.engine.quant import quantize_model
from shoal.engine.sampling import SamplingParams
from shoal.engine.tokenizer import load_tokenizer

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


class StepTimer:
    """Wraps the runner's phases with wall-clock timers (one sample per step)."""

    def __init__(self, runner: ModelRunner) -> None:
        self.samples: dict[str, list[float]] = {"prepare": [], "layers": [], "head": []}
        self._wrap(runner, "_prepare", "prepare")
        self._wrap(runner.model, "forward", "layers")
        self._wrap(runner.model, "compute_logits", "head")

    def _wrap(self, owner: Any, name: str, label: str) -> None:
        inner: Callable[..., Any] = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = inner(*args, **kwargs)
            self.samples[label].append(time.perf_counter() - start)
            return out

        setattr(owner, name, timed)

    def reset(self) -> None:
        for values in self.samples.values():
            values.clear()


def run_streams(engine: LLMEngine, timer: StepTimer, streams: int, steps: int) -> dict[str, float]:
    params = SamplingParams(temperature=0, max_tokens=steps + 2, ignore_eos=True)
    for i in range(streams):
        engine.add_request(f"s{streams}-{i}", f"Story {i}: {PROMPT}", params)
    while any(seq.num_uncomputed_tokens > 1 for seq in engine._seqs.values()):  # prefill
        engine.step()
    engine.step()  # first decode step: warm-up
    timer.reset()
    step_times, cpu_times = [], []
    while engine.has_unfinished():
        start, cpu_start = time.perf_counter(), time.thread_time()
        outputs = engine.step()
        if outputs and all(o.token_ids for o in outputs) and len(outputs) == streams:
            step_times.append(time.perf_counter() - start)
            cpu_times.append(time.thread_time() - cpu_start)
    med = {k: statistics.median(v) * 1e3 if v else 0.0 for k, v in timer.samples.items()}
    step = statistics.median(step_times) * 1e3
    return {
        "step_ms": step,
        "cpu_ms": statistics.median(cpu_times) * 1e3,
        **med,
        "other": step - sum(med.values()),
        "tok_s": streams * 1e3 / step,
    }


def time_to_first_token(engine: LLMEngine, num_tokens: int) -> float:
    """Seconds from adding a `num_tokens` prompt to its first token (median of 3, after a warm-up)."""
    prompt = list(range(1000, 1000 + num_tokens))  # plain ids: the prefix cache is off, all of it prefills
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    times = []
    for rep in range(4):
        start = time.perf_counter()
        engine.add_request(f"ttft-{num_tokens}-{rep}", prompt, params)
        while engine.has_unfinished():
            engine.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def profile_one(engine: LLMEngine, steps: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    params = SamplingParams(temperature=0, max_tokens=steps + 2, ignore_eos=True)
    engine.add_request("profile", PROMPT, params)
    engine.step()
    engine.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        while engine.has_unfinished():
            engine.step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="threads of steps with >= 64 tokens (prefill; default: torch's count, as a node's runner)",
    )
    parser.add_argument(
        "--decode-threads",
        type=int,
        default=None,
        help="threads of smaller (decode) steps (default: --threads)",
    )
    parser.add_argument("--streams", default="1,4,16")
    parser.add_argument("--modes", default="none,auto")
    parser.add_argument("--steps", type=int, default=40, help="decode steps timed per stream count")
    parser.add_argument("--profile", action="store_true", help="torch.profiler table for 1 stream")
    parser.add_argument("--compile", action="store_true", help="torch.compile'd decode layers")
    parser.add_argument("--ttft", type=int, default=1000, help="prompt tokens for the TTFT line (0: skip)")
    args = parser.parse_args()
    if args.decode_threads is None:
        args.decode_threads = args.threads
    torch.set_num_threads(args.threads)
    path = embedded_model_path()
    tokenizer = load_tokenizer(path)
    print(f"threads: {args.decode_threads} for decode steps, {args.threads} for prefill; steps={args.steps}")
    for mode in args.modes.split(","):
        runner = ModelRunner(
            path,
            kv_cache_bytes=256 << 20,
            max_model_len=2048,
            max_num_batched_tokens=2048,
            compile_decode=args.compile,
            threads=ThreadPolicy(small_step_threads=args.decode_threads, large_step_threads=args.threads),
        )
        # "none" too: on CPU it prepacks the bf16 weights, as load_engine does
        print(quantize_model(runner.model, mode).describe())
        config = EngineConfig(max_num_batched_tokens=2048, max_num_seqs=64, enable_prefix_caching=False)
        engine = LLMEngine(runner, tokenizer, config)
        timer = StepTimer(runner)
        for streams in (int(s) for s in args.streams.split(",")):
            r = run_streams(engine, timer, streams, args.steps)
            print(
                f"{mode:>5} streams={streams:>2}: step {r['step_ms']:6.2f} ms = prepare {r['prepare']:5.2f}"
                f" + layers {r['layers']:6.2f} + head {r['head']:5.2f} + other {r['other']:5.2f}"
                f"  -> {r['tok_s']:6.1f} tok/s (this thread's CPU time per step {r['cpu_ms']:6.2f} ms)",
                flush=True,
            )
        if args.ttft:
            ttft = time_to_first_token(engine, args.ttft)
            print(f"{mode:>5} time to first token, {args.ttft}-token prompt: {ttft * 1e3:.0f} ms", flush=True)
        if args.profile:
            profile_one(engine, args.steps)


if __name__ == "__main__":
    main()
