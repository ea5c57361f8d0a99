import random
import struct

import pytest

from shoal.net.sealing import (
    FRAME_VERSION,
    MAX_FRAME_BYTES,
    REPLAY_WINDOW,
    DropReason,
    FrameError,
    Sealer,
)

KEY = b"correct horse battery staple"


def make_pair(key: bytes | None = KEY, cluster: str = "test") -> tuple[Sealer, Sealer]:
    return Sealer(key, cluster, "alice"), Sealer(key, cluster, "bob")


def test_round_trip() -> None:
    alice, bob = make_pair()
    for payload in [b"", b"hello", bytes(range(256)) * 100]:
        assert bob.open(alice.seal(payload)) == ("alice", payload)
    assert bob.drops.total() == 0


def test_without_key_round_trips_and_says_so() -> None:
    alice, bob = make_pair(key=None)
    assert not alice.has_secret
    assert Sealer(KEY, "test", "x").has_secret
    assert bob.open(alice.seal(b"hi")) == ("alice", b"hi")


def test_ciphertext_hides_the_payload() -> None:
    alice, _ = make_pair()
    assert b"secret-payload" not in alice.seal(b"secret-payload")


@pytest.mark.parametrize(
    ("key", "cluster"),
    [(b"another key", "test"), (None, "test"), (KEY, "other-cluster")],
)
def test_wrong_key_or_cluster_fails_authentication(key: bytes | None, cluster: str) -> None:
    stranger = Sealer(key, cluster, "mallory")
    _, bob = make_pair()
    with pytest.raises(FrameError) as error:
        bob.open(stranger.seal(b"let me in"))
    assert error.value.reason is DropReason.AUTH_FAILED
    assert bob.drops.get(DropReason.AUTH_FAILED) == 1


def test_every_single_bit_flip_is_rejected() -> None:
    alice, bob = make_pair()
    frame = alice.seal(b"payload under test")
    for bit in range(len(frame) * 8):
        corrupt = bytearray(frame)
        corrupt[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(FrameError):
            bob.open(bytes(corrupt))
    assert bob.drops.total() == len(frame) * 8
    # The untouched frame still opens: no forged frame moved the replay window.
    assert bob.open(frame) == ("alice", b"payload under test")


def test_replayed_frame_is_dropped_and_counted() -> None:
    alice, bob = make_pair()
    frame = alice.seal(b"once")
    assert bob.open(frame) == ("alice", b"once")
    with pytest.raises(FrameError) as error:
        bob.open(frame)
    assert error.value.reason is DropReason.REPLAYED
    assert bob.drops.get(DropReason.REPLAYED) == 1


def test_out_of_order_within_window_accepted_once() -> None:
    alice, bob = make_pair()
    frames = [alice.seal(str(i).encode()) for i in range(10)]
    order = [9, 3, 0, 5, 1, 8, 2, 7, 4, 6]
    for i in order:
        assert bob.open(frames[i]) == ("alice", str(i).encode())
    for i in order:
        with pytest.raises(FrameError):
            bob.open(frames[i])
    assert bob.drops.get(DropReason.REPLAYED) == 10


def test_frame_older_than_window_is_dropped() -> None:
    alice, bob = make_pair()
    old = alice.seal(b"old")
    newer = [alice.seal(b"x") for _ in range(REPLAY_WINDOW)]
    assert bob.open(newer[-1])[1] == b"x"
    with pytest.raises(FrameError) as error:
        bob.open(old)
    assert error.value.reason is DropReason.REPLAYED
    # The oldest frame still inside the window is accepted.
    assert bob.open(newer[0])[1] == b"x"


def test_restarted_sender_continues_above_old_counters() -> None:
    before = Sealer(KEY, "test", "alice")
    _, bob = make_pair()
    for _ in range(5):
        bob.open(before.seal(b"a"))
    restarted = Sealer(KEY, "test", "alice")
    assert bob.open(restarted.seal(b"after restart")) == ("alice", b"after restart")


def test_replay_state_is_per_sender() -> None:
    alice, bob = make_pair()
    carol = Sealer(KEY, "test", "carol")
    receiver = Sealer(KEY, "test", "dave")
    frames = [alice.seal(b"a"), bob.seal(b"b"), carol.seal(b"c")]
    assert [receiver.open(f)[0] for f in frames] == ["alice", "bob", "carol"]


def test_oversized_payload_refused_on_seal_and_open() -> None:
    alice, bob = make_pair()
    with pytest.raises(ValueError, match="frame limit"):
        alice.seal(bytes(MAX_FRAME_BYTES))
    with pytest.raises(FrameError) as error:
        bob.open(bytes([FRAME_VERSION]) + bytes(MAX_FRAME_BYTES))
    assert error.value.reason is DropReason.OVERSIZED


def test_unknown_version_and_malformed_are_classified() -> None:
    alice, bob = make_pair()
    frame = alice.seal(b"x")
    cases = {
        bytes([FRAME_VERSION + 1]) + frame[1:]: DropReason.UNKNOWN_VERSION,
        b"": DropReason.MALFORMED,
        frame[:10]: DropReason.MALFORMED,
        frame[:1] + b"\xff" + frame[2:]: DropReason.MALFORMED,  # sender id longer than the frame
        frame[:1] + b"\x00" + frame[2:]: DropReason.MALFORMED,  # empty sender id
    }
    for corrupt, reason in cases.items():
        with pytest.raises(FrameError) as error:
            bob.open(corrupt)
        assert error.value.reason is reason, corrupt
    assert bob.drops.total() == len(cases)


def test_invalid_constructor_arguments() -> None:
    with pytest.raises(ValueError, match="cluster name"):
        Sealer(KEY, "", "a")
    with pytest.raises(ValueError, match="cluster key"):
        Sealer(b"", "c", "a")
    with pytest.raises(ValueError, match="sender id"):
        Sealer(KEY, "c", "")
    with pytest.raises(ValueError, match="sender id"):
        Sealer(KEY, "c", "x" * 256)


def corrupt_frames(valid: list[bytes], rng: random.Random, count: int) -> list[bytes]:
    """Random bytes, truncations, header and body mutations, huge lengths, and stale replays."""
    frames: list[bytes] = []
    for i in range(count):
        base = rng.choice(valid)
        kind = i % 7
        if kind == 0:
            frames.append(rng.randbytes(rng.randrange(0, 200)))
        elif kind == 1:
            frames.append(base[: rng.randrange(0, len(base))])
        elif kind == 2:  # header mutation: version, length, id or counter
            mutated = bytearray(base)
            pos = rng.randrange(0, 2 + base[1] + 8)
            mutated[pos] = (mutated[pos] + rng.randrange(1, 256)) % 256
            frames.append(bytes(mutated))
        elif kind == 3:  # body mutation
            mutated = bytearray(base)
            pos = rng.randrange(2 + base[1] + 8, len(base))
            mutated[pos] ^= rng.randrange(1, 256)
            frames.append(bytes(mutated))
        elif kind == 4:  # forged counter with a valid header shape
            header_end = 2 + base[1]
            counter = struct.pack(">Q", rng.getrandbits(64))
            frames.append(base[:header_end] + counter + base[header_end + 8 :])
        elif kind == 5:
            frames.append(base + rng.randbytes(rng.randrange(1, 32)))
        else:  # replay of an already accepted frame
            frames.append(base)
    frames.append(bytes([FRAME_VERSION]) + bytes(MAX_FRAME_BYTES + 1))
    return frames


def test_random_and_corrupt_frames_only_raise_frame_error_and_are_all_counted() -> None:
    rng = random.Random(1234)
    alice, bob = make_pair()
    valid = [alice.seal(rng.randbytes(rng.randrange(0, 300))) for _ in range(50)]
    for frame in valid:
        bob.open(frame)
    garbage = corrupt_frames(valid, rng, 10_000)
    for frame in garbage:
        with pytest.raises(FrameError):
            bob.open(frame)
    assert bob.drops.total() == len(garbage)
    counts = bob.drops.snapshot()
    for reason in ["auth_failed", "replayed", "oversized", "malformed", "unknown_version"]:
        assert counts[reason] > 0, counts
    # Still working for legitimate traffic afterwards.
    assert bob.open(alice.seal(b"still alive")) == ("alice", b"still alive")


def test_frame_moved_to_another_context_fails_authentication() -> None:
    alice, bob = make_pair()
    frame = alice.seal(b"for heartbeats", context=b"all/heartbeat")
    with pytest.raises(FrameError) as error:
        bob.open(frame, context=b"all/events")
    assert error.value.reason is DropReason.AUTH_FAILED
    assert bob.open(frame, context=b"all/heartbeat") == ("alice", b"for heartbeats")
