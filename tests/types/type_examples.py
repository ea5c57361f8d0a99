"""One valid example of every member of every union, keyed by class. A test fails when a union gains a
member without an example here."""

from __future__ import annotations

from instance_examples import MESSAGE_EXAMPLES
from pydantic import BaseModel

from shoal.types import (
    ApiAddress,
    CommandAccepted,
    CommandBatch,
    CommandEnvelope,
    CommandId,
    CommandRejected,
    EventBatch,
    EventIndex,
    EventRange,
    EventRangeRequest,
    GpuInfo,
    Heartbeat,
    IndexedEvent,
    MasterElected,
    NetworkInterface,
    NodeId,
    NodeJoined,
    NodeLabelRemoved,
    NodeLabelSet,
    NodeProfile,
    NodeProfileUpdated,
    NodeTimedOut,
    Ping,
    Pong,
    RemoveNodeLabel,
    ReplyBatch,
    SetNodeLabel,
    Term,
)
from shoal.types.generation import (
    CancelGeneration,
    ChatMessage,
    GenerationChunk,
    GenerationChunks,
    GenerationParams,
    StartGeneration,
)
from shoal.types.instance_ids import InstanceId, TaskId
from shoal.types.instance_messages import INSTANCE_COMMANDS, INSTANCE_EVENTS

NODE_A = NodeId("0123456789abcdef0123456789abcdef")
NODE_B = NodeId("fedcba9876543210fedcba9876543210")
COMMAND_ID = CommandId("5f1c2b7e9a3d4e6f8a0b1c2d3e4f5a6b")


def make_profile(node_id: NodeId = NODE_A) -> NodeProfile:
    return NodeProfile(
        node_id=node_id,
        hostname="box-1",
        memory_total_bytes=64 * 2**30,
        memory_available_bytes=48 * 2**30,
        cpu_model="AMD EPYC 7763 64-Core Processor",
        num_cpu_cores=64,
        num_cpu_threads=128,
        gpus=(
            GpuInfo(index=0, name="NVIDIA H100", memory_total_bytes=80 * 2**30, memory_free_bytes=79 * 2**30),
        ),
        backends=("cpu", "cuda"),
        disk_free_bytes=500 * 2**30,
        network_interfaces=(NetworkInterface(name="eth0", addresses=("10.0.0.5", "fe80::1")),),
        api_address=ApiAddress(host="10.0.0.5", port=52415),
        shoal_version="0.1.0",
        started_at=1_700_000_000.5,
        link_rtts_ms={NODE_B: 0.42},
    )


def _indexed(index: int, event: object) -> IndexedEvent:
    return IndexedEvent.model_validate(
        {"index": EventIndex(index), "term": Term(1), "timestamp": 1_700_000_001.0, "event": event}
    )


SET_LABEL = SetNodeLabel(node_id=NODE_A, key="zone", value="rack-2")

COMMAND_EXAMPLES: dict[type[BaseModel], BaseModel] = {
    SetNodeLabel: SET_LABEL,
    RemoveNodeLabel: RemoveNodeLabel(node_id=NODE_A, key="zone"),
    **{cls: MESSAGE_EXAMPLES[cls] for cls in INSTANCE_COMMANDS},
}

EVENT_EXAMPLES: dict[type[BaseModel], BaseModel] = {
    MasterElected: MasterElected(node_id=NODE_A, term=Term(1)),
    NodeJoined: NodeJoined(node_id=NODE_A, profile=make_profile()),
    NodeProfileUpdated: NodeProfileUpdated(node_id=NODE_A, profile=make_profile()),
    NodeTimedOut: NodeTimedOut(node_id=NODE_B),
    NodeLabelSet: NodeLabelSet(node_id=NODE_A, key="gpu-class", value="h100"),
    NodeLabelRemoved: NodeLabelRemoved(node_id=NODE_A, key="gpu-class"),
    **{cls: MESSAGE_EXAMPLES[cls] for cls in INSTANCE_EVENTS},
}

REPLY_EXAMPLES: dict[type[BaseModel], BaseModel] = {
    CommandAccepted: CommandAccepted(
        command_id=COMMAND_ID, first_index=EventIndex(7), last_index=EventIndex(8)
    ),
    CommandRejected: CommandRejected(command_id=COMMAND_ID, reason="unknown node fedcba98"),
}

WIRE_EXAMPLES: dict[type[BaseModel], BaseModel] = {
    Heartbeat: Heartbeat(
        node_id=NODE_A,
        term=Term(3),
        last_index=EventIndex(41),
        force_master=False,
        is_master=True,
        eligible=True,
        profile=make_profile(),
    ),
    EventRangeRequest: EventRangeRequest(
        requester=NODE_B, first_index=EventIndex(3), last_index=EventIndex(9)
    ),
    EventRange: EventRange(
        events=(_indexed(1, EVENT_EXAMPLES[MasterElected]), _indexed(2, EVENT_EXAMPLES[NodeJoined]))
    ),
    EventBatch: EventBatch(
        events=(
            _indexed(5, EVENT_EXAMPLES[NodeLabelSet]),
            IndexedEvent.model_validate(
                {
                    "index": EventIndex(6),
                    "term": Term(1),
                    "timestamp": 1_700_000_002.0,
                    "event": EVENT_EXAMPLES[NodeLabelRemoved],
                    "command_id": COMMAND_ID,
                }
            ),
        )
    ),
    CommandBatch: CommandBatch(
        commands=(CommandEnvelope(command_id=COMMAND_ID, origin=NODE_B, command=SET_LABEL),)
    ),
    ReplyBatch: ReplyBatch(replies=(REPLY_EXAMPLES[CommandAccepted], REPLY_EXAMPLES[CommandRejected])),
    Ping: Ping(node_id=NODE_A, ping_id=17, sent_at=12345.678),
    Pong: Pong(node_id=NODE_B, ping_id=17, sent_at=12345.678),
    StartGeneration: StartGeneration(
        task_id=TaskId("t1"),
        instance_id=InstanceId("i1"),
        origin=NODE_B,
        prompt=(ChatMessage(role="user", content="Hi"),),
        params=GenerationParams(temperature=0.0, max_tokens=8, stop=("\n",)),
    ),
    CancelGeneration: CancelGeneration(task_id=TaskId("t1"), instance_id=InstanceId("i1"), origin=NODE_B),
    GenerationChunks: GenerationChunks(
        task_id=TaskId("t1"),
        chunks=(
            GenerationChunk(text="Hel", token_ids=(5, 6)),
            GenerationChunk(
                text="lo", token_ids=(7,), finish_reason="stop", prompt_tokens=3, completion_tokens=3
            ),
        ),
    ),
}
