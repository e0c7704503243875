"""The coordinator's round loop, shared by the deployed ServerApp and the simulation.

Flower's `Strategy.start` runs rounds 1..N in one go and keeps only aggregated metrics. A consortium needs
more: per-site metrics every round, a durable run directory, resume from the last complete round after a
crash, and a quorum so that one hospital going offline does not stop the others. So this loop drives a
`flwr.serverapp.strategy` strategy (FedAvg, FedProx or FedAdam, optionally inside Flower's DP wrappers)
round by round through its own `configure_train` / `aggregate_train` / `configure_evaluate`, and does the
bookkeeping itself.

This module (and everything it imports) never reads patient files: sites return parameters and
aggregate metrics only.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fl_server.config import ExperimentConfig
from fl_server.privacy.replies import refusal_text
from fl_server.run_dir import RunDirectory
from fl_server.site_identity import SiteRoster
from fl_server.strategies import (
    build_strategy,
    initial_state,
    restore_strategy_state,
    round_config,
    strategy_state,
)
from shared_model import protocol
from shared_model.numbers import none_if_nan

log = logging.getLogger("llnm.server")

def quorum_message(rnd: int, trained: int, min_sites: int, failures: list[dict[str, Any]], run_path: object) -> str:
    """Why a round stopped the run, and what can actually be done next.

    A site that refused under its own privacy budget or policy will refuse a resumed round too, so resuming is
    only suggested when some failures were something else (a crash, a timeout, an unreachable site).
    """
    unapproved = sorted({f["site"] for f in failures if "runs only apps it approved" in str(f.get("reason", ""))})
    refused = sorted({f["site"] for f in failures if str(f.get("reason", "")).startswith(
        (protocol.REFUSAL_MARKER, protocol.POLICY_REFUSAL_MARKER))} - set(unapproved))
    other = sorted({f["site"] for f in failures} - set(refused) - set(unapproved))
    text = (f"round {rnd}: {trained} site(s) trained, fewer than min_sites={min_sites}; "
            f"failures: {json.dumps(failures)}.")
    if unapproved:
        text += (f" {', '.join(unapproved)} have not approved this app yet: once they have (`llnm-site approve "
                 f"HASH`, the hash `llnm-server app-hash` prints), `llnm-server resume {run_path}` goes on.")
    if refused:
        text += (f" {', '.join(refused)} refused under their own privacy budget or policy (their messages say "
                 "which rule); resuming this run cannot change that: start a new experiment that fits their "
                 "policies, or run with fewer sites (federation.min_sites).")
    if other:
        text += f" Fix {', '.join(other)} and run `llnm-server resume {run_path}`."
    return text


#: What a Flower error code means for a consortium, in words (flwr.common.constant.ErrorCode).
_FLOWER_ERRORS = {
    5: "unreachable: its SuperNode stopped sending heartbeats (disconnected, stopped or its machine is down)",
    3: "the message expired before the site could take it",
    4: "its reply expired before the coordinator could take it",
    8: "its ClientApp process crashed (out of memory, killed)",
    1: "its ClientApp could not be loaded (is the site on the app version the coordinator runs?)",
    6: "a Flower mod refused the message",
    7: "the app bundle was not valid at the site",
}


def describe_error(code: int, reason: str) -> str:
    """A failure's reason: what Flower's error code means, then Flower's own text."""
    meaning = _FLOWER_ERRORS.get(int(code))
    text = " ".join(str(reason).split())
    return f"{meaning} (Flower: {text})" if meaning else f"error: {text}"


#: How often a phase still waiting for sites says so on the console.
PROGRESS_EVERY_S = 60.0


class QuorumNotMet(RuntimeError):
    """Fewer sites than `federation.min_sites` replied in a round; the run stops and can be resumed."""


@dataclass
class RoundOutcome:
    replies: list[Message]
    failures: list[dict[str, Any]]


@dataclass
class Evaluation:
    """What the sites' evaluate replies held: per-site metrics, pooled metrics merged from their score
    histograms, the failures, the histograms, and (final evaluation with `evaluation.explain`) the sites'
    explanation aggregates and why any site withheld them."""

    sites: dict[str, Any]
    pooled: dict[str, Any]
    failures: list[dict[str, Any]]
    histograms: dict[str, Any]
    explanations: dict[str, Any]
    withheld: dict[str, str]


class Federation:
    """Runs (or resumes) one experiment on a Grid and records it in a RunDirectory."""

    def __init__(self, grid: Grid, exp: ExperimentConfig, run_dir: RunDirectory, *,
                 echo: bool = True) -> None:
        self.grid = grid
        self.exp = exp
        self.rd = run_dir
        self.echo = echo
        self.roster = SiteRoster()
        self.site_names: dict[int, str] = self.roster.names
        self.known_sites: set[str] = set()
        self.ledger = None
        self.tracker = None
        self.run_id = exp.name  # the run's identity at the sites, from its run directory once it runs

    # ---- helpers -------------------------------------------------------------------------------
    def say(self, text: str) -> None:
        log.info(text)
        if self.echo:
            print(text, flush=True)

    def _name(self, node_id: int) -> str:
        """The site's own name, else the name its key is registered under, else the node id."""
        return self.site_names.get(node_id) or self.roster.registered.get(node_id) or f"node-{node_id}"

    def wait_for_sites(self, rnd: int | None = None) -> list[int]:
        """The connected nodes this run accepts (named, not refused), once there are `min_sites` of them
        (before round `rnd`, which the error names)."""
        fed = self.exp.federation
        deadline = time.monotonic() + fed.connect_timeout_s
        while True:
            nodes = list(self.grid.get_node_ids())
            self.refresh_site_names(nodes)
            accepted = self.roster.accepted(nodes)
            if len(accepted) >= fed.min_sites:
                return accepted
            if time.monotonic() > deadline:
                refused = f" ({len(nodes) - len(accepted)} node(s) refused, see run.json)" if self.roster.rejected \
                    else ""
                before = "" if rnd is None else f"round {rnd}: "
                kept = "" if not rnd or rnd <= 1 else (
                    f" Rounds 1-{rnd - 1} are kept; once enough sites are back, `llnm-server resume "
                    f"{self.rd.path}` goes on from round {rnd}.")
                raise QuorumNotMet(
                    f"{before}only {len(accepted)} site(s) connected after {fed.connect_timeout_s:.0f} s{refused}; "
                    f"federation.min_sites is {fed.min_sites}.{kept}"
                )
            time.sleep(1.0)

    def refresh_site_names(self, nodes: Iterable[int]) -> None:
        """Ask newly seen SuperNodes for their site name (a `query` message; nothing else is asked) and bind
        each to it, refusing a node whose name is not its registered one or is already held (site_identity)."""
        nodes = list(nodes)
        new = [n for n in nodes if n not in self.site_names and n not in self.roster.rejected]
        if not new:
            return
        self.roster.note_registered(self.grid.get_nodes())
        # The experiment's name travels with the query too, so that a site's audit log files it under the run.
        ask = ConfigRecord({protocol.QUERY_ASK: protocol.ASK_SITE_NAME, protocol.RUN_ID: self.run_id})
        msgs = [Message(RecordDict({protocol.CONFIG_RECORD: ask}), dst_node_id=n, message_type="query")
                for n in new]
        refused = False
        for reply in self.grid.send_and_receive(msgs, timeout=min(120.0, self.exp.federation.round_timeout_s)):
            if reply.has_error():
                continue
            name = _reply_site_name(reply)
            reason = self.roster.admit(reply.metadata.src_node_id, name, nodes)
            if reason:
                refused = True
                self.say(f"[llnm] refused {reason}")
                continue
            self.known_sites.add(name)
        if refused:
            self.rd.update_run_info(rejected_nodes=self.roster.summary())

    def _for_accepted(self, messages: Iterable[Message]) -> list[Message]:
        return [m for m in messages if m.metadata.dst_node_id not in self.roster.rejected]

    def exchange(self, messages: list[Message], phase: str) -> RoundOutcome:
        """Send, wait up to the round timeout, and sort replies from failures (errors, timeouts).

        Our own push/pull loop rather than `Grid.send_and_receive`: an error reply that the SuperLink
        generates for a node (unavailable, upload expired) does not come from that node, so failures are
        attributed through the id of the message they answer.
        """
        fed = self.exp.federation
        if not messages:
            return RoundOutcome([], [])
        dst = [m.metadata.dst_node_id for m in messages]
        ids = list(self.grid.push_messages(messages))
        node_of = dict(zip(ids, dst, strict=True))
        pending = set(ids)
        started = time.monotonic()
        deadline = started + fed.round_timeout_s
        next_note = started + PROGRESS_EVERY_S
        ok: list[Message] = []
        failures: list[dict[str, Any]] = []
        while pending and time.monotonic() < deadline:
            if time.monotonic() >= next_note:
                # A phase can take minutes (a final evaluation with explanations, a first round at a large site):
                # say how far it is, so that a quiet console is never mistaken for a hang.
                waiting = sorted(self._name(node_of[m]) for m in pending)
                self.say(f"[llnm] {phase}: {len(ok) + len(failures)} of {len(ids)} site(s) answered after "
                         f"{time.monotonic() - started:.0f} s; waiting for {', '.join(waiting)} (timeout "
                         f"{fed.round_timeout_s:.0f} s)")
                next_note += PROGRESS_EVERY_S
            for r in self.grid.pull_messages(list(pending)):
                mid = r.metadata.reply_to_message_id
                if mid not in pending:
                    continue
                pending.discard(mid)
                node = node_of[mid]
                if r.has_error():
                    # A refusal under the site's own policy is recorded in the site's words.
                    policy = refusal_text(r.error.reason, protocol.POLICY_REFUSAL_MARKER)
                    failures.append({"site": self._name(node), "node_id": node, "phase": phase,
                                     "reason": policy or describe_error(r.error.code, r.error.reason)})
                else:
                    ok.append(r)
            if pending:
                time.sleep(1.0)
        for mid in pending:
            node = node_of[mid]
            failures.append({"site": self._name(node), "node_id": node, "phase": phase,
                             "reason": f"no reply within {fed.round_timeout_s:.0f} s (timed out or disconnected)"})
        return RoundOutcome(ok, failures)

    def offline_sites(self, nodes: Iterable[int], phase: str,
                      already: Iterable[dict[str, Any]] = ()) -> list[dict[str, Any]]:
        """Known sites not connected now, except those `already` recorded as failed in this phase (a site
        that dropped mid-round is one failure, not two)."""
        online = {self.site_names.get(n) for n in nodes}
        recorded = {f["site"] for f in already}
        return [{"site": s, "node_id": None, "phase": phase, "reason": "offline (not connected)"}
                for s in sorted(self.known_sites - online - recorded)]

    # ---- evaluation ----------------------------------------------------------------------------
    def evaluate(self, strategy: Strategy, server_round: int, arrays: ArrayRecord, split: str,
                 skip_nodes: set[int] | None = None, explain: bool = False) -> Evaluation:
        """Every connected site evaluates the global model on its `split`; per-site metrics plus pooled
        metrics merged exactly from the sites' score histograms (see `Evaluation`). `skip_nodes` (sites that
        just failed to answer in training) are not waited for a second time in the same round."""
        from shared_model.evaluation.metrics import metrics_from_histograms

        nodes = list(self.grid.get_node_ids())
        config = round_config(self.exp, server_round, split=split, explain=explain, run_id=self.run_id)
        msgs = self._for_accepted(strategy.configure_evaluate(server_round, arrays, config, self.grid))
        skipped = [m for m in msgs if m.metadata.dst_node_id in (skip_nodes or set())]
        msgs = [m for m in msgs if m.metadata.dst_node_id not in (skip_nodes or set())]
        outcome = self.exchange(msgs, "evaluate") if msgs else RoundOutcome([], [])
        outcome.failures += [{"site": self._name(m.metadata.dst_node_id), "node_id": m.metadata.dst_node_id,
                              "phase": "evaluate", "reason": "skipped: no reply in this round's training"}
                             for m in skipped]
        sites: dict[str, Any] = {}
        hists: dict[str, Any] = {}
        explanations: dict[str, Any] = {}
        withheld: dict[str, str] = {}
        for r in outcome.replies:
            name = _reply_site_name(r)
            self.site_names.setdefault(r.metadata.src_node_id, name)
            record = r.content[protocol.METRICS_RECORD]
            sites[name], hists[name] = protocol.decode_eval_metrics(record)
            population = protocol.decode_population(record)
            if population is not None:
                sites[name]["population"] = population
            stage = protocol.decode_stage_metrics(record)
            if stage is not None:
                sites[name]["risk_stage"] = stage
            explanation = protocol.decode_explanation(record)
            if explanation is not None:
                explanations[name] = explanation
            site_record = r.content[protocol.SITE_RECORD]
            if explain and protocol.EXPLAIN_WITHHELD in site_record:
                withheld[name] = str(site_record[protocol.EXPLAIN_WITHHELD])
        pooled = metrics_from_histograms(list(hists.values())) if hists else {}
        pooled = {k: none_if_nan(v) if isinstance(v, float) else v for k, v in pooled.items()}
        failures = outcome.failures + self.offline_sites(nodes, "evaluate", outcome.failures)
        return Evaluation(dict(sorted(sites.items())), pooled, failures, dict(sorted(hists.items())),
                          dict(sorted(explanations.items())), withheld)

    # ---- the loop ------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Rounds from the last complete one on, then the final evaluation; returns metrics.json's content."""
        fed = self.exp.federation
        self.run_id = self.rd.run_uid()
        self.rd.begin_attempt()
        start_round = self.rd.last_complete_round() + 1
        self.rd.truncate_to(start_round - 1)
        nodes = self.wait_for_sites()
        strategy = build_strategy(self.exp, num_sites_expected=max(len(nodes), fed.min_sites))
        if self.exp.privacy.patient.enabled or self.exp.privacy.site.enabled:
            from fl_server.privacy import PrivacyLedger

            self.ledger = PrivacyLedger.open(self.rd, self.exp)
            self.ledger.truncate_to(start_round - 1)
            self.ledger.attach(strategy)
        from fl_server.tracking import open_tracker

        track = self.exp.tracking
        log_dir = Path(track.log_dir) if track.log_dir else self.rd.path / "tensorboard"
        self.tracker = open_tracker(track.backend, log_dir, start_round)
        try:
            return self._run_rounds(strategy, nodes, start_round)
        finally:
            if self.tracker is not None:
                self.tracker.close()

    def _run_rounds(self, strategy: Strategy, nodes: list[int], start_round: int) -> dict[str, Any]:
        fed = self.exp.federation
        if start_round == 1:
            arrays = ArrayRecord(initial_state(self.exp))
            self.say(f"[llnm] run {self.exp.name}: {fed.rounds} rounds of {fed.strategy}, "
                     f"{len(nodes)} site(s) connected (quorum {fed.min_sites})")
        else:
            arrays = self._restore(start_round - 1, strategy)
        for rnd in range(start_round, fed.rounds + 1):
            arrays = self._train_round(rnd, strategy, arrays)
        if fed.final_eval_split:
            self._final_evaluation(strategy, arrays)
        self.rd.update_run_info(status="completed", rounds_completed=fed.rounds)
        if self.ledger is not None:
            for sentence in self.ledger.guarantee_sentences():
                self.say(f"[llnm] privacy: {sentence}")
        self.say(f"[llnm] run directory: {self.rd.path}")
        return self.rd.metrics()

    def _restore(self, last_round: int, strategy: Strategy) -> ArrayRecord:
        """The global model, strategy state, known sites and privacy state after `last_round`."""
        rd = self.rd
        loaded = rd.load_checkpoint(last_round)
        # safetensors stores keys sorted; keep the model's own order, which Flower's DP clipping (server
        # wrapper and client mods) pairs positionally with the arrays the sites send back.
        state = {k: loaded[k] for k in initial_state(self.exp)}
        server_state = rd.load_server_state(last_round)
        arrays_file = server_state.get("arrays_file")
        if arrays_file:
            from safetensors.numpy import load_file as load_np

            restore_strategy_state(strategy, load_np(str(rd.checkpoints / arrays_file)))
        self.known_sites.update(server_state.get("known_sites", []))
        if self.ledger is not None:
            self.ledger.restore(strategy, server_state.get("privacy", {}))
        total = self.exp.federation.rounds
        if last_round >= total:
            self.say(f"[llnm] resuming run {self.exp.name}: all {total} rounds kept; the final evaluation is left")
        else:
            self.say(f"[llnm] resuming run {self.exp.name} at round {last_round + 1}/{total} "
                     f"(rounds 1-{last_round} kept)")
        return ArrayRecord(state)

    def _train_round(self, rnd: int, strategy: Strategy, arrays: ArrayRecord) -> ArrayRecord:
        """One round: train at every connected site, aggregate, evaluate, save; returns the new model."""
        fed = self.exp.federation
        t0 = time.perf_counter()
        nodes = self.wait_for_sites(rnd)
        if self.ledger is not None:
            self.ledger.before_round(rnd, strategy)
        msgs = self._for_accepted(strategy.configure_train(rnd, arrays, round_config(self.exp, rnd, run_id=self.run_id),
                                                           self.grid))
        secure_info: dict[str, Any] | None = None
        t_train = time.perf_counter()
        if fed.secure_aggregation:
            from fl_server.secure_aggregation import run_secure_round

            secure = run_secure_round(self.grid, self.exp, rnd, msgs, self._name)
            outcome, secure_info = RoundOutcome(secure.replies, secure.failures), secure.info
        else:
            outcome = self.exchange(msgs, "train")
        failures = outcome.failures + self.offline_sites(nodes, "train", outcome.failures)
        train_sites: dict[str, Any] = {}
        for r in outcome.replies:
            name = _reply_site_name(r)
            self.site_names.setdefault(r.metadata.src_node_id, name)
            self.known_sites.add(name)
            m = r.content[protocol.METRICS_RECORD]
            train_sites[name] = {k: (none_if_nan(v) if isinstance(v, float) else v) for k, v in m.items()}
        if self.ledger is not None:
            outcome.replies = self.ledger.screen_replies(rnd, outcome.replies, failures, self._name)
        if not fed.secure_aggregation:
            from fl_server.update_screen import screen_updates

            reference = {k: v.numpy() for k, v in arrays.items()}
            outcome.replies, rejected = screen_updates(
                outcome.replies, reference, run_id=self.run_id, server_round=rnd,
                name_of=lambda r: self._name(r.metadata.src_node_id), max_norm=fed.max_update_norm,
                max_norm_ratio=fed.max_update_norm_ratio, transport=fed.update_transport)
            for failure in rejected:
                self.say(f"[llnm] round {rnd}: {failure['site']}: {failure['reason']}")
            failures += rejected
        if len(outcome.replies) < fed.min_sites:
            self._record_failed_round(rnd, failures, train_sites)
            raise QuorumNotMet(quorum_message(rnd, len(outcome.replies), fed.min_sites, failures, self.rd.path))
        # Which instruction each aggregated update answers: a reply can only be one to this round's messages.
        aggregated = {self._name(r.metadata.src_node_id): str(r.metadata.reply_to_message_id)
                      for r in outcome.replies}
        new_arrays, _ = strategy.aggregate_train(rnd, outcome.replies)
        if new_arrays is None:
            self._record_failed_round(rnd, failures, train_sites)
            raise QuorumNotMet(f"round {rnd}: aggregation produced no model (see log)")
        if self.ledger is not None:
            self.ledger.after_aggregate(rnd, strategy, outcome.replies, self._name)
        train_seconds = round(time.perf_counter() - t_train, 3)

        unresponsive = {f["node_id"] for f in outcome.failures if f["reason"].startswith("no reply")}
        if rnd % fed.eval_every == 0 or rnd == fed.rounds:
            ev = self.evaluate(strategy, rnd, new_arrays, fed.eval_split, unresponsive)
        else:  # federation.eval_every: no evaluation this round (each costs every site a pass over its split)
            ev = Evaluation({}, {}, [], {}, {}, {})
        entry = {
            "round": rnd,
            "split": fed.eval_split,
            "sites": ev.sites,
            "pooled": ev.pooled,
            "train": dict(sorted(train_sites.items())),
            "failures": failures + ev.failures,
            "participants": sorted(train_sites),
            "aggregated": dict(sorted(aggregated.items())),
            "seconds": round(time.perf_counter() - t0, 3),
            "train_seconds": train_seconds,
        }
        if secure_info is not None:
            entry["secure_aggregation"] = secure_info
        self._save_round(rnd, new_arrays, strategy, entry)
        self._print_round(entry)
        return new_arrays

    def _final_evaluation(self, strategy: Strategy, arrays: ArrayRecord) -> None:
        """Every site evaluates the chosen global model (best on validation, or the last) on the final split."""
        fed = self.exp.federation
        final_round = fed.rounds
        best = self.rd.metrics().get("best_round")
        if fed.final_model == "best" and best is not None:
            final_round = int(best)
            arrays = ArrayRecord(self.rd.load_checkpoint(final_round))
        explain = self.exp.evaluation.explain
        self.say(f"[llnm] final {fed.final_eval_split} evaluation of the round-{final_round} model ({fed.final_model}) "
                 "at every site" + (": each site also explains it (integrated gradients over its patients; this can "
                                    "take minutes)" if explain else ""))
        ev = self.evaluate(strategy, fed.rounds, arrays, fed.final_eval_split, explain=explain)
        # The sites' score histograms (what they sent, at the resolution their policy allows) are kept for the
        # final model only: per-site ROC, calibration and decision curves are drawn from them.
        final: dict[str, Any] = {"round": final_round, "model": fed.final_model, "split": fed.final_eval_split,
                                 "sites": ev.sites, "pooled": ev.pooled, "failures": ev.failures,
                                 "histograms": ev.histograms}
        if explain:
            from shared_model.evaluation.explanation import combine_site_explanations

            final["explanations"] = {**combine_site_explanations(ev.explanations, self.exp.preprocess.inputs),
                                     "withheld": ev.withheld}
        self.rd.set_final(final)
        if self.tracker is not None:
            self.tracker.log_final(final)
        self.say(f"[llnm] final {fed.final_eval_split} evaluation of the round-{final_round} model "
                 f"({fed.final_model}): " + _site_line(ev.sites, ev.pooled))
        if explain:
            self._print_explanation(final["explanations"])

    def _print_explanation(self, expl: dict[str, Any]) -> None:
        if expl.get("paper_group_shares"):
            ours = ", ".join(f"{g} {v:.1%}" for g, v in expl["paper_group_shares"].items())
            paper = ", ".join(f"{g} {v:.1%}" for g, v in expl["paper_shares"].items())
            self.say(f"[llnm] feature-group shares (integrated gradients): {ours} | paper: {paper}")
        if expl.get("capsule"):
            rates = ", ".join(f"{b['bin']} {_fmt(b['observed_rate'])} observed / {_fmt(b['mean_probability'])} "
                              f"predicted (n={b['n']})" for b in expl["capsule"])
            self.say(f"[llnm] LLNM rate by capsule distance: {rates}")
        for site, why in expl.get("withheld", {}).items():
            self.say(f"[llnm] {site} sent no explanation: {why}")

    def _save_round(self, rnd: int, arrays: ArrayRecord, strategy: Strategy, entry: dict[str, Any]) -> None:
        rd = self.rd
        state = arrays.to_torch_state_dict()
        rd.save_checkpoint(rnd, state, {
            "model_config": self.exp.architecture().to_dict(),
            "preprocess_config": self.exp.preprocess.to_dict(),
            "experiment": self.exp.name,
            "split": entry["split"],
            "pooled": entry["pooled"],
        })
        info, np_arrays = strategy_state(strategy)
        server_state: dict[str, Any] = {"round": rnd, **info, "known_sites": sorted(self.known_sites)}
        if np_arrays:
            from safetensors.numpy import save_file as save_np

            fname = f"server-state-{rnd:04d}.safetensors"
            save_np({k: np.ascontiguousarray(v) for k, v in np_arrays.items()}, str(rd.checkpoints / fname))
            server_state["arrays_file"] = fname
        if self.ledger is not None:
            server_state["privacy"] = self.ledger.state(strategy)
        rd.save_server_state(rnd, server_state)
        rd.append_round(entry)
        rd.update_run_info(status="running", rounds_completed=rnd)
        if self.tracker is not None:
            privacy = None
            if self.ledger is not None:
                privacy = next((e for e in self.ledger.data["rounds"] if e["round"] == rnd), None)
            self.tracker.log_round(entry, privacy)

    def _record_failed_round(self, rnd: int, failures: list[dict[str, Any]], train_sites: dict[str, Any]) -> None:
        self.rd.update_run_info(status="stopped", stopped_at_round=rnd, failures=failures,
                                trained_sites=sorted(train_sites))

    def _print_round(self, entry: dict[str, Any]) -> None:
        fails = "; ".join(f"{f['site']} {f['phase']}: {f['reason']}" for f in entry["failures"])
        metrics = (f"{entry['split']} " + _site_line(entry["sites"], entry["pooled"]) if entry["sites"]
                   else f"trained by {len(entry['participants'])} site(s), not evaluated (federation.eval_every)")
        self.say(f"[llnm] round {entry['round']}/{self.exp.federation.rounds} ({entry['seconds']:.0f} s) "
                 + metrics + (f" | failed: {fails}" if fails else ""))


def _fmt(v: Any) -> str:
    return "  -  " if v is None else f"{v:.3f}"


def _site_line(sites: dict[str, Any], pooled: dict[str, Any]) -> str:
    parts = [f"{name} {_fmt(m.get('auc'))}" for name, m in sites.items()]
    return "AUC " + ", ".join(parts) + f" | pooled {_fmt(pooled.get('auc'))}"


def _reply_site_name(reply: Message) -> str:
    return str(reply.content[protocol.SITE_RECORD][protocol.SITE_NAME])
