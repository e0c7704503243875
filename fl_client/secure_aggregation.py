"""The site's side of a secure-aggregation round (see fl_server.secure_aggregation for the whole exchange).

Flower's `secaggplus_mod` runs the SecAgg+ protocol on the legacy FitIns/FitRes layout: it answers the
key-setup, key-sharing and unmasking stages itself and, in the masking stage, calls the ClientApp for a
FitRes whose parameters it then masks. `secure_aggregation_mod` puts it in front of the ClientApp's train
function only for messages that carry SecAgg+ stage configs (every other train message passes through),
and translates between the layouts: the FitIns becomes an ordinary train message for the site's own
train handler (so its policy checks, patient-level DP and the site-DP clipping mod all apply), and the
reply becomes a FitRes holding, instead of the model, the scaled update

    u = (local - global) * weight / weight_scale

(with weight the train metric the coordinator named, `num-examples` or `unit-weight`). Only u, masked,
leaves the site; the metrics and the site's name and policy travel in the FitRes metrics as in a plain
round.
"""

from __future__ import annotations

import contextvars
import json
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from shared_model import protocol


class SecureAggregationRefusal(RuntimeError):
    """The site's update does not fit the quantizer's range: refusing beats being clipped silently."""


# Set only while this module's SecAgg+ path runs the site's train handler: a site that requires secure
# aggregation (require-secure-aggregation) trains only then. Process-local, so no message can set it.
_SECURE_ROUND: contextvars.ContextVar[bool] = contextvars.ContextVar("llnm_secure_round", default=False)


def inside_secure_round() -> bool:
    """Whether the current train call comes from a SecAgg+ round (its update will leave only masked)."""
    return _SECURE_ROUND.get()


def secure_aggregation_mod(msg: Message, ctxt: Context, call_next: Any) -> Message:
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, ctxt)
    return secaggplus_mod(msg, ctxt, lambda m, c: _train_for_fitres(m, c, call_next))


def _train_for_fitres(msg: Message, ctxt: Context, call_next: Any) -> Message:
    import torch
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common.recorddict_compat import fitres_to_recorddict, recorddict_to_fitins

    fitins = recorddict_to_fitins(msg.content, keep_input=True)
    config = dict(fitins.config)
    keys = json.loads(str(config[protocol.SECAGG_KEYS]))
    weight_key = str(config[protocol.SECAGG_WEIGHT_KEY])
    weight_scale = float(config[protocol.SECAGG_WEIGHT_SCALE])
    bound = float(config[protocol.SECAGG_CLIPPING_RANGE])
    global_arrays = parameters_to_ndarrays(fitins.parameters)
    if len(keys) != len(global_arrays):
        raise ValueError(f"secure aggregation: {len(global_arrays)} arrays but {len(keys)} keys in the FitIns")
    state = {k: torch.from_numpy(np.array(a, copy=True)) for k, a in zip(keys, global_arrays, strict=True)}
    plain_config = {k: v for k, v in config.items() if not k.startswith("secagg-")}
    original = msg.content
    # The site's own train path sees an ordinary train message (model + round config).
    msg.content = RecordDict({protocol.ARRAYS_RECORD: ArrayRecord(state),
                              protocol.CONFIG_RECORD: ConfigRecord(plain_config)})
    token = _SECURE_ROUND.set(True)
    try:
        reply = call_next(msg, ctxt)
    finally:
        _SECURE_ROUND.reset(token)
        msg.content = original
    if reply.has_error():
        return reply
    local = reply.content[protocol.ARRAYS_RECORD]
    metrics = dict(reply.content[protocol.METRICS_RECORD])
    site = reply.content[protocol.SITE_RECORD]
    weight = float(metrics[weight_key]) / weight_scale
    update = []
    for key, g in zip(keys, global_arrays, strict=True):
        u = (np.asarray(local[key].numpy(), dtype=np.float64) - np.asarray(g, dtype=np.float64)) * weight
        update.append(u)
    peak = max((float(np.max(np.abs(u))) for u in update if u.size), default=0.0)
    if peak > bound:
        # The refusal names the coordinator's range only: the update's own values never leave unmasked.
        raise SecureAggregationRefusal(
            f"{protocol.POLICY_REFUSAL_MARKER}: secure aggregation: site {site.get(protocol.SITE_NAME)} refuses "
            f"round {config.get(protocol.SERVER_ROUND)}: its scaled update does not fit "
            f"federation.secagg.clipping_range {bound:g}, which Flower's quantizer would clip silently; the "
            "coordinator can raise clipping_range, or weight_scale (the update is multiplied by weight / "
            "weight_scale)")
    fit_metrics: dict[str, Any] = {**metrics, **{k: str(v) for k, v in site.items()}}
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), 1, fit_metrics)
    return Message(fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)
