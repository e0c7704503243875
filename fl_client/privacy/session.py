"""Patient-level DP-SGD for one site in one round: plan, budget check, Opacus wiring, persisted history.

How a round goes (`PatientDPSession`):

* `open(...)` derives the round's DP-SGD plan exactly as Opacus will run it (`fl_client.privacy.plan`),
  loads the persisted history (`fl_client.privacy.history`) and refuses the round (a clear
  `PatientBudgetExceeded`, which becomes the ClientApp's error reply) if the epsilon after it would exceed the
  site's budget: the smaller of its node config's ``max-patient-epsilon`` and the coordinator's target.
* `hooks()` plugs `opacus.PrivacyEngine.make_private` into `shared_model.training.train_local`, with the
  accountant's history restored, so Opacus' own accountant continues the run's composition.
* `finish(result)` checks that Opacus accounted exactly the planned steps, persists the history (atomic
  write) and returns the numeric ``dp-*`` metrics of the train reply.
* The history file stays locked (`fl_client.privacy.history.history_lock`) from `open` until the session has
  saved it or failed: `finish`, a refusal and `close()` (also `with session:`) release it. A second training
  of the same site waits for the first and then re-reads the history, so it sees and counts its release.

Every release of a round (an "attempt") is recorded with a fingerprint of everything that determines it
(incoming global model, training data, optimiser settings, seeds, DP plan). A round that is retried with
identical inputs (a coordinator resuming after a crash) re-runs with the same site-secret noise and sampling
seeds, so it reproduces the release already accounted bit for bit and costs nothing more; a retry with
different inputs is a new release with fresh seeds and is counted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fl_client.privacy.history import LOCK_TIMEOUT_S, SiteHistory, default_state_dir, history_lock, now, state_path
from fl_client.privacy.plan import DPPlan, HistoryEntry, epsilon_for, make_plan, merge_history, patient_dp_config
from shared_model import protocol

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from filelock import BaseFileLock
    from torch import nn
    from torch.utils.data import DataLoader

    from fl_client.settings import SiteSettings
    from shared_model.config import PatientDPConfig
    from shared_model.training import TrainHooks, TrainResult

log = logging.getLogger("llnm.client.privacy")

# Relative slack on budget comparisons: the calibrated plan ends at (not above) the target, and the same
# Opacus accountant recomputes it, so only float noise needs room.
BUDGET_RTOL = 1e-9


class PatientBudgetExceeded(RuntimeError):
    """Training this round would take the site past its patient-level epsilon budget."""


@dataclass
class _Release:
    """The release being made in this process."""

    attempt: int
    replay_of: dict[str, Any] | None
    prior: list[HistoryEntry]
    fingerprint: str


class PatientDPSession:
    """DP-SGD for one site in one round: plan, budget check, Opacus wiring, and the persisted history."""

    def __init__(self, *, site_name: str, run_id: str, server_round: int, plan: DPPlan, budget: float | None,
                 budget_source: str, history: SiteHistory, data_path: Path | None,
                 lock: BaseFileLock | None = None) -> None:
        self.site_name = site_name
        self.run_id = run_id
        self.server_round = server_round
        self.plan = plan
        self.budget = budget
        self.budget_source = budget_source
        self.history = history
        self.data_path = data_path
        self._release: _Release | None = None
        self._engine: Any = None
        self._module: nn.Module | None = None
        self._wrapped: Any = None
        self._lock = lock

    # ---- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, *, site_name: str, run_id: str, settings: SiteSettings,
             privacy_cfg: PatientDPConfig | Mapping[str, Any], n_train: int, batch_size: int, local_epochs: int,
             total_rounds: int, server_round: int, lock_timeout: float = LOCK_TIMEOUT_S) -> PatientDPSession:
        """Plan the round, lock and load the site's history and refuse the round if it would exceed the budget.

        `privacy_cfg` is the round's `PatientDPConfig` (a plain mapping is validated with it). The history file
        stays locked until `finish`, a refusal or `close()`; another training of this site holding it is waited
        for up to `lock_timeout` seconds (then `PrivacyStateError`).
        """
        if n_train <= 0:
            raise ValueError(f"site {site_name!r}: no training patients, so there is nothing to train with DP-SGD")
        state_dir = default_state_dir(settings).expanduser().resolve()
        data_path = Path(settings.data_path).resolve() if settings is not None else None
        if data_path is not None and (state_dir == data_path or data_path in state_dir.parents):
            raise ValueError(
                f"privacy-state-dir {state_dir} is inside the site folder {data_path}; nothing may be written "
                "there: choose a folder outside the site data"
            )
        # Validate the plan's inputs before touching the history file (the noise search runs once, below).
        cfg = patient_dp_config(privacy_cfg)
        path = state_path(state_dir, site_name, run_id)
        # Read the history only under its lock, held until this session has saved it (or failed).
        lock = history_lock(path, lock_timeout)
        try:
            history = SiteHistory.load_or_create(path, site_name=site_name, run_id=run_id,
                                                 accountant=cfg.accountant, delta=float(cfg.delta))
            plan = make_plan(cfg, n_train=n_train, batch_size=batch_size, local_epochs=local_epochs,
                             total_rounds=total_rounds, calibrated=history.data["calibrated"])
            budget, source = cls._budget(settings, plan)
        except BaseException:
            lock.release()
            raise
        session = cls(site_name=site_name, run_id=run_id, server_round=server_round, plan=plan, budget=budget,
                      budget_source=source, history=history, data_path=data_path, lock=lock)
        if not history.attempts(server_round):
            # A new round: its cost is known now. (A retried round is decided in make_private, once the
            # inputs are known: an identical retry replays the release already accounted.)
            session._check_budget(history.history(), plan.entry())
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

    @staticmethod
    def _budget(settings: SiteSettings | None, plan: DPPlan) -> tuple[float | None, str]:
        site_eps = getattr(settings, "max_patient_epsilon", None) if settings is not None else None
        candidates: list[tuple[float, str]] = []
        if site_eps is not None:
            candidates.append((float(site_eps), f"this site's max-patient-epsilon {float(site_eps):g} "
                                                 "(its node config)"))
        if plan.target_epsilon is not None:
            candidates.append((plan.target_epsilon, f"the coordinator's target epsilon {plan.target_epsilon:g} "
                                                    "(privacy.patient.target_epsilon)"))
        if not candidates:
            return None, "no budget (fixed noise multiplier, no max-patient-epsilon in the node config)"
        return min(candidates, key=lambda c: c[0])

    def _check_budget(self, spent_history: list[HistoryEntry], entry: HistoryEntry) -> float:
        """Epsilon after adding `entry`; raises PatientBudgetExceeded (and records it) if over budget."""
        p = self.plan
        after = epsilon_for([*spent_history, entry], p.delta, p.accountant)
        if self.budget is None or after <= self.budget * (1 + BUDGET_RTOL):
            return after
        spent = epsilon_for(spent_history, p.delta, p.accountant)
        message = (
            f"{protocol.REFUSAL_MARKER} reached: site {self.site_name!r} refuses round {self.server_round} of run "
            f"{self.run_id!r}. It has spent epsilon {spent:.4f} (delta {p.delta:g}, {p.accountant} accountant) and "
            f"this round ({entry[2]} DP-SGD steps, noise multiplier {entry[0]:.4f}, sample rate {entry[1]:.4g}) "
            f"would cost {after - spent:.4f} more, reaching {after:.4f}, above {self.budget_source}. "
            "The site trains no further in this run; the federation goes on without it."
        )
        self.history.data["refusals"].append({"round": self.server_round, "at": now(), "spent": spent,
                                              "would_reach": after, "budget": self.budget,
                                              "budget_source": self.budget_source})
        try:
            self.history.save()
        finally:
            self.close()
        log.warning(message)
        raise PatientBudgetExceeded(message)

    # ---- training ------------------------------------------------------------------------------
    def hooks(self) -> TrainHooks:
        """`train_local` hooks that make the model, optimiser and loader private with Opacus."""
        from shared_model.training import TrainHooks

        # Two notices every round would otherwise print at every site: Opacus' reminder that its secure
        # RNG is off (docs/privacy.md explains the generators used instead) and PyTorch's note that the
        # per-sample-gradient hooks on the first layer see no input gradients (expected: inputs are data).
        warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with "
                                "respect to module outputs since no inputs require gradients", category=UserWarning)
        return TrainHooks(make_private=self._make_private)

    def _fingerprint(self, model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader) -> str:
        """Digest of everything that determines this round's release except the site-secret seeds."""
        import torch

        h = hashlib.blake2b(digest_size=32)
        h.update(json.dumps(asdict(self.plan), sort_keys=True).encode())
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        h.update(json.dumps(groups, sort_keys=True, default=str).encode())
        h.update(f"seed={torch.initial_seed()};batch={loader.batch_size};device={_device_of(model)}".encode())
        for name, tensor in sorted(model.state_dict().items()):
            h.update(name.encode())
            _update_tensor(h, tensor)
        dataset = loader.dataset
        h.update(f"n={len(dataset)}".encode())  # type: ignore[arg-type]
        for i in range(len(dataset)):  # type: ignore[arg-type]
            for tensor in dataset[i]:
                _update_tensor(h, tensor)
        return h.hexdigest()

    def _make_private(self, model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader
                      ) -> tuple[Any, Any, Any]:
        import torch
        from opacus import PrivacyEngine
        from torch.utils.data import DataLoader

        p = self.plan
        if len(loader.dataset) != p.n_train:  # type: ignore[arg-type]
            raise RuntimeError(f"DP-SGD was planned for {p.n_train} training patients but the loader has "
                               f"{len(loader.dataset)}")  # type: ignore[arg-type]
        fingerprint = self._fingerprint(model, optimizer, loader)
        attempts = self.history.attempts(self.server_round)
        match = next((i for i, a in enumerate(attempts) if a.get("fingerprint") == fingerprint), None)
        if match is not None:
            # Same inputs as a release already accounted: run it again with the same seeds.
            prior = self.history.history(exclude=(self.server_round, match))
            release = _Release(attempt=match, replay_of=attempts[match], prior=prior, fingerprint=fingerprint)
            log.info("site %s round %d: identical retry of a release already accounted; replaying it",
                     self.site_name, self.server_round)
        else:
            prior = self.history.history()
            if attempts:
                # A retry with different inputs is a new release on top of the one already made.
                self._check_budget(prior, p.entry())
            release = _Release(attempt=len(attempts), replay_of=None, prior=prior, fingerprint=fingerprint)
        noise_seed, sampling_seed = self.history.seeds(self.server_round, release.attempt)
        device = _device_of(model)
        noise_gen = torch.Generator(device=device).manual_seed(noise_seed)
        sampling_gen = torch.Generator().manual_seed(sampling_seed)
        # Same dataset and batch size (so the same Poisson rate), but a sampling generator the coordinator
        # cannot predict; Opacus takes the generator of the loader it is given.
        base = DataLoader(loader.dataset, batch_size=loader.batch_size, shuffle=False, drop_last=False,
                          collate_fn=loader.collate_fn, generator=sampling_gen)
        engine = PrivacyEngine(accountant=p.accountant)
        engine.accountant.history = list(prior)
        wrapped, dp_optimizer, dp_loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=base, noise_multiplier=p.noise_multiplier,
            max_grad_norm=p.max_grad_norm, poisson_sampling=True, noise_generator=noise_gen,
        )
        if len(dp_loader) != p.steps_per_epoch or not math.isclose(1 / len(dp_loader), p.sample_rate):
            raise RuntimeError(
                f"Opacus runs {len(dp_loader)} steps per epoch at sample rate {1 / len(dp_loader):.6g}, but the plan "
                f"has {p.steps_per_epoch} at {p.sample_rate:.6g}; the accounting would not match"
            )
        self._release = release
        self._engine = engine
        self._module = model
        self._wrapped = wrapped
        return wrapped, dp_optimizer, dp_loader

    # ---- finishing -----------------------------------------------------------------------------
    def finish(self, result: TrainResult) -> dict[str, float]:
        """Persist the round's release in the history and return the train reply's ``dp-*`` metrics.

        The history lock is released on return and on every error (`close`)."""
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
        added = _history_minus(after_hist, release.prior)
        steps_added = sum(n for _, _, n in added)
        if steps_added != p.steps_round or int(result.steps) != p.steps_round:
            raise RuntimeError(
                f"site {self.site_name!r} round {self.server_round}: Opacus accounted {steps_added} DP-SGD steps and "
                f"train_local made {result.steps}, but {p.steps_round} were planned; the release is withheld"
            )
        result_sha = _state_digest(self._module)
        replayed = False
        if release.replay_of is not None:
            same = (release.replay_of.get("result_sha256") == result_sha
                    and merge_history(release.replay_of["history"]) == added)
            if same:
                replayed = True
                release.replay_of["replays"] = int(release.replay_of.get("replays", 0)) + 1
            else:
                log.warning("site %s round %d: a retry with identical inputs gave a different model (nondeterministic "
                            "computation); it is accounted as one more release", self.site_name, self.server_round)
        if not replayed:
            if release.replay_of is not None:
                # Not covered by the earlier check, which assumed a free replay.
                self._check_budget(self.history.history(), p.entry())
            self.history.add_attempt(self.server_round, {
                "fingerprint": release.fingerprint if release.replay_of is None else f"{release.fingerprint}+rerun",
                "result_sha256": result_sha,
                "history": [list(e) for e in added],
                "steps": steps_added,
                "noise_multiplier": p.noise_multiplier,
                "sample_rate": p.sample_rate,
                "max_grad_norm": p.max_grad_norm,
                "n_train": p.n_train,
                "finished_at": now(),
                "replays": 0,
            })
        full = self.history.history()
        epsilon = epsilon_for(full, p.delta, p.accountant)
        if not replayed:
            self.history.data["rounds"][str(self.server_round)]["attempts"][-1]["epsilon_after"] = epsilon
        self.history.save()
        self.close()
        metrics = {
            protocol.DP_EPSILON: float(epsilon),
            protocol.DP_DELTA: float(p.delta),
            protocol.DP_NOISE_MULTIPLIER: float(p.noise_multiplier),
            protocol.DP_SAMPLE_RATE: float(p.sample_rate),
            protocol.DP_MAX_GRAD_NORM: float(p.max_grad_norm),
            protocol.DP_STEPS_ROUND: int(steps_added),
            protocol.DP_STEPS_TOTAL: int(sum(n for _, _, n in full)),
            protocol.DP_BUDGET_EPSILON: float(self.budget) if self.budget is not None else math.nan,
            protocol.DP_REPLAYED: int(replayed),
            protocol.DP_ATTEMPTS_ROUND: len(self.history.attempts(self.server_round)),
            protocol.DP_HISTORY_SEGMENTS: len(full),
        }
        assert tuple(metrics) == protocol.DP_METRIC_KEYS
        log.info("site %s round %d: DP-SGD done, epsilon %.4f at delta %g after %d steps (budget %s)",
                 self.site_name, self.server_round, epsilon, p.delta, metrics[protocol.DP_STEPS_TOTAL],
                 "none" if self.budget is None else f"{self.budget:g}")
        return metrics

    def _cleanup(self) -> None:
        # Remove Opacus' hooks and per-sample gradient buffers from the model the ClientApp sends back.
        wrapped, self._wrapped = self._wrapped, None
        cleanup = getattr(wrapped, "cleanup", None)
        if callable(cleanup):
            cleanup()

    def spent(self) -> float:
        """Epsilon spent by this site in this run so far (from the history file)."""
        return epsilon_for(self.history.history(), self.plan.delta, self.plan.accountant)


def _device_of(model: nn.Module) -> Any:
    import torch

    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def _update_tensor(h: Any, tensor: Any) -> None:
    import torch

    if isinstance(tensor, torch.Tensor):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    else:
        h.update(repr(tensor).encode())


def _state_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        _update_tensor(h, tensor)
    return h.hexdigest()


def _history_minus(after: list[HistoryEntry], before: list[HistoryEntry]) -> list[HistoryEntry]:
    """Entries `after` has beyond `before` (both canonical); raises if `before` is not contained in `after`."""
    remaining = {(z, q): n for z, q, n in before}
    out: list[HistoryEntry] = []
    for z, q, n in after:
        extra = n - remaining.pop((z, q), 0)
        if extra < 0:
            raise RuntimeError("the accountant history shrank during training")
        if extra:
            out.append((z, q, extra))
    if any(n > 0 for n in remaining.values()):
        raise RuntimeError("the accountant lost part of the restored history during training")
    return out

