"""Model downloads from a Hugging Face hub into this node's models directory.

Inputs: `start(repo_id, revision)` from the API. Output: the model folder `<models_dir>/<owner>--<name>`
(then listed by GET /models and placeable by that name), and each download's record with its progress
(bytes written of the total) and its end: done (the folder holds a model whose config loads) or failed (the
reason). Files come through `huggingface_hub.snapshot_download`, which resumes partial files left by an
interrupted download and checks what it fetched against the hub's listing. One download runs at a time.
In offline mode every download is refused with an error that says so.
"""

from __future__ import annotations

import math
import re
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

REPO_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")
REVISION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")
MAX_ERROR_CHARS = 2000
DownloadStatus = Literal["queued", "downloading", "done", "failed"]


class DownloadRefused(ValueError):
    """A download that cannot start (offline mode, a malformed repo id)."""


@dataclass(frozen=True)
class DownloadSettings:
    models_dir: Path
    endpoint: str | None = None  # None: huggingface_hub's default hub
    offline: bool = False


@dataclass
class Download:
    download_id: str
    repo_id: str
    revision: str
    target: Path
    status: DownloadStatus = "queued"
    bytes_done: int = 0
    byte_bar: Any = None  # snapshot_download's bytes bar: its `total` grows as files are listed
    error: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def view(self) -> dict[str, Any]:
        with self._lock:
            return {
                "download_id": self.download_id,
                "repo_id": self.repo_id,
                "revision": self.revision,
                "model": self.target.name,
                "path": str(self.target),
                "status": self.status,
                "bytes_done": self.bytes_done,
                "bytes_total": getattr(self.byte_bar, "total", None),
                "error": self.error,
            }


class Downloader:
    def __init__(self, settings: DownloadSettings) -> None:
        self.settings = settings
        self.downloads: dict[str, Download] = {}
        self._send: MemoryObjectSendStream[Download]
        self._receive: MemoryObjectReceiveStream[Download]
        self._send, self._receive = anyio.create_memory_object_stream[Download](math.inf)

    def start(self, repo_id: str, revision: str = "main") -> Download:
        if self.settings.offline:
            raise DownloadRefused(f"this node is offline: it downloads nothing (asked for {repo_id!r})")
        if not REPO_ID_PATTERN.match(repo_id) or ".." in repo_id:
            raise DownloadRefused(f"{repo_id!r} is not a hub repo id (owner/name)")
        if not REVISION_PATTERN.match(revision) or ".." in revision:
            raise DownloadRefused(f"{revision!r} is not a revision (branch, tag or commit)")
        target = self.settings.models_dir / repo_id.replace("/", "--")
        download = Download(uuid.uuid4().hex, repo_id, revision, target)
        self.downloads[download.download_id] = download
        self._send.send_nowait(download)
        return download

    async def run(self) -> None:
        """Carry out the queued downloads, one at a time, until cancelled; then close the queue."""
        try:
            async for download in self._receive:
                await anyio.to_thread.run_sync(self._fetch, download)
        finally:
            self.close()

    def close(self) -> None:
        self._send.close()
        self._receive.close()

    def _fetch(self, download: Download) -> None:
        from huggingface_hub import snapshot_download

        from shoal.engine.loader import load_config

        with download._lock:
            download.status = "downloading"
        try:
            snapshot_download(
                download.repo_id,
                revision=download.revision,
                local_dir=download.target,
                endpoint=self.settings.endpoint,
                token=False,  # no credentials from the environment: public repos only, for now
                tqdm_class=_progress_class(download),
            )
            load_config(download.target)  # verification: what arrived is a model this engine reads
        except Exception as error:
            # The top of one download (a thread): every failure is the download's reason, never a crash.
            with download._lock:
                download.status = "failed"
                download.error = f"{type(error).__name__}: {error}"[:MAX_ERROR_CHARS]
            return
        with download._lock:
            download.status = "done"


def _progress_class(download: Download) -> type:
    from huggingface_hub.utils import tqdm

    class Progress(tqdm):
        """snapshot_download's bars, hidden; the one over the bytes written becomes the download's progress."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            self.counts_bytes = str(kwargs.get("desc", "")).startswith("Reconstructing")
            if self.counts_bytes:
                download.byte_bar = self

        def update(self, n: float | None = 1) -> bool | None:
            if self.counts_bytes:
                with download._lock:
                    download.bytes_done += int(n or 0)
            return None

    return Progress
