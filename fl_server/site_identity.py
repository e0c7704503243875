"""Which connected SuperNode is which hospital, and which nodes are refused.

A site reports its name in the reply to the coordinator's `query`; with SuperNode authentication the
SuperLink also knows the name the coordinator registered the node's key under (`llnm-server
register-site`). The registered name is authoritative:

* a node whose claimed name differs from its registered one is refused (a registered hospital presenting
  another hospital's name with its own key);
* a node claiming a name that another connected node already holds is refused (a second SuperNode pointed
  at a copy of a site's folder would otherwise count that site's patients twice);
* on a SuperLink without node authentication (loopback development) only the second rule can apply.

A refused node gets no training or evaluation message in this run, so nothing it sends is ever merged into
a site's metrics or the global model; each refusal is logged once and kept in run.json.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("llnm.server")


@dataclass
class SiteRoster:
    names: dict[int, str] = field(default_factory=dict)
    registered: dict[int, str] = field(default_factory=dict)
    rejected: dict[int, dict[str, Any]] = field(default_factory=dict)

    def note_registered(self, nodes: Iterable[Any]) -> None:
        """Registered names from the SuperLink's node list (empty without node authentication)."""
        for info in nodes:
            name = str(getattr(info, "name", "") or "")
            if name:
                self.registered[int(info.node_id)] = name

    def admit(self, node_id: int, claimed: str, connected: Iterable[int]) -> str | None:
        """Bind `node_id` to `claimed`, or return why it is refused (and remember the refusal)."""
        if node_id in self.rejected:
            return str(self.rejected[node_id]["reason"])
        registered = self.registered.get(node_id)
        reason = None
        if registered and claimed != registered:
            reason = (f"node {node_id} is registered as {registered!r} but claims to be {claimed!r}; a site's name "
                      "is bound to its registered key")
        else:
            live = set(connected)
            holder = next((n for n, name in self.names.items() if name == claimed and n != node_id and n in live),
                          None)
            if holder is not None:
                reason = (f"node {node_id} claims site name {claimed!r}, which node {holder} already holds in this "
                          "run; a second node with one site's name (e.g. a copy of its folder) is never merged "
                          "into that site's metrics")
        if reason:
            self.rejected[node_id] = {"node_id": node_id, "claimed": claimed, "registered": registered,
                                      "reason": reason}
            log.warning("refused node: %s", reason)
            return reason
        self.names[node_id] = claimed
        return None

    def accepted(self, nodes: Iterable[int]) -> list[int]:
        return [n for n in nodes if n not in self.rejected]

    def summary(self) -> list[dict[str, Any]]:
        return list(self.rejected.values())
