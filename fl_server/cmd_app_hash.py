"""`llnm-server app-hash [--out FAB]`: the SHA-256 of the Flower app bundle that `llnm-server run` submits.

Sites approve exactly this hash (`llnm-site approve HASH`, or `llnm-site approve FILE.fab` after reading
the bundle written with `--out`); a run of any other code is refused at every site.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fl_server.config import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, help="also write the bundle (.fab, a zip) for sites to inspect")
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from fl_server.deployment import app_bundle

    try:
        fab, digest = app_bundle()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_bytes(fab)
    if args.json:
        print(json.dumps({"sha256": digest, "bytes": len(fab), "fab": str(args.out) if args.out else None}))
    else:
        print(digest)
        print(f"({len(fab)} bytes{'; written to ' + str(args.out) if args.out else ''})", file=sys.stderr)
    return 0
