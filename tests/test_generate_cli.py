"""`shoal generate` as a user runs it: a real subprocess on the embedded model."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shoal.cli import main


def run_generate(args: list[str], cache_home: Path, stdin: str = "") -> subprocess.CompletedProcess[str]:
    # The tokenizer cache under the session's temp dir: shared with the engine tests, never the user's.
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home)}
    return subprocess.run(
        [sys.executable, "-m", "shoal.cli", "generate", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
        check=False,
    )


@pytest.fixture(scope="module")
def cache_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "xdg-cache"


def test_prompt_streams_an_answer_and_stats(cache_home: Path) -> None:
    result = run_generate(
        ["--prompt", "What is the capital of France?", "--max-tokens", "8", "--temperature", "0"], cache_home
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "TTFT" in result.stderr and "tok/s" in result.stderr
    # weights are quantized by default ("auto": int4 where lossless, int8-refined int4 for the Q8_0 head)
    assert "quantization auto: 120 int4, 1 int4+int8" in result.stderr
    assert "Traceback" not in result.stderr


def test_chat_keeps_the_conversation_and_reuses_the_prefix(cache_home: Path) -> None:
    result = run_generate(
        ["--max-tokens", "8", "--temperature", "0"],
        cache_home,
        stdin="What is the capital of France?\nAnd of Germany?\n/exit\n",
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout and "Berlin" in result.stdout
    stats = [line for line in result.stderr.splitlines() if "prompt tokens" in line]
    assert len(stats) == 2
    assert "(0 cached)" in stats[0] and "(0 cached)" not in stats[1]


def test_bad_model_path_is_one_line_error(cache_home: Path, tmp_path: Path) -> None:
    result = run_generate(["--model", str(tmp_path / "missing.gguf"), "--prompt", "hi"], cache_home)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not exist" in lines[0] and "missing.gguf" in lines[0]


def test_bad_sampling_value_is_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    # In process: the sampling values are checked before any model is touched.
    assert main(["generate", "--temperature", "-1", "--prompt", "hi"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "temperature must be >= 0" in lines[0]
