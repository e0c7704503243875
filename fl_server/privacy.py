"""Site-level DP at the coordinator and the run's privacy ledger ``runs/<name>/privacy.json``.

Two guarantees can be on in one run, and this module records both:

* **patient level** (``privacy.patient``): every hospital runs DP-SGD itself (`fl_client.privacy`) and reports,
  in its train reply, the parameters it actually ran and its own cumulative epsilon. The coordinator cannot
  add to that guarantee; it checks that every accepted reply carries it and writes it down.
* **site level** (``privacy.site``): Flower's central-DP strategy wrappers clip each site's whole model update
  (on the server, or at the site with Flower's clipping mods) and add Gaussian noise to the average, so the
  released global model hides any one hospital's contribution. With fixed clipping, Flower's `RdpAccountant`
  (no sampling amplification, add-or-remove-one site) accounts every release and the run stops before
  ``privacy.site.max_epsilon`` would be exceeded. Adaptive clipping has no accountant in Flower, and the
  ledger says so instead of inventing an epsilon.

Flower's wrappers assume every sampled site replies: with an accountant they skip the round otherwise. A
hospital going offline must not stop a consortium, so the wrappers used here (thin subclasses of Flower's)
set ``num_sampled_clients`` to the number of updates actually averaged, K, just before aggregating. The noise
on the average is then ``z * C / K``, i.e. ``z * C`` on the sum of K clipped updates, which is exactly the
Gaussian mechanism Flower's accountant composes (noise multiplier z, sensitivity C): the guarantee holds for
any K, with the number of participating sites treated as public (the coordinator sees who replied anyway).

The ledger is rewritten (atomically) as soon as each round's replies are in, so a crash keeps what was
spent. Rounds dropped when a crashed run resumes are not deleted but moved to ``abandoned``: site-level
releases made in them (the noisy model may have reached the sites) are composed into the accountant again.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from fl_server.config import ConfigError, ExperimentConfig
from fl_server.run_dir import RunDirectory, atomic_write_json

log = logging.getLogger("llnm.server")

LEDGER_FORMAT = "llnm-fl privacy ledger"
LEDGER_VERSION = 1
# Keep in sync with fl_client.privacy (not imported here: the server never imports site-side modules).
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
REFUSAL_MARKER = "patient-level privacy budget"
SITE_DP_MODE_KEY = "site-dp-clipping"
# Relative slack when checking a site's reported epsilon against the run's target (float noise only).
EPS_RTOL = 1e-6
SERVER_ACCOUNTANT = "flwr RdpAccountant (no sampling amplification, add-or-remove-one site)"


class SiteBudgetExhausted(RuntimeError):
    """The next round's site-level release would exceed ``privacy.site.max_epsilon``; the run stops."""


# --------------------------------------------------------------------------------------------------------
# Flower's DP wrappers, tolerant of sites dropping out
# --------------------------------------------------------------------------------------------------------


class _RoundRecords:
    """Per-round facts the ledger needs and Flower's wrappers do not keep."""

    llnm_mode: str

    def _llnm_init(self, mode: str) -> None:
        self.llnm_mode = mode
        self.llnm_rounds: dict[int, dict[str, Any]] = {}

    def _llnm_record(self, server_round: int, **values: Any) -> None:
        self.llnm_rounds.setdefault(server_round, {}).update(values)


def _rebuild_accountant(accountant: Any, population: int, compositions: Iterable[tuple[float, int, int]]) -> Any:
    """A fresh Flower RdpAccountant with `population`, composing (noise multiplier, sample size, count)."""
    from flwr.serverapp import GaussianPrivacyEvent, PrivacyConfig, RdpAccountant

    old = accountant.config
    new = RdpAccountant(PrivacyConfig(target_delta=old.target_delta, population_size=population,
                                      neighboring_relation=old.neighboring_relation,
                                      sampling_method=old.sampling_method, max_epsilon=old.max_epsilon))
    for noise, sample, count in compositions:
        new.compose(GaussianPrivacyEvent(noise_multiplier=float(noise), sample_size=min(int(sample), population),
                                         population_size=population), int(count))
    return new


def _compositions(accountant: Any) -> list[tuple[float, int, int]]:
    state = accountant.state_dict()
    return [(c["event"]["noise_multiplier"], c["event"]["sample_size"], c["count"]) for c in state["compositions"]]


class _FixedMixin(_RoundRecords):
    """Flower's fixed-clipping wrappers, with K = the sites actually averaged (see the module docstring)."""

    noise_multiplier: float
    clipping_norm: float
    num_sampled_clients: int
    accountant: Any

    def _prepare_accounting(self, server_round: int, messages: Iterable[Message]) -> Iterable[Message]:
        msgs = list(messages)
        self._llnm_record(server_round, sites_sampled=len(msgs))
        if msgs:
            self.num_sampled_clients = len(msgs)
            if self.accountant is not None and len(msgs) > self.accountant.config.population_size:
                self.accountant = _rebuild_accountant(self.accountant, len(msgs), _compositions(self.accountant))
        return super()._prepare_accounting(server_round, msgs)  # type: ignore[misc]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        ok = [r for r in replies if not r.has_error()]
        if ok and len(ok) == len(replies):
            self.num_sampled_clients = len(ok)
        self._llnm_record(server_round, sites_aggregated=len(ok), clipping_norm=float(self.clipping_norm),
                          noise_multiplier=float(self.noise_multiplier),
                          noise_stddev=float(self.noise_multiplier * self.clipping_norm / max(len(ok), 1)))
        return super().aggregate_train(server_round, replies)  # type: ignore[misc]


class _AdaptiveMixin(_RoundRecords):
    """Flower's adaptive-clipping wrappers, with K = the sites actually averaged."""

    noise_multiplier: float
    clipping_norm: float
    num_sampled_clients: int

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        msgs = list(super().configure_train(server_round, arrays, config, grid))  # type: ignore[misc]
        self._llnm_record(server_round, sites_sampled=len(msgs))
        return msgs

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        ok = [r for r in replies if not r.has_error()]
        if ok and len(ok) == len(replies):
            self.num_sampled_clients = len(ok)
        used = float(self.clipping_norm)
        out = super().aggregate_train(server_round, replies)  # type: ignore[misc]
        # Flower adds the noise with the norm it has just adapted, so the noise scale follows that norm.
        k = max(len(ok), 1)
        self._llnm_record(server_round, sites_aggregated=len(ok), clipping_norm=used,
                          clipping_norm_next=float(self.clipping_norm),
                          noise_multiplier=float(self.noise_multiplier),
                          noise_stddev=float(self.noise_multiplier * self.clipping_norm / k),
                          effective_noise_multiplier=float(self.noise_multiplier * self.clipping_norm / used))
        return out


class _ClientSideMarker:
    """Tells the site's `site_dp_clipping_mod` which of Flower's clipping mods to apply."""

    llnm_mode: str

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        config[SITE_DP_MODE_KEY] = self.llnm_mode
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]


class SiteDPServerFixed(_FixedMixin, DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping, tolerant of dropouts."""


class SiteDPClientFixed(_ClientSideMarker, _FixedMixin, DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed clipping (sites clip with `fixedclipping_mod`), tolerant of dropouts."""


class SiteDPServerAdaptive(_AdaptiveMixin, DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive clipping, tolerant of dropouts (no accountant exists)."""


class SiteDPClientAdaptive(_ClientSideMarker, _AdaptiveMixin, DifferentialPrivacyClientSideAdaptiveClipping):
    """Flower's client-side adaptive clipping (sites clip with `adaptiveclipping_mod`), no accountant."""


_WRAPPERS: dict[str, type] = {
    "server-fixed": SiteDPServerFixed,
    "client-fixed": SiteDPClientFixed,
    "server-adaptive": SiteDPServerAdaptive,
    "client-adaptive": SiteDPClientAdaptive,
}


def flower_wrapper_name(strategy: Strategy) -> str:
    """The Flower class a wrapper here extends (what the ledger and the guarantee name)."""
    for cls in type(strategy).__mro__:
        if cls.__module__.startswith("flwr.") and cls.__name__.startswith("DifferentialPrivacy"):
            return cls.__name__
    return type(strategy).__name__


def wrap_with_site_dp(strategy: Strategy, exp: ExperimentConfig, num_sites_expected: int) -> Strategy:
    """Wrap `strategy` in Flower's DP wrapper for ``privacy.site.clipping``, with Flower's accountant if fixed.

    The accountant uses no sampling amplification (every connected site takes part in every round) and
    add-or-remove-one site as the neighbouring relation, over a population of `num_sites_expected` sites.
    """
    site = exp.privacy.site
    cls = _WRAPPERS[site.clipping]
    num = max(int(num_sites_expected), 1)
    try:
        if site.clipping.endswith("fixed"):
            from flwr.serverapp import NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod

            accountant = RdpAccountant(PrivacyConfig(
                target_delta=site.delta, population_size=num,
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                sampling_method=SamplingMethod.NO_AMPLIFICATION, max_epsilon=site.max_epsilon))
            wrapped = cls(strategy, site.noise_multiplier, site.clipping_norm, num, accountant=accountant)
        else:
            wrapped = cls(strategy, site.noise_multiplier, num, initial_clipping_norm=site.clipping_norm,
                          target_clipped_quantile=site.target_clipped_quantile,
                          clipped_count_stddev=site.clipped_count_stddev)
    except ValueError as exc:
        text = str(exc)
        if "FedAvg.aggregate_train" in text:
            raise ConfigError(
                f"privacy.site.clipping={site.clipping}: Flower's accountant needs plain FedAvg aggregation, so "
                f"federation.strategy must be fedavg or fedprox (got {exp.federation.strategy}: a server "
                "optimiser changes what the noise protects)"
            ) from None
        if "clipped_count_stddev" in text:
            raise ConfigError(
                f"privacy.site.clipped_count_stddev: with {num} sites Flower's default is {num / 20:g}, too small "
                f"for noise_multiplier={site.noise_multiplier} (adaptive clipping needs noise_multiplier < "
                "2 * clipped_count_stddev); set privacy.site.clipped_count_stddev explicitly"
            ) from None
        raise ConfigError(f"privacy.site: {text}") from None
    wrapped._llnm_init(site.clipping)
    return wrapped


# --------------------------------------------------------------------------------------------------------
# the ledger
# --------------------------------------------------------------------------------------------------------


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _finite(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _refusal_text(reason: str) -> str | None:
    """The site's refusal message inside Flower's error text, or None if this failure is something else.

    Flower wraps the ClientApp's exception (``<class ...>:<'message'>``, in simulation with a Ray traceback
    around it); the site's message is one line that starts with `REFUSAL_MARKER`.
    """
    at = reason.find(REFUSAL_MARKER)
    if at < 0:
        return None
    text = reason[at:].split("\n", 1)[0]
    end = text.find("'>")
    return (text[:end] if end >= 0 else text).strip()


def _spent_in_refusal(text: str) -> float | None:
    match = re.search(r"has spent epsilon ([0-9.]+)", text)
    return float(match.group(1)) if match else None


class PrivacyLedger:
    """The run's privacy record, ``privacy.json``, and the coordinator's privacy checks around each round."""

    def __init__(self, path: Path, data: dict[str, Any], exp: ExperimentConfig | None) -> None:
        self.path = path
        self.data = data
        self.exp = exp
        self.strategy: Strategy | None = None
        self._truncated_to: int | None = None

    # ---- creation / loading --------------------------------------------------------------------
    @staticmethod
    def _header(exp: ExperimentConfig) -> dict[str, Any]:
        pat, site = exp.privacy.patient, exp.privacy.site
        return {
            "patient": {
                "enabled": pat.enabled,
                "mechanism": "dp-sgd" if pat.enabled else None,
                "implementation": "opacus (per-patient gradients, Poisson sampling), at each site",
                "accountant": pat.accountant,
                "delta": pat.delta,
                "target_epsilon": pat.target_epsilon,
                "noise_multiplier": pat.noise_multiplier,
                "max_grad_norm": pat.max_grad_norm,
                "unit": "patient",
            },
            "site": {
                "enabled": site.enabled,
                "mechanism": "gaussian (central DP on the average of clipped site updates)" if site.enabled else None,
                "clipping": site.clipping,
                "noise_multiplier": site.noise_multiplier,
                "clipping_norm": site.clipping_norm,
                "delta": site.delta,
                "max_epsilon": site.max_epsilon,
                "accountant": SERVER_ACCOUNTANT if site.enabled and site.clipping.endswith("fixed") else None,
                "unit": "site (a hospital's whole model update)",
            },
        }

    @classmethod
    def open(cls, rd: RunDirectory, exp: ExperimentConfig) -> PrivacyLedger:
        """The ledger of `rd`, created if new, continued (never reset) if the run is resumed."""
        path = rd.privacy_path
        header = cls._header(exp)
        if path.is_file():
            ledger = cls._read(path, exp)
            for level in ("patient", "site"):
                old = {k: v for k, v in ledger.data.get(level, {}).items() if k != "wrapper"}
                if old != header[level]:
                    raise ConfigError(
                        f"{path}: the {level}-level privacy settings differ from those this run started with "
                        f"({json.dumps(old, sort_keys=True)} vs {json.dumps(header[level], sort_keys=True)}); "
                        "a run's privacy settings cannot change"
                    )
            return ledger
        data = {"format": LEDGER_FORMAT, "version": LEDGER_VERSION, "run": exp.name, "created_at": _now(),
                **header, "rounds": [], "abandoned": [], "stopped": None}
        ledger = cls(path, data, exp)
        ledger._write()
        return ledger

    @classmethod
    def load(cls, rd: RunDirectory) -> PrivacyLedger:
        """Read-only view (``llnm-server status``)."""
        exp = rd.load_config() if rd.config_path.is_file() else None
        return cls._read(rd.privacy_path, exp)

    @classmethod
    def _read(cls, path: Path, exp: ExperimentConfig | None) -> PrivacyLedger:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: privacy ledger cannot be read: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != LEDGER_FORMAT or data.get("version") != LEDGER_VERSION:
            raise ConfigError(f"{path}: not a version-{LEDGER_VERSION} privacy ledger")
        for key in ("rounds", "abandoned"):
            if not isinstance(data.get(key), list):
                raise ConfigError(f"{path}: field {key!r} must be a list")
        return cls(path, data, exp)

    def _write(self) -> None:
        self.data["updated_at"] = _now()
        atomic_write_json(self.path, self.data)

    # ---- resume --------------------------------------------------------------------------------
    def truncate_to(self, rnd: int) -> None:
        """Keep rounds <= `rnd`; later (half-done) rounds move to ``abandoned`` with what they spent."""
        keep, moved = [], []
        for entry in self.data["rounds"]:
            (keep if entry["round"] <= rnd else moved).append(entry)
        for entry in moved:
            entry["abandoned_at"] = _now()
            entry["resumed_after_round"] = rnd
            self.data["abandoned"].append(entry)
        self.data["rounds"] = keep
        self.data["stopped"] = None
        self._truncated_to = rnd
        if moved:
            log.info("privacy ledger: rounds %s were not completed before the crash; their spending is kept "
                     "under 'abandoned'", [e["round"] for e in moved])
        self._write()

    def _abandoned_releases(self) -> list[dict[str, Any]]:
        """Site-level releases of rounds abandoned when resuming from the current truncation point."""
        if self._truncated_to is None:
            return []
        return [e["server"] for e in self.data["abandoned"]
                if e.get("resumed_after_round") == self._truncated_to and (e.get("server") or {}).get("released")]

    def _compose_abandoned(self, strategy: Strategy) -> None:
        accountant = getattr(strategy, "accountant", None)
        releases = self._abandoned_releases()
        if accountant is None or not releases:
            return
        comps = _compositions(accountant) + [(r["noise_multiplier"], r["sites_sampled"], 1) for r in releases]
        strategy.accountant = _rebuild_accountant(accountant, accountant.config.population_size, comps)
        log.info("privacy ledger: %d site-level release(s) of abandoned rounds composed into the accountant",
                 len(releases))

    def attach(self, strategy: Strategy) -> None:
        """Start recording `strategy` (and count site-level releases of abandoned rounds)."""
        self.strategy = strategy
        if self.exp is not None and self.exp.privacy.site.enabled:
            self.data["site"]["wrapper"] = flower_wrapper_name(strategy)
            self._compose_abandoned(strategy)
        self._write()

    def restore(self, strategy: Strategy, state: dict[str, Any]) -> None:
        """Continue the site-level accountant (and adaptive clipping norm) saved with the last complete round."""
        if self.exp is None or not self.exp.privacy.site.enabled:
            return
        saved = state.get("accountant")
        accountant = getattr(strategy, "accountant", None)
        if accountant is not None:
            if not isinstance(saved, dict):
                raise ConfigError("server state has no site-level accountant state; the run cannot resume "
                                  "without losing what was spent")
            cfg = saved.get("config", {})
            if (cfg.get("sampling_method") != accountant.config.sampling_method.value
                    or cfg.get("neighboring_relation") != accountant.config.neighboring_relation.value
                    or cfg.get("target_delta") != accountant.config.target_delta):
                raise ConfigError(f"saved site-level accountant has another privacy model ({cfg}); cannot resume")
            comps = [(c["event"]["noise_multiplier"], c["event"]["sample_size"], c["count"])
                     for c in saved.get("compositions", [])]
            population = max(int(cfg.get("population_size", 1)), accountant.config.population_size)
            strategy.accountant = _rebuild_accountant(accountant, population, comps)
            self._compose_abandoned(strategy)
        if "clipping_norm" in state and state["clipping_norm"] is not None and hasattr(strategy, "clipping_norm"):
            strategy.clipping_norm = float(state["clipping_norm"])

    def state(self, strategy: Strategy) -> dict[str, Any]:
        """JSON-able privacy state saved with each round (the accountant's events, the clipping norm)."""
        accountant = getattr(strategy, "accountant", None)
        return {
            "accountant": accountant.state_dict() if accountant is not None else None,
            "clipping_norm": float(strategy.clipping_norm) if hasattr(strategy, "clipping_norm") else None,
        }

    # ---- rounds --------------------------------------------------------------------------------
    def before_round(self, rnd: int, strategy: Strategy) -> None:
        """Stop the run, with a clear error, if this round's site-level release would exceed the budget."""
        accountant = getattr(strategy, "accountant", None)
        if accountant is None or self.exp is None or self.exp.privacy.site.max_epsilon is None:
            return
        from flwr.serverapp import GaussianPrivacyEvent

        site = self.exp.privacy.site
        population = accountant.config.population_size
        event = GaussianPrivacyEvent(noise_multiplier=float(strategy.noise_multiplier),
                                     sample_size=min(int(strategy.num_sampled_clients), population),
                                     population_size=population)
        if not accountant.would_exceed(event):
            return
        spent = accountant.get_privacy_spent()
        message = (
            f"site-level privacy budget reached: round {rnd} would take the site-level epsilon above "
            f"privacy.site.max_epsilon={site.max_epsilon:g} (spent: epsilon {spent.epsilon:.4f} at delta "
            f"{spent.delta:g} after {spent.num_releases} release(s)); the run stops here with the model of "
            f"round {rnd - 1}"
        )
        self.data["stopped"] = {"round": rnd, "reason": message, "at": _now()}
        self._write()
        log.error(message)
        raise SiteBudgetExhausted(message)

    def _known_sites(self) -> list[str]:
        names: set[str] = set()
        for entry in self.data["rounds"]:
            names.update(entry.get("sites", {}))
        return sorted(names)

    def _last_site_entry(self, name: str) -> dict[str, Any] | None:
        for entry in reversed(self.data["rounds"]):
            rec = entry.get("sites", {}).get(name)
            if rec and rec.get("epsilon") is not None:
                return rec
        return None

    def screen_replies(self, rnd: int, replies: list[Message], failures: list[dict[str, Any]],
                       name_fn: Callable[[int], str]) -> list[Message]:
        """Drop train replies lacking valid DP-SGD metrics (patient DP on) and record what every site spent.

        A dropped reply becomes a failure of its site for the round (appended to `failures`).
        """
        exp = self.exp
        patient_on = bool(exp is not None and exp.privacy.patient.enabled)
        kept: list[Message] = []
        sites: dict[str, dict[str, Any]] = {}
        for reply in replies:
            name = _reply_site(reply, name_fn)
            if not patient_on:
                kept.append(reply)
                sites[name] = {"status": "trained", "mechanism": None}
                continue
            problem, rec = self._site_record(reply)
            if problem is not None:
                failures.append({"site": name, "node_id": reply.metadata.src_node_id, "phase": "train",
                                 "reason": f"reply rejected by the privacy check: {problem}"})
                log.warning("round %d: %s's update is not used: %s", rnd, name, problem)
                last = self._last_site_entry(name)
                sites[name] = {"status": "rejected", "reason": problem,
                               "epsilon": rec.get("epsilon") if rec else (last or {}).get("epsilon")}
                continue
            kept.append(reply)
            sites[name] = rec
        for fail in failures:
            if fail.get("phase") != "train" or fail["site"] in sites:
                continue
            refusal = _refusal_text(str(fail.get("reason", "")))
            if refusal:
                fail["reason"] = refusal  # the site's own words, not Flower's wrapping of them
            last = self._last_site_entry(fail["site"])
            rec = {"status": "refused" if refusal else "failed", "reason": refusal or fail.get("reason")}
            if patient_on:
                spent = _spent_in_refusal(refusal) if refusal else None
                rec.update({"mechanism": "dp-sgd",
                            "epsilon": spent if spent is not None else (last or {}).get("epsilon"),
                            "steps_total": (last or {}).get("steps_total"),
                            "budget_epsilon": (last or {}).get("budget_epsilon")})
                if refusal is None and last is not None:
                    rec["note"] = ("no reply: the site may have trained, so its epsilon is at least this value "
                                   "(its own history file is authoritative)")
            sites[fail["site"]] = rec
            if refusal:
                log.warning("round %d: %s", rnd, refusal)
        for name in self._known_sites():
            if name not in sites:
                last = self._last_site_entry(name)
                sites[name] = {"status": "absent", "epsilon": (last or {}).get("epsilon")}
        entry = {"round": rnd, "recorded_at": _now(), "sites": dict(sorted(sites.items())), "server": None,
                 "complete": False}
        self.data["rounds"] = [e for e in self.data["rounds"] if e["round"] != rnd] + [entry]
        self.data["rounds"].sort(key=lambda e: e["round"])
        self._write()
        return kept

    def _site_record(self, reply: Message) -> tuple[str | None, dict[str, Any] | None]:
        """(problem or None, ledger record) for one train reply under patient-level DP."""
        assert self.exp is not None
        pat = self.exp.privacy.patient
        metrics = reply.content["metrics"] if "metrics" in reply.content.metric_records else None
        if metrics is None:
            return "no metrics record", None
        missing = [k for k in DP_METRIC_KEYS if k not in metrics]
        if missing:
            return f"patient-level DP is on but the reply lacks {missing} (did the site run DP-SGD?)", None
        m = {k: metrics[k] for k in DP_METRIC_KEYS}
        rec = {
            "status": "trained",
            "mechanism": "dp-sgd",
            "accountant": f"opacus-{pat.accountant}",
            "sample_rate": _finite(m["dp-sample-rate"]),
            "noise_multiplier": _finite(m["dp-noise-multiplier"]),
            "max_grad_norm": _finite(m["dp-max-grad-norm"]),
            "steps_round": int(m["dp-steps-round"]),
            "steps_total": int(m["dp-steps-total"]),
            "delta": _finite(m["dp-delta"]),
            "epsilon": _finite(m["dp-epsilon"]),
            "budget_epsilon": _finite(m["dp-budget-epsilon"]),
            "replayed": bool(m["dp-replayed"]),
            "attempts_round": int(m["dp-attempts-round"]),
            "history_segments": int(m["dp-history-segments"]),
        }
        if rec["epsilon"] is None or rec["epsilon"] < 0:
            return f"dp-epsilon {m['dp-epsilon']!r} is not a valid epsilon", rec
        if rec["delta"] != pat.delta:
            return f"dp-delta {m['dp-delta']!r} differs from the run's delta {pat.delta:g}", rec
        if rec["max_grad_norm"] != pat.max_grad_norm:
            return f"dp-max-grad-norm {m['dp-max-grad-norm']!r} differs from the run's {pat.max_grad_norm:g}", rec
        if pat.noise_multiplier is not None and rec["noise_multiplier"] != pat.noise_multiplier:
            return (f"dp-noise-multiplier {m['dp-noise-multiplier']!r} differs from the run's "
                    f"{pat.noise_multiplier:g}"), rec
        if not (rec["noise_multiplier"] or 0) > 0 or not 0 < (rec["sample_rate"] or 0) <= 1:
            return "dp-noise-multiplier / dp-sample-rate out of range", rec
        if pat.target_epsilon is not None and rec["epsilon"] > pat.target_epsilon * (1 + EPS_RTOL):
            return (f"reported epsilon {rec['epsilon']:.4f} is above the run's target "
                    f"{pat.target_epsilon:g}"), rec
        budget = rec["budget_epsilon"]
        if budget is not None and rec["epsilon"] > budget * (1 + EPS_RTOL):
            return f"reported epsilon {rec['epsilon']:.4f} is above the site's own budget {budget:g}", rec
        return None, rec

    def after_aggregate(self, rnd: int, strategy: Strategy, replies: list[Message],
                        name_fn: Callable[[int], str]) -> None:
        """Record the round's site-level release (if any) and mark the round's ledger entry complete."""
        entry = next((e for e in self.data["rounds"] if e["round"] == rnd), None)
        if entry is None:
            self.screen_replies(rnd, list(replies), [], name_fn)
            entry = next(e for e in self.data["rounds"] if e["round"] == rnd)
        entry["participants"] = sorted(_reply_site(r, name_fn) for r in replies)
        if self.exp is not None and self.exp.privacy.site.enabled:
            entry["server"] = self._server_record(rnd, strategy)
        entry["complete"] = True
        entry["recorded_at"] = _now()
        self._write()

    def _server_record(self, rnd: int, strategy: Strategy) -> dict[str, Any]:
        assert self.exp is not None
        site = self.exp.privacy.site
        facts = dict(getattr(strategy, "llnm_rounds", {}).get(rnd, {}))
        rec: dict[str, Any] = {
            "mechanism": "gaussian",
            "clipping": site.clipping,
            "wrapper": flower_wrapper_name(strategy),
            "released": True,
            "noise_multiplier": facts.get("noise_multiplier", float(strategy.noise_multiplier)),
            "clipping_norm": facts.get("clipping_norm", float(strategy.clipping_norm)),
            "sites_sampled": facts.get("sites_sampled"),
            "sites_aggregated": facts.get("sites_aggregated"),
            "noise_stddev": facts.get("noise_stddev"),
            "delta": site.delta,
        }
        for extra in ("clipping_norm_next", "effective_noise_multiplier"):
            if extra in facts:
                rec[extra] = facts[extra]
        accountant = getattr(strategy, "accountant", None)
        if accountant is not None:
            spent = accountant.get_privacy_spent()
            rec.update({"epsilon": float(spent.epsilon), "releases": int(spent.num_releases),
                        "rdp_order": spent.optimal_order, "accountant": SERVER_ACCOUNTANT})
        else:
            rec.update({"epsilon": None, "releases": None, "accountant": None,
                        "accountant_note": "Flower has no privacy accountant for adaptive clipping; no epsilon "
                                           "is claimed"})
        return rec

    # ---- the guarantee in words ----------------------------------------------------------------
    def guarantee_sentences(self) -> list[str]:
        """One plain sentence per enabled level: what this run guarantees so far."""
        out: list[str] = []
        rounds = [e for e in self.data["rounds"] if e.get("complete")]
        pat = self.data.get("patient", {})
        if pat.get("enabled"):
            out.append(self._patient_sentence(rounds, pat))
        site = self.data.get("site", {})
        if site.get("enabled"):
            out.append(self._site_sentence(rounds, site))
        return out

    def _patient_sentence(self, rounds: list[dict[str, Any]], pat: dict[str, Any]) -> str:
        last: dict[str, dict[str, Any]] = {}
        refused: set[str] = set()
        for entry in rounds:
            for name, rec in entry.get("sites", {}).items():
                if rec.get("status") == "trained":
                    last[name] = rec
                elif rec.get("status") == "refused":
                    refused.add(name)
        delta = pat.get("delta")
        if not last:
            target = pat.get("target_epsilon")
            return (f"patient-level DP-SGD is configured at every site (delta {delta:g}"
                    + (f", target epsilon {target:g}" if target else "") + ") but no site has reported training yet")
        worst = max(rec["epsilon"] for rec in last.values())
        noises = sorted({round(rec["noise_multiplier"], 4) for rec in last.values()})
        noise = f"{noises[0]:g}" if len(noises) == 1 else f"{noises[0]:g} to {noises[-1]:g}"
        per_site = ", ".join(f"{name} {rec['epsilon']:.3f}" for name, rec in sorted(last.items()))
        stops = "; ".join(f"{name} stopped at its own budget" for name in sorted(refused))
        return (
            f"patient-level ({worst:.3f}, {delta:g})-DP at every site after {len(rounds)} round(s): each hospital "
            f"trained with DP-SGD (Opacus, Poisson sampling, per-patient clipping norm {pat.get('max_grad_norm'):g}, "
            f"noise multiplier {noise}, {str(pat.get('accountant')).upper()} accountant) and has spent epsilon "
            f"{per_site}" + (f" ({stops})" if stops else "")
        )

    def _site_sentence(self, rounds: list[dict[str, Any]], site: dict[str, Any]) -> str:
        released = [e["server"] for e in rounds if e.get("server")]
        abandoned = [e["server"] for e in self.data.get("abandoned", []) if (e.get("server") or {}).get("released")]
        where = "the coordinator clipped" if str(site.get("clipping")).startswith("server") else "each site clipped"
        noise_by = "added" if where.startswith("the coordinator") else "the coordinator added"
        wrapper = site.get("wrapper") or "Flower's DP wrapper"
        if not released:
            return (f"site-level DP ({site.get('clipping')} clipping, noise multiplier "
                    f"{site.get('noise_multiplier'):g}) is configured but no round has been released yet")
        last = released[-1]
        n = len(released) + len(abandoned)
        if last.get("epsilon") is not None:
            return (
                f"site-level ({last['epsilon']:.3f}, {site.get('delta'):g})-DP for each hospital's whole contribution "
                f"after {n} release(s): {where} every model update to norm {site.get('clipping_norm'):g} and "
                f"{noise_by} Gaussian noise with multiplier {site.get('noise_multiplier'):g} to the average "
                f"({wrapper}; {SERVER_ACCOUNTANT}; the number of participating sites is treated as public)"
            )
        return (
            f"site-level: {where} every model update adaptively (clipping norm now "
            f"{last.get('clipping_norm_next', 0):.4g}) "
            f"and {noise_by} Gaussian noise (multiplier {last.get('noise_multiplier'):.4g}) to the average "
            f"in {n} release(s) ({wrapper}), but Flower has no privacy accountant for adaptive clipping, so no "
            "site-level epsilon is claimed"
        )


def _reply_site(reply: Message, name_fn: Callable[[int], str]) -> str:
    if "site" in reply.content.config_records:
        name = reply.content["site"].get("site-name")
        if name:
            return str(name)
    return name_fn(reply.metadata.src_node_id)
