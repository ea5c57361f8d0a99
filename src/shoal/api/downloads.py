"""Download routes: POST /models/download {repo_id, revision} -> 202 with the download (its model name is
then usable in POST /instances once it is done), 409 when refused (offline node, malformed repo id);
GET /models/downloads and GET /models/downloads/{id} show status and progress (bytes done of total)."""

from __future__ import annotations

from typing import Any, Protocol

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from shoal.api.errors import documented, error_response
from shoal.worker.downloads import Downloader, DownloadRefused


class DownloadNode(Protocol):
    @property
    def downloader(self) -> Downloader: ...


class DownloadBody(BaseModel):
    repo_id: str
    revision: str = "main"


def add_download_routes(app: FastAPI, node: DownloadNode) -> None:
    @app.post(
        "/models/download",
        response_model=None,
        status_code=202,
        responses={202: {"description": "The download, started or already under way"}, **documented(409)},
    )
    async def download(body: DownloadBody) -> JSONResponse:
        try:
            started = node.downloader.start(body.repo_id, body.revision)
        except DownloadRefused as error:
            return error_response(409, "download_refused", str(error))
        return JSONResponse(started.view(), status_code=202)

    @app.get("/models/downloads")
    async def downloads() -> dict[str, Any]:
        return {"downloads": [d.view() for d in node.downloader.downloads.values()]}

    @app.get("/models/downloads/{download_id}", response_model=None, responses=documented(404))
    async def one_download(download_id: str) -> JSONResponse:
        found = node.downloader.downloads.get(download_id)
        if found is None:
            return error_response(404, "download_not_found", f"no download {download_id}")
        return JSONResponse(found.view())
