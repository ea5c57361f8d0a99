"""A small typed HTTP client for one node's API: the control routes and `POST /generate`, for the CLI.

Inputs: the API's base URL and an optional API key (sent as `Authorization: Bearer`). Every call answers a
typed value or raises `NodeUnreachable` (nothing answers at that address) or `ApiError` (the node's error
shape {"error": {"type", "message"}}, with the HTTP status). Blocking (httpx), one connection pool per
client; a streamed answer is closed (and so cancelled on its runner) when its iterator is closed.
"""

from __future__ import annotations

import json
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import httpx

CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 30.0
SERVING_KINDS = frozenset({"runner_ready", "runner_running"})
TERMINAL_KINDS = frozenset({"runner_failed", "runner_shutdown"})


class NodeUnreachable(ConnectionError):
    """Nothing answers at the node's API address."""


class ApiError(RuntimeError):
    """The node answered with an error: `status` (HTTP), `kind` (its error type) and its message."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(f"{message} (HTTP {status}, {kind})")
        self.status = status
        self.kind = kind
        self.message = message


class GenerationFailed(RuntimeError):
    """A generation that started and then failed (an error line in the /generate stream)."""


@dataclass(frozen=True, slots=True)
class Health:
    node_id: str
    role: str
    master: str | None
    status: str
    last_index: int


@dataclass(frozen=True, slots=True)
class RunnerView:
    runner_id: str
    node_id: str
    kind: str  # a RunnerStatus kind: runner_loading, runner_ready, ...
    layers_done: int | None = None
    layers_total: int | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class InstanceView:
    instance_id: str
    model_id: str
    source: str
    sharding: str
    node_ids: tuple[str, ...]
    runners: tuple[RunnerView, ...]  # one per shard once every runner reported; fewer before

    @property
    def is_ready(self) -> bool:
        return len(self.runners) == len(self.node_ids) and all(r.kind in SERVING_KINDS for r in self.runners)

    def failed_runner(self) -> RunnerView | None:
        return next((r for r in self.runners if r.kind in TERMINAL_KINDS), None)


@dataclass(frozen=True, slots=True)
class ModelEntry:
    model_id: str
    path: str | None
    embedded: bool
    local: bool
    instance_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class DownloadView:
    download_id: str
    repo_id: str
    model: str  # the name to place it by once done
    status: str  # queued | downloading | done | failed
    bytes_done: int
    bytes_total: int | None
    error: str | None


@dataclass(frozen=True, slots=True)
class Delta:
    text: str


@dataclass(frozen=True, slots=True)
class Finish:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def instance_from_json(body: Mapping[str, Any]) -> InstanceView:
    shards = body["shards"]
    runners = []
    for shard in shards:
        status = body.get("runners", {}).get(shard["runner_id"])
        if status is not None:
            runners.append(
                RunnerView(
                    runner_id=shard["runner_id"],
                    node_id=shard["node_id"],
                    kind=status["kind"],
                    layers_done=status.get("layers_done"),
                    layers_total=status.get("layers_total"),
                    reason=status.get("reason"),
                )
            )
    return InstanceView(
        instance_id=body["instance_id"],
        model_id=body["card"]["model_id"],
        source=body["card"]["source"],
        sharding=body["sharding"],
        node_ids=tuple(shard["node_id"] for shard in shards),
        runners=tuple(runners),
    )


def _download_from_json(body: Mapping[str, Any]) -> DownloadView:
    return DownloadView(
        download_id=body["download_id"],
        repo_id=body["repo_id"],
        model=body["model"],
        status=body["status"],
        bytes_done=body["bytes_done"],
        bytes_total=body.get("bytes_total"),
        error=body.get("error"),
    )


def _raise_for_error(response: httpx.Response) -> None:
    if response.is_success:
        return
    response.read()
    kind, message = "http_error", response.text.strip() or response.reason_phrase
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict):
        kind, message = str(error.get("type", kind)), str(error.get("message", message))
    elif isinstance(error, str):
        message = error
    raise ApiError(response.status_code, kind, message)


class NodeClient:
    def __init__(self, base_url: str, api_key: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(REQUEST_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as error:
            raise NodeUnreachable(f"no node answers at {self.base_url}: {error}") from error
        _raise_for_error(response)
        return response.json()

    def health(self) -> Health:
        """The node's health; a node silenced by an identity clash answers too (status identity_clash)."""
        try:
            response = self._http.get("/health")
        except httpx.TransportError as error:
            raise NodeUnreachable(f"no node answers at {self.base_url}: {error}") from error
        if response.status_code not in (200, 503):
            _raise_for_error(response)
        try:
            body = response.json()
            return Health(
                node_id=body["node_id"],
                role=body["role"],
                master=body["master"],
                status=body["status"],
                last_index=body["last_index"],
            )
        except (ValueError, KeyError, TypeError) as error:
            raise ApiError(
                response.status_code, "not_a_node", f"{self.base_url} answers, but not as a shoal node"
            ) from error

    def state(self) -> dict[str, Any]:
        """The replicated cluster state with this node's diagnostics (GET /state), as the node sends it."""
        result: dict[str, Any] = self._request("GET", "/state")
        return result

    def models(self) -> list[ModelEntry]:
        return [
            ModelEntry(
                model_id=entry["id"],
                path=entry.get("path"),
                embedded=bool(entry.get("embedded")),
                local=bool(entry.get("local")),
                instance_ids=tuple(entry.get("instances", ())),
            )
            for entry in self._request("GET", "/models")["models"]
        ]

    def instances(self) -> list[InstanceView]:
        return [instance_from_json(body) for body in self._request("GET", "/instances")["instances"]]

    def instance(self, instance_id: str) -> InstanceView | None:
        """The instance with its runners' statuses, or None once it is gone (deleted)."""
        try:
            return instance_from_json(self._request("GET", f"/instances/{instance_id}"))
        except ApiError as error:
            if error.status == 404:
                return None
            raise

    def place(self, model: str, quant: str | None = None) -> InstanceView:
        """POST /instances (`quant`: None for the node's default); ApiError 404 (unknown model), 409
        (placement refused), 422 (invalid field), 503 (no master yet)."""
        body = {"model": model} if quant is None else {"model": model, "quant": quant}
        return instance_from_json(self._request("POST", "/instances", json=body))

    def start_download(self, repo_id: str) -> DownloadView:
        return _download_from_json(self._request("POST", "/models/download", json={"repo_id": repo_id}))

    def download(self, download_id: str) -> DownloadView:
        return _download_from_json(self._request("GET", f"/models/downloads/{download_id}"))

    def downloads(self) -> list[DownloadView]:
        return [_download_from_json(d) for d in self._request("GET", "/models/downloads")["downloads"]]

    def deleted_reason(self, instance_id: str, from_index: int, wait_s: float = 5.0) -> str | None:
        """Why the instance was deleted: its InstanceDeleted event at or after `from_index` (GET /events)."""
        timeout = httpx.Timeout(wait_s, connect=CONNECT_TIMEOUT_S)
        params = {"from_index": max(1, from_index)}
        try:
            with self._http.stream("GET", "/events", params=params, timeout=timeout) as response:
                _raise_for_error(response)
                for line in response.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    event = json.loads(line.removeprefix("data: "))["event"]
                    if event["kind"] == "instance_deleted" and event["instance_id"] == instance_id:
                        return str(event["reason"])
        except httpx.TransportError:
            return None  # read timeout: the reason has not reached this node
        return None

    def generate(
        self, model: str, messages: Sequence[Mapping[str, str]], params: Mapping[str, Any]
    ) -> Generator[Delta | Finish, None, None]:
        """Stream one answer (POST /generate with `messages`). Closing the iterator early closes the
        connection, which cancels the task on its runner. GenerationFailed when the stream reports an error."""
        body = {"model": model, "messages": list(messages), **params}
        # No read timeout: a long prompt sends nothing until its first token; the node has its own deadline.
        timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=CONNECT_TIMEOUT_S, read=None)
        try:
            with self._http.stream("POST", "/generate", json=body, timeout=timeout) as response:
                _raise_for_error(response)
                for line in response.iter_lines():
                    if not line:
                        continue
                    event = json.loads(line)
                    if event["type"] == "delta":
                        yield Delta(event["text"])
                    elif event["type"] == "finish":
                        usage = event.get("usage", {})
                        yield Finish(
                            event["finish_reason"],
                            usage.get("prompt_tokens", 0),
                            usage.get("completion_tokens", 0),
                        )
                    elif event["type"] == "error":
                        raise GenerationFailed(event["message"])
                    elif event["type"] == "end":
                        return
        except httpx.TransportError as error:
            raise NodeUnreachable(f"lost the node at {self.base_url}: {error}") from error
