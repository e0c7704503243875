"""`llnm-server provision --config CONSORTIUM.yaml --out DIR [--ca-cert F --ca-key F]`: certificates and kits.

Creates (or reuses) the consortium's certificate authority, the SuperLink's TLS certificate for the hosts in
the consortium file, and one onboarding kit per site in DIR/kits/<site>/ (nothing secret: hand each to its
hospital). Run it again after adding a site: existing credentials are kept.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fl_server.config import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, metavar="CONSORTIUM.yaml",
                   help="the consortium file: name, superlink.address, superlink.hosts, sites")
    p.add_argument("--out", required=True, metavar="DIR", help="provisioning folder (keep ca/ca.key secret)")
    p.add_argument("--ca-cert", type=Path, help="an existing CA certificate to sign with (PEM)")
    p.add_argument("--ca-key", type=Path, help="its private key (PEM, unencrypted)")


def run(args: argparse.Namespace) -> int:
    from fl_server.consortium import load_consortium
    from fl_server.provisioning import CA_KEY, KITS, provision

    try:
        cfg = load_consortium(args.config)
        report = provision(cfg, Path(args.out), ca_cert=args.ca_cert, ca_key=args.ca_key)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = report.out
    print(f"provisioned {cfg.name} in {out}: {len(report.created)} file(s) written, {len(report.kept)} kept")
    for f in report.created:
        print(f"  + {f}")
    print(f"SuperLink certificate valid for: {', '.join(cfg.superlink.certificate_hosts())}")
    print(f"site kits (no secrets; send each to its hospital): {', '.join(str(out / KITS / s) for s in cfg.sites)}")
    print(f"keep secret: {out / CA_KEY} and {out / 'superlink/server.key'}")
    print(f"next: llnm-server start --provision {out}; then, per site, "
          f"llnm-server register-site --provision {out} --name SITE --public-key SITE.pub")
    return 0
