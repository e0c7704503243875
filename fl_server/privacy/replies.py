"""What a site's train reply says about its privacy: its DP-SGD metrics checked against the run's settings,
its name, and the site's refusal inside the error text Flower wraps around it."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

from flwr.app import Message

from shared_model import protocol
from shared_model.config import PatientDPConfig

# Relative slack when checking a site's reported epsilon against the run's target (float noise only).
EPS_RTOL = 1e-6


def reply_site(reply: Message, name_fn: Callable[[int], str]) -> str:
    """The site name a reply carries in its site record, else `name_fn` of its node id."""
    if protocol.SITE_RECORD in reply.content.config_records:
        name = reply.content[protocol.SITE_RECORD].get(protocol.SITE_NAME)
        if name:
            return str(name)
    return name_fn(reply.metadata.src_node_id)


def reply_policy(reply: Message) -> dict[str, Any] | None:
    """The site's privacy policy (its node-config keys) that a reply carries, if it carries one."""
    if protocol.SITE_RECORD not in reply.content.config_records:
        return None
    text = reply.content[protocol.SITE_RECORD].get(protocol.SITE_POLICY)
    if not isinstance(text, str):
        return None
    try:
        policy = json.loads(text)
    except json.JSONDecodeError:
        return None
    return policy if isinstance(policy, dict) else None


def refusal_text(reason: str, marker: str = protocol.REFUSAL_MARKER) -> str | None:
    """The site's refusal message inside Flower's error text, or None if this failure is something else.

    Flower wraps the ClientApp's exception (``<class ...>:<'message'>``, in simulation with a Ray traceback
    around it); the site's message is one line that starts with `marker` (`protocol.REFUSAL_MARKER` for a
    budget refusal, `protocol.POLICY_REFUSAL_MARKER` for a site-policy one).
    """
    at = reason.find(marker)
    if at < 0:
        return None
    text = reason[at:].split("\n", 1)[0]
    end = text.find("'>")
    return (text[:end] if end >= 0 else text).strip()


def spent_in_refusal(text: str) -> tuple[str, float] | None:
    """What a site says it has spent in its budget refusal `text`: ("lifetime" or "run", epsilon), if it says."""
    match = re.search(r"spent epsilon ([0-9.]+)", text)
    if not match:
        return None
    return ("lifetime" if "over their lifetime" in text else "run"), float(match.group(1))


def dp_reply_record(reply: Message, pat: PatientDPConfig) -> tuple[str | None, dict[str, Any] | None]:
    """(problem or None, ledger record) for one train reply under patient-level DP with settings `pat`."""
    content = reply.content
    metrics = content[protocol.METRICS_RECORD] if protocol.METRICS_RECORD in content.metric_records else None
    if metrics is None:
        return "no metrics record", None
    missing = [k for k in protocol.DP_METRIC_KEYS if k not in metrics]
    if missing:
        return f"patient-level DP is on but the reply lacks {missing} (did the site run DP-SGD?)", None
    m = {k: metrics[k] for k in protocol.DP_METRIC_KEYS}
    rec = {
        "status": "trained",
        "mechanism": "dp-sgd",
        "accountant": f"opacus-{pat.accountant}",
        "sample_rate": _finite(m[protocol.DP_SAMPLE_RATE]),
        "noise_multiplier": _finite(m[protocol.DP_NOISE_MULTIPLIER]),
        "max_grad_norm": _finite(m[protocol.DP_MAX_GRAD_NORM]),
        "steps_round": int(m[protocol.DP_STEPS_ROUND]),
        "steps_total": int(m[protocol.DP_STEPS_TOTAL]),
        "delta": _finite(m[protocol.DP_DELTA]),
        "epsilon": _finite(m[protocol.DP_EPSILON]),
        "budget_epsilon": _finite(m[protocol.DP_BUDGET_EPSILON]),
        "replayed": bool(m[protocol.DP_REPLAYED]),
        "attempts_round": int(m[protocol.DP_ATTEMPTS_ROUND]),
        "history_segments": int(m[protocol.DP_HISTORY_SEGMENTS]),
        "lifetime_epsilon": _finite(m[protocol.DP_LIFETIME_EPSILON]),
        "lifetime_delta": _finite(m[protocol.DP_LIFETIME_DELTA]),
        "lifetime_runs": int(m[protocol.DP_LIFETIME_RUNS]),
        "public_count": int(metrics[protocol.NUM_EXAMPLES]) if protocol.NUM_EXAMPLES in metrics else None,
        "policy": reply_policy(reply),
    }
    if rec["epsilon"] is None or rec["epsilon"] < 0:
        return f"{protocol.DP_EPSILON} {m[protocol.DP_EPSILON]!r} is not a valid epsilon", rec
    if rec["delta"] != pat.delta:
        return f"{protocol.DP_DELTA} {m[protocol.DP_DELTA]!r} differs from the run's delta {pat.delta:g}", rec
    if rec["max_grad_norm"] != pat.max_grad_norm:
        return (f"{protocol.DP_MAX_GRAD_NORM} {m[protocol.DP_MAX_GRAD_NORM]!r} differs from the run's "
                f"{pat.max_grad_norm:g}"), rec
    if pat.noise_multiplier is not None and rec["noise_multiplier"] != pat.noise_multiplier:
        return (f"{protocol.DP_NOISE_MULTIPLIER} {m[protocol.DP_NOISE_MULTIPLIER]!r} differs from the run's "
                f"{pat.noise_multiplier:g}"), rec
    if not (rec["noise_multiplier"] or 0) > 0 or not 0 < (rec["sample_rate"] or 0) <= 1:
        return f"{protocol.DP_NOISE_MULTIPLIER} / {protocol.DP_SAMPLE_RATE} out of range", rec
    if pat.target_epsilon is not None and rec["epsilon"] > pat.target_epsilon * (1 + EPS_RTOL):
        return (f"reported epsilon {rec['epsilon']:.4f} is above the run's target "
                f"{pat.target_epsilon:g}"), rec
    life = rec["lifetime_epsilon"]
    if life is None or life < rec["epsilon"] * (1 - EPS_RTOL):
        return (f"{protocol.DP_LIFETIME_EPSILON} {m[protocol.DP_LIFETIME_EPSILON]!r} is not a valid lifetime "
                "epsilon (it can never be below the run's)"), rec
    budget = rec["budget_epsilon"]
    if budget is not None and life > budget * (1 + EPS_RTOL):
        return f"reported lifetime epsilon {life:.4f} is above the site's own lifetime budget {budget:g}", rec
    return None, rec


def _finite(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None

