"""The event log: every node's durable copy of the cluster's indexed events, in SQLite (WAL mode).

Only contiguous runs are stored: the first event has index 1 and each append continues the last index
exactly, inside one transaction (all of a batch or none of it). Each row holds the IndexedEvent's JSON.

Durability: WAL with `synchronous=NORMAL` by default. A committed append survives the process being
killed at any point (SIGKILL included) — the failure the cluster plans for. A power loss may drop the
last commits, never corrupt earlier ones; another node's copy then restores them by catch-up. Pass
`synchronous="FULL"` to fsync every commit instead (slower appends).

Readers in other threads or processes may open the same file while a writer appends (WAL): they see a
consistent prefix. One EventLog object may be shared across threads (calls are serialised by a lock).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

from pydantic import ValidationError

from shoal.state import InvalidEventError, apply
from shoal.types.events import IndexedEvent
from shoal.types.ids import EventIndex
from shoal.types.state import State

SCHEMA_VERSION = 1
REPLAY_BATCH_SIZE = 1000
_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    idx INTEGER PRIMARY KEY CHECK (idx >= 1),
    term INTEGER NOT NULL,
    kind TEXT NOT NULL,
    body TEXT NOT NULL
)
"""


class EventLogError(Exception):
    """The event log cannot do what was asked."""


class EventLogContinuityError(EventLogError, ValueError):
    """An append that would leave a gap, repeat an index, or not start at index 1."""


class EventLogCorruptError(EventLogError):
    """The database file or one of its rows cannot be read back. `index` is the first bad event's index
    (None when the file itself is unreadable): `truncate_from(index)` keeps the good prefix, and catch-up
    from the master refills the rest."""

    def __init__(self, path: Path, index: int | None, reason: str) -> None:
        where = f"event {index}" if index is not None else "the database"
        super().__init__(f"event log {path}: {where} is corrupt: {reason}")
        self.path = path
        self.index = index
        self.reason = reason


class EventLog:
    def __init__(self, path: Path, *, synchronous: Literal["NORMAL", "FULL"] = "NORMAL") -> None:
        self.path = path
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
        try:
            version = connection.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise EventLogError(
                    f"event log {path} has schema version {version}; this shoal reads up to {SCHEMA_VERSION}"
                )
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute(f"PRAGMA synchronous={synchronous}")
            connection.execute(_SCHEMA)
            connection.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            # Reading the table end to end is cheap and catches a file whose pages are damaged at open.
            integrity = connection.execute("PRAGMA quick_check").fetchone()[0]
            if integrity != "ok":
                raise EventLogCorruptError(path, None, f"integrity check failed: {integrity}")
        except sqlite3.DatabaseError as error:
            connection.close()
            raise EventLogCorruptError(path, None, str(error)) from error
        except BaseException:
            connection.close()
            raise
        self._connection: sqlite3.Connection | None = connection

    # --- writing -----------------------------------------------------------------------------------------

    def append(self, events: Sequence[IndexedEvent]) -> None:
        """Store `events` (in index order, continuing the log) atomically."""
        if not events:
            return
        with self._lock:
            connection = self._open_connection()
            try:
                connection.execute("BEGIN IMMEDIATE")
                try:
                    expected = self._last_index(connection) + 1
                    rows = []
                    for event in events:
                        if event.index != expected:
                            raise EventLogContinuityError(
                                f"event log {self.path}: append of event {event.index} where {expected} is next"
                            )
                        rows.append((event.index, event.term, event.event.kind, event.model_dump_json()))
                        expected += 1
                    connection.executemany(
                        "INSERT INTO events (idx, term, kind, body) VALUES (?, ?, ?, ?)", rows
                    )
                except BaseException:
                    connection.execute("ROLLBACK")
                    raise
                connection.execute("COMMIT")
            except sqlite3.DatabaseError as error:
                raise EventLogCorruptError(self.path, None, str(error)) from error

    def truncate_from(self, index: int) -> None:
        """Delete the events at `index` and after (dropping a corrupt tail, or events a new master never
        had). The log keeps [1, index - 1]."""
        with self._lock:
            connection = self._open_connection()
            try:
                connection.execute("DELETE FROM events WHERE idx >= ?", (index,))
            except sqlite3.DatabaseError as error:
                raise EventLogCorruptError(self.path, None, str(error)) from error

    # --- reading -----------------------------------------------------------------------------------------

    def last_index(self) -> EventIndex:
        """The index of the last stored event; 0 when the log is empty."""
        with self._lock:
            connection = self._open_connection()
            try:
                return EventIndex(self._last_index(connection))
            except sqlite3.DatabaseError as error:
                raise EventLogCorruptError(self.path, None, str(error)) from error

    def read_range(self, first: int, last: int) -> list[IndexedEvent]:
        """The events [first, last]; shorter (possibly empty) where the log ends before `last`."""
        if first < 1:
            raise ValueError(f"event indices start at 1, not {first}")
        with self._lock:
            connection = self._open_connection()
            try:
                rows = connection.execute(
                    "SELECT idx, body FROM events WHERE idx BETWEEN ? AND ? ORDER BY idx", (first, last)
                ).fetchall()
            except sqlite3.DatabaseError as error:
                raise EventLogCorruptError(self.path, None, str(error)) from error
        events: list[IndexedEvent] = []
        for expected, (index, body) in enumerate(rows, start=first):
            if index != expected:
                raise EventLogCorruptError(self.path, expected, f"missing (the next stored event is {index})")
            events.append(self._decode(index, body))
        return events

    def iter_events(self, first: int = 1) -> Iterator[IndexedEvent]:
        """All events from `first` on, read in batches (so a long log is never loaded whole)."""
        while True:
            batch = self.read_range(first, first + REPLAY_BATCH_SIZE - 1)
            yield from batch
            if len(batch) < REPLAY_BATCH_SIZE:
                return
            first += REPLAY_BATCH_SIZE

    def replay(self) -> State:
        """The state folded from every stored event, from index 1."""
        state = State()
        for event in self.iter_events():
            try:
                state = apply(state, event)
            except InvalidEventError as error:
                raise EventLogCorruptError(self.path, event.index, f"does not fold: {error}") from error
        return state

    # --- lifecycle ---------------------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _open_connection(self) -> sqlite3.Connection:
        if self._connection is None:
            raise EventLogError(f"event log {self.path} is closed")
        return self._connection

    @staticmethod
    def _last_index(connection: sqlite3.Connection) -> int:
        row = connection.execute("SELECT MAX(idx) FROM events").fetchone()
        return 0 if row[0] is None else int(row[0])

    def _decode(self, index: int, body: object) -> IndexedEvent:
        if not isinstance(body, str | bytes):
            raise EventLogCorruptError(self.path, index, f"body is {type(body).__name__}, not JSON text")
        try:
            event = IndexedEvent.model_validate_json(body)
        except ValidationError as error:
            raise EventLogCorruptError(self.path, index, f"unreadable: {error}") from error
        if event.index != index:
            raise EventLogCorruptError(self.path, index, f"row holds event {event.index}")
        return event
