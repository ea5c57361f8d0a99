"""shoal vs transformers vs llama.cpp on the embedded SmolLM2-135M-Instruct, in one run.

Measures (medians over --reps): single-stream decode tok/s, time to first token for ~200 and ~1000 token
prompts, aggregate decode tok/s at 1/4/16 concurrent streams, this machine's memory bandwidth and the
decode limit it implies, and the ratios issue 2 targets. shoal runs through LLMEngine (continuous
batching) in bf16 and with int8 / int4 / auto weight quantization; transformers in bf16 from the same GGUF;
llama.cpp through llama-cpp-python on the same Q4_1 file (optional: see bench/README.md).

    .venv/bin/python bench/engine.py [--tokens 128] [--reps 3] [--modes none,int8,int4,auto] [--compile]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from membw import decode_weight_bytes, measure_bandwidth
from shoal.engine.embedded import embedded_model_path

TEXT = (
    "The history of the river valley begins long before the first farmers arrived. Glaciers carved the "
    "hills, and the water that followed them laid down layers of silt, sand and stone. Over thousands of "
    "years forests grew and burned and grew again, and the animals that lived in them left their bones in "
    "the banks of the slow brown river. When people came, they built small houses of wood and reed near "
    "the water, planted barley and beans, and learned which years the river would flood. "
)
DECODE_PROMPT = "Once upon a time, in a small village by the sea,"
Result = dict[str, float | None]
DecodeRun = Callable[[], float]  # one single-stream decode of --tokens tokens -> tok/s


def median_of(reps: int, fn: Callable[[], float]) -> float:
    fn()  # warm-up: first calls pay for allocation and kernel selection
    return statistics.median(fn() for _ in range(reps))


def prompt_of(
    tokenizer_encode: Callable[[str], list[int]], decode: Callable[[list[int]], str], n: int
) -> str:
    text = TEXT * (n // 60 + 2)
    return decode(tokenizer_encode(text)[:n])


# ---------------------------------------------------------------- shoal


def bench_shoal(mode: str, args: argparse.Namespace, prompts: dict[int, str]) -> tuple[Result, DecodeRun]:
    from shoal.engine.llm_engine import EngineConfig, LLMEngine
    from shoal.engine.model_runner import ModelRunner, ThreadPolicy
    from shoal.engine.models.llama import COMPILED_DECODE_SMALL_ROWS
    from shoal.engine.quant import quantize_model
    from shoal.engine.sampling import SamplingParams
    from shoal.engine.tokenizer import load_tokenizer

    path = embedded_model_path()
    # steps under 64 tokens (decode) on --decode-threads, prefill on --threads; by default both are
    # --threads, as in a node's runner
    threads = ThreadPolicy(small_step_threads=args.decode_threads, large_step_threads=args.threads)
    runner = ModelRunner(
        path,
        kv_cache_bytes=256 << 20,
        max_model_len=2048,
        max_num_batched_tokens=2048,
        threads=threads,
        compile_decode=args.compile,
    )
    summary = quantize_model(runner.model, mode)
    print(f"  shoal {mode}: {summary.describe()}", flush=True)
    tokenizer = load_tokenizer(path)
    # no prefix cache: every repetition of a prompt must prefill it again
    config = EngineConfig(max_num_batched_tokens=2048, max_num_seqs=64, enable_prefix_caching=False)
    engine = LLMEngine(runner, tokenizer, config)
    counter = iter(range(10**9))

    def run(batch: list[str], max_tokens: int) -> list[list[float]]:
        """Token arrival times per request."""
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        ids = [f"r{next(counter)}" for _ in batch]
        for rid, prompt in zip(ids, batch, strict=True):
            engine.add_request(rid, prompt, params)
        times: dict[str, list[float]] = {rid: [] for rid in ids}
        start = time.perf_counter()
        while engine.has_unfinished():
            for out in engine.step():
                if out.token_ids:
                    times[out.request_id].append(time.perf_counter() - start)
        return [times[rid] for rid in ids]

    if args.compile:  # compiles the decode graphs (one stream; 2-4; more), as a node's warm-up does
        for streams in (1, 2, COMPILED_DECODE_SMALL_ROWS + 1):
            run([DECODE_PROMPT] * streams, 3)

    def decode() -> float:
        return decode_rate(run([DECODE_PROMPT], args.tokens))

    result: Result = {}
    result["decode"] = median_of(args.reps, decode)
    for n, prompt in prompts.items():
        result[f"ttft{n}"] = median_of(args.reps, lambda p=prompt: run([p], 1)[0][0])  # type: ignore[misc]
    for s in args.streams:
        batch = [f"Story {i}: {DECODE_PROMPT}" for i in range(s)]
        result[f"streams{s}"] = median_of(
            args.reps, lambda b=batch: aggregate_rate(run(b, args.stream_tokens))
        )  # type: ignore[misc]
    return result, decode


def decode_rate(times: list[list[float]]) -> float:
    (t,) = times
    return (len(t) - 1) / (t[-1] - t[0])


def aggregate_rate(times: list[list[float]]) -> float:
    """Tokens after every stream's first one, over the time from the last first token to the end."""
    begin = max(t[0] for t in times)
    end = max(t[-1] for t in times)
    tokens = sum(sum(1 for x in t if x > begin) for t in times)
    return tokens / (end - begin)


# ---------------------------------------------------------------- transformers


def bench_transformers(args: argparse.Namespace, prompts: dict[int, str]) -> Result:
    import transformers

    path = embedded_model_path()
    transformers.logging.set_verbosity_error()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.bfloat16
    ).eval()

    def generate(batch: list[str], new_tokens: int) -> float:
        enc = tokenizer(batch, return_tensors="pt", padding=True)
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                **enc,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=tokenizer.pad_token_id,
            )
        return time.perf_counter() - start

    def rate(batch: list[str], new_tokens: int) -> float:
        first = generate(batch, 1)
        return len(batch) * (new_tokens - 1) / (generate(batch, new_tokens) - first)

    result: Result = {}
    result["decode"] = median_of(args.reps, lambda: rate([DECODE_PROMPT], args.tokens))
    for n, prompt in prompts.items():
        result[f"ttft{n}"] = median_of(args.reps, lambda p=prompt: generate([p], 1))  # type: ignore[misc]
    for s in args.streams:
        batch = [f"Story {i}: {DECODE_PROMPT}" for i in range(s)]
        result[f"streams{s}"] = median_of(args.reps, lambda b=batch: rate(b, args.stream_tokens))  # type: ignore[misc]
    return result


# ---------------------------------------------------------------- llama.cpp


def bench_llama_cpp(args: argparse.Namespace, prompts: dict[int, str]) -> tuple[Result, DecodeRun] | None:
    try:
        import llama_cpp
    except ImportError:
        print("  skipped: llama-cpp-python not installed (see bench/README.md)", flush=True)
        return None
    llm = llama_cpp.Llama(
        str(embedded_model_path()),
        n_ctx=2048,
        n_batch=1024,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        verbose=False,
    )

    def run(prompt: str, new_tokens: int) -> list[float]:
        tokens = llm.tokenize(prompt.encode())
        llm.reset()  # forget the previous prompt: no prefix reuse between repetitions
        times = []
        start = time.perf_counter()
        for _ in llm.generate(tokens, temp=0.0, top_k=1, reset=True):
            times.append(time.perf_counter() - start)
            if len(times) == new_tokens:
                break
        return times

    def decode() -> float:
        return decode_rate([run(DECODE_PROMPT, args.tokens)])

    result: Result = {"decode": median_of(args.reps, decode)}
    for n, prompt in prompts.items():
        result[f"ttft{n}"] = median_of(args.reps, lambda p=prompt: run(p, 1)[0])  # type: ignore[misc]
    for s in args.streams:  # llama-cpp-python's Llama serves one sequence at a time
        result[f"streams{s}"] = result["decode"] if s == 1 else None
    return result, decode


# ---------------------------------------------------------------- report


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    return f"{value * 1000:.0f} ms" if unit == "s" else f"{value:.1f}"


def ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None else f"{a / b:.2f}x"


def take_turns(runs: dict[str, DecodeRun], reps: int) -> dict[str, list[float]]:
    """Each engine's single-stream decode tok/s, the engines taking turns run by run: on a shared machine
    the speed drifts by a third within minutes, so a ratio of figures taken minutes apart says little."""
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(reps):
        for name, run in runs.items():
            rates[name].append(run())
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=128, help="tokens generated for single-stream decode")
    parser.add_argument(
        "--stream-tokens", type=int, default=64, help="tokens per stream for the batched runs"
    )
    parser.add_argument("--reps", type=int, default=3, help="repetitions per figure (the median is shown)")
    parser.add_argument("--threads", type=int, default=2, help="threads of every engine (shoal: prefill)")
    parser.add_argument(
        "--decode-threads",
        type=int,
        default=None,
        help="shoal's threads for steps under 64 tokens (decode; default: --threads, as a node's runner)",
    )
    parser.add_argument(
        "--turns",
        type=int,
        default=7,
        help="single-stream decode runs per engine taking turns, shoal's fastest mode vs llama.cpp (0: skip)",
    )
    parser.add_argument("--modes", default="none,int8,int4,auto", help="shoal quantization modes to run")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="shoal: compiled decode steps (a node's default)",
    )
    parser.add_argument("--engines", default="shoal,transformers,llama.cpp")
    parser.add_argument("--streams", default="1,4,16")
    parser.add_argument("--prompt-tokens", default="200,1000", help="prompt lengths for time to first token")
    args = parser.parse_args()
    args.streams = [int(s) for s in args.streams.split(",")]
    if args.decode_threads is None:
        args.decode_threads = args.threads
    torch.set_num_threads(args.threads)
    engines = args.engines.split(",")

    from shoal.engine.tokenizer import load_tokenizer

    tok = load_tokenizer(embedded_model_path())
    prompts = {int(n): prompt_of(tok.encode, tok.decode, int(n)) for n in args.prompt_tokens.split(",")}

    bw = measure_bandwidth()
    compiled = ", decode compiled" if args.compile else ""
    print(f"threads: {args.threads} (shoal decode steps: {args.decode_threads}{compiled})")
    print(
        f"memory bandwidth ({args.threads} threads): read {bw['read']:.1f} GB/s, copy {bw['copy']:.1f} GB/s"
    )
    for name, num_bytes in decode_weight_bytes(30, 576, 1536, 576, 192, 49152).items():
        print(
            f"  decode limit {name:>15}: {num_bytes / 2**20:6.1f} MiB/token -> {bw['read'] * 1e9 / num_bytes:5.0f} tok/s"
        )

    results: dict[str, Result] = {}
    decode_runs: dict[str, DecodeRun] = {}  # kept for the turns: every engine stays loaded
    if "shoal" in engines:
        for mode in args.modes.split(","):
            print(f"running shoal {mode} ...", flush=True)
            results[f"shoal {mode}"], decode_runs[f"shoal {mode}"] = bench_shoal(mode, args, prompts)
            gc.collect()
    if "transformers" in engines:
        print("running transformers bf16 ...", flush=True)
        results["transformers bf16"] = bench_transformers(args, prompts)
        gc.collect()
    if "llama.cpp" in engines:
        print("running llama.cpp Q4_1 ...", flush=True)
        llama = bench_llama_cpp(args, prompts)
        if llama is not None:
            results["llama.cpp Q4_1"], decode_runs["llama.cpp Q4_1"] = llama

    columns = [("decode", "decode tok/s", "")]
    columns += [(f"ttft{n}", f"TTFT {n}", "s") for n in prompts]
    columns += [(f"streams{s}", f"{s} streams tok/s", "") for s in args.streams]
    print()
    print(f"{'engine':<20}" + "".join(f"{title:>17}" for _, title, _ in columns))
    for name, res in results.items():
        print(f"{name:<20}" + "".join(f"{fmt(res.get(key), unit):>17}" for key, _, unit in columns))

    shoal_modes = {k: v for k, v in results.items() if k.startswith("shoal")}
    if not shoal_modes:
        return
    best_name, best = max(shoal_modes.items(), key=lambda kv: kv[1]["decode"] or 0.0)
    llama_res = results.get("llama.cpp Q4_1", {})
    hf = results.get("transformers bf16", {})
    bf16 = results.get("shoal none", {})
    long_n = max(prompts)
    s_lo, s_hi = min(args.streams), max(args.streams)
    print()
    if llama_res and args.turns > 0:
        pair = {best_name: decode_runs[best_name], "llama.cpp Q4_1": decode_runs["llama.cpp Q4_1"]}
        print(f"single-stream decode, taking turns ({args.turns} runs each, {args.tokens} tokens):")
        rates = take_turns(pair, args.turns)
        for name, values in rates.items():
            print(
                f"  {name:<20} median {statistics.median(values):6.1f} tok/s  (runs: {', '.join(f'{v:.1f}' for v in values)})"
            )
        ours, theirs = rates[best_name], rates["llama.cpp Q4_1"]
        paired = statistics.median(a / b for a, b in zip(ours, theirs, strict=True))
        print(
            f"  {best_name} / llama.cpp Q4_1: {ratio(statistics.median(ours), statistics.median(theirs))} (medians), "
            f"{paired:.2f}x (median of back-to-back pairs)  (target >= 1.0x)"
        )
        print()
    print(f"ratios (targets from issue 2; shoal's fastest decode mode is {best_name!r}):")
    print(
        f"  single-stream decode, {best_name} / llama.cpp Q4_1:   {ratio(best['decode'], llama_res.get('decode'))}  (target >= 1.0x; sequential runs, see the turns above)"
    )
    print(
        f"  decode, shoal bf16 / transformers bf16:        {ratio(bf16.get('decode'), hf.get('decode'))}  (target >= 1.5x)"
    )
    print(
        f"  TTFT ~{long_n} tokens, {best_name} / llama.cpp:       {ratio(best[f'ttft{long_n}'], llama_res.get(f'ttft{long_n}'))}  (target <= 0.5x)"
    )
    print(
        f"  {best_name}: {s_hi} streams / {s_lo} stream aggregate:  {ratio(best[f'streams{s_hi}'], best[f'streams{s_lo}'])}  (target >= 6x)"
    )


if __name__ == "__main__":
    main()
