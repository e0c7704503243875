"""Patient-level DP-SGD at a hospital, with an accountant history that lives on the site's own disk.

Why this module exists: the privacy unit inside a hospital is the patient, and the only party that can
guarantee anything about the patients is the hospital itself. So the site, not the coordinator, runs
DP-SGD (Opacus: per-patient gradients, per-patient clipping, Gaussian noise, Poisson sampling), keeps the
accountant's history, and refuses to train once its own budget would be exceeded.

How a round goes (`PatientDPSession`):

* `open(...)` derives the round's DP-SGD plan exactly as Opacus will run it: `train_local`'s data loader has
  ``ceil(n / B)`` batches, Opacus' `DPDataLoader` samples every patient with probability ``1 / ceil(n / B)``
  and yields ``int(1 / that)`` batches per epoch, and the accountant is told ``q = 1 / len(DPDataLoader)``.
  The noise multiplier is calibrated once per run by Opacus' `get_noise_multiplier` for the coordinator's
  target epsilon over every local step planned for the run (rounds x local epochs x steps per epoch), or
  taken from the configuration. The persisted history is loaded and the round is refused (a clear
  `PatientBudgetExceeded`, which becomes the ClientApp's error reply) if the epsilon after it would exceed the
  site's budget: the smaller of its node config's ``max-patient-epsilon`` and the coordinator's target.
* `hooks()` plugs `opacus.PrivacyEngine.make_private` into `shared_model.training.train_local`, with the
  accountant's history restored, so Opacus' own accountant continues the run's composition.
* `finish(result)` checks that Opacus accounted exactly the planned steps, persists the history (atomic
  write) and returns the numeric ``dp-*`` metrics of the train reply.

The history file (one JSON file per site and run, in ``privacy-state-dir`` from the node config, else
``$LLNM_PRIVACY_DIR``, else ``~/.local/share/llnm-fl/privacy``) survives the fresh ClientApp process of every
round and SuperNode restarts. It is keyed by server round, and every release of a round (an "attempt") is
recorded with a fingerprint of everything that determines it (incoming global model, training data,
optimiser settings, seeds, DP plan). A round that is retried with identical inputs (a coordinator resuming
after a crash) re-runs with the same site-secret noise and sampling seeds, so it reproduces the release
already accounted bit for bit and costs nothing more; a retry with different inputs is a new release with
fresh seeds and is counted. Noise and Poisson sampling draw from generators seeded from a random secret
kept in the history file, never from the run's seed, which the coordinator knows.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import tempfile
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import Context, Message

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from torch import nn
    from torch.utils.data import DataLoader

    from fl_client.client_app import SiteSettings
    from shared_model.training import TrainHooks, TrainResult

log = logging.getLogger("llnm.client.privacy")

ENV_STATE_DIR = "LLNM_PRIVACY_DIR"
STATE_FORMAT = "llnm-fl patient DP-SGD accountant history"
STATE_VERSION = 1
ACCOUNTANTS = ("rdp", "prv")
# Relative slack on budget comparisons: the calibrated plan ends at (not above) the target, and the same
# Opacus accountant recomputes it, so only float noise needs room.
BUDGET_RTOL = 1e-9
# The exact keys every DP site puts in its train reply (Flower requires identical keys across replies).
DP_METRIC_KEYS = (
    "dp-epsilon",
    "dp-delta",
    "dp-noise-multiplier",
    "dp-sample-rate",
    "dp-max-grad-norm",
    "dp-steps-round",
    "dp-steps-total",
    "dp-budget-epsilon",
    "dp-replayed",
    "dp-attempts-round",
    "dp-history-segments",
)
# Marker that opens every refusal message, so the coordinator can recognise it inside Flower's error text.
REFUSAL_MARKER = "patient-level privacy budget"
# ConfigRecord key the coordinator's client-side site-DP wrappers add to the train config (fl_server.privacy).
SITE_DP_MODE_KEY = "site-dp-clipping"

HistoryEntry = tuple[float, float, int]  # Opacus accountant history: (noise_multiplier, sample_rate, steps)


class PatientBudgetExceeded(RuntimeError):
    """Training this round would take the site past its patient-level epsilon budget."""


class PrivacyStateError(RuntimeError):
    """The site's accountant history file is unreadable or inconsistent; nothing is trained until fixed."""


# --------------------------------------------------------------------------------------------------------
# the DP-SGD plan
# --------------------------------------------------------------------------------------------------------


def opacus_sampling(n_train: int, batch_size: int) -> tuple[float, int]:
    """``(accounted sample rate, steps per epoch)`` exactly as Opacus derives them from `train_local`'s loader.

    `train_local` builds ``DataLoader(batch_size=min(B, n), drop_last=False)``: ``ceil(n / B)`` batches.
    `DPDataLoader.from_data_loader` samples with probability ``1 / ceil(n / B)`` and runs
    ``int(1 / sample_rate)`` steps (one fewer for some sizes because of float rounding, e.g. 93 batches),
    and `PrivacyEngine.make_private` accounts ``q = 1 / len(dp_loader)``, which is never below the real rate.
    """
    if n_train <= 0:
        raise ValueError(f"no training patients (n_train={n_train}); DP-SGD needs at least one")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    batches = math.ceil(n_train / min(batch_size, n_train))
    steps = int(1 / (1 / batches))
    return 1 / steps, steps


def merge_history(entries: Iterable[Sequence[float]]) -> list[HistoryEntry]:
    """Canonical accountant history: steps of identical (noise, rate) pairs summed, first-seen order.

    Composition of Gaussian mechanisms does not depend on their order, so this is the same guarantee in
    fewer entries (Opacus itself only merges consecutive entries).
    """
    out: dict[tuple[float, float], int] = {}
    for z, q, steps in entries:
        key = (float(z), float(q))
        out[key] = out.get(key, 0) + int(steps)
    return [(z, q, n) for (z, q), n in out.items() if n > 0]


def epsilon_for(history: Sequence[Sequence[float]], delta: float, accountant: str) -> float:
    """Epsilon at `delta` of a history, by Opacus' accountant of the given kind (0 for no history)."""
    entries = tuple(merge_history(history))
    return _epsilon_cached(entries, float(delta), accountant) if entries else 0.0


@functools.lru_cache(maxsize=256)
def _epsilon_cached(entries: tuple[HistoryEntry, ...], delta: float, accountant: str) -> float:
    # The budget check before a round and the report after it ask for the same history: compute it once.
    from opacus.accountants import create_accountant

    acct = create_accountant(mechanism=accountant)
    acct.history = list(entries)
    return float(acct.get_epsilon(delta=delta))


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """Noise multiplier reaching `target_epsilon` after `steps` Poisson-sampled steps (Opacus' search)."""
    from opacus.accountants.utils import get_noise_multiplier

    try:
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=steps, accountant=accountant))
    except ValueError as exc:
        raise ValueError(
            f"privacy.patient.target_epsilon={target_epsilon} cannot be reached with delta={delta}, "
            f"sample rate {sample_rate:.4g} and {steps} steps: {exc}"
        ) from None


@dataclass(frozen=True)
class DPPlan:
    """What DP-SGD will do at this site in this round, and what was planned for the whole run."""

    n_train: int
    batch_size: int
    local_epochs: int
    total_rounds: int
    sample_rate: float
    steps_per_epoch: int
    steps_round: int
    steps_planned: int
    noise_multiplier: float
    max_grad_norm: float
    delta: float
    accountant: str
    target_epsilon: float | None

    def entry(self) -> HistoryEntry:
        return (self.noise_multiplier, self.sample_rate, self.steps_round)


def _positive(cfg: dict[str, Any], key: str, *, optional: bool = False) -> float | None:
    value = cfg.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"privacy-config {key}: expected a positive number, got {value!r}")
    return float(value)


def _accountant_and_delta(privacy_cfg: dict[str, Any]) -> tuple[str, float]:
    accountant = str(privacy_cfg.get("accountant", "rdp"))
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"privacy-config accountant: expected one of {ACCOUNTANTS}, got {accountant!r}")
    delta = _positive(privacy_cfg, "delta")
    assert delta is not None
    if not delta < 1:
        raise ValueError(f"privacy-config delta: must be below 1, got {delta}")
    return accountant, delta


def make_plan(privacy_cfg: dict[str, Any], *, n_train: int, batch_size: int, local_epochs: int,
              total_rounds: int, calibrated: dict[str, float] | None = None) -> DPPlan:
    """The round's DP-SGD plan from the coordinator's `privacy.patient` section and the site's data size.

    `calibrated` caches noise multipliers already searched for (the search costs seconds); it is updated.
    """
    accountant, delta = _accountant_and_delta(privacy_cfg)
    max_grad_norm = _positive(privacy_cfg, "max_grad_norm")
    target = _positive(privacy_cfg, "target_epsilon", optional=True)
    noise = _positive(privacy_cfg, "noise_multiplier", optional=True)
    if (target is None) == (noise is None):
        raise ValueError("privacy-config: exactly one of target_epsilon or noise_multiplier must be set")
    if local_epochs < 1 or total_rounds < 1:
        raise ValueError(f"local_epochs ({local_epochs}) and total_rounds ({total_rounds}) must be >= 1")
    q, steps_epoch = opacus_sampling(n_train, batch_size)
    steps_round = local_epochs * steps_epoch
    steps_planned = total_rounds * steps_round
    if noise is None:
        assert target is not None
        key = json.dumps([target, delta, q, steps_planned, accountant])
        if calibrated is not None and key in calibrated:
            noise = float(calibrated[key])
        else:
            noise = calibrate_noise(target, delta, q, steps_planned, accountant)
            if calibrated is not None:
                calibrated[key] = noise
    return DPPlan(n_train=n_train, batch_size=batch_size, local_epochs=local_epochs, total_rounds=total_rounds,
                  sample_rate=q, steps_per_epoch=steps_epoch, steps_round=steps_round, steps_planned=steps_planned,
                  noise_multiplier=float(noise), max_grad_norm=float(max_grad_norm), delta=float(delta),
                  accountant=accountant, target_epsilon=target)


# --------------------------------------------------------------------------------------------------------
# the history file
# --------------------------------------------------------------------------------------------------------


def default_state_dir(settings: SiteSettings | None = None) -> Path:
    """Node config ``privacy-state-dir``, else ``$LLNM_PRIVACY_DIR``, else ``~/.local/share/llnm-fl/privacy``."""
    if settings is not None and settings.privacy_state_dir is not None:
        return Path(settings.privacy_state_dir)
    if os.environ.get(ENV_STATE_DIR):
        return Path(os.environ[ENV_STATE_DIR])
    return Path.home() / ".local" / "share" / "llnm-fl" / "privacy"


def _slug(text: str) -> str:
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in text)[:60]
    return f"{safe}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def state_path(state_dir: Path, site_name: str, run_id: str) -> Path:
    """The history file of one site in one run."""
    return Path(state_dir) / f"{_slug(site_name)}__{_slug(run_id)}.json"


def _atomic_write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class SiteHistory:
    """One site's accountant history for one run, as stored on the site's disk.

    Layout: ``{"format", "version", "site", "run_id", "accountant", "delta", "secret", "calibrated",
    "rounds": {"<server round>": {"attempts": [{"fingerprint", "result_sha256", "history", "steps",
    "noise_multiplier", "sample_rate", "max_grad_norm", "epsilon_after", "finished_at", "replays"}]}},
    "refusals": [...]}``. Every attempt's ``history`` is the Opacus history entries it added; the run's
    history is their composition over all rounds and attempts.
    """

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data

    @classmethod
    def load_or_create(cls, path: Path, *, site_name: str, run_id: str, accountant: str,
                       delta: float) -> SiteHistory:
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise PrivacyStateError(
                    f"{path}: the site's DP accountant history cannot be read ({exc}); it records the privacy "
                    "already spent, so it is never silently reset: restore it from a backup, or move it away "
                    "only if this site never trained in this run"
                ) from None
            hist = cls(path, data)
            hist._validate(site_name=site_name, run_id=run_id, accountant=accountant, delta=delta)
            return hist
        data = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "site": site_name,
            "run_id": run_id,
            "accountant": accountant,
            "delta": delta,
            "secret": secrets.token_hex(32),
            "created_at": _now(),
            "calibrated": {},
            "rounds": {},
            "refusals": [],
        }
        return cls(path, data)

    def _validate(self, *, site_name: str, run_id: str, accountant: str, delta: float) -> None:
        d = self.data
        where = str(self.path)
        if not isinstance(d, dict) or d.get("format") != STATE_FORMAT or d.get("version") != STATE_VERSION:
            raise PrivacyStateError(f"{where}: not a version-{STATE_VERSION} {STATE_FORMAT!r} file")
        for key, want in (("site", site_name), ("run_id", run_id)):
            if d.get(key) != want:
                raise PrivacyStateError(f"{where}: field {key!r} is {d.get(key)!r}, expected {want!r}")
        if d.get("accountant") != accountant:
            raise PrivacyStateError(
                f"{where}: this run's history was accounted with {d.get('accountant')!r}, but the coordinator now "
                f"asks for {accountant!r}; one run keeps one accountant"
            )
        if d.get("delta") != delta:
            raise PrivacyStateError(f"{where}: this run's delta was {d.get('delta')!r}, the coordinator now sends "
                                    f"{delta!r}; one run keeps one delta")
        if not isinstance(d.get("secret"), str) or len(d["secret"]) < 32:
            raise PrivacyStateError(f"{where}: field 'secret' is missing or too short")
        rounds = d.get("rounds")
        if not isinstance(rounds, dict):
            raise PrivacyStateError(f"{where}: field 'rounds' must be a mapping")
        for rnd, rec in rounds.items():
            if not str(rnd).isdigit() or not isinstance(rec, dict) or not isinstance(rec.get("attempts"), list):
                raise PrivacyStateError(f"{where}: rounds[{rnd!r}] is malformed")
            for i, att in enumerate(rec["attempts"]):
                try:
                    entries = [(float(z), float(q), int(n)) for z, q, n in att["history"]]
                except (KeyError, TypeError, ValueError):
                    raise PrivacyStateError(f"{where}: rounds[{rnd}].attempts[{i}].history is malformed") from None
                if any(not (z > 0 and 0 < q <= 1 and n >= 0) for z, q, n in entries):
                    raise PrivacyStateError(f"{where}: rounds[{rnd}].attempts[{i}].history has impossible values")
        d.setdefault("calibrated", {})
        d.setdefault("refusals", [])

    # ---- queries -------------------------------------------------------------------------------
    def attempts(self, server_round: int) -> list[dict[str, Any]]:
        return list(self.data["rounds"].get(str(server_round), {}).get("attempts", []))

    def history(self, *, exclude: tuple[int, int] | None = None) -> list[HistoryEntry]:
        """Composition of every recorded release, optionally leaving out one (round, attempt index)."""
        entries: list[Sequence[float]] = []
        for rnd in sorted(self.data["rounds"], key=int):
            for i, att in enumerate(self.data["rounds"][rnd]["attempts"]):
                if exclude == (int(rnd), i):
                    continue
                entries.extend(att["history"])
        return merge_history(entries)

    def seeds(self, server_round: int, attempt: int) -> tuple[int, int]:
        """(noise seed, sampling seed): secret to the site, fixed per (round, attempt) so retries replay."""
        key = bytes.fromhex(self.data["secret"])

        def derive(purpose: str) -> int:
            digest = hmac.new(key, f"{server_round}:{attempt}:{purpose}".encode(), hashlib.sha256).digest()
            return int.from_bytes(digest[:8], "big") & (2**63 - 1)

        return derive("noise"), derive("poisson-sampling")

    # ---- updates -------------------------------------------------------------------------------
    def add_attempt(self, server_round: int, attempt: dict[str, Any]) -> None:
        self.data["rounds"].setdefault(str(server_round), {"attempts": []})["attempts"].append(attempt)

    def save(self) -> None:
        self.data["updated_at"] = _now()
        _atomic_write_json(self.path, self.data)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# --------------------------------------------------------------------------------------------------------
# the session
# --------------------------------------------------------------------------------------------------------


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
                 budget_source: str, history: SiteHistory, data_path: Path | None) -> None:
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
        self._dp_loader_len: int | None = None

    # ---- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, *, site_name: str, run_id: str, settings: SiteSettings, privacy_cfg: dict[str, Any],
             n_train: int, batch_size: int, local_epochs: int, total_rounds: int,
             server_round: int) -> PatientDPSession:
        """Plan the round, load the site's history and refuse the round if it would exceed the budget."""
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
        accountant, delta = _accountant_and_delta(privacy_cfg)
        history = SiteHistory.load_or_create(state_path(state_dir, site_name, run_id), site_name=site_name,
                                             run_id=run_id, accountant=accountant, delta=delta)
        plan = make_plan(privacy_cfg, n_train=n_train, batch_size=batch_size, local_epochs=local_epochs,
                         total_rounds=total_rounds, calibrated=history.data["calibrated"])
        budget, source = cls._budget(settings, plan)
        session = cls(site_name=site_name, run_id=run_id, server_round=server_round, plan=plan, budget=budget,
                      budget_source=source, history=history, data_path=data_path)
        if not history.attempts(server_round):
            # A new round: its cost is known now. (A retried round is decided in make_private, once the
            # inputs are known: an identical retry replays the release already accounted.)
            session._check_budget(history.history(), plan.entry())
        return session

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
            f"{REFUSAL_MARKER} reached: site {self.site_name!r} refuses round {self.server_round} of run "
            f"{self.run_id!r}. It has spent epsilon {spent:.4f} (delta {p.delta:g}, {p.accountant} accountant) and "
            f"this round ({entry[2]} DP-SGD steps, noise multiplier {entry[0]:.4f}, sample rate {entry[1]:.4g}) "
            f"would cost {after - spent:.4f} more, reaching {after:.4f}, above {self.budget_source}. "
            "The site trains no further in this run; the federation goes on without it."
        )
        self.history.data["refusals"].append({"round": self.server_round, "at": _now(), "spent": spent,
                                              "would_reach": after, "budget": self.budget,
                                              "budget_source": self.budget_source})
        self.history.save()
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
        self._dp_loader_len = len(dp_loader)
        return wrapped, dp_optimizer, dp_loader

    # ---- finishing -----------------------------------------------------------------------------
    def finish(self, result: TrainResult) -> dict[str, float]:
        """Persist the round's release in the history and return the train reply's ``dp-*`` metrics."""
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
                "finished_at": _now(),
                "replays": 0,
            })
        full = self.history.history()
        epsilon = epsilon_for(full, p.delta, p.accountant)
        if not replayed:
            self.history.data["rounds"][str(self.server_round)]["attempts"][-1]["epsilon_after"] = epsilon
        self.history.save()
        self._cleanup()
        metrics = {
            "dp-epsilon": float(epsilon),
            "dp-delta": float(p.delta),
            "dp-noise-multiplier": float(p.noise_multiplier),
            "dp-sample-rate": float(p.sample_rate),
            "dp-max-grad-norm": float(p.max_grad_norm),
            "dp-steps-round": int(steps_added),
            "dp-steps-total": int(sum(n for _, _, n in full)),
            "dp-budget-epsilon": float(self.budget) if self.budget is not None else math.nan,
            "dp-replayed": int(replayed),
            "dp-attempts-round": len(self.history.attempts(self.server_round)),
            "dp-history-segments": len(full),
        }
        assert tuple(metrics) == DP_METRIC_KEYS
        log.info("site %s round %d: DP-SGD done, epsilon %.4f at delta %g after %d steps (budget %s)",
                 self.site_name, self.server_round, epsilon, p.delta, metrics["dp-steps-total"],
                 "none" if self.budget is None else f"{self.budget:g}")
        return metrics

    def _cleanup(self) -> None:
        # Remove Opacus' hooks and per-sample gradient buffers from the model the ClientApp sends back.
        cleanup = getattr(self._wrapped, "cleanup", None)
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


# --------------------------------------------------------------------------------------------------------
# client-side clipping for site-level DP (Flower's mods, only when the coordinator asks for them)
# --------------------------------------------------------------------------------------------------------


def site_dp_clipping_mod(msg: Message, ctxt: Context, call_next: Any) -> Message:
    """Apply Flower's `fixedclipping_mod` / `adaptiveclipping_mod` when this round's config asks for them.

    The coordinator's client-side site-DP wrappers (fl_server.privacy) put ``site-dp-clipping`` =
    ``client-fixed`` or ``client-adaptive`` (and Flower's ``clipping_norm``) into the train config; any other
    train message passes through untouched. Flower's mods check only the array records (one in, one out,
    same keys) and the incoming config record, so the reply's extra ``site`` ConfigRecord is fine. Clipping
    after DP-SGD is post-processing and costs no patient-level privacy.
    """
    from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod

    records = msg.content.config_records
    config = records.get("config") if "config" in records else None
    mode = str(config.get(SITE_DP_MODE_KEY, "")) if config is not None else ""
    if mode == "client-fixed":
        return fixedclipping_mod(msg, ctxt, call_next)
    if mode == "client-adaptive":
        return adaptiveclipping_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)
