"""What a Flower message weighs on the wire, for the byte benchmarks."""

from __future__ import annotations

from typing import Any


def object_bytes(records: dict[str, Any], *, reply: bool) -> int:
    """Bytes of the objects Flower pushes for a train message (`reply=False`: an instruction, as a SuperNode
    pulls it) or a train reply holding `records` (record name -> ArrayRecord/ConfigRecord/...)."""
    from flwr.app import Message, RecordDict
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_task_id", "_run_id", "_node_id"):  # a message outside a Flower process
        setattr(TaskIdentity, attr, 1)
    ask = Message(RecordDict({} if reply else records), dst_node_id=1, message_type="train")
    msg = Message(RecordDict(records), reply_to=ask) if reply else ask
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(msg).values())
