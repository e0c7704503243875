"""`llnm-site import uci-dtc|ddti SOURCE --out DIR [--sites K] [--seed S] [--check]`: a public data set as sites.

Writes K site folders `DIR/<dataset>-1..K` that pass `llnm-site check`, and `DIR/import.json` with every
count. Sites are patient-disjoint; the split into K simulated hospitals (and train/val/test within each) is
stratified by label, seeded, and recorded in each site's `site.yaml` (`import`). Records the source cannot
express in the contract are counted and printed, never dropped silently. SOURCE is only read.

    llnm-site import uci-dtc ../shared/data/uci_dtc --out data/uci --sites 3 --seed 0
    llnm-site import ddti ../shared/data/ddti --out data/ddti --sites 3 --seed 0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DATASETS = ("uci-dtc", "ddti")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", choices=DATASETS, help="which public data set SOURCE holds")
    p.add_argument("source", type=Path, help="the data set's folder (e.g. ../shared/data/uci_dtc); only read")
    p.add_argument("--out", required=True, type=Path, help="folder for the site folders (not inside SOURCE)")
    p.add_argument("--sites", type=int, default=3, help="simulated hospitals (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split into sites and splits (default 0)")
    p.add_argument("--check", action="store_true", help="run `llnm-site check` (deep) on every site written")


def run(args: argparse.Namespace) -> int:
    from fl_research.importers.common import SourceError, write_sites
    from fl_research.importers.ddti import read_ddti
    from fl_research.importers.uci_dtc import read_uci_dtc

    if not args.source.exists():
        print(f"error: {args.source} does not exist", file=sys.stderr)
        return 2
    try:
        result = read_uci_dtc(args.source) if args.dataset == "uci-dtc" else read_ddti(args.source)
        summary = write_sites(result, args.out, args.sites, args.seed, args.dataset)
    except SourceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.dataset}: {summary['records_read']} records read, {summary['patients_written']} patients written "
          f"into {args.sites} site(s) under {args.out} (seed {args.seed})")
    print(f"outcome: {summary['outcome']}")
    print("classes: " + ", ".join(f"{name} {n}" for name, n in summary["classes"].items()))
    if summary["not_expressed"]:
        print("not expressible in the contract (counted, not imported):")
        for reason, n in summary["not_expressed"].items():
            print(f"  {n:4d}  {reason}")
    else:
        print("not expressible in the contract: none")
    for reason, n in summary["notes"].items():
        print(f"  note: {n} {reason}")
    for name, site in summary["per_site"].items():
        parts = ", ".join(f"{split} {c['patients']} ({c['positive']}+/{c['negative']}-"
                          + (f"/{c['unlabelled']}?" if c["unlabelled"] else "") + ")"
                          for split, c in site["splits"].items())
        print(f"  {name}: {site['patients']} patients: {parts}")
    print(f"details: {args.out / 'import.json'}")
    if args.check:
        return _check_all(args.out, list(summary["per_site"]))
    return 0


def _check_all(out: Path, names: list[str]) -> int:
    from shared_model.sitedata.check import check_site

    status = 0
    for name in names:
        report = check_site(out / name, progress=False)
        print(f"check {name}: {'USABLE' if report.usable else 'NOT USABLE'}, {len(report.errors)} error(s), "
              f"{len(report.warnings)} warning(s)")
        for problem in report.errors[:10]:
            print(f"  {problem.format()}")
        status = status or (0 if report.usable else 1)
    return status
