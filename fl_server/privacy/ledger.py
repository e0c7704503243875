"""The run's privacy ledger ``runs/<name>/privacy.json`` and the coordinator's privacy checks around each round.

Two guarantees can be on in one run, and the ledger records both:

* **patient level** (``privacy.patient``): every hospital runs DP-SGD itself (`fl_client.privacy`) and reports,
  in its train reply, the parameters it actually ran and its own cumulative epsilon. The coordinator cannot
  add to that guarantee; it checks that every accepted reply carries it and writes it down.
* **site level** (``privacy.site``): Flower's central-DP wrappers (`fl_server.privacy.wrappers`) release a
  noisy average of clipped site updates. With fixed clipping the run stops before ``privacy.site.max_epsilon``
  would be exceeded; adaptive clipping has no accountant in Flower, and the ledger says so instead of
  inventing an epsilon.

The ledger is rewritten (atomically) as soon as each round's replies are in, so a crash keeps what was
spent. Rounds dropped when a crashed run resumes are not deleted but moved to ``abandoned``: site-level
releases made in them (the noisy model may have reached the sites) are composed into the accountant again.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import Message
from flwr.serverapp.strategy import Strategy

from fl_server.config import ConfigError, ExperimentConfig
from fl_server.privacy.guarantee import guarantee_sentences
from fl_server.privacy.replies import dp_reply_record, refusal_text, reply_policy, reply_site, spent_in_refusal
from fl_server.privacy.wrappers import (
    SERVER_ACCOUNTANT,
    accountant_compositions,
    flower_wrapper_name,
    rebuild_accountant,
)
from fl_server.run_dir import RunDirectory
from shared_model.fileio import atomic_write_json

log = logging.getLogger("llnm.server")

LEDGER_FORMAT = "llnm-fl privacy ledger"
LEDGER_VERSION = 1


class SiteBudgetExhausted(RuntimeError):
    """The next round's site-level release would exceed ``privacy.site.max_epsilon``; the run stops."""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


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
                "adjacency": ("add or remove one patient at one site; the sample rate, steps and FedAvg weight "
                              "come from the site's public patient count, never its exact count"),
                "lifetime": ("each site also composes every run that touched its patients, on its own disk, and "
                             "refuses a round that would pass its own max-patient-epsilon; that lifetime figure "
                             "stays at the site"),
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
                # With SecAgg+ the coordinator adds the noise to the unmasked sum of the clipped updates.
                "secure_aggregation": bool(exp.federation.secure_aggregation),
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
        atomic_write_json(self.path, self.data, indent=2)

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
        comps = accountant_compositions(accountant) + [(r["noise_multiplier"], r["sites_sampled"], 1)
                                                       for r in releases]
        strategy.accountant = rebuild_accountant(accountant, accountant.config.population_size, comps)
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
            strategy.accountant = rebuild_accountant(accountant, population, comps)
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

    def _rounds_trained(self, name: str, before: int) -> int:
        """Rounds before `before` in which this run accepted a DP-SGD update of site `name`."""
        return sum(1 for e in self.data["rounds"] if e["round"] < before and e.get("complete")
                   and (e.get("sites", {}).get(name) or {}).get("status") == "trained")

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
            name = reply_site(reply, name_fn)
            if not patient_on:
                kept.append(reply)
                sites[name] = {"status": "trained", "mechanism": None, "policy": reply_policy(reply)}
                continue
            assert exp is not None
            problem, rec = dp_reply_record(reply, exp.privacy.patient, exp.train, self._rounds_trained(name, rnd))
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
            refusal = refusal_text(str(fail.get("reason", "")))
            if refusal:
                fail["reason"] = refusal  # the site's own words, not Flower's wrapping of them
            last = self._last_site_entry(fail["site"])
            rec = {"status": "refused" if refusal else "failed", "reason": refusal or fail.get("reason")}
            if patient_on:
                run_spent = spent_in_refusal(refusal) if refusal else None
                rec.update({"mechanism": "dp-sgd",
                            "epsilon": run_spent if run_spent is not None else (last or {}).get("epsilon"),
                            "steps_total": (last or {}).get("steps_total")})
                if refusal is None and last is not None:
                    rec["note"] = ("no reply: the site may have trained, so its epsilon is at least this value "
                                   "(its own ledger is authoritative)")
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

    def after_aggregate(self, rnd: int, strategy: Strategy, replies: list[Message],
                        name_fn: Callable[[int], str]) -> None:
        """Record the round's site-level release (if any) and mark the round's ledger entry complete."""
        entry = next((e for e in self.data["rounds"] if e["round"] == rnd), None)
        if entry is None:
            self.screen_replies(rnd, list(replies), [], name_fn)
            entry = next(e for e in self.data["rounds"] if e["round"] == rnd)
        entry["participants"] = sorted(reply_site(r, name_fn) for r in replies)
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
        return guarantee_sentences(self.data)
