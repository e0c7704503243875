"""Connection attempts the SuperLink refused, as records the coordinator can read.

Flower's SuperLink refuses a SuperNode whose key is not registered (never was, or was revoked) with one error
line in its own log, which nobody reads. `llnm-server start` hands every line of that log to a `RefusalWatch`,
which appends each refusal to PROVISION_DIR/superlink-events.jsonl with the key's fingerprint and, when the
registry knows it, the site it belonged to. `llnm-server status` and the run's `run.json` (written when
`llnm-server run` ends) summarise the attempts made during the run: how often each key tried, first and last.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fl_server.records import timestamp
from fl_server.site_registry import SiteRegistry

__all__ = ["EVENTS_FILE", "RefusalWatch", "read_refusals", "refusal_lines", "summarise_refusals"]

EVENTS_FILE = "superlink-events.jsonl"

# The SuperLink's line for an activation it refused: Flower's FLEET_NODE_ACTIVATION_FAILED (ApiError 2004),
# with the PEM of the key that tried, its newlines escaped.
_REFUSED = re.compile(r"activate-node\]\[ApiError:(\d+)\].*?public key: b'(-----BEGIN PUBLIC KEY-----.+?"
                      r"-----END PUBLIC KEY-----)(?:\\n)?'(?:, exception: (.*))?")


def _fingerprint(pem: str) -> str | None:
    """The key's SHA256 fingerprint as `llnm-site keygen` and the registry write it, None if not a key."""
    from cryptography.hazmat.primitives import serialization

    from shared_model.protocol.site_kit import public_key_fingerprint

    try:
        key = serialization.load_pem_public_key(pem.replace("\\n", "\n").encode())
        line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    except (ValueError, TypeError):
        return None
    return public_key_fingerprint(line)


class RefusalWatch:
    """Called with each line of the SuperLink's output; records the refused activations."""

    def __init__(self, provision_dir: Path) -> None:
        self.provision_dir = Path(provision_dir)
        self.path = self.provision_dir / EVENTS_FILE

    def __call__(self, line: str) -> None:
        found = _REFUSED.search(line)
        if not found:
            return
        code, pem, why = found.groups()
        key = _fingerprint(pem)
        event: dict[str, Any] = {"time": timestamp(), "kind": "refused-activation", "flower_error": int(code),
                                 "key": key, "reason": (why or "").strip() or None}
        event.update(self._known_as(key))
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(event) + "\n")

    def _known_as(self, key: str | None) -> dict[str, Any]:
        """Which site's key it was, by the registry (a revoked site's key is named as such)."""
        try:
            sites = SiteRegistry(self.provision_dir).sites
        except Exception:  # a damaged registry must never stop the SuperLink's log
            return {}
        for name, entry in sites.items():
            if key is not None and entry.get("fingerprint") == key:
                return {"site": name, "revoked_at": entry.get("revoked_at")}
        return {"site": None}


def read_refusals(provision_dir: str | Path, since: str | None = None, until: str | None = None
                  ) -> list[dict[str, Any]]:
    """The refusals recorded in `provision_dir` between `since` and `until` (ISO times, inclusive)."""
    path = Path(provision_dir) / EVENTS_FILE
    if not path.is_file():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash of the SuperLink's supervisor
        t = str(event.get("time", ""))
        if (since is None or t >= since) and (until is None or t <= until):
            events.append(event)
    return events


def summarise_refusals(events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per key: who it was (if known), how many attempts, the first and the last."""
    by_key: dict[str, dict[str, Any]] = {}
    for e in events:
        key = str(e.get("key"))
        entry = by_key.setdefault(key, {"key": e.get("key"), "site": e.get("site"),
                                         "revoked": bool(e.get("revoked_at")), "attempts": 0,
                                         "first": e["time"], "last": e["time"]})
        entry["attempts"] += 1
        entry["last"] = e["time"]
    return sorted(by_key.values(), key=lambda x: x["first"])


def refusal_lines(summary: Iterable[dict[str, Any]]) -> list[str]:
    lines = []
    for s in summary:
        who = (f"the revoked key of {s['site']}" if s["revoked"] and s["site"] else
               f"a key registered to {s['site']}" if s["site"] else "an unregistered key")
        times = "once" if s["attempts"] == 1 else f"{s['attempts']} times"
        lines.append(f"refused connection: {who} ({s['key']}) tried {times}, {s['first']} to {s['last']}")
    return lines
