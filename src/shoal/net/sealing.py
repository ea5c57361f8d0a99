"""Sealing of every frame that crosses the transport: AES-256-GCM under an HKDF-derived cluster key.

Frame layout (all integers big-endian):

    version (1) | sender id length (1) | sender id (utf-8, 1..255) | counter (8) | ciphertext + tag (16)

The header (everything before the ciphertext) plus a context the receiver knows (the topic key) is the
AEAD's associated data, so no byte of the header can be changed, and no frame moved to another topic or
recipient, without failing authentication. Each sender encrypts under its own key, derived from the cluster
key and its id, and a nonce built from a hash of its id and its counter: nonces never repeat under one key
while the counter only grows. The counter starts at the wall clock in nanoseconds and then counts frames,
so a restarted sender continues above every counter it used before (it cannot send more than one frame per
nanosecond). It counts frames rather than following the clock so that the receivers' window (in counter
units) tolerates reordering of `REPLAY_WINDOW` frames. Limitation: if the wall clock steps back across a
restart by more than the process lived, receivers that saw the old counters drop the new ones as replays
until they restart themselves.

Receivers keep, per sender, the highest counter seen and a bitmap of the `REPLAY_WINDOW` counters below it:
a frame is accepted once, slightly out-of-order frames are accepted once, duplicates and frames older than
the window are dropped. Replay state is only updated by authenticated frames, so forged frames cannot move
it. Every dropped frame is counted by reason in `DropCounters`.

Without a cluster key the key derives from the cluster name: the same code path, and no secrecy —
`Sealer.has_secret` says which one is in use so the node can tell its operator.
"""

from __future__ import annotations

import hashlib
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import StrEnum

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from shoal.types.ids import NodeId

FRAME_VERSION = 1
MAX_FRAME_BYTES = 16 * 1024 * 1024
REPLAY_WINDOW = 1024
MAX_TRACKED_SENDERS = 4096
MAX_SENDER_ID_BYTES = 255
TAG_BYTES = 16
_COUNTER = struct.Struct(">Q")
_MIN_FRAME_BYTES = 2 + 1 + _COUNTER.size + TAG_BYTES


class DropReason(StrEnum):
    """Why a received frame was dropped (the keys of `DropCounters`)."""

    AUTH_FAILED = "auth_failed"
    REPLAYED = "replayed"
    OVERSIZED = "oversized"
    MALFORMED = "malformed"
    UNKNOWN_VERSION = "unknown_version"
    # Counted by the transport, never by the sealer: a subscriber's queue was full.
    OVERFLOW = "overflow"


class FrameError(Exception):
    """A received frame was rejected; `reason` says why. The only error `Sealer.open` raises."""

    def __init__(self, reason: DropReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class DropCounters:
    """Thread-safe counts of dropped frames by reason."""

    _counts: dict[DropReason, int] = field(default_factory=lambda: dict.fromkeys(DropReason, 0))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, reason: DropReason, num: int = 1) -> None:
        with self._lock:
            self._counts[reason] += num

    def get(self, reason: DropReason) -> int:
        with self._lock:
            return self._counts[reason]

    def snapshot(self) -> dict[str, int]:
        """The counts by reason name, e.g. for `GET /state` or a log line."""
        with self._lock:
            return {reason.value: num for reason, num in self._counts.items()}

    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())


@dataclass
class _ReplayWindow:
    highest: int
    seen: int  # bit i set: counter (highest - i) was accepted

    def check(self, counter: int) -> DropReason | None:
        if counter > self.highest:
            return None
        offset = self.highest - counter
        if offset >= REPLAY_WINDOW or (self.seen >> offset) & 1:
            return DropReason.REPLAYED
        return None

    def mark(self, counter: int) -> None:
        if counter > self.highest:
            shift = counter - self.highest
            self.seen = (
                ((self.seen << shift) | 1) & ((1 << REPLAY_WINDOW) - 1) if shift < REPLAY_WINDOW else 1
            )
            self.highest = counter
        else:
            self.seen |= 1 << (self.highest - counter)


def _derive(secret: bytes, info: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info.encode()).derive(secret)


class Sealer:
    """Seals frames sent by `sender_id` and opens frames from any member of the cluster.

    Thread-safe: the transport opens frames on zenoh's threads and seals on the event loop's.
    """

    def __init__(self, cluster_key: bytes | None, cluster_name: str, sender_id: NodeId) -> None:
        if not cluster_name:
            raise ValueError("cluster name must not be empty")
        if cluster_key is not None and len(cluster_key) == 0:
            raise ValueError(
                "cluster key must not be empty (pass None to derive the key from the cluster name)"
            )
        self._sender_bytes = sender_id.encode()
        if not 1 <= len(self._sender_bytes) <= MAX_SENDER_ID_BYTES:
            raise ValueError(f"sender id must be 1..{MAX_SENDER_ID_BYTES} utf-8 bytes, got {sender_id!r}")
        self.sender_id = sender_id
        self.cluster_name = cluster_name
        self.has_secret = cluster_key is not None
        secret = cluster_key if cluster_key is not None else cluster_name.encode()
        self._cluster_key = _derive(secret, f"shoal/v1/{cluster_name}")
        self._header_prefix = bytes([FRAME_VERSION, len(self._sender_bytes)]) + self._sender_bytes
        self._own_aead = self._sender_aead(self._sender_bytes)
        self._own_nonce_prefix = hashlib.sha256(self._sender_bytes).digest()[:4]
        self._counter = time.time_ns()
        self._seal_lock = threading.Lock()
        self._open_lock = threading.Lock()
        self._aeads: OrderedDict[bytes, AESGCM] = OrderedDict()
        self._windows: OrderedDict[bytes, _ReplayWindow] = OrderedDict()
        self.drops = DropCounters()

    def _sender_aead(self, sender: bytes) -> AESGCM:
        key = _derive(self._cluster_key, "shoal/v1/sender/" + sender.hex())
        return AESGCM(key)

    def seal(self, plaintext: bytes, *, context: bytes = b"") -> bytes:
        """One frame carrying `plaintext`, under the next counter.

        `context` is authenticated but not sent (the transport passes the topic key), so a frame moved to
        another topic or another recipient fails authentication.
        """
        if len(plaintext) + len(self._header_prefix) + _COUNTER.size + TAG_BYTES > MAX_FRAME_BYTES:
            raise ValueError(
                f"payload of {len(plaintext)} bytes exceeds the {MAX_FRAME_BYTES}-byte frame limit"
            )
        with self._seal_lock:
            self._counter += 1
            counter = self._counter
        header = self._header_prefix + _COUNTER.pack(counter)
        nonce = self._own_nonce_prefix + _COUNTER.pack(counter)
        return header + self._own_aead.encrypt(nonce, plaintext, header + context)

    def open(self, frame: bytes, *, context: bytes = b"") -> tuple[NodeId, bytes]:
        """The sender and plaintext of `frame`; raises `FrameError` (and counts it) if the frame is dropped.

        `context` must equal the one the frame was sealed with.
        """
        try:
            return self._open(frame, context)
        except FrameError as error:
            self.drops.add(error.reason)
            raise

    def _open(self, frame: bytes, context: bytes) -> tuple[NodeId, bytes]:
        if len(frame) > MAX_FRAME_BYTES:
            raise FrameError(DropReason.OVERSIZED, f"{len(frame)} bytes > {MAX_FRAME_BYTES}")
        if len(frame) < 1:
            raise FrameError(DropReason.MALFORMED, "empty frame")
        if frame[0] != FRAME_VERSION:
            raise FrameError(DropReason.UNKNOWN_VERSION, f"version {frame[0]}, expected {FRAME_VERSION}")
        if len(frame) < _MIN_FRAME_BYTES:
            raise FrameError(DropReason.MALFORMED, f"{len(frame)} bytes is shorter than any frame")
        id_len = frame[1]
        header_len = 2 + id_len + _COUNTER.size
        if id_len == 0 or len(frame) < header_len + TAG_BYTES:
            raise FrameError(DropReason.MALFORMED, f"sender id length {id_len} does not fit the frame")
        sender = bytes(frame[2 : 2 + id_len])
        try:
            sender_id = NodeId(sender.decode())
        except UnicodeDecodeError:
            raise FrameError(DropReason.MALFORMED, "sender id is not utf-8") from None
        (counter,) = _COUNTER.unpack_from(frame, 2 + id_len)
        header = bytes(frame[:header_len])
        with self._open_lock:
            window = self._windows.get(sender)
            if window is not None and window.check(counter) is not None:
                raise FrameError(DropReason.REPLAYED, f"counter {counter} from {sender_id!r} seen or too old")
            aead = self._aeads.get(sender)
            if aead is None:
                aead = self._sender_aead(sender)
        nonce = hashlib.sha256(sender).digest()[:4] + _COUNTER.pack(counter)
        try:
            plaintext = aead.decrypt(nonce, bytes(frame[header_len:]), header + context)
        except InvalidTag:
            raise FrameError(DropReason.AUTH_FAILED, f"frame claiming sender {sender_id!r}") from None
        with self._open_lock:
            # Checked again: another thread may have accepted the same counter while this one decrypted.
            window = self._windows.get(sender)
            if window is None:
                window = _ReplayWindow(highest=counter, seen=1)
                self._windows[sender] = window
            elif window.check(counter) is not None:
                raise FrameError(DropReason.REPLAYED, f"counter {counter} from {sender_id!r} seen or too old")
            else:
                window.mark(counter)
            self._windows.move_to_end(sender)
            self._aeads[sender] = aead
            self._aeads.move_to_end(sender)
            # Only authenticated senders get here, so the tables grow only with real cluster members.
            while len(self._windows) > MAX_TRACKED_SENDERS:
                self._windows.popitem(last=False)
            while len(self._aeads) > MAX_TRACKED_SENDERS:
                self._aeads.popitem(last=False)
        return sender_id, plaintext
