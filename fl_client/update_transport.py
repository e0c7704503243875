"""The site side of `federation.update_transport: float16`: a ClientApp mod that sends the update as float16
differences from the model the round sent (shared_model/protocol/update_codec.py).

It is the outermost train mod, so it encodes exactly what would otherwise leave: the update after the
client-side DP clipping mod (post-processing of a released value costs no privacy).
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Array, ArrayRecord, Context, Message

from shared_model import protocol
from shared_model.protocol.update_codec import ENCODING_FLOAT16_DELTA, encode_update


def update_transport_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    reply = call_next(msg, context)
    config = msg.content.config_records.get(protocol.CONFIG_RECORD, {})
    if (config.get(protocol.UPDATE_TRANSPORT) != "float16" or reply.has_error()
            or protocol.ARRAYS_RECORD not in reply.content or protocol.ARRAYS_RECORD not in msg.content):
        return reply
    sent = {k: v.numpy() for k, v in msg.content[protocol.ARRAYS_RECORD].items()}
    local = {k: v.numpy() for k, v in reply.content[protocol.ARRAYS_RECORD].items()}
    encoded = encode_update(local, sent)
    reply.content[protocol.ARRAYS_RECORD] = ArrayRecord({k: Array(v) for k, v in encoded.items()})
    reply.content[protocol.SITE_RECORD][protocol.UPDATE_ENCODING] = ENCODING_FLOAT16_DELTA
    return reply
