"""`shoal generate`: stream one answer (--prompt) or chat interactively with a model on this machine.

The edge of the engine: reads flags and the environment (the tokenizer cache dir), builds the engine, and
turns every error a person can act on into one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from typing import TextIO

import torch

from shoal.engine.embedded import embedded_model_path
from shoal.engine.errors import ShoalError
from shoal.engine.llm_engine import EngineConfig, LLMEngine, Prompt, load_engine
from shoal.engine.output_processor import RequestOutput
from shoal.engine.quant import QUANT_MODES
from shoal.engine.sampling import SamplingParams
from shoal.engine.tokenizer import default_cache_dir
from shoal.paths import user_path

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_EXIT_WORDS = {"/exit", "/quit"}


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate text with a model on this machine",
        description="Stream an answer to --prompt, or chat interactively (keeping the conversation) without it.",
    )
    parser.add_argument("--model", help="HF model folder or .gguf file (default: the embedded SmolLM2-135M)")
    parser.add_argument("--prompt", help="answer this prompt and exit (chat template applied)")
    parser.add_argument("--system", help="system message to start the conversation with")
    parser.add_argument("--max-tokens", type=int, default=512, help="most tokens per answer (default 512)")
    parser.add_argument("--temperature", type=float, default=0.7, help="0 is greedy (default 0.7)")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default 0.9)")
    parser.add_argument("--top-k", type=int, default=-1, help="sample among the k best tokens (default off)")
    parser.add_argument("--seed", type=int, help="seed for reproducible sampling")
    parser.add_argument(
        "--dtype",
        choices=["auto", *_DTYPES],
        default="auto",
        help="compute dtype (auto: bfloat16, or float32 on CPU with --quant none)",
    )
    parser.add_argument(
        "--quant",
        choices=QUANT_MODES,
        default="auto",
        help="weight-only quantization (auto: the most compact format that keeps the weights accurate)",
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--max-model-len", type=int, help="context window (default: the model's)")
    parser.add_argument("--kv-cache-mb", type=int, default=512, help="KV cache budget in MiB (default 512)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        params = SamplingParams(
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            max_tokens=args.max_tokens,
        )
        engine = _load(args)
    except (ShoalError, ValueError, OSError) as exc:
        # ValueError: the runner's configuration checks (KV budget, device); OSError: unreadable files.
        print(f"shoal generate: error: {exc}", file=sys.stderr)
        return 1
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    if args.prompt is not None:
        prompt: Prompt = args.prompt
        if engine.tokenizer.has_chat_template:
            prompt = [*messages, {"role": "user", "content": args.prompt}]
        try:
            stream_reply(engine, prompt, params, sys.stdout, sys.stderr)
        except ShoalError as exc:
            print(f"shoal generate: error: {exc}", file=sys.stderr)
            return 1
        return 0
    return chat(engine, messages, params, sys.stdin, sys.stdout, sys.stderr)


def _load(args: argparse.Namespace) -> LLMEngine:
    model_path = user_path(args.model) if args.model else embedded_model_path()
    if args.dtype == "auto":
        # The quantized kernels compute in bf16; unquantized CPU matmuls are no faster in bf16 than fp32 here.
        dtype = torch.float32 if args.device == "cpu" and args.quant == "none" else torch.bfloat16
    else:
        dtype = _DTYPES[args.dtype]
    engine = load_engine(
        model_path,
        device=args.device,
        dtype=dtype,
        kv_cache_bytes=args.kv_cache_mb << 20,
        max_model_len=args.max_model_len,
        config=EngineConfig(),
        tokenizer_cache_dir=default_cache_dir(),
        quant=args.quant,
    )
    if engine.quantization is not None and args.quant != "none":
        print(f"shoal generate: {engine.quantization.describe()}", file=sys.stderr)
    return engine


_request_ids = itertools.count()


def stream_reply(engine: LLMEngine, prompt: Prompt, params: SamplingParams, out: TextIO, err: TextIO) -> str:
    """Write the answer as it is generated, then a stats line on `err`. Ctrl-C stops this answer only."""
    request_id = f"cli-{next(_request_ids)}"
    engine.add_request(request_id, prompt, params)
    pieces: list[str] = []
    final: RequestOutput | None = None
    try:
        while engine.has_unfinished():
            for output in engine.step():
                out.write(output.text)
                out.flush()
                pieces.append(output.text)
                if output.finished:
                    final = output
    except KeyboardInterrupt:
        engine.abort(request_id)
        while engine.has_unfinished():
            engine.step()
        err.write("\n[interrupted]\n")
        return "".join(pieces)
    out.write("\n")
    out.flush()
    if final is not None:
        err.write(_format_stats(final) + "\n")
    return "".join(pieces)


def chat(
    engine: LLMEngine,
    messages: list[dict[str, str]],
    params: SamplingParams,
    stdin: TextIO,
    out: TextIO,
    err: TextIO,
) -> int:
    """Read a line, answer it, keep the conversation; the shared history is reused from the prefix cache."""
    if not engine.tokenizer.has_chat_template:
        err.write("shoal generate: error: this model has no chat template; use --prompt\n")
        return 1
    interactive = stdin.isatty()
    if interactive:
        err.write("Chat with the model. /exit or Ctrl-D to leave.\n")
    while True:
        if interactive:
            out.write("> ")
            out.flush()
        line = stdin.readline()
        if not line:
            return 0
        text = line.strip()
        if not text:
            continue
        if text in _EXIT_WORDS:
            return 0
        turn = [*messages, {"role": "user", "content": text}]
        try:
            answer = stream_reply(engine, turn, params, out, err)
        except ShoalError as exc:
            err.write(f"shoal generate: error: {exc}\n")
            continue
        messages = [*turn, {"role": "assistant", "content": answer}]


def _format_stats(output: RequestOutput) -> str:
    s = output.stats
    parts = [f"{s.prompt_tokens} prompt tokens ({s.cached_tokens} cached)", f"{s.completion_tokens} tokens"]
    if s.time_to_first_token_s is not None:
        parts.append(f"TTFT {s.time_to_first_token_s:.2f} s")
    if s.prefill_tokens_per_s is not None:
        parts.append(f"prefill {s.prefill_tokens_per_s:.0f} tok/s")
    if s.decode_tokens_per_s is not None:
        parts.append(f"decode {s.decode_tokens_per_s:.1f} tok/s")
    parts.append(f"finish: {output.finish_reason}")
    return "[" + ", ".join(parts) + "]"
