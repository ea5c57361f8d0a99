"""Make sure a model is served by the cluster a node belongs to, showing progress on stderr.

Input: a model name as `shoal run` takes it ("default", a model of the node's models directory, a path, or
a Hugging Face repo id `owner/name`, which the node downloads first). Output: the name to generate with and
the ready instance. An instance already placed for that model is reused (followed until ready if it is still
loading); otherwise one is placed with `POST /instances`. A refused placement, a failed download or a failed
runner raises `PlacementFailed` with the node's reason.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from shoal.client import ApiError, InstanceView, NodeClient
from shoal.commands.progress import ProgressLine, describe_download, describe_instance
from shoal.paths import user_path
from shoal.worker.downloads import REPO_ID_PATTERN

POLL_S = 0.25
NO_MASTER_WAIT_S = 60.0  # a node that just started elects itself master after a quiet period
EMBEDDED_ALIAS = "default"


class PlacementFailed(RuntimeError):
    """The model cannot be served: what the node said, in words a person can act on."""


@dataclass(frozen=True, slots=True)
class Served:
    model: str  # the name generation requests use
    instance: InstanceView


def is_hub_repo_id(name: str) -> bool:
    """`owner/name` that is not a local path: a model the node downloads from the hub."""
    return name.count("/") == 1 and bool(REPO_ID_PATTERN.match(name)) and not user_path(name).exists()


def serves(name: str, instance: InstanceView, embedded_id: str | None) -> bool:
    """Whether `instance` serves the model that `shoal run` was asked for by `name`."""
    if name == EMBEDDED_ALIAS:
        return embedded_id is not None and instance.model_id == embedded_id
    if name in (instance.model_id, instance.source):
        return True
    path = user_path(name)
    return path.exists() and str(path.resolve()) == instance.source


def ensure_served(
    client: NodeClient, name: str, progress: ProgressLine, timeout_s: float, quant: str | None = None
) -> Served:
    """The ready instance serving `name`: reused when placed, otherwise downloaded (hub ids) and placed
    (with weight quantization `quant`, None: the node's default)."""
    served = _served(client, name, progress, timeout_s, place=True, quant=quant)
    assert served is not None  # place=True places when nothing serves the model yet
    return served


def find_served(client: NodeClient, name: str, progress: ProgressLine, timeout_s: float) -> Served | None:
    """The instance serving `name` once ready (followed while it loads), or None when none is placed."""
    return _served(client, name, progress, timeout_s, place=False)


def _served(
    client: NodeClient,
    name: str,
    progress: ProgressLine,
    timeout_s: float,
    place: bool,
    quant: str | None = None,
) -> Served | None:
    deadline = time.monotonic() + timeout_s
    models = client.models()
    if is_hub_repo_id(name):
        local_name = name.replace("/", "--")
        if place and not any(m.model_id == local_name and m.local for m in models):
            local_name = _download(client, name, progress, deadline)
        name = local_name
    embedded_id = next((m.model_id for m in models if m.embedded), None)
    placed = next((i for i in client.instances() if serves(name, i, embedded_id)), None)
    since_index = client.health().last_index
    if placed is None:
        if not place:
            return None
        placed = _place(client, name, quant, progress, deadline)
    return Served(name, _follow(client, placed, since_index, progress, deadline))


def _download(client: NodeClient, repo_id: str, progress: ProgressLine, deadline: float) -> str:
    try:
        download = client.start_download(repo_id)
    except ApiError as error:
        raise PlacementFailed(f"cannot download {repo_id}: {error.message}") from error
    while download.status not in ("done", "failed"):
        progress.show(describe_download(download))
        if time.monotonic() > deadline:
            raise PlacementFailed(f"the download of {repo_id} did not finish in time")
        time.sleep(POLL_S)
        download = client.download(download.download_id)
    progress.done(describe_download(download) if download.status == "failed" else f"downloaded {repo_id}")
    if download.status == "failed":
        raise PlacementFailed(f"the download of {repo_id} failed: {download.error}")
    return download.model


def _place(
    client: NodeClient, name: str, quant: str | None, progress: ProgressLine, deadline: float
) -> InstanceView:
    no_master_until = min(deadline, time.monotonic() + NO_MASTER_WAIT_S)
    while True:
        progress.show(f"{name}: placing")
        try:
            return client.place(name, quant)
        except ApiError as error:
            if error.status == 503 and time.monotonic() < no_master_until:
                time.sleep(POLL_S)  # no master yet: the cluster is electing
                continue
            what = {404: "unknown model: ", 409: "placement refused: "}.get(error.status, "")
            progress.done()
            raise PlacementFailed(f"{name}: {what}{error.message}") from error


def _follow(
    client: NodeClient, instance: InstanceView, since_index: int, progress: ProgressLine, deadline: float
) -> InstanceView:
    """Show the runners' progress until every one is ready; PlacementFailed when one fails."""
    current: InstanceView | None = instance
    shown = False  # an instance ready at the first look needs no progress line
    while True:
        if current is None:
            progress.done()
            reason = client.deleted_reason(instance.instance_id, since_index)
            raise PlacementFailed(
                f"{instance.model_id}: instance {instance.instance_id} was deleted"
                + (f": {reason}" if reason else " (by another client or a failure)")
            )
        failed = current.failed_runner()
        if failed is not None:
            progress.done()
            raise PlacementFailed(
                f"{current.model_id}: runner {failed.runner_id} on node {failed.node_id} failed: {failed.reason}"
            )
        if current.is_ready:
            progress.done(describe_instance(current) if shown else None)
            return current
        progress.show(describe_instance(current))
        shown = True
        if time.monotonic() > deadline:
            progress.done()
            raise PlacementFailed(f"{current.model_id}: not ready in time ({describe_instance(current)})")
        time.sleep(POLL_S)
        current = client.instance(instance.instance_id)
