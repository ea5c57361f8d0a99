"""`shoal run`, `shoal chat` and `shoal status` as a user runs them: real processes on loopback, the embedded
model, fresh data dirs and free ports, a local stand-in for the hub, and a pseudo-terminal for the chat.
Two nodes in all: one `shoal run` starts for a prompt (and must stop), one it starts in serve mode, which
the other commands then use."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from shoal.client import NodeClient
from shoal.local_cluster import free_port
from tests.runner.tiny_model_dir import write_tiny_model_dir
from tests.worker.fake_hub import FakeHub

PROMPT = "What is the capital of France?"
API_KEY = "run-cli-key"
COMMAND_TIMEOUT_S = 240.0  # node start + runner load + answer on a loaded 2-core machine


def shoal(
    *args: str, stdin: str | None = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shoal.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        env={**os.environ, **(env or {})},
    )


def node_flags(data_dir: Path, api_port: int, hub: str | None = None) -> list[str]:
    downloads = ["--hub-endpoint", hub] if hub else ["--offline"]
    return [
        "--data-dir",
        str(data_dir),
        "--api-port",
        str(api_port),
        "--port",
        str(free_port()),
        *downloads,
    ]


def write_tiny_chat_model(path: Path) -> Path:
    """The tests' tiny random model, with a chat template (so `messages` render) on its byte tokenizer."""
    from transformers import PreTrainedTokenizerFast

    write_tiny_model_dir(path)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    )
    tokenizer.save_pretrained(str(path))
    return path


def answers(url: str) -> bool:
    try:
        httpx.get(f"{url}/health", timeout=2)
    except httpx.TransportError:
        return False
    return True


def processes_using(data_dir: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if str(data_dir) in " ".join(process.info["cmdline"] or ()):
            found.append(process)
    return found


def test_run_with_a_prompt_starts_a_node_answers_and_stops_it(tmp_path: Path) -> None:
    api_port = free_port()
    result = shoal(
        "run", "default", PROMPT, "--temperature", "0", "--max-tokens", "12", *node_flags(tmp_path, api_port)
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "starting a node" in result.stderr
    assert "ready" in result.stderr  # loading progress was shown
    assert not answers(f"http://127.0.0.1:{api_port}")
    assert processes_using(tmp_path) == []


@dataclass
class Serving:
    process: subprocess.Popen[str]
    url: str
    data_dir: Path
    first_line: str
    hub: FakeHub


@pytest.fixture(scope="module")
def serving(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serving]:
    """`shoal run --api-key KEY` with stdin not a terminal and no prompt: it serves until SIGTERM, with
    its node's defaults (compiled one-stream decode included). Its node downloads from a local stand-in
    for the hub that holds one tiny model, acme/tiny."""
    data_dir = tmp_path_factory.mktemp("serve")
    hub = FakeHub({"acme/tiny": write_tiny_chat_model(tmp_path_factory.mktemp("hub") / "tiny")})
    hub.__enter__()
    api_port = free_port()
    stderr_path = data_dir / "run.err"
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "shoal.cli",
                "run",
                "--api-key",
                API_KEY,
                *node_flags(data_dir, api_port, hub.url),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    try:
        assert process.stdout is not None
        first_line = process.stdout.readline()  # blocks until it serves (or exits: an empty line)
        assert first_line.startswith("serving "), stderr_path.read_text()
        yield Serving(process, f"http://127.0.0.1:{api_port}", data_dir, first_line, hub)
    finally:
        hub.__exit__()
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
        if process.stdout is not None:
            process.stdout.close()


def test_serve_mode_says_what_it_serves(serving: Serving) -> None:
    assert "SmolLM2-135M-Instruct" in serving.first_line
    assert serving.url in serving.first_line
    assert serving.process.poll() is None


def test_run_uses_the_running_node_and_leaves_it_running(serving: Serving) -> None:
    result = shoal(
        "run", "default", PROMPT, "--api-url", serving.url, "--temperature", "0", "--max-tokens", "12",
        env={"SHOAL_API_KEY": API_KEY},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "starting a node" not in result.stderr
    assert answers(serving.url) and serving.process.poll() is None


def test_status_shows_the_node_and_the_instance(serving: Serving) -> None:
    instances = httpx.get(
        f"{serving.url}/instances", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10
    ).json()["instances"]
    health = httpx.get(f"{serving.url}/health", timeout=10).json()
    result = shoal("status", "--api-url", serving.url, "--api-key", API_KEY)
    assert result.returncode == 0, result.stderr
    assert f"{health['node_id'][:8]} (this)" in result.stdout
    assert "master" in result.stdout
    (instance,) = instances
    assert instance["instance_id"] in result.stdout
    assert "SmolLM2-135M-Instruct" in result.stdout and "ready" in result.stdout
    raw = shoal("status", "--json", "--api-url", serving.url, "--api-key", API_KEY)
    assert json.loads(raw.stdout)["state"]["instances"][instance["instance_id"]]["card"]["model_id"] == (
        "SmolLM2-135M-Instruct"
    )
    refused = shoal("status", "--api-url", serving.url)
    assert refused.returncode == 1 and "API key" in refused.stderr


def test_run_downloads_a_hub_model_places_it_and_answers(serving: Serving) -> None:
    result = shoal(
        "run", "acme/tiny", "hello", "--api-url", serving.url, "--temperature", "0", "--max-tokens", "4",
        env={"SHOAL_API_KEY": API_KEY},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "downloading acme/tiny" in result.stderr and "downloaded acme/tiny" in result.stderr
    assert "acme--tiny: ready" in result.stderr
    assert any(path.endswith("/config.json") for _, path in serving.hub.requests)
    models = httpx.get(
        f"{serving.url}/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10
    ).json()
    assert any(m["id"] == "acme--tiny" and m["instances"] for m in models["models"])


def test_run_of_an_unknown_model_says_so(serving: Serving) -> None:
    result = shoal("run", "no-such-model", "hi", "--api-url", serving.url, "--api-key", API_KEY)
    assert result.returncode == 1
    assert "no-such-model: unknown model" in result.stderr


def test_run_says_why_a_runner_failed(serving: Serving, tmp_path: Path) -> None:
    broken = write_tiny_chat_model(tmp_path / "broken")
    (broken / "tokenizer.json").write_text("{not json")  # placement reads the config; the runner fails
    result = shoal("run", str(broken), "hi", "--api-url", serving.url, "--api-key", API_KEY)
    assert result.returncode == 1
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("shoal run: error: broken: instance "), result.stderr
    assert "was deleted: runner" in error and "failed" in error and "cannot load the tokenizer" in error


def test_the_client_finds_why_an_instance_was_deleted(serving: Serving) -> None:
    with NodeClient(serving.url, API_KEY) as client:
        since = client.health().last_index
        placed = client.place("acme--tiny")
        response = httpx.delete(
            f"{serving.url}/instances/{placed.instance_id}",
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        assert client.instance(placed.instance_id) is None
        assert client.deleted_reason(placed.instance_id, since) == "deleted on request"


def test_chat_reads_turns_from_stdin_and_keeps_the_history(serving: Serving) -> None:
    turns = f"{PROMPT}\nRepeat your previous answer exactly.\n/bye\nnever sent\n"
    result = shoal(
        "chat", "--api-url", serving.url, "--temperature", "0", "--max-tokens", "12",
        stdin=turns, env={"SHOAL_API_KEY": API_KEY},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("Paris") >= 2  # the second answer only knows Paris from the history


def _take_terminal() -> None:
    # In the child, after setsid: make stdin (the pty) the controlling terminal, so Ctrl-C sends SIGINT.
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    """A command on a pseudo-terminal, read with a deadline: what a person at a terminal sees."""

    def __init__(self, *args: str) -> None:
        self.fd, child_end = pty.openpty()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "shoal.cli", *args],
            stdin=child_end,
            stdout=child_end,
            stderr=child_end,
            start_new_session=True,
            preexec_fn=_take_terminal,
        )
        os.close(child_end)
        self.seen = ""

    def read_until(self, text: str, timeout_s: float = 60.0) -> str:
        deadline = time.monotonic() + timeout_s
        while text not in self.seen:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {text!r} within {timeout_s} s; the terminal shows:\n{self.seen}"
            if select.select([self.fd], [], [], min(remaining, 0.2))[0]:
                self.seen += os.read(self.fd, 4096).decode(errors="replace")
        found, _, self.seen = self.seen.partition(text)
        return found + text

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def close(self) -> None:
        """Kill the command if it still runs, and release the terminal (once)."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def exit_code(self, timeout_s: float = 30.0) -> int:
        return self.process.wait(timeout=timeout_s)


def test_chat_in_a_terminal_ctrl_c_stops_the_answer_on_the_runner(serving: Serving) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    cancelled_before = httpx.get(f"{serving.url}/state", headers=headers, timeout=10).json()["diagnostics"]
    terminal = Terminal("chat", "--api-url", serving.url, "--api-key", API_KEY, "--max-tokens", "400")
    try:
        assert "/bye or Ctrl-D" in terminal.read_until(">>> ")
        terminal.type("Write a long story about a dragon who learns to sing.\n")
        terminal.read_until("sing.\r\n")  # the echo of the line typed
        terminal.read_until(" ", timeout_s=90)  # the answer has started: a word written
        terminal.type("\x03")  # Ctrl-C
        assert "[interrupted]" in terminal.read_until(">>> ")
        time.sleep(0.5)  # as a person would: the prompt is up and line editing has the terminal
        terminal.type("\x03")  # Ctrl-C at the prompt does not leave
        assert "/bye or Ctrl-D to leave" in terminal.read_until(">>> ")
        terminal.type("/bye\n")
        assert terminal.exit_code() == 0
    finally:
        terminal.close()  # never a chat process left behind, whatever failed

    def cancelled() -> int:
        state = httpx.get(f"{serving.url}/state", headers=headers, timeout=10).json()
        return int(state["diagnostics"]["worker"]["tasks_cancelled"])

    deadline = time.monotonic() + 30
    while cancelled() <= cancelled_before["worker"]["tasks_cancelled"]:
        assert time.monotonic() < deadline, "the interrupted answer was not cancelled on the runner"
        time.sleep(0.2)


def test_sigterm_stops_serve_mode_and_its_node(serving: Serving) -> None:
    tree = psutil.Process(serving.process.pid).children(recursive=True)
    assert tree, "the node (and its runner) run as children of shoal run"
    serving.process.send_signal(signal.SIGTERM)
    assert serving.process.wait(timeout=60) == 0
    _, alive = psutil.wait_procs(tree, timeout=30)
    assert alive == []
    assert not answers(serving.url)


def test_chat_without_a_node_says_how_to_start_one() -> None:
    started = time.monotonic()
    result = shoal("chat", "--api-url", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert "shoal run" in result.stderr and "no node answers" in result.stderr
    assert time.monotonic() - started < 30
