"""The SQLite event log: contiguity, ranges, replay, reopen, corruption, a killed writer, WAL readers."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shoal.master.event_log import EventLog, EventLogContinuityError, EventLogCorruptError, EventLogError
from shoal.state import apply_all
from shoal.types import (
    ApiAddress,
    Event,
    EventIndex,
    IndexedEvent,
    MasterElected,
    NodeId,
    NodeJoined,
    NodeLabelSet,
    NodeProfile,
    State,
    Term,
)

A = NodeId("node-a")


def profile() -> NodeProfile:
    return NodeProfile(
        node_id=A,
        hostname="host-a",
        memory_total_bytes=16 * 2**30,
        memory_available_bytes=8 * 2**30,
        cpu_model="test cpu",
        num_cpu_cores=4,
        num_cpu_threads=8,
        disk_free_bytes=2**40,
        api_address=ApiAddress(host="127.0.0.1", port=8000),
        shoal_version="0.1.0",
        started_at=1.0,
    )


def at(index: int, event: Event) -> IndexedEvent:
    return IndexedEvent(index=EventIndex(index), term=Term(1), timestamp=float(index), event=event)


def event_at(index: int) -> IndexedEvent:
    """Event `index` of a log that folds: master elected, node joined, then label sets."""
    if index == 1:
        return at(1, MasterElected(node_id=A, term=Term(1)))
    if index == 2:
        return at(2, NodeJoined(node_id=A, profile=profile()))
    return at(index, NodeLabelSet(node_id=A, key=f"k{index % 7}", value=str(index)))


def history(num_events: int) -> list[IndexedEvent]:
    return [event_at(index) for index in range(1, num_events + 1)]


@pytest.fixture
def log(tmp_path: Path) -> Iterator[EventLog]:
    with EventLog(tmp_path / "events.db") as event_log:
        yield event_log


def test_empty_log(log: EventLog) -> None:
    assert log.last_index() == 0
    assert log.read_range(1, 10) == []
    assert log.replay() == State()


def test_append_and_read_ranges(log: EventLog) -> None:
    events = history(20)
    log.append(events[:5])
    log.append(events[5:6])
    log.append(events[6:])
    assert log.last_index() == 20
    assert log.read_range(1, 20) == events
    assert log.read_range(4, 9) == events[3:9]
    assert log.read_range(20, 20) == [events[19]]
    assert log.read_range(18, 100) == events[17:]  # shorter where the log ends
    assert log.read_range(21, 30) == []
    with pytest.raises(ValueError, match="start at 1"):
        log.read_range(0, 3)


@pytest.mark.parametrize("first_index", [2, 5])
def test_first_append_must_start_at_one(log: EventLog, first_index: int) -> None:
    with pytest.raises(EventLogContinuityError, match=f"append of event {first_index} where 1 is next"):
        log.append(history(6)[first_index - 1 :])
    assert log.last_index() == 0


def test_append_must_continue_without_gap_or_repeat(log: EventLog) -> None:
    events = history(10)
    log.append(events[:4])
    with pytest.raises(EventLogContinuityError, match="append of event 6 where 5 is next"):
        log.append(events[5:])
    with pytest.raises(EventLogContinuityError, match="append of event 4 where 5 is next"):
        log.append(events[3:])
    assert log.read_range(1, 10) == events[:4]


def test_batch_with_inner_gap_is_all_or_nothing(log: EventLog) -> None:
    events = history(10)
    log.append(events[:2])
    with pytest.raises(EventLogContinuityError, match="append of event 6 where 5 is next"):
        log.append([*events[2:4], *events[5:7]])
    assert log.last_index() == 2


def test_replay_equals_folding(log: EventLog) -> None:
    events = history(2500)  # more than one replay batch
    log.append(events)
    assert log.replay() == apply_all(State(), events)
    assert log.replay().last_index == 2500


def test_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "events.db"
    events = history(30)
    with EventLog(path) as log:
        log.append(events[:20])
    with EventLog(path) as log:
        assert log.last_index() == 20
        log.append(events[20:])
    with EventLog(path, synchronous="FULL") as log:
        assert log.read_range(1, 30) == events
        assert log.replay() == apply_all(State(), events)


def test_closed_log_says_so(log: EventLog) -> None:
    log.close()
    log.close()  # idempotent
    with pytest.raises(EventLogError, match="is closed"):
        log.last_index()


def _corrupt_row(path: Path, index: int, body: str) -> None:
    connection = sqlite3.connect(path)
    with connection:
        connection.execute("UPDATE events SET body = ? WHERE idx = ?", (body, index))
    connection.close()


@pytest.mark.parametrize(
    "body",
    [
        '{"kind": "indexed_event", "index": 7, "term": 1, "timest',  # torn write
        "",
        '{"kind": "indexed_event", "index": 8, "term": 1, "timestamp": 1.0, "event": {"kind": "node_timed_out", "node_id": "node-a"}}',
        '{"kind": "indexed_event", "index": 7, "term": 1, "timestamp": 1.0, "event": {"kind": "unheard_of"}}',
    ],
)
def test_corrupt_row_gives_clear_error_and_recovers(tmp_path: Path, body: str) -> None:
    path = tmp_path / "events.db"
    events = history(12)
    with EventLog(path) as log:
        log.append(events)
    _corrupt_row(path, 7, body)
    with EventLog(path) as log:  # opening works: the file is a sound database
        with pytest.raises(EventLogCorruptError, match=r"event 7 is corrupt") as caught:
            log.replay()
        assert caught.value.index == 7
        assert log.read_range(1, 6) == events[:6]
        # recovery: keep the good prefix, refill the rest (as catch-up from the master would)
        log.truncate_from(caught.value.index)
        assert log.last_index() == 6
        log.append(events[6:])
        assert log.replay() == apply_all(State(), events)


def test_row_that_does_not_fold_is_reported_at_its_index(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    with EventLog(path) as log:
        log.append(history(5))
    wrong = at(4, NodeLabelSet(node_id=NodeId("ghost"), key="k", value="v"))
    _corrupt_row(path, 4, wrong.model_dump_json())
    with (
        EventLog(path) as log,
        pytest.raises(EventLogCorruptError, match="event 4 is corrupt: does not fold"),
    ):
        log.replay()


def test_garbage_file_gives_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    path.write_bytes(os.urandom(8192))
    with pytest.raises(EventLogCorruptError, match=r"events.db: the database is corrupt"):
        EventLog(path)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    EventLog(path).close()
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA user_version=99")
    connection.close()
    with pytest.raises(EventLogError, match="schema version 99"):
        EventLog(path)


def test_concurrent_reader_while_writer_appends(tmp_path: Path) -> None:
    """WAL: a reader on its own connection always sees a contiguous, readable prefix while a writer commits."""
    path = tmp_path / "events.db"
    events = history(600)
    writer = EventLog(path)
    reader = EventLog(path)
    done = threading.Event()
    errors: list[BaseException] = []

    def write() -> None:
        try:
            for start in range(0, len(events), 10):
                writer.append(events[start : start + 10])
        except BaseException as error:
            errors.append(error)
        finally:
            done.set()

    thread = threading.Thread(target=write)
    thread.start()
    seen = [0]
    deadline = time.monotonic() + 30
    while not done.is_set() and time.monotonic() < deadline:
        last = reader.last_index()
        assert last % 10 == 0  # a batch is visible whole or not at all
        assert last >= seen[-1]
        seen.append(last)
        if last:
            assert reader.read_range(max(1, last - 15), last) == events[max(0, last - 16) : last]
    thread.join(timeout=30)
    assert not errors
    assert reader.last_index() == 600
    assert reader.replay() == apply_all(State(), events)
    writer.close()
    reader.close()


def test_writer_killed_mid_stream_leaves_a_sound_prefix(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_event_log import event_at
        from shoal.master.event_log import EventLog
        log = EventLog(__import__("pathlib").Path({str(path)!r}))
        start = 1
        while True:  # until killed
            log.append([event_at(index) for index in range(start, start + 50)])
            start += 50
            if start == 551:
                print("ready", flush=True)
        """
    )
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) as child:
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready"
            time.sleep(0.2)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=10)
    assert child.returncode == -signal.SIGKILL
    with EventLog(path) as log:
        last = log.last_index()
        assert last >= 550 and last % 50 == 0
        assert log.replay() == apply_all(State(), history(last))
