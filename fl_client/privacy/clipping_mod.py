"""Client-side clipping for site-level DP: Flower's mods, applied only when the coordinator asks for them."""

from __future__ import annotations

from typing import Any

from flwr.app import Context, Message

from shared_model import protocol


def site_dp_clipping_mod(msg: Message, ctxt: Context, call_next: Any) -> Message:
    """Apply Flower's `fixedclipping_mod` / `adaptiveclipping_mod` when this round's config asks for them.

    The coordinator's client-side site-DP wrappers (`fl_server.privacy.wrappers`) put
    `protocol.SITE_DP_CLIPPING` = `protocol.SITE_DP_CLIENT_FIXED` or `protocol.SITE_DP_CLIENT_ADAPTIVE` (and
    Flower's ``clipping_norm``) into the train config; any other train message passes through untouched.
    Flower's mods check only the array records (one in, one out, same keys) and the incoming config record,
    so the reply's extra `protocol.SITE_RECORD` ConfigRecord is fine. Clipping after DP-SGD is
    post-processing and costs no patient-level privacy.
    """
    from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod

    records = msg.content.config_records
    config = records.get(protocol.CONFIG_RECORD) if protocol.CONFIG_RECORD in records else None
    mode = str(config.get(protocol.SITE_DP_CLIPPING, "")) if config is not None else ""
    if mode == protocol.SITE_DP_CLIENT_FIXED:
        return fixedclipping_mod(msg, ctxt, call_next)
    if mode == protocol.SITE_DP_CLIENT_ADAPTIVE:
        return adaptiveclipping_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)
