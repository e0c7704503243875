"""The coordinator's round loop, shared by the deployed ServerApp and the simulation.

Flower's `Strategy.start` runs rounds 1..N in one go and keeps only aggregated metrics. A consortium needs
more: per-site metrics every round, a durable run directory, resume from the last complete round after a
crash, and a quorum so that one hospital going offline does not stop the others. So this loop drives a
`flwr.serverapp.strategy` strategy (FedAvg, FedProx or FedAdam, optionally inside Flower's DP wrappers)
round by round through its own `configure_train` / `aggregate_train` / `configure_evaluate`, and does the
bookkeeping itself. Talking to the sites is `site_channel`, reading their evaluations `round_evaluation`,
the console text `console`, the records `records`.

This module (and everything it imports) never reads patient files: sites return parameters and
aggregate metrics only.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fl_server.config import ExperimentConfig
from fl_server.console import explanation_lines, quorum_message, round_line, site_line
from fl_server.records import Failure, FinalRecord, MetricsFile, RoundRecord
from fl_server.round_evaluation import Evaluation, read_evaluation
from fl_server.run_dir import RunDirectory
from fl_server.site_channel import QuorumNotMet, RoundOutcome, SiteChannel, reply_site_name
from fl_server.strategies import (
    build_strategy,
    initial_state,
    restore_strategy_state,
    round_config,
    strategy_state,
)
from shared_model import protocol
from shared_model.numbers import none_if_nan

__all__ = ["Federation", "QuorumNotMet"]

log = logging.getLogger("llnm.server")


class Federation:
    """Runs (or resumes) one experiment on a Grid and records it in a RunDirectory."""

    def __init__(self, grid: Grid, exp: ExperimentConfig, run_dir: RunDirectory, *,
                 echo: bool = True) -> None:
        self.grid = grid
        self.exp = exp
        self.rd = run_dir
        self.echo = echo
        # The run's identity at the sites is the experiment's name until the run directory gives its own.
        self.sites = SiteChannel(grid, exp, run_dir.path, run_id=exp.name, say=self.say,
                                 on_refused=lambda summary: run_dir.update_run_info(rejected_nodes=summary))
        self.ledger = None
        self.tracker = None

    def say(self, text: str) -> None:
        log.info(text)
        if self.echo:
            print(text, flush=True)

    @property
    def run_id(self) -> str:
        return self.sites.run_id

    def _name(self, node_id: int) -> str:
        return self.sites.name(node_id)

    # ---- evaluation ----------------------------------------------------------------------------
    def evaluate(self, strategy: Strategy, server_round: int, arrays: ArrayRecord, split: str,
                 skip_nodes: set[int] | None = None, explain: bool = False) -> Evaluation:
        """Every connected site evaluates the global model on its `split` (see `Evaluation`). `skip_nodes`
        (sites that just failed to answer in training) are not waited for a second time in the same round."""
        nodes = list(self.grid.get_node_ids())
        config = round_config(self.exp, server_round, split=split, explain=explain, run_id=self.run_id)
        msgs = self.sites.for_accepted(strategy.configure_evaluate(server_round, arrays, config, self.grid))
        skipped = [m for m in msgs if m.metadata.dst_node_id in (skip_nodes or set())]
        msgs = [m for m in msgs if m.metadata.dst_node_id not in (skip_nodes or set())]
        outcome = self.sites.exchange(msgs, "evaluate") if msgs else RoundOutcome([], [])
        outcome.failures += [{"site": self._name(m.metadata.dst_node_id), "node_id": m.metadata.dst_node_id,
                              "phase": "evaluate", "reason": "skipped: no reply in this round's training"}
                             for m in skipped]
        for r in outcome.replies:
            self.sites.site_names.setdefault(r.metadata.src_node_id, reply_site_name(r))
        failures = outcome.failures + self.sites.offline_sites(nodes, "evaluate", outcome.failures)
        return read_evaluation(outcome.replies, failures, explain=explain, task=self.exp.task)

    # ---- the loop ------------------------------------------------------------------------------
    def run(self) -> MetricsFile:
        """Rounds from the last complete one on, then the final evaluation; returns metrics.json's content."""
        fed = self.exp.federation
        self.sites.run_id = self.rd.run_uid()
        self.rd.begin_attempt()
        start_round = self.rd.last_complete_round() + 1
        self.rd.truncate_to(start_round - 1)
        nodes = self.sites.wait_for_sites()
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

    def _run_rounds(self, strategy: Strategy, nodes: list[int], start_round: int) -> MetricsFile:
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
        self.sites.known_sites.update(server_state.get("known_sites", []))
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
        nodes = self.sites.wait_for_sites(rnd)
        if self.ledger is not None:
            self.ledger.before_round(rnd, strategy)
        config = round_config(self.exp, rnd, run_id=self.run_id)
        msgs = self.sites.for_accepted(strategy.configure_train(rnd, arrays, config, self.grid))
        secure_info: dict[str, Any] | None = None
        t_train = time.perf_counter()
        if fed.secure_aggregation:
            from fl_server.secure_aggregation import run_secure_round

            secure = run_secure_round(self.grid, self.exp, rnd, msgs, self._name)
            outcome, secure_info = RoundOutcome(secure.replies, secure.failures), secure.info
        else:
            outcome = self.sites.exchange(msgs, "train")
        failures = outcome.failures + self.sites.offline_sites(nodes, "train", outcome.failures)
        train_sites: dict[str, Any] = {}
        for r in outcome.replies:
            name = reply_site_name(r)
            self.sites.site_names.setdefault(r.metadata.src_node_id, name)
            self.sites.known_sites.add(name)
            m = r.content[protocol.METRICS_RECORD]
            train_sites[name] = {k: (none_if_nan(v) if isinstance(v, float) else v) for k, v in m.items()}
        # A site that trained nothing (a segmentation round at a site without drawn masks) answered, and counts
        # towards the quorum, but its unchanged model is neither screened nor averaged in.
        trained_nothing = [int(r.content[protocol.METRICS_RECORD].get(protocol.NUM_EXAMPLES, 1)) == 0
                           for r in outcome.replies]
        idle = sorted(self._name(r.metadata.src_node_id)
                      for r, nothing in zip(outcome.replies, trained_nothing, strict=True) if nothing)
        outcome.replies = [r for r, nothing in zip(outcome.replies, trained_nothing, strict=True) if not nothing]
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
        if len(outcome.replies) + len(idle) < fed.min_sites:
            self._record_failed_round(rnd, failures, train_sites)
            raise QuorumNotMet(quorum_message(rnd, len(outcome.replies) + len(idle), fed.min_sites, failures,
                                              self.rd.path))
        if not outcome.replies:
            self._record_failed_round(rnd, failures, train_sites)
            raise QuorumNotMet(f"round {rnd}: no site had anything to train on ({', '.join(idle)} replied with 0 "
                               "examples)" + (": no site has drawn masks in its training split"
                                              if self.exp.task == "segment" else ""))
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
            ev = Evaluation.none()
        entry: RoundRecord = {
            "round": rnd,
            "split": fed.eval_split,
            "sites": ev.sites,
            "pooled": ev.pooled,
            "train": dict(sorted(train_sites.items())),
            "failures": failures + ev.failures,
            "participants": sorted(set(train_sites) - set(idle)),
            "idle": idle,
            "aggregated": dict(sorted(aggregated.items())),
            "seconds": round(time.perf_counter() - t0, 3),
            "train_seconds": train_seconds,
        }
        if secure_info is not None:
            entry["secure_aggregation"] = secure_info
        self._save_round(rnd, new_arrays, strategy, entry)
        self.say(round_line(entry, self.exp.federation.rounds))
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
        final: FinalRecord = {"round": final_round, "model": fed.final_model, "split": fed.final_eval_split,
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
                 f"({fed.final_model}): " + site_line(ev.sites, ev.pooled))
        if explain:
            for line in explanation_lines(final["explanations"]):
                self.say(line)

    def _save_round(self, rnd: int, arrays: ArrayRecord, strategy: Strategy, entry: RoundRecord) -> None:
        rd = self.rd
        state = arrays.to_torch_state_dict()
        network = ({"task": "segment", "segmenter_config": self.exp.segmenter_architecture().to_dict()}
                   if self.exp.task == "segment"
                   else {"task": "llnm", "model_config": self.exp.architecture().to_dict()})
        rd.save_checkpoint(rnd, state, {
            **network,
            "preprocess_config": self.exp.preprocess.to_dict(),
            "experiment": self.exp.name,
            "split": entry["split"],
            "pooled": entry["pooled"],
        })
        info, np_arrays = strategy_state(strategy)
        server_state: dict[str, Any] = {"round": rnd, **info, "known_sites": sorted(self.sites.known_sites)}
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

    def _record_failed_round(self, rnd: int, failures: list[Failure], train_sites: dict[str, Any]) -> None:
        self.rd.update_run_info(status="stopped", stopped_at_round=rnd, failures=failures,
                                trained_sites=sorted(train_sites))
