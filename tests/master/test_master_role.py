"""The master role over a real Replica and EventLog: what it writes, broadcasts and answers."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from cluster_data import make_profile

from shoal.master.master import Master, MasterSettings
from shoal.replica import Replica
from shoal.types import (
    CommandAccepted,
    CommandEnvelope,
    CommandId,
    EventBatch,
    IndexedEvent,
    MasterElected,
    NodeId,
    NodeJoined,
    NodeLabelSet,
    ReplyBatch,
    SetNodeLabel,
    Term,
    WireMessage,
)

OLD, NEW, ASKER = NodeId("old-master"), NodeId("new-master"), NodeId("asker")


class RecordingOutbox:
    def __init__(self) -> None:
        self.broadcasts: list[WireMessage] = []
        self.sent: list[tuple[NodeId, WireMessage]] = []

    async def broadcast(self, message: WireMessage) -> None:
        self.broadcasts.append(message)

    async def send(self, node_id: NodeId, message: WireMessage) -> None:
        self.sent.append((node_id, message))


def history() -> list[IndexedEvent]:
    label = SetNodeLabel(node_id=ASKER, key="zone", value="eu")
    return [
        IndexedEvent(index=1, term=Term(1), timestamp=0.0, event=MasterElected(node_id=OLD, term=Term(1))),
        IndexedEvent(
            index=2, term=Term(1), timestamp=0.0, event=NodeJoined(node_id=ASKER, profile=make_profile(ASKER))
        ),
        IndexedEvent(
            index=3,
            term=Term(1),
            timestamp=0.0,
            event=NodeLabelSet(node_id=ASKER, key=label.key, value=label.value),
            command_id=CommandId("cmd-1"),
        ),
    ]


@pytest.mark.anyio
async def test_new_master_answers_a_resent_command_from_its_log_without_applying_it_again(
    tmp_path: Path,
) -> None:
    replica = Replica(NEW, tmp_path / "events.sqlite3", request_retry_s=0.5)
    replica.commit(history())
    outbox = RecordingOutbox()
    master = Master(NEW, MasterSettings(node_timeout_s=60.0, profile_update_interval_s=5.0), replica, outbox)
    resent = CommandEnvelope(
        command_id=CommandId("cmd-1"),
        origin=ASKER,
        command=SetNodeLabel(node_id=ASKER, key="zone", value="us"),
    )
    fresh = CommandEnvelope(
        command_id=CommandId("cmd-2"),
        origin=ASKER,
        command=SetNodeLabel(node_id=ASKER, key="rack", value="r9"),
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(master.run, 2)
        await anyio.sleep(0.05)
        master.submit(resent)
        master.submit(fresh)
        with anyio.fail_after(5):
            while not outbox.sent:
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    # one reply frame to the asker answering both, the resent one with its original indices
    ((to, message),) = outbox.sent
    assert to == ASKER and isinstance(message, ReplyBatch)
    replies = {r.command_id: r for r in message.replies}
    assert replies[CommandId("cmd-1")] == CommandAccepted(
        command_id=CommandId("cmd-1"), first_index=3, last_index=3
    )
    assert isinstance(replies[CommandId("cmd-2")], CommandAccepted)
    # the log got the election and the fresh command only; zone is still "eu"
    assert replica.state.nodes[ASKER].labels == {"zone": "eu", "rack": "r9"}
    written = [e for batch in outbox.broadcasts if isinstance(batch, EventBatch) for e in batch.events]
    assert [type(e.event) for e in written] == [MasterElected, NodeLabelSet]
    assert written[1].command_id == "cmd-2"
    replica.close()
