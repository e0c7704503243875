"""How a site's train update travels: float32 weights (the default) or float16 differences from the round's model.

`federation.update_transport: float16` halves what each site uploads per round. A site then sends, for every
floating tensor, its new weights minus the global model it was sent, in float16 (an update is small, so float16's
relative precision applies to the update, not to the weights), and says so in its site record
(`update-encoding`). The coordinator adds the differences back to the same global model in float32 before it
screens and aggregates anything, so the strategy and the site-level DP wrappers see weights as always.
Non-floating tensors (counters) travel unchanged. Under secure aggregation updates are masked integers, so
this encoding is refused there (fl_server/config.py).

Both sides use this module: the site encodes (`fl_client.update_transport`), the coordinator decodes
(`fl_server.federation`).
"""

from __future__ import annotations

import numpy as np

from shared_model import protocol

TRANSPORTS = ("float32", "float16")
ENCODING_FLOAT16_DELTA = "float16-delta"


def encode_update(local: dict[str, np.ndarray], global_: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The float16 differences `local - global_` of every floating tensor (others as they are)."""
    out = {}
    for key, value in local.items():
        if np.issubdtype(value.dtype, np.floating) and key in global_:
            out[key] = (value.astype(np.float32) - global_[key].astype(np.float32)).astype(np.float16)
        else:
            out[key] = value
    return out


def decode_update(sent: dict[str, np.ndarray], global_: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The weights a float16-difference update stands for, in the global model's dtypes.

    Raises:
        ValueError: a tensor is missing, unknown or of another shape (named), so that the reply is rejected.
    """
    missing, extra = sorted(set(global_) - set(sent)), sorted(set(sent) - set(global_))
    if missing or extra:
        raise ValueError(f"tensor(s) missing: {missing[:3]}" if missing else f"unknown tensor(s): {extra[:3]}")
    out = {}
    for key, ref in global_.items():
        got = sent[key]
        if got.shape != ref.shape:
            raise ValueError(f"{key}: shape {list(got.shape)}, the global model's is {list(ref.shape)}")
        if np.issubdtype(ref.dtype, np.floating):
            if got.dtype != np.float16:
                raise ValueError(f"{key}: dtype {got.dtype} in a float16-difference update")
            out[key] = (ref.astype(np.float32) + got.astype(np.float32)).astype(ref.dtype)
        else:
            out[key] = got
    return out


def reply_encoding(site_record: dict) -> str:
    """The encoding a train reply declares (float32 weights when it declares none)."""
    return str(site_record.get(protocol.UPDATE_ENCODING, "float32"))
