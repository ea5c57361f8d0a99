"""Downloads from a local stand-in for the Hugging Face hub into a models directory (no node needed)."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from shoal.engine.loader import load_config
from shoal.worker.downloads import Download, Downloader, DownloadRefused, DownloadSettings
from tests.runner.tiny_model_dir import write_tiny_model_dir
from tests.worker.fake_hub import FakeHub


async def _finish(downloader: Downloader, *downloads: Download) -> None:
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(downloader.run)
            while any(d.status in ("queued", "downloading") for d in downloads):
                await anyio.sleep(0.02)
            tg.cancel_scope.cancel()


def test_download_writes_a_loadable_model_with_progress(tmp_path: Path) -> None:
    source = write_tiny_model_dir(tmp_path / "source")
    size = sum(p.stat().st_size for p in source.iterdir() if p.is_file())
    with FakeHub({"acme/tiny": source}) as hub:
        downloader = Downloader(DownloadSettings(models_dir=tmp_path / "models", endpoint=hub.url))
        done = downloader.start("acme/tiny")
        missing = downloader.start("acme/nothing-here")
        anyio.run(_finish, downloader, done, missing)
    view = done.view()
    assert view["status"] == "done", view
    assert view["model"] == "acme--tiny" and Path(view["path"]) == tmp_path / "models" / "acme--tiny"
    assert view["bytes_done"] == view["bytes_total"] == size
    assert load_config(view["path"]).num_layers == 3
    assert missing.view()["status"] == "failed" and "acme/nothing-here" in missing.view()["error"]


@pytest.mark.parametrize(
    ("settings", "repo_id", "words"),
    [
        ({"offline": True}, "acme/tiny", "offline"),
        ({}, "../../etc", "not a hub repo id"),
        ({}, "a/b/c", "not a hub repo id"),
    ],
)
def test_refused_downloads(tmp_path: Path, settings: dict[str, bool], repo_id: str, words: str) -> None:
    downloader = Downloader(DownloadSettings(models_dir=tmp_path, **settings))
    with pytest.raises(DownloadRefused, match=words):
        downloader.start(repo_id)
    assert downloader.downloads == {}
    downloader.close()
