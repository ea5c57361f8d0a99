"""A local HTTP server that speaks the Hugging Face Hub's file endpoints, standing in for the hub in tests.

Serves the files of local folders as model repos: repo info (`/api/models/<repo>/revision/<rev>`), the
recursive tree listing (`/api/models/<repo>/tree/<rev>`) and file downloads (`/<repo>/resolve/<rev>/<path>`,
HEAD and GET, with byte ranges for resumed downloads). `requests` records every path asked for.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self, repos: dict[str, Path]) -> None:
        self.repos = repos
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # quiet
                return

            def do_HEAD(self) -> None:
                hub._answer(self, head=True)

            def do_GET(self) -> None:
                hub._answer(self, head=False)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _files(self, repo: str) -> dict[str, Path]:
        root = self.repos[repo]
        return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}

    def _answer(self, handler: BaseHTTPRequestHandler, head: bool) -> None:
        path = unquote(urlparse(handler.path).path)
        self.requests.append((handler.command, path))
        for repo in self.repos:
            if path.startswith(f"/api/models/{repo}/revision/"):
                files = self._files(repo)
                body = {"id": repo, "sha": COMMIT, "siblings": [{"rfilename": name} for name in files]}
                return _json(handler, body, head)
            if path.startswith(f"/api/models/{repo}/tree/"):
                listing = [
                    {"type": "file", "path": name, "size": p.stat().st_size, "oid": _oid(p)}
                    for name, p in self._files(repo).items()
                ]
                return _json(handler, listing, head)
            prefix = f"/{repo}/resolve/"
            if path.startswith(prefix):
                name = path[len(prefix) :].split("/", 1)[1]
                file = self._files(repo).get(name)
                if file is None:
                    break
                return _file(handler, file, head)
        handler.send_response(404)
        handler.send_header("X-Error-Code", "RepoNotFound")
        handler.send_header("Content-Length", "0")
        handler.end_headers()


def _oid(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def _json(handler: BaseHTTPRequestHandler, body: Any, head: bool) -> None:
    data = json.dumps(body).encode()
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    if not head:
        handler.wfile.write(data)


def _file(handler: BaseHTTPRequestHandler, path: Path, head: bool) -> None:
    data = path.read_bytes()
    start = 0
    ranged = handler.headers.get("Range")
    if ranged and ranged.startswith("bytes="):
        start = int(ranged[6:].split("-")[0] or 0)
    handler.send_response(206 if start else 200)
    handler.send_header("X-Repo-Commit", COMMIT)
    handler.send_header("ETag", f'"{_oid(path)}"')
    handler.send_header("Content-Length", str(len(data) - start))
    if start:
        handler.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
    handler.end_headers()
    if not head:
        handler.wfile.write(data[start:])
