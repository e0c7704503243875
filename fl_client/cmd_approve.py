"""`llnm-site approve HASH|FILE.fab [--state-dir DIR]`: allow one app to run on this site's data.

The site's gate runs a ClientApp only if the SHA-256 of its Flower app bundle is on this list. Approve
the hash the coordinator announces (`llnm-server app-hash`), or a .fab file you reviewed, whose hash is
computed here. `--list` shows the list; `--withdraw HASH` removes one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import zipfile
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("app", nargs="?", metavar="HASH|FAB", help="a SHA-256 (64 hex digits) or a .fab file")
    p.add_argument("--note", default="", help="why, or who reviewed it (kept with the approval)")
    p.add_argument("--state-dir", help="the site's state folder (default $LLNM_SITE_STATE_DIR, else "
                                       "~/.local/share/llnm-fl)")
    p.add_argument("--list", action="store_true", help="print the approved apps")
    p.add_argument("--withdraw", metavar="HASH", help="remove an approval")
    p.add_argument("--json", action="store_true")


def _digest(value: str) -> tuple[str, str]:
    from fl_client.site_state import parse_hash

    path = Path(value)
    if path.is_file():
        data = path.read_bytes()
        if not zipfile.is_zipfile(path):
            raise ValueError(f"{path}: not a Flower app bundle (a .fab is a zip file)")
        with zipfile.ZipFile(path) as z:
            if "pyproject.toml" not in z.namelist():
                raise ValueError(f"{path}: no pyproject.toml inside; not a Flower app bundle")
        return hashlib.sha256(data).hexdigest(), str(path.resolve())
    return parse_hash(value), "hash"


def run(args: argparse.Namespace) -> int:
    from fl_client.site_state import SiteStateError, approvals_path, approve, load_approvals, state_root, withdraw

    root = state_root(args.state_dir)
    try:
        if args.withdraw:
            from fl_client.site_state import parse_hash

            digest = parse_hash(args.withdraw)
            removed = withdraw(root, digest)
            print(f"{'withdrew' if removed else 'was not approved:'} {digest} ({approvals_path(root)})")
            return 0
        if args.list or not args.app:
            apps = load_approvals(root)
            if args.json:
                print(json.dumps({"file": str(approvals_path(root)), "apps": apps}, indent=2))
            elif not apps:
                print(f"no approved apps ({approvals_path(root)})")
            else:
                for digest, meta in sorted(apps.items(), key=lambda kv: kv[1].get("approved_at", "")):
                    print(f"{digest}  {meta.get('approved_at', '')}  {meta.get('source', '')}  {meta.get('note', '')}")
            return 0
        digest, source = _digest(args.app)
        added = approve(root, digest, source=source, note=args.note)
    except (SiteStateError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{'approved' if added else 'already approved:'} {digest} in {approvals_path(root)}")
    return 0
