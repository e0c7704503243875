"""`llnm-server revoke-site --provision DIR NAME`: unregister a site's key (Flower's `flwr supernode
unregister`). Its SuperNode is refused from its next request; the other sites keep their credentials."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fl_server.config import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME")
    p.add_argument("--provision", required=True, metavar="DIR", help="the provisioning folder")
    p.add_argument("--superlink", help="HOST:PORT of the SuperLink's control API (default: the consortium's)")


def run(args: argparse.Namespace) -> int:
    from fl_server.control import revoke_site

    try:
        entry = revoke_site(Path(args.provision), args.name, superlink=args.superlink)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"revoked {args.name} (key {entry['fingerprint']}, node id {entry['node_id']}) at {entry['revoked_at']}")
    return 0
