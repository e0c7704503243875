"""Train replies screened before aggregation: a malformed or outlying update never reaches the global model.

Each rejected reply becomes a failure of its site for the round (`phase: train`, reason `rejected update: ...`)
and the round goes on with the others, under the same quorum (`federation.min_sites`). A reply is rejected when:

* it answers another run or another round (the site echoes the round config's `run-id` and `server-round` in
  its site record);
* its arrays are not the global model's: a tensor missing or extra, another shape, another dtype;
* any value is NaN or infinite;
* its update (site model minus the round's global model, as one vector) is longer than
  `federation.max_update_norm`, when set, or than `federation.max_update_norm_ratio` times the median update
  norm of the round's replies (default 10; with fewer than three replies the median is not a yardstick and
  only the absolute bound applies).

Secure-aggregation rounds are not screened here: the coordinator only ever sees the masked sum there, and
SecAgg+ bounds each coordinate by its clipping range instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import Message

from shared_model import protocol

__all__ = ["screen_updates"]


def _arrays(record: Any) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def _shape_problem(sent: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> str | None:
    missing = sorted(set(reference) - set(sent))
    extra = sorted(set(sent) - set(reference))
    if missing:
        return f"tensor(s) missing: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"
    if extra:
        return f"unknown tensor(s): {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}"
    for key, ref in reference.items():
        got = sent[key]
        if got.shape != ref.shape:
            return f"{key}: shape {list(got.shape)}, the global model's is {list(ref.shape)}"
        if got.dtype != ref.dtype:
            return f"{key}: dtype {got.dtype}, the global model's is {ref.dtype}"
    return None


def _echo_problem(reply: Message, run_id: str, server_round: int) -> str | None:
    site = reply.content.get(protocol.SITE_RECORD, {})
    got_run, got_round = site.get(protocol.SITE_RUN_ID), site.get(protocol.SITE_ROUND)
    if got_run is None or got_round is None:
        return "the reply does not say which run and round it answers (another software version?)"
    if str(got_run) != str(run_id):
        return f"it answers run {got_run!r}, not this run {run_id!r}"
    if int(got_round) != int(server_round):
        return f"it answers round {got_round}, not round {server_round}"
    return None


def _decode(reply: Message, reference: dict[str, np.ndarray], transport: str) -> str | None:
    """Turn a float16-difference update back into float32 weights in place; the problem, if it cannot be."""
    from flwr.app import Array, ArrayRecord

    from shared_model.protocol.update_codec import ENCODING_FLOAT16_DELTA, decode_update, reply_encoding

    encoding = reply_encoding(reply.content.get(protocol.SITE_RECORD, {}))
    wanted = ENCODING_FLOAT16_DELTA if transport == "float16" else "float32"
    if encoding != wanted:
        return f"it sent its update as {encoding}, the round asked for {wanted} (federation.update_transport)"
    if encoding == "float32":
        return None
    try:
        weights = decode_update(_arrays(reply.content[protocol.ARRAYS_RECORD]), reference)
    except ValueError as exc:
        return str(exc)
    reply.content[protocol.ARRAYS_RECORD] = ArrayRecord({k: Array(v) for k, v in weights.items()})
    return None


def screen_updates(replies: list[Message], reference: dict[str, np.ndarray], *, run_id: str, server_round: int,
                   name_of: Callable[[Message], str], max_norm: float | None = None,
                   max_norm_ratio: float | None = 10.0, transport: str = "float32"
                   ) -> tuple[list[Message], list[dict[str, Any]]]:
    """(accepted replies, one failure record per rejected reply). `reference` is the round's global model.

    With `transport` float16 each update arrives as float16 differences and is first turned back into float32
    weights (shared_model/protocol/update_codec.py); a reply in another encoding than the round asked for is
    rejected."""
    accepted: list[tuple[Message, float]] = []
    rejected: list[dict[str, Any]] = []

    def reject(reply: Message, why: str) -> None:
        rejected.append({"site": name_of(reply), "node_id": reply.metadata.src_node_id, "phase": "train",
                         "reason": f"rejected update: {why}"})

    for reply in replies:
        problem = _echo_problem(reply, run_id, server_round)
        if problem is None and protocol.ARRAYS_RECORD not in reply.content:
            problem = "no arrays record"
        if problem is None:
            problem = _decode(reply, reference, transport)
        if problem is None:
            sent = _arrays(reply.content[protocol.ARRAYS_RECORD])
            problem = _shape_problem(sent, reference)
        if problem is None:
            bad = next((k for k, v in sent.items() if np.issubdtype(v.dtype, np.floating)
                        and not np.isfinite(v).all()), None)
            if bad is not None:
                problem = f"{bad}: NaN or infinite values"
        if problem is not None:
            reject(reply, problem)
            continue
        norm = float(np.sqrt(sum(float(np.sum((sent[k].astype(np.float64) - reference[k]) ** 2))
                                 for k in reference if np.issubdtype(reference[k].dtype, np.floating))))
        if max_norm is not None and norm > max_norm:
            reject(reply, f"update norm {norm:.4g} above federation.max_update_norm={max_norm:g}")
            continue
        accepted.append((reply, norm))
    if max_norm_ratio is not None and len(accepted) >= 3:
        median = float(np.median([n for _, n in accepted]))
        keep = []
        for reply, norm in accepted:
            if median > 0 and norm > max_norm_ratio * median:
                reject(reply, f"update norm {norm:.4g} is {norm / median:.1f}x the round's median {median:.4g} "
                              f"(federation.max_update_norm_ratio={max_norm_ratio:g})")
            else:
                keep.append((reply, norm))
        accepted = keep
    return [r for r, _ in accepted], rejected
