"""Patient-level DP-SGD at a hospital, with an accountant history that lives on the site's own disk.

Why this package exists: the privacy unit inside a hospital is the patient, and the only party that can
guarantee anything about the patients is the hospital itself. So the site, not the coordinator, runs
DP-SGD (Opacus: per-patient gradients, per-patient clipping, Gaussian noise, Poisson sampling), keeps the
accountant's history, and refuses to train once its own budget would be exceeded.

* `plan`: the round's DP-SGD plan (sampling rate, steps, noise multiplier) exactly as Opacus runs it;
* `history`: the site's lifetime privacy ledger (every DP-SGD release of every run), on the site's disk;
* `site_record`: every run the site took part in (with or without DP), the run's pinned DP terms, and the
  evaluation releases;
* `session`: `PatientDPSession`, one round: plan, lock, Opacus wiring and the persisted release;
* `budget`: the limits a round must fit (lifetime, run cap, target) and the run's pinned DP terms;
* `release`: what makes a release the same release (fingerprint, replay, withholding) and what it sends;
* `evaluation`: differentially private evaluate replies, charged to the site's evaluation budget;
* `clipping_mod`: Flower's client-side clipping mods for site-level DP, when the coordinator asks for them.
"""

from __future__ import annotations

from fl_client.privacy.budget import BUDGET_RTOL, PatientBudgetExceeded
from fl_client.privacy.clipping_mod import site_dp_clipping_mod
from fl_client.privacy.history import (
    ENV_STATE_DIR,
    PrivacyStateError,
    SiteLedger,
    default_state_dir,
    ledger_path,
)
from fl_client.privacy.plan import (
    DPPlan,
    calibrate_noise,
    epsilon_for,
    make_plan,
    merge_history,
    opacus_sampling,
    patient_dp_config,
)
from fl_client.privacy.release import ReleaseWithheld
from fl_client.privacy.session import PatientDPSession
from shared_model.protocol import DP_METRIC_KEYS

__all__ = [
    "BUDGET_RTOL",
    "DP_METRIC_KEYS",
    "ENV_STATE_DIR",
    "DPPlan",
    "PatientBudgetExceeded",
    "PatientDPSession",
    "PrivacyStateError",
    "ReleaseWithheld",
    "SiteLedger",
    "calibrate_noise",
    "default_state_dir",
    "epsilon_for",
    "ledger_path",
    "make_plan",
    "merge_history",
    "opacus_sampling",
    "patient_dp_config",
    "site_dp_clipping_mod",
]
