"""The site's own state outside its data folder: the apps it approved and its audit log.

Both live under the site's state folder: `--state-dir` of `llnm-site join|approve|audit`, else
`$LLNM_SITE_STATE_DIR`, else `~/.local/share/llnm-fl`. The folder must not be inside the site data folder
(nothing is ever written there).

* `approved-apps.json`: the SHA-256 of every Flower app bundle (FAB) the site agreed to run.
* `audit/<site>.jsonl`: one JSON object per line, appended and never rewritten; written by the site's app
  gate (`fl_client.app_gate`) around every ClientApp process, so it records what actually left the site
  whatever code the coordinator sent.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock

from shared_model.fileio import atomic_write_json
from shared_model.naming import safe_filename

ENV_STATE_DIR = "LLNM_SITE_STATE_DIR"
ENV_SITE_NAME = "LLNM_SITE_NAME"
APPROVALS_FILE = "approved-apps.json"
APPROVALS_FORMAT = "llnm-fl approved apps"
AUDIT_DIR = "audit"
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class SiteStateError(ValueError):
    """A bad approval, hash or state folder, with what is wrong."""


def state_root(explicit: str | os.PathLike[str] | None = None) -> Path:
    if explicit:
        return Path(explicit).expanduser().resolve()
    if os.environ.get(ENV_STATE_DIR):
        return Path(os.environ[ENV_STATE_DIR]).expanduser().resolve()
    return Path.home() / ".local" / "share" / "llnm-fl"


def check_outside(state: Path, data: Path) -> None:
    """Refuse a state folder inside (or equal to) the site's data folder."""
    s, d = state.resolve(), data.resolve()
    if s == d or d in s.parents:
        raise SiteStateError(f"state folder {s} is inside the site data folder {d}; the site's data folder is "
                             "never written to: choose --state-dir elsewhere")


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


# ---- approvals -------------------------------------------------------------------------------------------

def approvals_path(root: Path) -> Path:
    return root / APPROVALS_FILE


def load_approvals(root: Path) -> dict[str, dict[str, Any]]:
    """hash -> {approved_at, source, note}; an absent file approves nothing."""
    path = approvals_path(root)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SiteStateError(f"{path}: not valid JSON ({exc}); fix or remove it, then approve again") from None
    apps = data.get("apps") if isinstance(data, dict) else None
    if not isinstance(apps, dict):
        raise SiteStateError(f"{path}: expected {{\"apps\": {{HASH: {{...}}}}}}")
    return apps


def parse_hash(value: str) -> str:
    digest = value.strip().lower().removeprefix("sha256:")
    if not SHA256_HEX.match(digest):
        raise SiteStateError(f"{value!r} is neither a 64-hex-digit SHA-256 nor a .fab file")
    return digest


def approve(root: Path, digest: str, *, source: str, note: str = "") -> bool:
    """Add `digest` to the allow-list; False if it was already there."""
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(approvals_path(root)) + ".lock"):
        apps = load_approvals(root)
        if digest in apps:
            return False
        apps[digest] = {"approved_at": now_iso(), "source": source, "note": note}
        atomic_write_json(approvals_path(root), {"format": APPROVALS_FORMAT, "apps": apps}, indent=2)
    return True


def withdraw(root: Path, digest: str) -> bool:
    with FileLock(str(approvals_path(root)) + ".lock"):
        apps = load_approvals(root)
        if digest not in apps:
            return False
        del apps[digest]
        atomic_write_json(approvals_path(root), {"format": APPROVALS_FORMAT, "apps": apps}, indent=2)
    return True


# ---- audit log -------------------------------------------------------------------------------------------

def audit_path(root: Path, site: str) -> Path:
    return root / AUDIT_DIR / f"{safe_filename(site, fallback='site')}.jsonl"


def append_audit(path: Path, entry: dict[str, Any]) -> None:
    """Append one line under a lock, flushed to disk: concurrent ClientApp processes never interleave."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"time": now_iso(), **entry}, sort_keys=False, default=str) + "\n"
    with FileLock(str(path) + ".lock"), open(path, "a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def read_audit(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
    """(line number, entry or None when the line is not JSON, raw line)."""
    with open(path, encoding="utf-8") as fh:
        for i, raw in enumerate(fh, 1):
            raw = raw.rstrip("\n")
            if not raw.strip():
                continue
            try:
                entry = json.loads(raw)
            except json.JSONDecodeError:
                yield i, None, raw
                continue
            yield i, entry if isinstance(entry, dict) else None, raw
