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
from shared_model.config import PatientDPConfig, TrainConfig
from shared_model.dp_accounting import check_history, opacus_sampling, reported_epsilon_problem
from shared_model.numbers import finite_or_none

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


def spent_in_refusal(text: str) -> float | None:
    """The run's epsilon at the site that a budget refusal `text` states, if it states one (a refusal under the
    site's lifetime budget states none: that figure stays on the site)."""
    match = re.search(r"The run has spent epsilon ([0-9.]+)", text)
    return float(match.group(1)) if match else None


def dp_reply_record(reply: Message, pat: PatientDPConfig, train: TrainConfig | None = None,
                    rounds_trained: int = 0) -> tuple[str | None, dict[str, Any] | None]:
    """(problem or None, ledger record) for one train reply under patient-level DP with settings `pat`.

    Every epsilon a site reports is recomputed here from the mechanism it reports with it (its run's
    composition: noise multipliers, sample rates and steps) with the run's accountant, at the run's delta.
    The sample rate must be the one DP-SGD's plan gives for the site's public patient count (its FedAvg
    weight) and the run's batch size (`train`), the round's steps the run's local epochs of it, and the run's
    steps at least those of the `rounds_trained` rounds already accepted from this site in this run. A reply
    that does not add up is not aggregated.
    """
    content = reply.content
    metrics = content[protocol.METRICS_RECORD] if protocol.METRICS_RECORD in content.metric_records else None
    if metrics is None:
        return "no metrics record", None
    missing = [k for k in protocol.DP_METRIC_KEYS if k not in metrics]
    if missing:
        return f"patient-level DP is on but the reply lacks {missing} (did the site run DP-SGD?)", None
    m = {k: metrics[k] for k in protocol.DP_METRIC_KEYS}
    public_count = metrics.get(protocol.NUM_EXAMPLES)
    rec = {
        "status": "trained",
        "mechanism": "dp-sgd",
        "accountant": f"opacus-{pat.accountant}",
        "sample_rate": finite_or_none(m[protocol.DP_SAMPLE_RATE]),
        "noise_multiplier": finite_or_none(m[protocol.DP_NOISE_MULTIPLIER]),
        "max_grad_norm": finite_or_none(m[protocol.DP_MAX_GRAD_NORM]),
        "steps_round": _int(m[protocol.DP_STEPS_ROUND]),
        "steps_total": _int(m[protocol.DP_STEPS_TOTAL]),
        "delta": finite_or_none(m[protocol.DP_DELTA]),
        "epsilon": finite_or_none(m[protocol.DP_EPSILON]),
        "replayed": bool(m[protocol.DP_REPLAYED]),
        "attempts_round": _int(m[protocol.DP_ATTEMPTS_ROUND]),
        "history_segments": _int(m[protocol.DP_HISTORY_SEGMENTS]),
        "history": _history(m),
        "public_count": _int(public_count),
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
    problem = _mechanism_problem(rec, train, rounds_trained)
    if problem is not None:
        return problem, rec
    problem = reported_epsilon_problem(rec["epsilon"], rec["history"], pat.delta, pat.accountant)
    if problem is not None:
        return problem, rec
    if pat.target_epsilon is not None and rec["epsilon"] > pat.target_epsilon * (1 + EPS_RTOL):
        return (f"reported epsilon {rec['epsilon']:.4f} is above the run's target "
                f"{pat.target_epsilon:g}"), rec
    return None, rec


def _mechanism_problem(rec: dict[str, Any], train: TrainConfig | None, rounds_trained: int) -> str | None:
    """Why the reported DP-SGD mechanism is not the one the run's settings and the site's public count give."""
    history = rec["history"]
    if history is None or len(history) != rec["history_segments"] or not history:
        return (f"{protocol.DP_HISTORY_NOISE} / {protocol.DP_HISTORY_RATE} / {protocol.DP_HISTORY_STEPS} do not "
                f"describe {rec['history_segments']!r} composition segment(s)")
    steps_total = sum(n for _, _, n in history)
    if rec["steps_total"] != steps_total:
        return (f"{protocol.DP_STEPS_TOTAL} {rec['steps_total']} differs from the {steps_total} steps of the "
                "reported composition")
    if (rec["noise_multiplier"], rec["sample_rate"]) not in {(z, q) for z, q, _ in history}:
        return "this round's noise multiplier and sample rate are not in the reported composition"
    if train is None:
        return None
    count = rec["public_count"]
    if count is None or count <= 0:
        return f"{protocol.NUM_EXAMPLES} {count!r} is not a public patient count"
    q, per_epoch = opacus_sampling(count, train.batch_size)
    if not math.isclose(rec["sample_rate"], q, rel_tol=1e-12):
        return (f"{protocol.DP_SAMPLE_RATE} {rec['sample_rate']:.6g} is not DP-SGD's rate {q:.6g} for the public "
                f"count {count} and the run's batch size {train.batch_size}")
    if rec["steps_round"] != per_epoch * train.local_epochs:
        return (f"{protocol.DP_STEPS_ROUND} {rec['steps_round']} is not the run's {train.local_epochs} local "
                f"epoch(s) of {per_epoch} steps")
    if steps_total < rec["steps_round"] * (rounds_trained + 1):
        return (f"{protocol.DP_STEPS_TOTAL} {steps_total} is fewer than the {rounds_trained + 1} round(s) of "
                f"{rec['steps_round']} steps this site has trained in the run")
    return None


def _history(m: dict[str, Any]) -> list[tuple[float, float, int]] | None:
    try:
        entries = list(zip(m[protocol.DP_HISTORY_NOISE], m[protocol.DP_HISTORY_RATE], m[protocol.DP_HISTORY_STEPS],
                           strict=True))
        return check_history(entries, "reported composition")
    except (TypeError, ValueError):
        return None


def _int(v: Any) -> int | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)) or v != int(v):
        return None
    return int(v)

