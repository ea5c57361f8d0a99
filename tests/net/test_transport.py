"""Real zenoh sessions on 127.0.0.1 (multicast off): three cluster members, a stranger with another key and
a raw zenoh session playing the attacker. Sessions are shared by the module; each test uses its own topics
and compares counters before and after, so tests stay independent."""

import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio
import pytest
import zenoh
from net_helpers import free_port, wait_until

from shoal.net.config import TransportSettings
from shoal.net.sealing import DropReason, Sealer
from shoal.net.transport import Transport, TransportClosedError, TransportOpenError

CLUSTER = "nettest"
KEY = b"the cluster secret"


@dataclass
class Cluster:
    members: list[Transport]
    stranger: Transport
    raw: zenoh.Session

    @property
    def everyone(self) -> list[Transport]:
        return [*self.members, self.stranger]


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


async def probe_until_delivered(sender: Transport, receivers: list[Transport], topic: str) -> None:
    """Publish until every receiver got one frame: the mesh is up and subscriptions have propagated."""
    subscriptions = [receiver.subscribe(topic) for receiver in receivers]
    got = [False] * len(receivers)

    async def drain(i: int) -> None:
        async for received_sender, _ in subscriptions[i]:
            if received_sender == sender.node_id:
                got[i] = True
                return

    async with anyio.create_task_group() as tasks:
        for i in range(len(receivers)):
            tasks.start_soon(drain, i)
        deadline = time.monotonic() + 10
        while not all(got):
            assert time.monotonic() < deadline, f"mesh did not form: delivered {got}"
            await sender.publish(topic, b"probe")
            await anyio.sleep(0.05)
    for subscription in subscriptions:
        subscription.close()


@pytest.fixture(scope="module")
async def cluster(anyio_backend: str) -> AsyncIterator[Cluster]:
    seed = f"tcp/127.0.0.1:{free_port()}"
    _, host_port = seed.split("/")
    first = TransportSettings.loopback(CLUSTER, port=int(host_port.split(":")[1]))
    members = [await Transport.open(first, Sealer(KEY, CLUSTER, "node-a"))]
    for name in ["node-b", "node-c"]:
        settings = TransportSettings.loopback(CLUSTER, port=free_port(), peers=(seed,))
        members.append(await Transport.open(settings, Sealer(KEY, CLUSTER, name)))
    stranger_settings = TransportSettings.loopback(CLUSTER, port=free_port(), peers=(seed,))
    stranger = await Transport.open(stranger_settings, Sealer(b"a different key", CLUSTER, "node-x"))
    raw_settings = TransportSettings.loopback(CLUSTER, port=free_port(), peers=(seed,))
    raw = zenoh.open(raw_settings.zenoh_config())
    try:
        for member in members:
            await probe_until_delivered(member, members, "probe")
        yield Cluster(members, stranger, raw)
    finally:
        raw.close()
        for transport in [*members, stranger]:
            await transport.close()


async def receive_one(
    subscription: AsyncIterator[tuple[str, bytes]], timeout: float = 5.0
) -> tuple[str, bytes]:
    with anyio.fail_after(timeout):
        return await anext(subscription)


async def assert_nothing_arrives(subscription: AsyncIterator[tuple[str, bytes]], wait: float = 0.3) -> None:
    with anyio.move_on_after(wait):
        message = await anext(subscription)
        raise AssertionError(f"unexpected message {message}")


@pytest.mark.anyio
async def test_nothing_leaves_loopback(cluster: Cluster) -> None:
    for transport in cluster.everyone:
        assert transport.settings.is_loopback_only()
        assert transport.links(), "transport has no links"
        # Gossip meshed everyone (3 members, the stranger, the raw session) though each only knew node-a,
        # and the only locators it spread were loopback ones.
        await wait_until(lambda t=transport: len(t.peers()) == 4, what="a full mesh")
        for src, dst in transport.links():
            assert src.startswith("tcp/127.0.0.1:") and dst.startswith("tcp/127.0.0.1:"), (src, dst)


@pytest.mark.anyio
async def test_members_exchange_broadcasts_in_every_direction(cluster: Cluster) -> None:
    subscriptions = [member.subscribe("chat") for member in cluster.members]
    for sender in cluster.members:
        await sender.publish("chat", f"hello from {sender.node_id}".encode())
        for subscription in subscriptions:
            assert await receive_one(subscription) == (
                sender.node_id,
                f"hello from {sender.node_id}".encode(),
            )
    for subscription in subscriptions:
        subscription.close()


@pytest.mark.anyio
async def test_directed_message_reaches_only_its_target(cluster: Cluster) -> None:
    a, b, c = cluster.members
    inboxes = {member.node_id: member.subscribe_direct("inbox") for member in cluster.members}
    broadcast = c.subscribe("inbox")
    await a.send(b.node_id, "inbox", b"for b only")
    assert await receive_one(inboxes[b.node_id]) == (a.node_id, b"for b only")
    await a.send(c.node_id, "inbox", b"for c")
    # c's first directed message is the one meant for it: b's never reached c.
    assert await receive_one(inboxes[c.node_id]) == (a.node_id, b"for c")
    await assert_nothing_arrives(inboxes[a.node_id])
    await assert_nothing_arrives(broadcast)
    for subscription in [*inboxes.values(), broadcast]:
        subscription.close()


@pytest.mark.anyio
async def test_other_cluster_key_receives_nothing_and_is_rejected(cluster: Cluster) -> None:
    a, b, _ = cluster.members
    stranger_inbox = cluster.stranger.subscribe("keyed")
    member_inbox = b.subscribe("keyed")
    rejected_before = [member.drops.get(DropReason.AUTH_FAILED) for member in cluster.members]
    stranger_rejected_before = cluster.stranger.drops.get(DropReason.AUTH_FAILED)

    await cluster.stranger.publish("keyed", b"let me in")
    await cluster.stranger.send(a.node_id, "keyed", b"directed intrusion")
    await wait_until(
        lambda: all(
            m.drops.get(DropReason.AUTH_FAILED) > before
            for m, before in zip(cluster.members, rejected_before, strict=True)
        ),
        what="members to reject the stranger's frames",
    )
    await wait_until(
        lambda: a.drops.get(DropReason.AUTH_FAILED) >= rejected_before[0] + 2, what="directed frame"
    )
    await assert_nothing_arrives(member_inbox)

    await a.publish("keyed", b"members only")
    assert await receive_one(member_inbox) == (a.node_id, b"members only")
    await wait_until(
        lambda: cluster.stranger.drops.get(DropReason.AUTH_FAILED) > stranger_rejected_before,
        what="the stranger to reject the members' frames",
    )
    # The stranger only ever hears itself.
    assert await receive_one(stranger_inbox) == (cluster.stranger.node_id, b"let me in")
    await assert_nothing_arrives(stranger_inbox, wait=0.1)
    stranger_inbox.close()
    member_inbox.close()


@pytest.mark.anyio
async def test_replayed_frame_is_dropped_and_counted(cluster: Cluster) -> None:
    a, b, _ = cluster.members
    key = f"shoal/{CLUSTER}/all/replay"
    captured: list[bytes] = []
    tap = cluster.raw.declare_subscriber(key, lambda sample: captured.append(sample.payload.to_bytes()))
    inbox = b.subscribe("replay")
    try:
        with anyio.fail_after(5):
            while not captured:
                await a.publish("replay", b"original")
                await anyio.sleep(0.02)
        while True:  # drain every probe that reached b
            with anyio.move_on_after(0.3):
                await anext(inbox)
                continue
            break
        replayed_before = b.drops.get(DropReason.REPLAYED)
        cluster.raw.put(key, captured[0])
        await wait_until(lambda: b.drops.get(DropReason.REPLAYED) == replayed_before + 1, what="replay count")
        await assert_nothing_arrives(inbox)
    finally:
        tap.undeclare()
        inbox.close()


@pytest.mark.anyio
async def test_frame_moved_to_another_topic_is_rejected(cluster: Cluster) -> None:
    """An attacker who intercepts a frame before it arrives cannot deliver it on another topic."""
    a, b, _ = cluster.members
    frame = a._sealer.seal(b"meant for moved-from", context=b"all/moved-from")
    moved_to, original = b.subscribe("moved-to"), b.subscribe("moved-from")
    rejected_before = b.drops.get(DropReason.AUTH_FAILED)
    cluster.raw.put(f"shoal/{CLUSTER}/all/moved-to", frame)
    await wait_until(lambda: b.drops.get(DropReason.AUTH_FAILED) > rejected_before, what="rejection")
    await assert_nothing_arrives(moved_to)
    cluster.raw.put(f"shoal/{CLUSTER}/all/moved-from", frame)  # where it belongs, it is valid
    assert await receive_one(original) == (a.node_id, b"meant for moved-from")
    moved_to.close()
    original.close()


@pytest.mark.anyio
async def test_ten_thousand_random_frames_are_counted_and_delivery_continues(cluster: Cluster) -> None:
    a, b, _ = cluster.members
    rng = random.Random(7)
    valid = a._sealer.seal(b"template", context=b"all/fuzz")
    keys = [f"shoal/{CLUSTER}/all/fuzz", f"shoal/{CLUSTER}/to/{b.node_id}/fuzz", f"shoal/{CLUSTER}/all/x/y"]
    frames: list[tuple[str, bytes]] = []
    for i in range(10_000):
        kind = i % 4
        if kind == 0:
            frame = rng.randbytes(rng.randrange(0, 120))
        elif kind == 1:
            frame = valid[: rng.randrange(0, len(valid))]
        elif kind == 2:
            mutated = bytearray(valid)
            mutated[rng.randrange(len(valid))] ^= rng.randrange(1, 256)
            frame = bytes(mutated)
        else:
            frame = bytes([1, 255]) + rng.randbytes(rng.randrange(0, 300))
        frames.append((keys[i % len(keys)], frame))
    inbox = b.subscribe("fuzz")
    before = b.drops.total()
    publisher_options = {"congestion_control": zenoh.CongestionControl.BLOCK}
    for key, frame in frames:
        cluster.raw.put(key, frame, **publisher_options)
    await wait_until(lambda: b.drops.total() - before >= 10_000, timeout=20, what="all fuzz frames counted")
    assert b.drops.total() - before == 10_000
    await a.publish("fuzz", b"still delivered")
    assert await receive_one(inbox) == (a.node_id, b"still delivered")
    inbox.close()


@pytest.mark.anyio
async def test_slow_consumer_overflows_and_is_counted(cluster: Cluster) -> None:
    a, b, _ = cluster.members
    slow = b.subscribe("flood", buffer=4)
    fast = b.subscribe("flood")
    before = b.drops.get(DropReason.OVERFLOW)
    for i in range(20):
        await a.publish("flood", str(i).encode())
    received = [await receive_one(fast) for _ in range(20)]
    assert [payload for _, payload in received] == [str(i).encode() for i in range(20)]
    assert b.drops.get(DropReason.OVERFLOW) - before == 16
    assert [(await receive_one(slow))[1] for _ in range(4)] == [b"0", b"1", b"2", b"3"]
    slow.close()
    fast.close()


@pytest.mark.anyio
async def test_publish_to_receive_latency(cluster: Cluster) -> None:
    a, b, _ = cluster.members
    inbox = b.subscribe("latency")
    latencies_ms: list[float] = []
    for i in range(300):
        started = time.perf_counter()
        await a.publish("latency", i.to_bytes(4, "big") + bytes(60))
        _, payload = await receive_one(inbox)
        assert int.from_bytes(payload[:4], "big") == i
        latencies_ms.append((time.perf_counter() - started) * 1000)
    inbox.close()
    latencies_ms.sort()
    p50, p99 = latencies_ms[len(latencies_ms) // 2], latencies_ms[int(len(latencies_ms) * 0.99)]
    print(f"loopback publish->receive, 64 B, n=300: p50 {p50:.3f} ms, p99 {p99:.3f} ms")
    assert p50 < 50, latencies_ms


@pytest.mark.anyio
async def test_close_ends_iterators_and_refuses_use(anyio_backend: str) -> None:
    port = free_port()
    transport = await Transport.open(
        TransportSettings.loopback(CLUSTER, port=port), Sealer(KEY, CLUSTER, "solo")
    )
    inbox = transport.subscribe("anything")
    ended = anyio.Event()

    async def consume() -> None:
        async for _ in inbox:
            pass
        ended.set()

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(consume)
        await anyio.sleep(0.05)
        await transport.close()
        with anyio.fail_after(2):
            await ended.wait()
    with pytest.raises(TransportClosedError):
        await transport.publish("anything", b"x")
    with pytest.raises(TransportClosedError):
        transport.subscribe("anything")
    await transport.close()  # idempotent


@pytest.mark.anyio
async def test_own_broadcasts_are_delivered_and_invalid_names_refused(anyio_backend: str) -> None:
    transport = await Transport.open(
        TransportSettings.loopback(CLUSTER, port=free_port()), Sealer(KEY, CLUSTER, "self")
    )
    try:
        inbox = transport.subscribe("echo")
        await transport.publish("echo", b"me")
        assert await receive_one(inbox) == ("self", b"me")
        for bad in ["", "a//b", "a/*", "**", "a/$b", "/lead"]:
            with pytest.raises(ValueError, match="invalid topic"):
                transport.subscribe(bad)
        with pytest.raises(ValueError, match="invalid node id"):
            await transport.send("a/b", "echo", b"x")
    finally:
        await transport.close()


@pytest.mark.anyio
async def test_burst_arrives_complete_and_in_order(cluster: Cluster) -> None:
    a, b, c = cluster.members
    inboxes = [b.subscribe("burst", buffer=3000), c.subscribe("burst", buffer=3000)]
    for i in range(2000):
        await a.publish("burst", i.to_bytes(4, "big"))
    for inbox in inboxes:
        received = [int.from_bytes((await receive_one(inbox))[1], "big") for _ in range(2000)]
        assert received == list(range(2000))
        inbox.close()


@pytest.mark.anyio
async def test_listen_port_in_use_is_a_clear_error(cluster: Cluster) -> None:
    taken = cluster.members[0].settings.listen[0]
    port = int(taken.rsplit(":", 1)[1])
    with pytest.raises(TransportOpenError, match=f"listen {taken}"):
        await Transport.open(TransportSettings.loopback(CLUSTER, port=port), Sealer(KEY, CLUSTER, "clash"))


@pytest.mark.anyio
async def test_drops_are_logged_with_their_counts(cluster: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    b = cluster.members[1]
    b._last_drop_warning = -1e9  # the module's earlier drops may have used up this interval's warning
    with caplog.at_level("WARNING", logger="shoal.net.transport"):
        cluster.raw.put(f"shoal/{CLUSTER}/all/logged", b"\x01garbage")
        await wait_until(lambda: "dropped a frame on all/logged" in caplog.text, what="drop warning")
    assert "malformed" in caplog.text
