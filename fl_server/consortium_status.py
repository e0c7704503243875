"""Who is in the consortium right now (`llnm-server status --provision DIR`): for each site of the consortium
file, whether its key is registered or revoked and whether its SuperNode is connected to the SuperLink, plus
the connections the SuperLink refused. The coordinator checks this before `llnm-server run`.

The connection state is Flower's (`flwr supernode ls` over the control API); the names come from
`registry.json`, since Flower knows a node by its id only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fl_server.consortium import load_consortium
from fl_server.control import flwr_json, require_provisioned
from fl_server.provisioning import CONSORTIUM_FILE
from fl_server.site_registry import SiteRegistry
from fl_server.superlink_events import read_refusals, refusal_lines, summarise_refusals
from shared_model.config import ConfigError

__all__ = ["consortium_lines", "consortium_status"]


def consortium_status(provision_dir: str | Path) -> dict[str, Any]:
    """Every site of the consortium with its registration and connection, and the refused connections. When
    the SuperLink cannot be asked, the connections are None and `superlink_error` says why."""
    provision_dir = Path(provision_dir)
    require_provisioned(provision_dir)
    consortium = load_consortium(provision_dir / CONSORTIUM_FILE)
    registry = SiteRegistry(provision_dir)
    nodes: dict[int, dict[str, Any]] | None = None
    superlink_error = None
    try:
        answer = flwr_json(provision_dir, ["supernode", "ls"])
        nodes = {int(n["node-id"]): n for n in answer.get("nodes", [])}
    except ConfigError as exc:
        # Flower's answer ends with the reason, after lines about what it was doing.
        superlink_error = [line.strip() for line in str(exc).splitlines() if line.strip()][-1]
    sites = {}
    for name in consortium.sites:
        entry = registry.sites.get(name) or {}
        revoked = bool(entry.get("revoked_at"))
        node = (nodes or {}).get(int(entry["node_id"])) if entry.get("node_id") is not None else None
        sites[name] = {
            "registered": bool(entry) and not revoked,
            "fingerprint": entry.get("fingerprint"),
            "registered_at": entry.get("registered_at"),
            "revoked_at": entry.get("revoked_at"),
            "node_id": entry.get("node_id"),
            "connection": _connection(entry, revoked, node, nodes),
        }
    return {
        "consortium": consortium.name,
        "superlink": consortium.superlink.address,
        "superlink_error": superlink_error,
        "sites": sites,
        "refused_connections": summarise_refusals(read_refusals(provision_dir)),
    }


def _connection(entry: dict[str, Any], revoked: bool, node: dict[str, Any] | None,
                nodes: dict[int, dict[str, Any]] | None) -> str | None:
    """One phrase for the site's SuperNode as the SuperLink sees it."""
    if not entry:
        return "not registered: waiting for its public key (llnm-server register-site)"
    if revoked:
        return "revoked: its SuperNode is refused"
    if nodes is None:
        return None
    if node is None:
        return "unknown to the SuperLink: start it with llnm-server start, which registers every site again"
    status = str(node.get("status", "unknown"))
    if status == "online":
        return f"online since {node.get('online-at')}"
    if status == "offline":
        return f"offline since {node.get('offline-at')}"
    if status == "registered":
        return "registered, never connected: the site has not joined yet"
    return status


def consortium_lines(status: dict[str, Any]) -> list[str]:
    """The text `llnm-server status --provision DIR` prints."""
    from shared_model.text_table import format_table

    sites = status["sites"]
    registered = sum(s["registered"] for s in sites.values())
    online = sum(bool(s["connection"] and s["connection"].startswith("online")) for s in sites.values())
    head = f"consortium {status['consortium']}, SuperLink {status['superlink']}: {len(sites)} site(s), " \
           f"{registered} registered"
    lines = [head + (f", {online} online" if status["superlink_error"] is None else "")]
    if status["superlink_error"] is not None:
        lines.append(f"the SuperLink could not be asked who is connected ({status['superlink_error']}); is "
                     "`llnm-server start` running?")
    rows = [[name, s["fingerprint"] or "-", s["connection"] or "-"] for name, s in sites.items()]
    lines += format_table(["site", "key", "connection"], rows, indent=2, text_columns=3)
    lines += refusal_lines(status["refused_connections"])
    return lines
