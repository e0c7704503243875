"""Patient-level DP-SGD for one site in one round: plan, budget checks, Opacus wiring, lifetime ledger.

How a round goes (`PatientDPSession`):

* `open(...)` derives the round's DP-SGD plan from public values only (the coordinator's settings and the
  site's public patient count; `fl_client.privacy.plan`), loads the site's lifetime ledger
  (`fl_client.privacy.history`) and refuses the round (a clear `PatientBudgetExceeded`, which becomes the
  ClientApp's error reply) if it would take the run past the coordinator's target epsilon, or the site's
  patients past the site's own lifetime budget (``max-patient-epsilon``, at the site's ``patient-delta``).
* `hooks()` plugs `opacus.PrivacyEngine.make_private` into `shared_model.model.training.train_local`, with the
  accountant's history restored, so Opacus' own accountant continues the composition.
* `finish(result)` checks that Opacus accounted exactly the planned steps, records the release in the ledger
  (atomic write) and returns the numeric ``dp-*`` metrics of the train reply.
* The site's privacy records stay locked (`fl_client.privacy.history.site_lock`) from `open` until the session
  has saved them or failed: `finish`, a refusal and `close()` (also `with session:`) release the lock. A second
  training of the same site waits for the first and then re-reads the ledger, so it sees and counts its release.

The site's floor under the coordinator's settings is enforced here, where the plan is known: the run's DP terms
are pinned when the site first trains in the run (a later round with another target, noise, delta, clipping
norm or accountant is refused), the calibrated noise multiplier must reach ``min-noise-multiplier``, and the
run's epsilon must stay within ``max-run-epsilon`` as well as the coordinator's target; the lifetime epsilon
of the site's patients (every ledger of the site, `fl_client.privacy.history`) must stay within
``max-patient-epsilon``. The lifetime figure stays on the site: a train reply carries the run's epsilon and
the mechanism that produced it, so that the coordinator can recompute it.

Every release of a round (an "attempt") is recorded with a fingerprint of everything that determines it: the
whole round config the coordinator sent, the incoming global model, which parameters are trained, the
training data, the optimiser settings, the CPU threads and the DP plan. A round retried with identical inputs
(a coordinator resuming after a crash) re-runs with the same site-secret noise and sampling seeds and must
reproduce the release already accounted bit for bit: it then costs nothing more. If it does not (anything not
covered by the fingerprint changed, or the hardware is not deterministic), the result is **withheld**: it was
made with noise already used, so sending it would reveal the difference of two releases that share their
noise, which no accountant covers. A retry with different inputs is a new release with fresh seeds and is
counted. The limits themselves are `fl_client.privacy.budget`; the fingerprint, the replay check and the reply's
``dp-*`` metrics are `fl_client.privacy.release`.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fl_client.policy import SitePolicyRefusal, noise_floor_refusal
from fl_client.privacy.budget import (
    Limits,
    PatientBudgetExceeded,
    budget_refusal,
    check_run_terms,
    run_terms,
)
from fl_client.privacy.history import (
    LOCK_TIMEOUT_S,
    SiteLedger,
    data_id,
    default_state_dir,
    ledger_path,
    patient_digests,
    site_lock,
)
from fl_client.privacy.history import now as now_text
from fl_client.privacy.plan import (
    DPPlan,
    HistoryEntry,
    epsilon_for,
    make_plan,
    merge_history,
    patient_dp_config,
)
from fl_client.privacy.release import (
    Release,
    ReleaseWithheld,
    device_of,
    history_minus,
    release_fingerprint,
    release_metrics,
    state_digest,
    withheld_message,
)
from fl_client.privacy.site_record import SiteRecord
from shared_model.sitedata.contract import coarse_count

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from filelock import BaseFileLock
    from torch import nn
    from torch.utils.data import DataLoader

    from fl_client.settings import SiteSettings
    from shared_model.config import PatientDPConfig
    from shared_model.model.training import TrainHooks, TrainResult

log = logging.getLogger("llnm.client.privacy")

DERIVED_COUNT_SOURCE = ("derived from the data: the training patients rounded up to two significant digits "
                        "(the rounded count is published and not covered by the guarantee; declare "
                        "public-patient-count to make it exact)")


def public_count(settings: SiteSettings | None, n_train: int) -> tuple[int, str]:
    """The public patient count DP-SGD is parameterised by, and its source (declared, or derived)."""
    if settings is not None:
        from fl_client.settings import declared_patient_count

        declared, where = declared_patient_count(settings)
        if declared is not None:
            return declared, f"declared public ({where})"
    return coarse_count(n_train), DERIVED_COUNT_SOURCE


class PatientDPSession:
    """DP-SGD for one site in one round: plan, budget checks, Opacus wiring, and the lifetime ledger."""

    def __init__(self, *, site_name: str, run_id: str, server_round: int, plan: DPPlan, ledger: SiteLedger,
                 site_budget: float | None, site_delta: float, n_train: int, data_path: Path | None,
                 lock: BaseFileLock | None = None, record: SiteRecord | None = None,
                 run_cap: float | None = None, round_config: Mapping[str, Any] | None = None) -> None:
        self.site_name = site_name
        self.run_id = run_id
        self.server_round = server_round
        self.plan = plan
        self.ledger = ledger
        self.site_budget = site_budget
        self.site_delta = site_delta
        self.n_train = n_train
        self.data_path = data_path
        self.record = record
        self.run_cap = run_cap
        self.round_config = dict(round_config or {})
        self._release: Release | None = None
        self._engine: Any = None
        self._module: nn.Module | None = None
        self._wrapped: Any = None
        self._lock = lock

    # ---- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, *, site_name: str, run_id: str, settings: SiteSettings,
             privacy_cfg: PatientDPConfig | Mapping[str, Any], train_patient_ids: Sequence[str], batch_size: int,
             local_epochs: int, total_rounds: int, server_round: int,
             round_config: Mapping[str, Any] | None = None,
             lock_timeout: float = LOCK_TIMEOUT_S) -> PatientDPSession:
        """Plan the round, lock and load the site's ledger and refuse the round if it would exceed a budget.

        `privacy_cfg` is the round's `PatientDPConfig` (a plain mapping is validated with it);
        `train_patient_ids` are the ids of the patients DP-SGD trains on (they pick the ledger); `round_config`
        is the whole round config the coordinator sent (it enters the release's fingerprint). The site's
        records stay locked until `finish`, a refusal or `close()`; another training of this site holding them
        is waited for up to `lock_timeout` seconds (then `PrivacyStateError`).
        """
        n_train = len(train_patient_ids)
        if n_train <= 0:
            raise ValueError(f"site {site_name!r}: no training patients, so there is nothing to train with DP-SGD")
        state_dir = default_state_dir(settings).expanduser().resolve()
        data_path = Path(settings.data_path).resolve() if settings is not None else None
        if data_path is not None and (state_dir == data_path or data_path in state_dir.parents):
            raise ValueError(
                f"privacy-state-dir {state_dir} is inside the site folder {data_path}; nothing may be written "
                "there: choose a folder outside the site data"
            )
        # Validate the plan's inputs before touching the ledger (the noise search runs once, below).
        cfg = patient_dp_config(privacy_cfg)
        count, count_source = public_count(settings, n_train)
        digests = patient_digests(train_patient_ids)
        path = ledger_path(state_dir, site_name, data_id(digests))
        # Read the site's records only under its lock, held until this session has saved them (or failed).
        lock = site_lock(state_dir, site_name, lock_timeout)
        try:
            ledger = SiteLedger.load_or_create(path, site_name=site_name, patients=digests)
            record = SiteRecord.load_or_create(state_dir, site_name)
            check_run_terms(record, cfg, site_name, run_id, server_round)
            plan = make_plan(cfg, public_count=count, count_source=count_source, batch_size=batch_size,
                             local_epochs=local_epochs, total_rounds=total_rounds,
                             calibrated=ledger.data["calibrated"])
            floor = getattr(settings, "min_noise_multiplier", None) if settings is not None else None
            if floor is not None and plan.noise_multiplier < floor:
                source = ("the round config's noise_multiplier" if plan.target_epsilon is None else
                          f"the noise multiplier calibrated for the run's target_epsilon {plan.target_epsilon:g} "
                          f"over {plan.steps_planned} steps")
                raise SitePolicyRefusal(noise_floor_refusal(settings, site_name, server_round,
                                                            plan.noise_multiplier, source))
        except BaseException:
            lock.release()
            raise
        if settings is not None:
            ledger.data["policy"] = settings.policy()  # what `llnm-site privacy` shows when run without flags
        site_budget = getattr(settings, "max_patient_epsilon", None) if settings is not None else None
        site_delta = float(getattr(settings, "patient_delta", plan.delta)) if settings is not None else plan.delta
        session = cls(site_name=site_name, run_id=run_id, server_round=server_round, plan=plan, ledger=ledger,
                      site_budget=site_budget, site_delta=site_delta, n_train=n_train, data_path=data_path,
                      lock=lock, record=record, round_config=round_config,
                      run_cap=getattr(settings, "max_run_epsilon", None) if settings is not None else None)
        if count_source == DERIVED_COUNT_SOURCE:
            log.warning("site %s: no public-patient-count declared; DP-SGD uses %d (%s)", site_name, count,
                        count_source)
        elif not 0.5 <= n_train / count <= 2.0:
            log.warning("site %s: %d training patients but a declared public count of %d; DP-SGD stays private "
                        "but its batches and weight are sized for %d", site_name, n_train, count, count)
        if not ledger.attempts(run_id, server_round):
            # A new round: its cost is known now. (A retried round is decided in make_private, once the
            # inputs are known: an identical retry replays the release already accounted.)
            session._check_budget(plan.entry())
        return session

    # ---- the history lock ------------------------------------------------------------------------
    def close(self) -> None:
        """Remove Opacus' hooks and release the history lock; idempotent, called on every exit path."""
        try:
            self._cleanup()
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def __enter__(self) -> PatientDPSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- budgets -------------------------------------------------------------------------------
    def epsilons(self, extra: Sequence[HistoryEntry] = (), exclude: dict[str, Any] | None = None
                 ) -> tuple[float, float]:
        """(run epsilon at the run's delta, lifetime epsilon at the site's delta) with `extra` entries added."""
        p = self.plan
        run = epsilon_for([*self.ledger.history(run_id=self.run_id, exclude=exclude), *extra], p.delta,
                          p.accountant)
        life = epsilon_for([*self.ledger.history(exclude=exclude), *extra], self.site_delta, p.accountant)
        return run, life

    def _check_budget(self, entry: HistoryEntry, exclude: dict[str, Any] | None = None) -> tuple[float, float]:
        """(run, lifetime) epsilon after adding `entry`; refuses (and records it) if a limit would be passed."""
        run_before, life_before = self.epsilons(exclude=exclude)
        run_after, life_after = self.epsilons([entry], exclude=exclude)
        limits = Limits(self.site_name, self.run_id, self.server_round, self.site_budget, self.site_delta,
                        self.run_cap, len(self.ledger.run_ids()))
        refusal = budget_refusal(limits, self.plan, entry, (run_before, run_after), (life_before, life_after))
        if refusal is None:
            return run_after, life_after
        self.ledger.add_refusal({"run_id": self.run_id, "round": self.server_round, "rule": refusal.rule,
                                 "value": refusal.value, "spent": refusal.spent, "would_reach": refusal.would_reach,
                                 "budget": refusal.value})
        try:
            self.ledger.save()
        finally:
            self.close()
        log.warning("%s%s", refusal.message, f" ({refusal.local})" if refusal.local else "")
        raise PatientBudgetExceeded(refusal.message)

    # ---- training ------------------------------------------------------------------------------
    def hooks(self) -> TrainHooks:
        """`train_local` hooks that make the model, optimiser and loader private with Opacus."""
        from shared_model.model.training import TrainHooks

        # Two notices every round would otherwise print at every site: Opacus' reminder that its secure
        # RNG is off (docs/privacy.md explains the generators used instead) and PyTorch's note that the
        # per-sample-gradient hooks on the first layer see no input gradients (expected: inputs are data).
        warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with "
                                "respect to module outputs since no inputs require gradients", category=UserWarning)
        return TrainHooks(make_private=self._make_private)

    def _make_private(self, model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader
                      ) -> tuple[Any, Any, Any]:
        import torch
        from opacus import PrivacyEngine
        from opacus.data_loader import DPDataLoader

        p = self.plan
        if len(loader.dataset) != self.n_train:  # type: ignore[arg-type]
            raise RuntimeError(f"DP-SGD was opened for {self.n_train} training patients but the loader has "
                               f"{len(loader.dataset)}")  # type: ignore[arg-type]
        fingerprint = release_fingerprint(self.plan, self.round_config, model, optimizer, loader)
        attempts = self.ledger.attempts(self.run_id, self.server_round)
        match = next((a for a in attempts if a.get("fingerprint") == fingerprint), None)
        if match is not None:
            # Same inputs as a release already accounted: run it again with the same seeds.
            prior = self.ledger.history(exclude=match)
            release = Release(attempt=int(match.get("attempt", attempts.index(match))), replay_of=match,
                               prior=prior, fingerprint=fingerprint)
            log.info("site %s round %d: identical retry of a release already accounted; replaying it",
                     self.site_name, self.server_round)
        else:
            if attempts:
                # A retry with different inputs is a new release on top of the one already made.
                self._check_budget(p.entry())
            release = Release(attempt=len(attempts), replay_of=None, prior=self.ledger.history(),
                               fingerprint=fingerprint)
        noise_seed, sampling_seed = self.ledger.seeds(self.run_id, self.server_round, release.attempt)
        device = device_of(model)
        noise_gen = torch.Generator(device=device).manual_seed(noise_seed)
        sampling_gen = torch.Generator().manual_seed(sampling_seed)
        # Poisson sampling at the plan's public rate, with a generator the coordinator cannot predict.
        dp_base = DPDataLoader(loader.dataset, sample_rate=p.sample_rate, collate_fn=loader.collate_fn,
                               generator=sampling_gen)
        engine = PrivacyEngine(accountant=p.accountant)
        engine.accountant.history = list(release.prior)
        wrapped, dp_optimizer, dp_loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=dp_base, noise_multiplier=p.noise_multiplier,
            max_grad_norm=p.max_grad_norm, poisson_sampling=False, noise_generator=noise_gen,
        )
        if len(dp_loader) != p.steps_per_epoch or not math.isclose(1 / len(dp_loader), p.sample_rate):
            raise RuntimeError(
                f"Opacus runs {len(dp_loader)} steps per epoch at sample rate {1 / len(dp_loader):.6g}, but the plan "
                f"has {p.steps_per_epoch} at {p.sample_rate:.6g}; the accounting would not match"
            )
        # Opacus divides the noisy sum by len(dataset) * q, which depends on the exact patient count; the
        # released update must depend only on public values, so divide by the public N / K instead.
        dp_optimizer.expected_batch_size = p.expected_batch_size
        self._release = release
        self._engine = engine
        self._module = model
        self._wrapped = wrapped
        return wrapped, dp_optimizer, dp_loader

    # ---- finishing -----------------------------------------------------------------------------
    def finish(self, result: TrainResult) -> dict[str, float]:
        """Record the round's release in the ledger and return the train reply's ``dp-*`` metrics.

        The ledger lock is released on return and on every error (`close`)."""
        try:
            return self._finish(result)
        finally:
            self.close()

    def _finish(self, result: TrainResult) -> dict[str, float]:
        if self._release is None or self._engine is None or self._module is None:
            raise RuntimeError("PatientDPSession.finish() before training: make_private was never called")
        p = self.plan
        release = self._release
        after_hist = merge_history(self._engine.accountant.history)
        added = history_minus(after_hist, release.prior)
        steps_added = sum(n for _, _, n in added)
        if steps_added != p.steps_round or int(result.steps) != p.steps_round:
            raise RuntimeError(
                f"site {self.site_name!r} round {self.server_round}: Opacus accounted {steps_added} DP-SGD steps and "
                f"train_local made {result.steps}, but {p.steps_round} were planned; the release is withheld"
            )
        result_sha = state_digest(self._module)
        replayed = False
        if release.replay_of is not None:
            same = (release.replay_of.get("result_sha256") == result_sha
                    and merge_history(release.replay_of["history"]) == added)
            if not same:
                self._withhold(release)
            replayed = True
            release.replay_of["replays"] = int(release.replay_of.get("replays", 0)) + 1
        if not replayed:
            self.ledger.add_release({
                "run_id": self.run_id,
                "round": self.server_round,
                "attempt": len(self.ledger.attempts(self.run_id, self.server_round)),
                "fingerprint": release.fingerprint,
                "result_sha256": result_sha,
                "history": [list(e) for e in added],
                "steps": steps_added,
                "noise_multiplier": p.noise_multiplier,
                "sample_rate": p.sample_rate,
                "max_grad_norm": p.max_grad_norm,
                "public_count": p.public_count,
                "count_source": p.count_source,
                "delta": p.delta,
                "accountant": p.accountant,
                "finished_at": now_text(),
                "replays": 0,
            })
        run_eps, life_eps = self.epsilons()
        if not replayed:
            self.ledger.data["releases"][-1].update(epsilon_run_after=run_eps, epsilon_lifetime_after=life_eps)
        if self.record is not None:
            self.record.pin_terms(self.run_id, run_terms(p))
            self.record.note_dp_round(self.run_id, self.server_round)
        self.ledger.save()
        if self.record is not None:
            self.record.save()
        self.close()
        metrics = release_metrics(p, run_eps, steps_added, self.ledger.history(run_id=self.run_id), replayed,
                                  len(self.ledger.attempts(self.run_id, self.server_round)))
        log.info("site %s round %d: DP-SGD done, run epsilon %.4f at delta %g, lifetime epsilon %.4f at delta %g "
                 "(budget %s)", self.site_name, self.server_round, run_eps, p.delta, life_eps, self.site_delta,
                 "none" if self.site_budget is None else f"{self.site_budget:g}")
        return metrics

    def _withhold(self, release: Release) -> None:
        """A replay that did not reproduce its release: record it, send nothing (`ReleaseWithheld`)."""
        assert release.replay_of is not None
        self.ledger.data.setdefault("withheld", []).append({
            "run_id": self.run_id, "round": self.server_round, "attempt": release.attempt,
            "fingerprint": release.fingerprint, "at": now_text()})
        try:
            self.ledger.save()
        finally:
            self.close()
        message = withheld_message(self.site_name, self.run_id, self.server_round)
        log.warning(message)
        raise ReleaseWithheld(message)

    def _cleanup(self) -> None:
        # Remove Opacus' hooks and per-sample gradient buffers from the model the ClientApp sends back.
        wrapped, self._wrapped = self._wrapped, None
        cleanup = getattr(wrapped, "cleanup", None)
        if callable(cleanup):
            cleanup()

    def spent(self) -> float:
        """Lifetime epsilon of this site's patients so far, at the site's delta (from the ledger)."""
        return self.epsilons()[1]
