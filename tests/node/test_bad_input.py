"""Bad input against real `shoal node` processes (loopback only): a raw zenoh peer floods them with random,
truncated, bit-flipped, oversized, replayed and well-sealed-but-wrong frames, and a clone of a node's
identity is started. The nodes keep serving, count every bad frame, and never let it into the state."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import zenoh

from shoal.identity import KEY_FILE_NAME
from shoal.local_cluster import LocalCluster, LocalNode, free_port
from shoal.net.config import TransportSettings
from shoal.net.sealing import MAX_FRAME_BYTES, Sealer
from shoal.types import (
    CommandBatch,
    CommandEnvelope,
    NodeId,
    SetNodeLabel,
    encode_wire_message,
    new_command_id,
)
from tests.node.test_cluster import STARTUP_S, agreed_states, set_label, wait_healthy

CLUSTER = "bad"
PREFIX = f"shoal/{CLUSTER}/"
NUM_FRAMES = 10_000
SEALER_REASONS = ("auth_failed", "replayed", "oversized", "malformed", "unknown_version")


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalCluster, list[LocalNode]]]:
    cluster = LocalCluster(tmp_path_factory.mktemp("bad"), cluster=CLUSTER, node_timeout_s=4.0)
    try:
        members = cluster.add(3)
        wait_healthy(cluster, members)
        cluster.wait_until(lambda: agreed_states(members, 3), 15.0, "3 nodes to agree")
        yield cluster, members
    finally:
        cluster.stop_all()


@pytest.fixture(scope="module")
def peer(nodes: tuple[LocalCluster, list[LocalNode]]) -> Iterator[zenoh.Session]:
    """A raw zenoh session in the cluster's mesh: it sees every frame and can put anything anywhere."""
    _, members = nodes
    settings = TransportSettings.loopback(CLUSTER, port=free_port(), peers=tuple(n.endpoint for n in members))
    assert settings.is_loopback_only()
    session = zenoh.open(settings.zenoh_config())
    deadline = time.monotonic() + 10
    while len(session.info.peers_zid()) < len(members) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield session
    finally:
        session.close()


def capture(session: zenoh.Session, seconds: float) -> list[tuple[str, bytes]]:
    frames: list[tuple[str, bytes]] = []
    subscriber = session.declare_subscriber(
        PREFIX + "**", lambda sample: frames.append((str(sample.key_expr), sample.payload.to_bytes()))
    )
    time.sleep(seconds)
    subscriber.undeclare()
    return list(frames)


def put(session: zenoh.Session, key: str, frame: bytes) -> None:
    session.put(key, frame, congestion_control=zenoh.CongestionControl.BLOCK)


def counters(node: LocalNode) -> dict[str, int]:
    diagnostics = node.state()["diagnostics"]
    return {
        **diagnostics["dropped_frames"],
        **diagnostics["dropped_messages"],
        "master_rejected_commands": diagnostics["master_rejected_commands"],
    }


def delta(after: dict[str, int], before: dict[str, int], keys: tuple[str, ...]) -> int:
    return sum(after[key] - before[key] for key in keys)


def test_replayed_frame_is_dropped_and_counted(
    nodes: tuple[LocalCluster, list[LocalNode]], peer: zenoh.Session
) -> None:
    _, members = nodes
    heartbeats = [(k, f) for k, f in capture(peer, 1.0) if k == PREFIX + "all/cluster"]
    assert heartbeats, "no broadcast frame captured"
    key, frame = heartbeats[-1]
    before = [counters(n) for n in members]
    put(peer, key, frame)
    time.sleep(1.0)
    for node, old in zip(members, before, strict=True):
        assert counters(node)["replayed"] - old["replayed"] == 1


def sealed_garbage(rng: random.Random, master_id: str, real_id: str) -> list[tuple[str, bytes, str]]:
    """Frames sealed with the right key by an outsider id: (route, frame, what each node should count)."""
    sealer = Sealer(None, CLUSTER, NodeId("outsider"))
    frames: list[tuple[str, bytes, str]] = []

    def seal(route: str, payload: bytes, expect: str) -> None:
        frames.append((route, sealer.seal(payload, context=route.encode()), expect))

    for _ in range(300):
        seal("all/cluster", rng.randbytes(rng.randrange(0, 300)), "undecodable")
    for i in range(200):
        seal("all/cluster", b'{"kind": "no_such_message_%d"}' % i, "undecodable")
    for _ in range(100):  # a command about a node that does not exist: the master rejects it
        envelope = CommandEnvelope(
            command_id=new_command_id(),
            origin=NodeId("outsider"),
            command=SetNodeLabel(node_id=NodeId("no-such-node"), key="k", value="v"),
        )
        seal(f"to/{master_id}/cluster", encode_wire_message(CommandBatch(commands=(envelope,))), "rejected")
    for _ in range(100):  # a command claiming to come from a real node
        envelope = CommandEnvelope(
            command_id=new_command_id(),
            origin=NodeId(real_id),
            command=SetNodeLabel(node_id=NodeId(real_id), key="k", value="v"),
        )
        seal(f"to/{master_id}/cluster", encode_wire_message(CommandBatch(commands=(envelope,))), "spoofed")
    return frames


def test_ten_thousand_bad_frames_are_counted_and_the_nodes_keep_serving(
    nodes: tuple[LocalCluster, list[LocalNode]], peer: zenoh.Session
) -> None:
    cluster, members = nodes
    rng = random.Random(1234)
    captured = [f for k, f in capture(peer, 1.0) if k.endswith("/cluster")]
    assert captured
    master = next(n for n in members if n.state()["diagnostics"]["role"] == "master")
    master_id = master.node_id()
    follower_id = next(n.node_id() for n in members if n is not master)
    state_before = agreed_states(members, 3)
    assert state_before is not None
    before = [counters(n) for n in members]

    sealed = sealed_garbage(rng, master_id, follower_id)
    raw: list[bytes] = [b"\x01" + b"\x00" * (MAX_FRAME_BYTES) for _ in range(2)]  # oversized
    num_raw = NUM_FRAMES - len(sealed)
    while len(raw) < num_raw:
        choice = rng.random()
        frame = bytearray(rng.choice(captured))
        if choice < 0.4:
            raw.append(rng.randbytes(rng.randrange(0, 400)))
        elif choice < 0.7:
            raw.append(bytes(frame[: rng.randrange(0, len(frame))]))
        else:
            bit = rng.randrange(len(frame) * 8)
            frame[bit // 8] ^= 1 << (bit % 8)
            raw.append(bytes(frame))
    # raw frames go to everyone (the broadcast key) or straight to the master
    for i, frame in enumerate(raw):
        put(peer, PREFIX + ("all/cluster" if i % 2 else f"to/{master_id}/cluster"), frame)
    for i, (route, frame, _) in enumerate(sealed):
        put(peer, PREFIX + route, frame)
        if i % 100 == 99:
            time.sleep(0.05)  # a flood, but not one that overflows a subscriber's queue on a loaded machine

    num_to_all = sum(1 for i in range(len(raw)) if i % 2)
    expected_sealer = {n.node_id(): num_to_all for n in members}
    expected_sealer[master_id] = len(raw)
    kinds = [expect for _, _, expect in sealed]

    def all_counted() -> bool:
        for node, old in zip(members, before, strict=True):
            now = counters(node)
            if delta(now, old, SEALER_REASONS) < expected_sealer[node.node_id()]:
                return False
            if now["undecodable"] - old["undecodable"] < kinds.count("undecodable"):
                return False
        after = counters(master)
        old = before[members.index(master)]
        return after["master_rejected_commands"] - old["master_rejected_commands"] >= kinds.count(
            "rejected"
        ) and after["spoofed_sender"] - old["spoofed_sender"] >= kinds.count("spoofed")

    cluster.wait_until(all_counted, 60.0, "every bad frame to be counted", interval=0.5)
    for node, old in zip(members, before, strict=True):
        now = counters(node)
        assert node.is_running()
        # exactly what was sent: nothing dropped silently, nothing counted twice, no queue overflow
        assert delta(now, old, SEALER_REASONS) == expected_sealer[node.node_id()], (now, old)
        assert now["overflow"] == old["overflow"]
        assert now["undecodable"] - old["undecodable"] == kinds.count("undecodable")
        # the first oversized frame went to the master only, the second to everyone
        assert now["oversized"] - old["oversized"] == (2 if node is master else 1)
    after = counters(master)
    old = before[members.index(master)]
    assert after["master_rejected_commands"] - old["master_rejected_commands"] == kinds.count("rejected")
    assert after["spoofed_sender"] - old["spoofed_sender"] == kinds.count("spoofed")

    # still serving: health, agreement, and a command that works
    assert all(n.get("/health")["status"] == "ok" for n in members)
    assert set_label(members[1], follower_id, "after-flood", "yes").status_code == 200
    states = cluster.wait_until(lambda: agreed_states(members, 3), 10.0, "agreement after the flood")
    assert "outsider" not in states[0]["nodes"] and "no-such-node" not in states[0]["nodes"]
    assert states[0]["nodes"][follower_id]["labels"].get("k") is None  # the spoofed commands did nothing
    # the log says so, rate-limited (a warning at most every 10 s per kind, not one per frame)
    for node in members:
        text = node.log_text()
        assert 1 <= text.count("dropped a frame") <= 5
    assert 1 <= master.log_text().count("dropped a message") <= 5


def test_clone_of_a_node_identity_stays_silent_and_says_why(
    nodes: tuple[LocalCluster, list[LocalNode]],
) -> None:
    cluster, members = nodes
    original = members[1]
    original_id = original.node_id()
    before = agreed_states(members, 3)
    assert before is not None
    replayed_before = [counters(n)["replayed"] for n in members]
    (clone,) = cluster.add(1, start=False)
    clone.data_dir.mkdir(parents=True)
    shutil.copy(original.data_dir / KEY_FILE_NAME, clone.data_dir / KEY_FILE_NAME)
    clone.start()

    def clash_reported() -> dict[str, Any] | None:
        response = httpx.get(clone.api_url + "/health", timeout=2)
        if response.status_code != 503:
            return None
        return dict(response.json())

    health = cluster.wait_until(clash_reported, STARTUP_S, "the clone to report the clash")
    assert health["status"] == "identity_clash" and health["node_id"] == original_id
    diagnostics = clone.state()["diagnostics"]
    assert diagnostics["role"] == "quarantined"
    assert diagnostics["identity_clash"]["other_api"].endswith(f":{original.api_port}")
    assert "already in use" in clone.log_text()
    # the original keeps working and the cluster's record of it is its own
    time.sleep(1.0)
    assert set_label(original, original_id, "still", "me").status_code == 200
    states = cluster.wait_until(lambda: agreed_states(members, 3), 10.0, "agreement with a clone around")
    record = states[0]["nodes"][original_id]
    assert record["status"] == "active"
    assert record["profile"]["api_address"]["port"] == original.api_port
    assert record["profile"]["started_at"] == before[0]["nodes"][original_id]["profile"]["started_at"]
    # the clone never sent a frame: no receiver's replay window moved past the original's counters
    assert [counters(n)["replayed"] for n in members] == replayed_before
    clone.kill()


def test_start_errors_are_one_line(tmp_path: Path) -> None:
    """A broken key file, a corrupt event log, a taken API port: one line on stderr, exit status 1."""

    def start(data_dir: Path, api_port: int) -> subprocess.Popen[str]:
        args = ["--cluster", "x", "--no-multicast", "--port", str(free_port()), "--api-port", str(api_port)]
        return subprocess.Popen(
            [sys.executable, "-m", "shoal.cli", "node", *args, "--data-dir", str(data_dir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    bad_key = tmp_path / "bad-key"
    bad_key.mkdir()
    (bad_key / KEY_FILE_NAME).write_text("not a key")
    bad_log = tmp_path / "bad-log"
    bad_log.mkdir()
    (bad_log / "events.sqlite3").write_bytes(b"this is not a database" * 100)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        processes = {
            "key": start(bad_key, free_port()),
            "log": start(bad_log, free_port()),
            "port": start(tmp_path / "fine", port),
        }
        try:
            results = {what: (p.wait(timeout=60), p.communicate()[1]) for what, p in processes.items()}
        finally:
            for process in processes.values():
                process.kill()
    for what, (returncode, stderr) in results.items():
        assert returncode == 1, (what, stderr)
        assert "Traceback" not in stderr, (what, stderr)
        (line,) = [line for line in stderr.splitlines() if line.startswith("shoal node:")]
        assert {"key": KEY_FILE_NAME, "log": "events.sqlite3", "port": str(port)}[what] in line
