"""`llnm-site keygen --out DIR [--name NAME]`: this site's key pair for SuperNode authentication.

Writes DIR/NAME.key (private, mode 600: it never leaves the hospital) and DIR/NAME.pub (send it to the
coordinator for `llnm-server register-site`). The key is ECDSA P-384 in OpenSSH format, the form
`flower-supernode --auth-supernode-private-key` reads. An existing key is never overwritten.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=Path, help="folder for the key pair (outside the site data folder)")
    p.add_argument("--name", default="site", help="file name stem (default: site -> site.key, site.pub)")


def run(args: argparse.Namespace) -> int:
    from shared_model.protocol.site_kit import make_site_key, public_key_fingerprint

    private_path, public_path = args.out / f"{args.name}.key", args.out / f"{args.name}.pub"
    for path in (private_path, public_path):
        if path.exists():
            print(f"error: {path} exists; keygen never overwrites a key (move it away to make a new pair)",
                  file=sys.stderr)
            return 2
    args.out.mkdir(parents=True, exist_ok=True)
    private, public = make_site_key()
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private)
    public_path.write_bytes(public)
    print(f"private key: {private_path} (keep it on this machine; `llnm-site join --key {private_path}`)")
    print(f"public key:  {public_path} (send this file to the coordinator)")
    print(f"fingerprint: {public_key_fingerprint(public.strip())} (read it to the coordinator to confirm)")
    return 0
