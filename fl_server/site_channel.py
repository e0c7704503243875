"""`SiteChannel`: how the coordinator talks to the consortium's SuperNodes through a Flower Grid.

It knows which connected node is which site (and refuses impostors, `site_identity`), waits for a quorum,
sends one phase's messages and sorts the replies from the failures, naming each failure's site and saying
why in words. It holds no model and no metrics.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fl_server.config import ExperimentConfig
from fl_server.privacy.replies import refusal_text
from fl_server.records import Failure
from fl_server.site_identity import SiteRoster
from shared_model import protocol

__all__ = ["PROGRESS_EVERY_S", "QuorumNotMet", "RoundOutcome", "SiteChannel", "describe_error", "reply_site_name"]

log = logging.getLogger("llnm.server")

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
    failures: list[Failure]



def reply_site_name(reply: Message) -> str:
    """The site name a reply carries (a site's own name; `site_identity` checked it at the first query)."""
    return str(reply.content[protocol.SITE_RECORD][protocol.SITE_NAME])


class SiteChannel:
    """The sites of one run, reached through a Grid."""

    def __init__(self, grid: Grid, exp: ExperimentConfig, run_path: Path, *, run_id: str,
                 say: Callable[[str], None], on_refused: Callable[[dict], None]) -> None:
        self.grid = grid
        self.exp = exp
        self.run_path = run_path
        self.run_id = run_id
        self.say = say
        self.on_refused = on_refused  # told the roster's refusals whenever a node is refused
        self.roster = SiteRoster()
        self.site_names: dict[int, str] = self.roster.names
        self.known_sites: set[str] = set()

    def name(self, node_id: int) -> str:
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
                    f"{self.run_path}` goes on from round {rnd}.")
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
            name = reply_site_name(reply)
            reason = self.roster.admit(reply.metadata.src_node_id, name, nodes)
            if reason:
                refused = True
                self.say(f"[llnm] refused {reason}")
                continue
            self.known_sites.add(name)
        if refused:
            self.on_refused(self.roster.summary())

    def for_accepted(self, messages: Iterable[Message]) -> list[Message]:
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
        failures: list[Failure] = []
        while pending and time.monotonic() < deadline:
            if time.monotonic() >= next_note:
                # A phase can take minutes (a final evaluation with explanations, a first round at a large site):
                # say how far it is, so that a quiet console is never mistaken for a hang.
                waiting = sorted(self.name(node_of[m]) for m in pending)
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
                    failures.append({"site": self.name(node), "node_id": node, "phase": phase,
                                     "reason": policy or describe_error(r.error.code, r.error.reason)})
                else:
                    ok.append(r)
            if pending:
                time.sleep(1.0)
        for mid in pending:
            node = node_of[mid]
            failures.append({"site": self.name(node), "node_id": node, "phase": phase,
                             "reason": f"no reply within {fed.round_timeout_s:.0f} s (timed out or disconnected)"})
        return RoundOutcome(ok, failures)

    def offline_sites(self, nodes: Iterable[int], phase: str,
                      already: Iterable[Failure] = ()) -> list[Failure]:
        """Known sites not connected now, except those `already` recorded as failed in this phase (a site
        that dropped mid-round is one failure, not two)."""
        online = {self.site_names.get(n) for n in nodes}
        recorded = {f["site"] for f in already}
        return [{"site": s, "node_id": None, "phase": phase, "reason": "offline (not connected)"}
                for s in sorted(self.known_sites - online - recorded)]
