"""The site's policy checks on each message, and how a refusal leaves the site.

The site's policy is its node config (`fl_client.settings`), never the coordinator's round config. Every train
and evaluate message is checked against it before a model or a patient is loaded; the checks that need the
round's DP-SGD plan (the calibrated noise multiplier, the run's epsilon so far) run in
`fl_client.privacy.session`. A refusal is one line that starts with `protocol.POLICY_REFUSAL_MARKER` (or
`protocol.REFUSAL_MARKER` for a budget) and names the site, the rule, the value received and what each side
can do. It leaves the site as the ClientApp's *error reply* (`refusal_reply`), not as an exception: the site's
log says "refused", with no traceback, and the coordinator records it in the site's words. A refusal never
carries a local path or a value computed from patients.
"""

from __future__ import annotations

import logging

from flwr.app import Error, Message

from fl_client.settings import (
    EVAL_SPLITS,
    MAX_CLIPPING_NORM,
    MAX_RUN_EPSILON,
    MIN_NOISE_MULTIPLIER,
    PATIENT_DELTA,
    REQUIRE_PATIENT_DP,
    REQUIRE_SECURE_AGGREGATION,
    SiteSettings,
)
from shared_model import protocol
from shared_model.config import PatientDPConfig

log = logging.getLogger("llnm.client")

#: Flower's error code for a ClientApp that ended with an error (flwr.common.constant.ErrorCode).
CLIENT_APP_ERROR = 2


class SitePolicyRefusal(RuntimeError):
    """A message this site's own policy (its node config) forbids; it goes back as the error reply's text."""


def check_train_policy(settings: SiteSettings, name: str, server_round: int, privacy: PatientDPConfig, *,
                       secure_round: bool = False) -> None:
    """Refuse a train message that the site's policy forbids, before anything is loaded."""
    head = f"{protocol.POLICY_REFUSAL_MARKER}: site {name!r} refuses round {server_round} training: its rule"
    if settings.require_secure_aggregation and not secure_round:
        raise SitePolicyRefusal(
            f"{head} {REQUIRE_SECURE_AGGREGATION}=true trains only inside a secure-aggregation (SecAgg+) round, but "
            "this train message is a plain one. The coordinator can set federation.secure_aggregation: true, or "
            f"the site operator can remove --{REQUIRE_SECURE_AGGREGATION}."
        )
    if settings.require_patient_dp and not privacy.enabled:
        raise SitePolicyRefusal(
            f"{head} {REQUIRE_PATIENT_DP}=true needs patient-level DP, but the round config has "
            f"{protocol.PRIVACY_CONFIG} enabled=false. The coordinator can turn on privacy.patient in the "
            f"experiment, or the site operator can remove --{REQUIRE_PATIENT_DP} (node config {REQUIRE_PATIENT_DP})."
        )
    if not privacy.enabled:
        return
    for key, limit, field, value, what in (
            (PATIENT_DELTA, settings.patient_delta, "delta", privacy.delta, "delta"),
            (MAX_CLIPPING_NORM, settings.max_clipping_norm, "max_grad_norm", privacy.max_grad_norm,
             "per-patient clipping norm"),
            (MAX_RUN_EPSILON, settings.max_run_epsilon, "target_epsilon", privacy.target_epsilon,
             "epsilon per run")):
        if limit is not None and value is not None and value > limit:
            raise SitePolicyRefusal(
                f"{head} {key}={limit:g} is the largest {what} it accepts, but the round config has "
                f"{protocol.PRIVACY_CONFIG} {field}={value:g}. The coordinator can set privacy.patient.{field} to "
                f"{limit:g} or less, or the site operator can raise --{key}."
            )
    if (settings.min_noise_multiplier is not None and privacy.noise_multiplier is not None
            and privacy.noise_multiplier < settings.min_noise_multiplier):
        raise SitePolicyRefusal(noise_floor_refusal(settings, name, server_round, privacy.noise_multiplier,
                                                    "the round config's noise_multiplier"))


def noise_floor_refusal(settings: SiteSettings, name: str, server_round: int, noise: float, source: str) -> str:
    """The refusal text of a DP-SGD noise multiplier below the site's `min-noise-multiplier`."""
    return (f"{protocol.POLICY_REFUSAL_MARKER}: site {name!r} refuses round {server_round} training: its rule "
            f"{MIN_NOISE_MULTIPLIER}={settings.min_noise_multiplier:g} is the smallest DP-SGD noise multiplier it "
            f"trains with, but {source} is {noise:.4g}. The coordinator can ask for a smaller target epsilon, fewer "
            f"rounds or larger batches (each raises the noise), or the site operator can lower "
            f"--{MIN_NOISE_MULTIPLIER}.")


def check_eval_policy(settings: SiteSettings, name: str, server_round: object, split: str) -> None:
    if split not in settings.eval_splits:
        raise SitePolicyRefusal(
            f"{protocol.POLICY_REFUSAL_MARKER}: site {name!r} refuses round {server_round} evaluation: its rule "
            f"{EVAL_SPLITS}={','.join(settings.eval_splits)} does not include the split received, "
            f"{protocol.EVAL_SPLIT}={split}. The coordinator can evaluate on one of "
            f"{', '.join(settings.eval_splits)}, or the site operator can add {split!r} to --{EVAL_SPLITS} "
            f"(never train)."
        )


def refusal_reply(msg: Message, reason: str, what: str) -> Message:
    """The error reply that carries a refusal to the coordinator, logged here as a refusal (not a crash)."""
    log.warning("refused %s: %s", what, reason)
    return Message(Error(code=CLIENT_APP_ERROR, reason=reason), reply_to=msg)
