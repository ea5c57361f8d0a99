"""A runner's warm-up compiles every decode graph before the runner is Ready, so no request waits for one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from shoal.engine.embedded import embedded_model_path
from shoal.engine.llm_engine import LLMEngine
from shoal.engine.model_runner import ModelRunner
from shoal.engine.sampling import SamplingParams
from shoal.engine.tokenizer import load_tokenizer
from shoal.runner.stage import warm_up
from tests.engine.tiny_models import write_tiny_model


def _compiled_graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


# inductor's own imports use the deprecated torch.jit.script_method
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_after_warm_up_no_decode_step_compiles(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    write_tiny_model(tmp_path / "model", "llama")
    runner = ModelRunner(
        tmp_path / "model", dtype=torch.float32, kv_cache_bytes=1 << 20, block_size=4, compile_decode=True
    )
    cache_dir = tmp_path_factory.getbasetemp() / "xdg-cache" / "shoal" / "tokenizers"
    engine = LLMEngine(runner, load_tokenizer(embedded_model_path(), cache_dir=cache_dir))
    warm_up(engine)
    graphs = _compiled_graphs()
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    for streams in (1, 3, 6):  # the graphs of one stream, of 2-4 and of more
        engine.generate([[5 + i, 7] for i in range(streams)], params)
    assert _compiled_graphs() == graphs, "a decode step compiled after warm-up"
    batched = runner.model.compiled_batched_decode
    assert batched is not None and batched.num_plans == 1  # the 6 streams ran compiled
