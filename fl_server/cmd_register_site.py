"""`llnm-server register-site --provision DIR --name NAME --public-key FILE`: let one hospital's SuperNode in.

The site made its key pair with `llnm-site keygen` and sent only the `.pub`. This registers it with the
running SuperLink (Flower's `flwr supernode register KEY.pub --name NAME`), which from then on accepts a
SuperNode signing with that key, under that name and no other.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fl_server.config import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--provision", required=True, metavar="DIR", help="the provisioning folder")
    p.add_argument("--name", required=True, help="the site's name, as in the consortium file")
    p.add_argument("--public-key", required=True, type=Path, help="the site's OpenSSH public key (.pub)")
    p.add_argument("--superlink", help="HOST:PORT of the SuperLink's control API (default: the consortium's)")


def run(args: argparse.Namespace) -> int:
    from fl_server.control import register_site

    try:
        entry = register_site(Path(args.provision), args.name, args.public_key, superlink=args.superlink)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"registered {args.name}: key {entry['fingerprint']}, Flower node id {entry['node_id']}")
    return 0
