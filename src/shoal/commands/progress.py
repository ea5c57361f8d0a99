"""Progress on stderr for the CLI: one line redrawn in place on a terminal, or a new line per change
when stderr is a file or a pipe (so logs stay readable). Texts come from pure functions of what the node
reports: a download's bytes, an instance's runner statuses."""

from __future__ import annotations

from typing import TextIO

from shoal.client import DownloadView, InstanceView, RunnerView

BAR_WIDTH = 24
_RUNNER_WORDS = {
    "runner_idle": "starting",
    "runner_connecting": "connecting",
    "runner_connected": "connected",
    "runner_loaded": "loaded",
    "runner_warming_up": "warming up",
    "runner_ready": "ready",
    "runner_running": "ready",
    "runner_shutting_down": "shutting down",
    "runner_shutdown": "shut down",
}


def bar(done: float, total: float, width: int = BAR_WIDTH) -> str:
    fraction = min(1.0, max(0.0, done / total)) if total > 0 else 0.0
    filled = round(fraction * width)
    return "[" + "#" * filled + "." * (width - filled) + f"] {fraction * 100:3.0f}%"


def format_bytes(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    raise AssertionError("unreachable")


def describe_download(download: DownloadView) -> str:
    head = f"downloading {download.repo_id}"
    if download.status == "queued":
        return f"{head}: queued"
    if download.status == "failed":
        return f"{head}: failed: {download.error}"
    if download.bytes_total:
        return (
            f"{head} {bar(download.bytes_done, download.bytes_total)} "
            f"{format_bytes(download.bytes_done)} of {format_bytes(download.bytes_total)}"
        )
    return f"{head}: {format_bytes(download.bytes_done)}"


def describe_runner(runner: RunnerView) -> str:
    if runner.kind == "runner_loading" and runner.layers_total:
        done = runner.layers_done or 0
        return f"loading layers {bar(done, runner.layers_total, 12)} {done}/{runner.layers_total}"
    if runner.kind == "runner_failed":
        return f"failed: {runner.reason}"
    return _RUNNER_WORDS.get(runner.kind, runner.kind.removeprefix("runner_"))


def describe_instance(instance: InstanceView) -> str:
    """`model: <status>` for one runner, `model: node1 <status> | node2 <status>` for a sharded one."""
    if not instance.runners:
        return f"{instance.model_id}: placed on {len(instance.node_ids)} node(s), starting runners"
    if len(instance.node_ids) == 1:
        return f"{instance.model_id}: {describe_runner(instance.runners[0])}"
    parts = [f"{r.node_id[:8]} {describe_runner(r)}" for r in instance.runners]
    missing = len(instance.node_ids) - len(instance.runners)
    if missing:
        parts.append(f"{missing} starting")
    return f"{instance.model_id} ({instance.sharding}): " + " | ".join(parts)


class ProgressLine:
    """Shows the latest status text: redrawn in place on a TTY, one line per distinct text otherwise."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._in_place = out.isatty()
        self._last = ""
        self._width = 0

    def show(self, text: str) -> None:
        if text == self._last:
            return
        self._last = text
        if self._in_place:
            padding = " " * max(0, self._width - len(text))
            self._out.write(f"\r{text}{padding}")
            self._width = len(text)
        else:
            self._out.write(text + "\n")
        self._out.flush()

    def done(self, text: str | None = None) -> None:
        """Ends the line (with a final text), so what follows starts on its own line."""
        if text is not None:
            self.show(text)
        if self._in_place and self._width:
            self._out.write("\n")
            self._out.flush()
        self._last, self._width = "", 0
