"""The budgets a DP-SGD round must fit, and the DP terms a run keeps once a site has trained in it.

Three limits, checked before a round spends anything (`budget_refusal`): the site's lifetime budget of its
patients (``max-patient-epsilon`` at the site's ``patient-delta``, over every run), the site's cap on one run
(``max-run-epsilon``) and the coordinator's ``target_epsilon`` for the run. A refusal names the rule and the
run's figures; the lifetime epsilon of the site's patients stays on the site (its log and ledger), never in
what is sent. `check_run_terms` refuses a round whose DP terms differ from those the run was pinned to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fl_client.policy import SitePolicyRefusal
from fl_client.privacy.plan import DPPlan, HistoryEntry
from fl_client.privacy.site_record import RUN_TERMS, SiteRecord
from fl_client.settings import MAX_RUN_EPSILON
from shared_model import protocol

if TYPE_CHECKING:  # pragma: no cover - typing only
    from shared_model.config import PatientDPConfig

__all__ = ["BUDGET_RTOL", "BudgetRefusal", "Limits", "PatientBudgetExceeded", "budget_refusal", "check_run_terms",
           "run_terms"]

# Relative slack on budget comparisons: the calibrated plan ends at (not above) the target, and the same
# Opacus accountant recomputes it, so only float noise needs room.
BUDGET_RTOL = 1e-9


class PatientBudgetExceeded(RuntimeError):
    """Training this round would take the run past its target, or the site past its lifetime budget."""


@dataclass(frozen=True)
class BudgetRefusal:
    """Why a round is refused: the message sent, a line kept on the site, and the ledger's record of it."""

    message: str
    local: str | None
    rule: str
    value: float
    spent: float
    would_reach: float


@dataclass(frozen=True)
class Limits:
    site_name: str
    run_id: str
    server_round: int
    site_budget: float | None  # max-patient-epsilon
    site_delta: float
    run_cap: float | None  # max-run-epsilon
    runs_so_far: int  # runs in the site's ledgers, for the local line only


def budget_refusal(limits: Limits, plan: DPPlan, entry: HistoryEntry, run: tuple[float, float],
                   life: tuple[float, float]) -> BudgetRefusal | None:
    """The refusal of a round that adds `entry`, given the (before, after) run and lifetime epsilons; None if it
    fits every limit."""
    run_before, run_after = run
    life_before, life_after = life
    cost = f"this round ({entry[2]} DP-SGD steps, noise multiplier {entry[0]:.4f}, sample rate {entry[1]:.4g})"
    where = f"site {limits.site_name!r} refuses round {limits.server_round} of run {limits.run_id!r}"
    budget, cap, target = limits.site_budget, limits.run_cap, plan.target_epsilon
    if budget is not None and life_after > budget * (1 + BUDGET_RTOL):
        return BudgetRefusal(
            f"{protocol.REFUSAL_MARKER} reached: {where}. {cost[0].upper() + cost[1:]} would take the lifetime "
            f"epsilon of its patients above the site's lifetime max-patient-epsilon {budget:g} (delta "
            f"{limits.site_delta:g}). This site trains in no further round that costs privacy; the coordinator "
            "goes on without it while min_sites remain. Only the site can raise its lifetime budget "
            "(--max-patient-epsilon), and only if its privacy policy allows.",
            f"lifetime epsilon {life_before:.4f} over {limits.runs_so_far} run(s) would reach {life_after:.4f}; "
            "see `llnm-site privacy`",
            "max-patient-epsilon", budget, life_before, life_after)
    if cap is not None and run_after > cap * (1 + BUDGET_RTOL):
        return BudgetRefusal(
            f"{protocol.REFUSAL_MARKER} reached: {where}. The run has spent epsilon {run_before:.4f} at this site "
            f"(delta {plan.delta:g}, {plan.accountant} accountant) and {cost} would reach {run_after:.4f}, above "
            f"the site's {MAX_RUN_EPSILON} {cap:g}. The coordinator can start a run with fewer rounds or a "
            f"smaller target; the run goes on without this site while min_sites remain.",
            None, MAX_RUN_EPSILON, cap, run_before, run_after)
    if target is not None and run_after > target * (1 + BUDGET_RTOL):
        return BudgetRefusal(
            f"{protocol.REFUSAL_MARKER} reached: {where}. The run has spent epsilon {run_before:.4f} at this site "
            f"(delta {plan.delta:g}, {plan.accountant} accountant) and {cost} would reach {run_after:.4f}, above "
            f"the coordinator's privacy.patient.target_epsilon {target:g} for this run. This happens when "
            "a round is retried with changed inputs (a changed experiment resumed under the same run name, or "
            "a site restarted mid-round): each retry is a new release. The coordinator can resume with the "
            "unchanged experiment (identical retries replay at no cost) or start a new run, which this site "
            "accounts against its lifetime budget; the run goes on without this site while min_sites remain.",
            None, "target_epsilon", target, run_before, run_after)
    return None


def run_terms(plan: DPPlan) -> dict[str, Any]:
    return {"target_epsilon": plan.target_epsilon, "noise_multiplier": None if plan.target_epsilon is not None
            else plan.noise_multiplier, "delta": plan.delta, "max_grad_norm": plan.max_grad_norm,
            "accountant": plan.accountant}


def check_run_terms(record: SiteRecord, cfg: PatientDPConfig, site_name: str, run_id: str,
                     server_round: int) -> None:
    """Refuse a round whose DP terms differ from those the site already trained this run under."""
    pinned = record.pinned_terms(run_id)
    if pinned is None:
        return
    now_terms = {"target_epsilon": cfg.target_epsilon, "noise_multiplier": cfg.noise_multiplier,
                 "delta": cfg.delta, "max_grad_norm": cfg.max_grad_norm, "accountant": cfg.accountant}
    changed = [k for k in RUN_TERMS if now_terms[k] != pinned.get(k)]
    if changed:
        pairs = ", ".join(f"{k} {pinned.get(k)} -> {now_terms[k]}" for k in changed)
        raise SitePolicyRefusal(
            f"{protocol.POLICY_REFUSAL_MARKER}: site {site_name!r} refuses round {server_round} training: the DP "
            f"terms of run {run_id!r} are fixed once the site has trained in it, and this round changes them "
            f"({pairs}). The coordinator can resume the run with its original privacy.patient settings, or start "
            "a new run, which the site accounts against its lifetime budget.")


